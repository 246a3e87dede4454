"""Token-selective routing benchmarks (docs/benchmarks.md, "Token-selective routing").

``accuracy``: train the same small TokenFormer on scikit-learn's digits through ``ImageClassifier`` and
``DigitsDataModule`` with and without routing at the same budget (epochs, batch, recipe, seed, data order), then
evaluate the routed models at a sweep of thresholds: top-1 accuracy and TLOps fraction of each. Writes JSON and the
routed weights (safetensors).

``speed``: wall-clock inference throughput of ``tokenformer_small`` (224², CPU) with hard skipping vs the unrouted
model, over a threshold sweep. The gates are untrained (last layer scaled so that halting probabilities spread
over (0, 1)): speed depends only on how many tokens each block keeps, so each row reports the measured TLOps
fraction next to the speed-up. The unrouted and routed models share all other weights and are timed interleaved
in one process.

    python scripts/benchmarks/bench_routing.py accuracy --epochs 30 --out /tmp/routing_acc.json
    python scripts/benchmarks/bench_routing.py speed --batch 8 --reps 3 --out /tmp/routing_speed.json
    python scripts/benchmarks/bench_routing.py speed --device cuda --dtype bfloat16 --batch 64 --reps 10

Both accept ``--device cpu|cuda`` and ``--dtype float32|bfloat16|float16`` (accuracy: Lightning's ``32-true`` /
``bf16-mixed`` / ``16-mixed``; speed: ``torch.autocast``); timings are synchronised on CUDA.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import timm
import torch
from common import add_device_args, autocast, dtype_of, load, machine_info, resolve_device, timed

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import DigitsDataModule, ImageClassifier, TokenFormerViT

THRESHOLDS = (1.0, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35, 0.3, 0.25, 0.2)


PRECISION = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}


# -------------------------------------------------------------------------------------------- accuracy
@torch.no_grad()
def evaluate(model: TokenFormerViT, loader, device: torch.device, dtype: torch.dtype) -> dict:
    """Top-1 accuracy (%) and TLOps fraction (exact token counts) of ``model`` in eval mode over ``loader``."""
    model.eval().to(device)
    correct = total = 0
    processed = None
    tokens = 0
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        with autocast(device, dtype):
            logits = model(images)
        correct += int((logits.argmax(-1) == targets).sum())
        total += len(targets)
        if model.token_routing:
            stats = model.routing_stats()
            counts = stats.processed.sum(1).cpu()
            processed = counts if processed is None else processed + counts
            tokens += stats.processed.shape[1] * stats.tokens
    out = {"acc1": 100.0 * correct / total, "images": total, "tlops": 1.0}
    if processed is not None:
        fractions = processed.double() / tokens
        out.update(tlops=float(fractions.mean()), block_fractions=[round(float(f), 4) for f in fractions])
    return out


def train(routing: bool, penalty: float, args: argparse.Namespace) -> tuple[TokenFormerViT, dict]:
    """Train through the library's own path (ImageClassifier + DigitsDataModule + Lightning), same recipe, seed and
    data order for every run; only ``token_routing``/``routing_loss_weight`` differ."""
    L.seed_everything(args.seed, verbose=False)
    module = ImageClassifier(
        "tokenformer_tiny", num_classes=10, img_size=args.img_size, lr=args.lr, weight_decay=0.05,
        betas=(0.9, 0.95), warmup_epochs=2, min_lr=1e-5, label_smoothing=0.1,
        model_kwargs=dict(patch_size=args.patch_size, embed_dim=args.dim, depth=args.depth, num_heads=args.heads,
                          token_routing=routing, routing_loss_weight=penalty),
    )
    dm = DigitsDataModule(img_size=args.img_size, batch_size=args.batch, num_workers=0, seed=args.seed)
    trainer = L.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu", devices=1,
                        precision=PRECISION[args.dtype], logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, gradient_clip_val=1.0,
                        limit_val_batches=0, num_sanity_val_steps=0)
    start = time.perf_counter()
    trainer.fit(module, dm)
    return module.model, {"train_seconds": round(time.perf_counter() - start, 1),
                          "steps": trainer.global_step, "params": sum(p.numel() for p in module.model.parameters())}


def run_accuracy(args: argparse.Namespace) -> dict:
    device, dtype = resolve_device(args), dtype_of(args)
    dm = DigitsDataModule(img_size=args.img_size, batch_size=args.batch, num_workers=0, seed=args.seed)
    dm.setup("validate")
    val = dm.val_dataloader()
    result = {"command": "accuracy", "args": vars(args), "machine_start": machine_info(device), "runs": []}
    configs = [("off", False, 0.0)] + [(f"on, λ={p:g}", True, p) for p in args.penalties]
    for name, routing, penalty in configs:
        print(f"== {name}", flush=True)
        model, info = train(routing, penalty, args)
        run = {"name": name, "routing": routing, "penalty": penalty, **info}
        if routing:
            run["sweep"] = []
            for threshold in THRESHOLDS:
                model.routing_threshold = threshold
                run["sweep"].append({"threshold": threshold, **evaluate(model, val, device, dtype)})
                print(f"  threshold {threshold}: {run['sweep'][-1]}", flush=True)
            if args.save_dir:
                from safetensors.torch import save_file
                path = Path(args.save_dir) / f"digits_routed_l{penalty:g}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(path))
                run["weights"] = str(path)
        else:
            run["eval"] = evaluate(model, val, device, dtype)
            print(f"  eval: {run['eval']}", flush=True)
        result["runs"].append(run)
    result["machine_end"] = {"loadavg": load()}
    return result


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
    acc = sub.add_parser("accuracy", help="digits: accuracy and TLOps with vs without routing")
    add_device_args(acc)
    acc.add_argument("--epochs", type=int, default=30)
    acc.add_argument("--batch", type=int, default=64)
    acc.add_argument("--lr", type=float, default=2e-3)
    acc.add_argument("--img-size", type=int, default=32)
    acc.add_argument("--patch-size", type=int, default=4)
    acc.add_argument("--dim", type=int, default=96)
    acc.add_argument("--depth", type=int, default=6)
    acc.add_argument("--heads", type=int, default=3)
    acc.add_argument("--penalties", type=float, nargs="+", default=[0.0, 0.05],
                     help="routing_loss_weight of each routed run")
    acc.add_argument("--seed", type=int, default=0)
    acc.add_argument("--save-dir", default=None, help="save the routed models' weights here")
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
