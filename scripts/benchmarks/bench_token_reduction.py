"""Token reduction on Fashion-MNIST: test accuracy against measured inference throughput, all in one run
(docs/benchmarks.md, "Token reduction on trained models").

One model family (a small TokenFormer at 40² in 4×4 patches: 100 patches + cls), Fashion-MNIST through
``IDXDataModule``, every model trained by :func:`benchlib.harness.train_eval` (``ImageClassifier`` + DataModule +
Lightning ``Trainer``, the shared recipe of ``benchlib.runs``). Per seed:

1. a base model is trained unrouted for ``--epochs``;
2. from its weights, each row is trained ``--finetune-epochs`` more with the same recipe, so that every row has the
   same training budget:
   - ``unrouted``: no routing (the reference);
   - ``threshold``: token-selective routing with ``routing_target`` (each of ``--targets``; the target annealed
     from 1 over ``--anneal`` of the fine-tune, a per-block minimum ``--min-fraction``), evaluated at the trained
     threshold;
   - ``capacity``: Mixture-of-Depths routing at each of ``--capacities``;
   (the routers are new parameters; ``--routed-from scratch`` trains the routed rows from scratch instead, for
   ``--epochs + --finetune-epochs``);
3. ``merging``: token merging (ToMe) at each of ``--merge-rates``, switched on in the trained ``unrouted`` model.

Accuracy is on the official test split (10,000 images), mean ± std over the seeds. Throughput: images/s at
``--infer-batch`` after warm-up, every model timed interleaved in this one process (median of ``--reps``). Work:
the fraction of the unrouted model's token-block operations executed (TLOps, exact; under merging the mean tokens
per block). For the routed models, the Pearson correlation between a patch's depth (blocks it went through) and its
pixel variance, raw and within patch position.

    # the defaults (d 48, 4 blocks, 40² at patch 4 = 100 patches, 3 seeds × (6 + 1) epochs, two runs at a time):
    # the table of docs/benchmarks.md, 57 min on an idle 2-core CPU (--epochs 10: the 10 + 1 table, 73 min)
    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_token_reduction.py --jobs 2 --threads 1 \\
        --save-weights /tmp/tr_weights --out-dir docs/benchmarks
    # one method alone, e.g. threshold routing at 0.6 without annealing, from saved base and unrouted weights
    python scripts/benchmarks/bench_token_reduction.py --from-weights /tmp/tr_ablation --targets 0.6 --capacities \\
        --merge-rates --anneal 0 --out-dir /tmp/tr_ablation_out --name threshold_ablation
    # the table again from the saved weights (no training: evaluation and timing only, a few minutes)
    python scripts/benchmarks/bench_token_reduction.py --from-weights /tmp/tr_weights --out-dir docs/benchmarks
    # GPU-sized: converged models
    python scripts/benchmarks/bench_token_reduction.py --device cuda --precision bf16-mixed --dim 192 \\
        --depth 6 --heads 3 --epochs 30 --finetune-epochs 10 --infer-batch 512 --out-dir /tmp/tr_gpu
    # smoke run (a minute)
    python scripts/benchmarks/bench_token_reduction.py --seeds 0 --epochs 1 --finetune-epochs 1 \\
        --limit-train-batches 3 --limit-test-images 256 --reps 2 --out-dir /tmp/tr_smoke

Writes ``token_reduction_fmnist.json``, ``token_reduction_fmnist.md`` (the table) and
``token_reduction_fmnist_pareto.png``; ``--save-weights DIR`` also every trained model's weights
(``{row}_s{seed}.safetensors``, loadable by ``routing_map.py`` and by ``--from-weights``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import multiprocessing
import statistics
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib.common import autocast, load, machine_info, time_interleaved  # noqa: E402
from benchlib.runs import add_recipe_args, recipe  # noqa: E402

PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16}


# ------------------------------------------------------------------------------------------------- models
def model_kwargs(args: argparse.Namespace, routing: dict[str, Any]) -> dict[str, Any]:
    """timm ``create_model`` arguments of one row (routing options other than the constructor's are set by
    :func:`configure_routing`)."""
    kwargs = {k: v for k, v in routing.items() if k not in ("min_fraction", "anneal_steps")}
    return dict(embed_dim=args.dim, depth=args.depth, num_heads=args.heads, patch_size=args.patch_size, in_chans=1,
                global_pool=args.pool, **kwargs)


def configure_routing(model: torch.nn.Module, routing: dict[str, Any]) -> None:
    """Threshold routing's training options (per-block minimum, target annealing) on the model's routing config."""
    if getattr(model, "routing", None) is not None:
        for key in ("min_fraction", "anneal_steps"):
            if key in routing:
                setattr(model.routing, key, routing[key])


def build_model(args: argparse.Namespace, routing: dict[str, Any]) -> torch.nn.Module:
    import timm

    import tokenformer_vision  # noqa: F401  (registers the models)

    model = timm.create_model("tokenformer_tiny", num_classes=10, img_size=args.img_size,
                              **model_kwargs(args, routing))
    configure_routing(model, routing)
    return model


def datamodule(args: argparse.Namespace):
    from tokenformer_vision.data import FASHION_MNIST_CLASSES, IDXDataModule

    return IDXDataModule(args.root, img_size=args.img_size, batch_size=args.batch_size, num_workers=args.workers,
                         class_names=FASHION_MNIST_CLASSES, crop_padding=args.crop_padding,
                         random_erasing=args.random_erasing, seed=0, persistent_workers=args.workers > 0)


def test_set(args: argparse.Namespace, device: torch.device) -> tuple[list, torch.Tensor]:
    """The test split's ``(images, targets)`` batches (at most ``--limit-test-images``) and one inference batch of
    ``--infer-batch`` test images (repeated if there are fewer) on ``device``."""
    dm = datamodule(args)
    dm.setup("test")
    test, seen = [], 0
    for x, y, *_ in dm.test_dataloader():
        if args.limit_test_images and seen >= args.limit_test_images:
            break
        test.append((x, y))
        seen += len(y)
    infer_x = torch.cat([x for x, _ in test])[: args.infer_batch]
    infer_x = torch.cat([infer_x] * math.ceil(args.infer_batch / len(infer_x)))[: args.infer_batch].to(device)
    return test, infer_x


def steps_per_epoch(args: argparse.Namespace) -> int:
    """Optimizer steps of one epoch (55,000 training images after the 5,000 validation hold-out, drop_last)."""
    steps = 55_000 // args.batch_size
    if args.limit_train_batches:
        limit = args.limit_train_batches
        steps = int(limit) if limit >= 1 else max(1, int(steps * limit))
    return steps


def train(args: argparse.Namespace, name: str, seed: int, routing: dict[str, Any], epochs: float,
          init: dict[str, torch.Tensor] | None, lr: float, warmup_epochs: float) -> dict[str, Any]:
    """One training run through the shared harness (a worker process); returns the model's weights and timings.
    ``epochs`` below 1: one epoch limited to that fraction of the training batches."""
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    if args.threads:
        torch.set_num_threads(args.threads)
    from benchlib.harness import train_eval

    from tokenformer_vision import ImageClassifier

    def build() -> ImageClassifier:
        module = ImageClassifier("tokenformer_tiny", num_classes=10, img_size=args.img_size,
                                 model_kwargs=model_kwargs(args, routing),
                                 **{**recipe(args), "lr": lr, "warmup_epochs": warmup_epochs})
        configure_routing(module.model, routing)
        if init is not None:  # the base model's weights; a routed model's routers are its only new parameters
            missing, unexpected = module.model.load_state_dict(init, strict=False)
            if unexpected or any(".router." not in k for k in missing):
                raise ValueError(f"{name}: the base weights do not fit ({missing=}, {unexpected=})")
        return module

    limits: dict[str, Any] = {}
    if epochs < 1:
        limits["limit_train_batches"] = epochs
    if args.limit_train_batches:
        limits.update(limit_train_batches=args.limit_train_batches, limit_val_batches=2)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = train_eval(build, datamodule(args), max_epochs=max(1, round(epochs)), seed=seed, accelerator=device,
                        precision=args.precision, gradient_clip_val=1.0, test=False, **limits)
    state = {k.removeprefix("model."): v for k, v in result.state_dict.items() if k.startswith("model.")}
    val_acc1 = [h.get("val/acc1") for h in result.history]
    return {"state": state, "train_wall_s": round(result.train_wall_s, 1),
            "train_images_per_s": round(result.train_images_per_s, 1), "train_flops": result.train_flops,
            "val_acc1": val_acc1[-1] if val_acc1 else None, "val_acc1_per_epoch": val_acc1}


# --------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def evaluate(model: torch.nn.Module, test: list, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """Top-1 (%), the fraction of token-block work done and, for a routed model, the depth–pixel-variance
    correlations, over the test batches."""
    model.eval().to(device)
    correct = total = 0
    work: list[float] = []
    hooks = [b.register_forward_hook(lambda m, i, o: work.append((i[0].shape[1] + o.shape[1]) / 2))
             for b in model.blocks] if model.merge_tokens else []
    depths, variances, tlops = [], [], []
    for images, targets in test:
        with autocast(device, dtype):
            logits = model(images.to(device))
        correct += int((logits.argmax(-1).cpu() == targets).sum())
        total += len(targets)
        if model.token_routing:
            tlops.append(model.routing_stats().tlops * len(targets))
            depths.append(model.routing_depth_map()[:, model.num_prefix_tokens:].float().cpu())
            p = model.patch_embed.patch_size[0]
            variances.append(F.unfold(images, kernel_size=p, stride=p).var(dim=1))  # [B, N] in grid order
    for h in hooks:
        h.remove()
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    out: dict[str, Any] = {"acc1": 100.0 * correct / total, "images": total}
    if work:
        out["work"] = sum(work) / len(work) / n0
    if tlops:
        out["work"] = sum(tlops) / total
        d, v = torch.cat(depths), torch.cat(variances)
        out["pearson_depth_variance"] = pearson(d, v)
        out["pearson_within_position"] = pearson(d - d.mean(0), v - v.mean(0))
    return out


def pearson(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    denom = float(a.norm() * b.norm())
    return float((a * b).sum()) / denom if denom > 0 else float("nan")


# ------------------------------------------------------------------------------------------------ reports
def pareto_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"unrouted": "black", "threshold": "tab:blue", "capacity": "tab:orange", "merging": "tab:green"}
    for method, color in colors.items():
        pts = sorted((r for r in rows if r["method"] == method), key=lambda r: r["img_per_s"])
        if not pts:
            continue
        ax.errorbar([r["img_per_s"] for r in pts], [r["acc1"] for r in pts], yerr=[r["acc1_std"] for r in pts],
                    fmt="o-" if len(pts) > 1 else "s", color=color, label=method, capsize=3)
        for r in pts:
            ax.annotate(r["setting"], (r["img_per_s"], r["acc1"]), textcoords="offset points", xytext=(4, 4),
                        fontsize=7, color=color)
    base = next(r for r in rows if r["method"] == "unrouted")
    ax.axhline(base["acc1"] - 0.5, color="grey", lw=0.8, ls="--", label="unrouted − 0.5 pt")
    ax.axvline(1.5 * base["img_per_s"], color="grey", lw=0.8, ls=":", label="1.5× unrouted")
    ax.set_xlabel("inference throughput (images/s)")
    ax.set_ylabel("test top-1 (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | setting | test top-1 % (mean ± std) | Δ pt | images/s | speed-up | work | train img/s | "
             "r(depth, var) | r within position |", "|" + "---|" * 10]

    def fmt(r: dict, key: str, spec: str = ".2f") -> str:
        return format(r[key], spec) if r.get(key) is not None else "–"

    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['acc1']:.2f} ± {r['acc1_std']:.2f} | "
                     f"{r['delta_pt']:+.2f} | {r['img_per_s']:.0f} | {r['speedup']:.2f}× | {fmt(r, 'work', '.3f')} | "
                     f"{fmt(r, 'train_images_per_s', '.0f')} | {fmt(r, 'pearson_depth_variance', '.3f')} | "
                     f"{fmt(r, 'pearson_within_position', '.3f')} |")
    return "\n".join(lines) + "\n"


def summarise(runs: dict[tuple[str, str], list[dict]], times: dict, args: argparse.Namespace) -> list[dict]:
    rows = []
    for (method, setting), results in runs.items():
        speeds = [args.infer_batch / statistics.median(times[(method, setting, r["seed"])]) for r in results]
        accs = [r["acc1"] for r in results]
        row = {"method": method, "setting": setting, "acc1": statistics.mean(accs),
               "acc1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "acc1_seeds": accs,
               "img_per_s": statistics.mean(speeds), "img_per_s_seeds": [round(s, 1) for s in speeds],
               "runs": results}
        for key in ("work", "train_images_per_s", "pearson_depth_variance", "pearson_within_position"):
            if all(r.get(key) is not None for r in results):
                row[key] = statistics.mean(r[key] for r in results)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["delta_pt"] = row["acc1"] - base["acc1"]
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
    return rows


# ---------------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_args(parser, epochs=6)
    parser.set_defaults(patch_size=4, depth=4, jobs=2, workers=0, lr=2e-3, warmup_epochs=0.5)
    parser.add_argument("--img-size", type=int, default=40,
                        help="input size (Fashion-MNIST resized once; 40 at patch 4: 100 patches)")
    parser.add_argument("--dim", type=int, default=48)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--pool", default="avg", help="global_pool: 'avg' (size-weighted under merging) or 'token'")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--finetune-epochs", type=float, default=1.0,
                        help="epochs of every row after the base model (below 1: that fraction of one epoch)")
    parser.add_argument("--finetune-lr", type=float, default=5e-4)
    parser.add_argument("--routed-from", choices=["unrouted", "scratch"], default="unrouted",
                        help="routed rows: fine-tuned from the base model, or trained from scratch")
    parser.add_argument("--targets", type=float, nargs="*", default=[0.75, 0.6], help="threshold routing_target")
    parser.add_argument("--anneal", type=float, default=0.5,
                        help="threshold routing: fraction of the routed training over which the target is annealed")
    parser.add_argument("--min-fraction", type=float, default=0.25,
                        help="threshold routing: per-block minimum fraction of patch tokens processed")
    parser.add_argument("--capacities", type=float, nargs="*", default=[0.75, 0.5])
    parser.add_argument("--merge-rates", type=int, nargs="*", default=[8, 12, 16, 20, 24])
    parser.add_argument("--infer-batch", type=int, default=128)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--limit-test-images", type=int, default=None, help="smoke runs: test images evaluated")
    parser.add_argument("--from-weights", default=None,
                        help="folder of --save-weights files: rows found there are loaded instead of trained")
    parser.add_argument("--save-weights", default=None, help="save every trained model here (safetensors)")
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--name", default="token_reduction_fmnist", help="stem of the output files")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    args.device = device.type
    dtype = PRECISION_DTYPE.get(args.precision, torch.float32)
    info = machine_info(device)
    started = time.perf_counter()

    test, infer_x = test_set(args, device)

    routed_epochs = args.epochs + args.finetune_epochs if args.routed_from == "scratch" else args.finetune_epochs
    anneal_steps = int(args.anneal * routed_epochs * steps_per_epoch(args))
    threshold = dict(token_routing=True, min_fraction=args.min_fraction, anneal_steps=anneal_steps)
    configs = [("unrouted", "–", {})]
    configs += [("threshold", f"target {t:g}", dict(threshold, routing_target=t)) for t in args.targets]
    configs += [("capacity", f"capacity {c:g}", dict(token_routing=True, routing_capacity=c))
                for c in args.capacities]

    def weights_path(folder: str | None, row: str, seed: int) -> Path | None:
        return Path(folder) / f"{row}_s{seed}.safetensors" if folder else None

    def row_name(method: str, setting: str) -> str:
        return method if method == "unrouted" else f"{method}_{setting.split()[-1]}"

    def saved(row: str, seed: int) -> dict[str, torch.Tensor] | None:
        path = weights_path(args.from_weights, row, seed)
        if path is None or not path.exists():
            return None
        from safetensors.torch import load_file

        return load_file(str(path))

    def save(row: str, seed: int, state: dict[str, torch.Tensor]) -> None:
        if args.save_weights:
            from safetensors.torch import save_file

            path = weights_path(args.save_weights, row, seed)
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.contiguous() for k, v in state.items()}, str(path))

    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    base_runs: dict[int, dict[str, Any]] = {}  # the base models' training (per-epoch validation: converged?)
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, args.jobs), mp_context=ctx) as pool:
        # stage 1: the base models (skipped for seeds whose every row is saved, or whose base is)
        bases: dict[int, Any] = {}
        for seed in args.seeds:
            if all(saved(row_name(m, s), seed) is not None for m, s, _ in configs):
                continue
            state = saved("base", seed)
            bases[seed] = state if state is not None else pool.submit(
                train, args, "base", seed, {}, args.epochs, None, args.lr, args.warmup_epochs)
        # stage 2: every row from its seed's base (a routed row from scratch needs none)
        futures = {}
        for seed in args.seeds:
            for method, setting, routing in configs:
                row = row_name(method, setting)
                if (state := saved(row, seed)) is not None:
                    results[(method, setting, seed)] = {"state": state, "loaded": True}
                    continue
                if method != "unrouted" and args.routed_from == "scratch":
                    futures[(method, setting, seed)] = pool.submit(
                        train, args, row, seed, routing, routed_epochs, None, args.lr, args.warmup_epochs)
                    continue
                base = bases[seed]
                if not isinstance(base, dict):
                    out = base.result()
                    save("base", seed, out["state"])
                    print(f"seed {seed} base: {out['train_images_per_s']} train img/s, val acc1 per epoch "
                          f"{out['val_acc1_per_epoch']}", flush=True)
                    bases[seed] = base = out["state"]
                    base_runs[seed] = {k: v for k, v in out.items() if k != "state"}
                futures[(method, setting, seed)] = pool.submit(
                    train, args, row, seed, routing, args.finetune_epochs, base, args.finetune_lr,
                    min(args.warmup_epochs, 0.1 * args.finetune_epochs))
        for key, future in futures.items():
            results[key] = future.result()
            save(row_name(*key[:2]), key[2], results[key]["state"])
            print(f"trained {key}: {results[key]['train_images_per_s']} train img/s", flush=True)

    runs: dict[tuple[str, str], list[dict]] = {}
    models: dict[tuple[str, str, int], torch.nn.Module] = {}
    for method, setting, routing in configs:
        for seed in args.seeds:
            out = results[(method, setting, seed)]
            model = build_model(args, routing)
            model.load_state_dict(out["state"])
            model.eval()
            result = {"seed": seed, **{k: v for k, v in out.items() if k != "state"},
                      **evaluate(model, test, device, dtype)}
            runs.setdefault((method, setting), []).append(result)
            models[(method, setting, seed)] = model
            print(f"seed {seed} {method} {setting}: { {k: v for k, v in result.items() if k != 'train_flops'} }",
                  flush=True)
    for r in args.merge_rates:  # no retraining: the trained unrouted model with merging switched on
        for seed in args.seeds:
            model = copy.deepcopy(models[("unrouted", "–", seed)])
            model.merge_tokens = r
            result = {"seed": seed, **evaluate(model, test, device, dtype)}
            runs.setdefault(("merging", f"r={r}"), []).append(result)
            models[("merging", f"r={r}", seed)] = model
            print(f"seed {seed} merging r={r}: {result}", flush=True)

    print(f"timing {len(models)} models, batch {args.infer_batch}, {args.reps} interleaved reps", flush=True)
    fns = {key: (lambda m: lambda: m(infer_x))(model.to(device).eval()) for key, model in models.items()}
    with torch.inference_mode(), autocast(device, dtype):
        times = time_interleaved(fns, reps=args.reps, warmup=args.warmup, device=device)

    rows = summarise(runs, times, args)
    ok = [r for r in rows if r["delta_pt"] >= -0.5]
    best = max(ok, key=lambda r: r["speedup"])
    thresholds = [r for r in rows if r["method"] == "threshold"]
    goals = {
        "best_within_0.5pt": f"{best['method']} {best['setting']}: {best['speedup']:.2f}× at "
                             f"{best['delta_pt']:+.2f} pt",
        "throughput_goal_1.5x_reached": best["speedup"] >= 1.5,
        "threshold_rows": [f"{r['setting']}: {r['delta_pt']:+.2f} pt, {r['speedup']:.2f}×, work {r['work']:.3f}"
                           for r in thresholds],
        "threshold_goal_within_1pt_and_faster": any(r["delta_pt"] >= -1.0 and r["speedup"] > 1.0 for r in thresholds),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "machine_start": info, "machine_end": {"loadavg": load()},
              "wall_seconds": round(time.perf_counter() - started, 1), "goals": goals,
              "base_runs": base_runs, "rows": rows}
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{args.name}.md").write_text(markdown(rows))
    title = (f"Fashion-MNIST {args.img_size}² patch {args.patch_size}, d {args.dim}, depth {args.depth}, "
             f"{args.epochs}+{args.finetune_epochs:g} epochs"
             + (f" of {args.limit_train_batches:g} batches" if args.limit_train_batches else "")
             + f", {len(args.seeds)} seed(s); {info['cpu']}, "
             f"batch {args.infer_batch}")
    pareto_plot(rows, out / f"{args.name}_pareto.png", title)
    print(markdown(rows))
    print(json.dumps(goals, indent=1))


if __name__ == "__main__":
    main()
