"""Token-selective routing benchmarks (docs/benchmarks.md, "Token-selective routing").

``accuracy``: on Fashion-MNIST (``IDXDataModule``, patch 2: 196 patches + cls), train the same small TokenFormer
without routing and with threshold routing at each ``--targets`` (``routing_target``, annealed from 1 over
``--anneal`` of training, per-block minimum ``--min-fraction``), same recipe, seed and data order, through
:func:`benchlib.harness.train_eval` (``ImageClassifier`` + DataModule + ``Trainer``). Then evaluate each routed model
at a sweep of thresholds on the test split: top-1, TLOps fraction and inference images/s, timed interleaved with
the unrouted model in this process. Mean over ``--seeds``. Writes JSON; ``--save-weights`` keeps the trained
models (safetensors) and ``--from-weights`` reuses them (evaluation and timing only).

``speed``: wall-clock inference throughput of ``tokenformer_small`` (224²) with hard skipping vs the unrouted
model, over a threshold sweep. The gates are untrained (last layer scaled so that keep probabilities spread over
(0, 1)): speed depends only on how many tokens each block keeps, so each row reports the measured TLOps fraction
next to the speed-up. The unrouted and routed models share all other weights and are timed interleaved.

    # CPU defaults (d 48, depth 4, 4 epochs, 1 seed, the two runs in parallel on a 2-core machine): about 35 min,
    # estimated from the measured training throughput
    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_routing.py accuracy --threads 1 --out /tmp/routing_acc.json
    python scripts/benchmarks/bench_routing.py accuracy --device cuda --precision bf16-mixed --dim 192 --depth 6 \
        --heads 3 --epochs 30 --seeds 0 1 2 --out /tmp/routing_acc_gpu.json
    # smoke run (a minute or two)
    python scripts/benchmarks/bench_routing.py accuracy --epochs 1 --limit-train-batches 3 \
        --limit-test-images 256 --thresholds 1.0 0.5 --reps 2 --out /tmp/routing_smoke.json
    python scripts/benchmarks/bench_routing.py speed --batch 8 --reps 3 --out /tmp/routing_speed.json
    python scripts/benchmarks/bench_routing.py speed --device cuda --dtype bfloat16 --batch 64 --reps 10

``accuracy`` takes Lightning's ``--precision`` (``32-true``, ``bf16-mixed``; evaluation runs under the matching
autocast), ``speed`` takes ``--dtype float32|bfloat16|float16`` (``torch.autocast``); both take ``--device``.
Timings are synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import timm
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_token_reduction import (  # noqa: E402  (this folder: the script's own, first on sys.path)
    PRECISION_DTYPE,
    build_model,
    evaluate,
    steps_per_epoch,
    test_set,
    train,
)
from benchlib.common import (  # noqa: E402
    add_device_args,
    autocast,
    dtype_of,
    load,
    machine_info,
    resolve_device,
    time_interleaved,
    timed,
)
from benchlib.runs import add_recipe_args  # noqa: E402

import tokenformer_vision  # noqa: E402, F401  (registers the models)

THRESHOLDS = (1.0, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3)


# -------------------------------------------------------------------------------------------- accuracy
def run_accuracy(args: argparse.Namespace) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = device.type
    dtype = PRECISION_DTYPE.get(args.precision, torch.float32)
    test, infer_x = test_set(args, device)
    anneal_steps = int(args.anneal * args.epochs * steps_per_epoch(args))
    configs = [("unrouted", {})] + [
        (f"target_{t:g}", dict(token_routing=True, routing_target=t, min_fraction=args.min_fraction,
                               anneal_steps=anneal_steps)) for t in args.targets]
    result = {"command": "accuracy", "args": vars(args), "machine_start": machine_info(device), "runs": []}
    states, infos = {}, {}
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {}
        for seed in args.seeds:
            for name, routing in configs:
                path = Path(args.from_weights or "") / f"{name}_s{seed}.safetensors"
                if args.from_weights and path.exists():
                    from safetensors.torch import load_file

                    states[(name, seed)], infos[(name, seed)] = load_file(str(path)), {"loaded": str(path)}
                    continue
                futures[(name, seed)] = pool.submit(train, args, name, seed, routing, args.epochs, None, args.lr,
                                                    args.warmup_epochs)
        for key, future in futures.items():
            out = future.result()
            states[key] = out.pop("state")
            infos[key] = out
            print(f"trained {key}: {out}", flush=True)
            if args.save_weights:
                from safetensors.torch import save_file

                Path(args.save_weights).mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in states[key].items()},
                          str(Path(args.save_weights) / f"{key[0]}_s{key[1]}.safetensors"))
    for seed in args.seeds:
        models = {}
        for name, routing in configs:
            models[name] = build_model(args, routing)
            models[name].load_state_dict(states[(name, seed)])
            models[name].eval().to(device)
        base = models["unrouted"]
        run = {"seed": seed, "unrouted": {**infos[("unrouted", seed)], **evaluate(base, test, device, dtype)},
               "routed": {}}
        print(f"seed {seed} unrouted: {run['unrouted']}", flush=True)
        fns = {("unrouted", None): lambda m=base: m(infer_x)}
        for name, _ in configs[1:]:
            sweep = []
            for threshold in args.thresholds:
                models[name].routing_threshold = threshold
                sweep.append({"threshold": threshold, **evaluate(models[name], test, device, dtype)})
                print(f"  seed {seed} {name} threshold {threshold}: {sweep[-1]}", flush=True)

                def call(m=models[name], t=threshold):
                    m.routing_threshold = t
                    return m(infer_x)

                fns[(name, threshold)] = call
            run["routed"][name] = {**infos[(name, seed)], "sweep": sweep}
        with torch.inference_mode(), autocast(device, dtype):
            times = time_interleaved(fns, reps=args.reps, warmup=args.warmup, device=device)
        base_s = statistics.median(times[("unrouted", None)])
        run["unrouted"]["img_per_s"] = args.infer_batch / base_s
        for name, routed in run["routed"].items():
            for row in routed["sweep"]:
                t = statistics.median(times[(name, row["threshold"])])
                row.update(img_per_s=args.infer_batch / t, speedup=base_s / t)
        result["runs"].append(run)
    result["summary"] = summarise_accuracy(result["runs"], configs)
    result["machine_end"] = {"loadavg": load()}
    print(json.dumps(result["summary"], indent=1))
    return result


def summarise_accuracy(runs: list[dict], configs: list) -> dict:
    """Mean over seeds: the unrouted model's top-1 and images/s; each routed model's per threshold."""
    def mean(values: list[float]) -> float:
        return round(statistics.fmean(values), 4)

    out = {"unrouted": {"acc1": mean([r["unrouted"]["acc1"] for r in runs]),
                        "img_per_s": mean([r["unrouted"]["img_per_s"] for r in runs])}}
    for name, _ in configs[1:]:
        rows = []
        for i, row in enumerate(runs[0]["routed"][name]["sweep"]):
            rows.append({"threshold": row["threshold"],
                         **{k: mean([r["routed"][name]["sweep"][i][k] for r in runs])
                            for k in ("acc1", "work", "img_per_s", "speedup")},
                         "delta_pt": mean([r["routed"][name]["sweep"][i]["acc1"] - r["unrouted"]["acc1"]
                                           for r in runs])})
        out[name] = rows
    return out


# ----------------------------------------------------------------------------------------------- speed
@torch.inference_mode()
def run_speed(args: argparse.Namespace) -> dict:
    device, dtype = resolve_device(args), dtype_of(args)
    info = machine_info(device)
    torch.manual_seed(0)
    base = timm.create_model(args.model, img_size=args.img, num_classes=1000).eval().to(device)
    routed = timm.create_model(args.model, img_size=args.img, num_classes=1000, token_routing=True).eval().to(device)
    missing, unexpected = routed.load_state_dict(base.state_dict(), strict=False)
    assert not unexpected and all(".router." in k for k in missing)
    with torch.no_grad():  # spread the untrained gates' halting probabilities over (0, 1)
        for block in routed.blocks[1:]:
            block.router.fc2.weight.mul_(args.gate_scale)
    x = torch.randn(args.batch, 3, args.img, args.img, generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device, dtype):
        base(x), routed(x)  # warm-up (allocator, kernels)
    base_times: list[float] = []
    rows = {t: {"threshold": t, "times": []} for t in args.thresholds}
    for rep in range(args.reps):
        for threshold in (None, *args.thresholds):  # interleaved: load drifts hit all configs alike
            model = base if threshold is None else routed
            if threshold is not None:
                routed.routing_threshold = threshold
            with timed(device, base_times if threshold is None else rows[threshold]["times"]), \
                    autocast(device, dtype):
                model(x)
            if threshold is not None:
                rows[threshold]["tlops"] = routed.routing_stats().tlops
        print(f"  rep {rep + 1}/{args.reps} done, load {load()[0]:.1f}", flush=True)
    base_s = statistics.median(base_times)
    table = []
    for row in rows.values():
        t = statistics.median(row["times"])
        table.append({"threshold": row["threshold"], "tlops": round(row["tlops"], 4), "seconds": round(t, 3),
                      "img_per_s": round(args.batch / t, 2), "speedup": round(base_s / t, 3),
                      "times": [round(v, 3) for v in row["times"]]})
        print(f"  threshold {row['threshold']}: TLOps {row['tlops']:.3f}, {t:.3f}s, speed-up {base_s / t:.2f}x",
              flush=True)
    return {"command": "speed", "args": vars(args), "machine_start": info,
            "unrouted": {"seconds": round(base_s, 3), "img_per_s": round(args.batch / base_s, 2),
                         "times": [round(v, 3) for v in base_times]},
            "routed": table, "machine_end": {"loadavg": load()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    acc = sub.add_parser("accuracy", help="Fashion-MNIST: accuracy, TLOps and speed with vs without routing")
    add_recipe_args(acc, epochs=4)
    acc.set_defaults(patch_size=2, depth=4, jobs=2, workers=0, lr=2e-3, warmup_epochs=0.5)
    acc.add_argument("--img-size", type=int, default=28, help="input size (Fashion-MNIST upscaled above 28)")
    acc.add_argument("--dim", type=int, default=48)
    acc.add_argument("--heads", type=int, default=2)
    acc.add_argument("--pool", default="avg")
    acc.add_argument("--seeds", type=int, nargs="+", default=[0])
    acc.add_argument("--targets", type=float, nargs="+", default=[0.6], help="routing_target of each routed run")
    acc.add_argument("--anneal", type=float, default=0.5, help="fraction of training over which the target anneals")
    acc.add_argument("--min-fraction", type=float, default=0.25, help="per-block minimum fraction processed")
    acc.add_argument("--thresholds", type=float, nargs="+", default=list(THRESHOLDS))
    acc.add_argument("--infer-batch", type=int, default=128)
    acc.add_argument("--reps", type=int, default=5)
    acc.add_argument("--warmup", type=int, default=2)
    acc.add_argument("--limit-test-images", type=int, default=None, help="smoke runs: test images evaluated")
    acc.add_argument("--from-weights", default=None, help="folder of --save-weights files to reuse")
    acc.add_argument("--save-weights", default=None, help="save the trained models here (safetensors)")
    acc.add_argument("--out", default=None)
    spd = sub.add_parser("speed", help="inference throughput vs kept fraction (hard skipping)")
    add_device_args(spd)
    spd.add_argument("--model", default="tokenformer_small")
    spd.add_argument("--img", type=int, default=224)
    spd.add_argument("--batch", type=int, default=8)
    spd.add_argument("--reps", type=int, default=3)
    spd.add_argument("--gate-scale", type=float, default=30.0)
    spd.add_argument("--thresholds", type=float, nargs="+", default=[1.0, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3])
    spd.add_argument("--out", default=None)
    args = parser.parse_args()
    result = run_accuracy(args) if args.command == "accuracy" else run_speed(args)
    text = json.dumps(result, indent=1)
    if args.out:
        Path(args.out).write_text(text)
    print(text)


if __name__ == "__main__":
    main()
