#!/usr/bin/env python
"""Train small then grow (GrowthCallback) vs train at the final width from scratch, on the digits data.

    OMP_NUM_THREADS=1 python scripts/benchmarks/growth_vs_scratch.py --epochs 24 --grow-epoch 8 --seeds 0 1 \\
        --out docs/benchmarks/growth_digits.json

Model: tokenformer_tiny's shell at d 96, 4 blocks, 3 heads, 32x32 input in 8x8 patches (16 tokens); widths
grow 4x, from 24 attention / 96 FFN tokens to 96 / 384 (the "n = d" rule) at epoch 8 of 24 (1/3 of the run, like
epoch 100 of 300 in configs/imagenet/tokenformer_base_grow_large.yaml).

Arms (same seed, data order, optimizer and LR schedule; only the parameter-token counts differ):
  scratch  the final widths (attn/ffn tokens) for all epochs;
  grow     the start widths until ``--grow-epoch``, then GrowthCallback grows to the final widths;
  small    the start widths for all epochs (what growth adds over not growing).

Training compute is counted with ``torch.utils.flop_counter.FlopCounterMode`` on one training step
(forward + backward) at each width, times the steps run at that width; wall time is measured too (noisy on a
shared machine: the arms run one after the other in this process). For each arm the script reports the
cumulative training FLOPs and time at the first epoch whose val accuracy reaches the scratch run's final val
accuracy ("compute to target"), and the final accuracy.

``--device cpu|cuda`` and ``--dtype float32|bfloat16|float16`` pick the trainer's accelerator and precision
(``32-true`` / ``bf16-mixed`` / ``16-mixed``); on CUDA the per-step wall times are synchronised.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import lightning.pytorch as pl
import torch
from common import add_device_args, load, machine_info, resolve_device, sync
from lightning.pytorch.callbacks import Callback
from torch.utils.flop_counter import FlopCounterMode

from tokenformer_vision import DigitsDataModule, GrowthCallback, ImageClassifier


class Meter(Callback):
    """Per epoch: val accuracy, cumulative training FLOPs (FLOPs per step at the current width × steps) and
    cumulative training wall time (training batches only, validation excluded)."""

    def __init__(self, flops_per_step: dict[tuple[int, int], float]) -> None:
        self.flops_per_step = flops_per_step
        self.flops = 0.0
        self.seconds = 0.0
        self.history: list[dict[str, float]] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        sync(pl_module.device)
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        sync(pl_module.device)
        self.seconds += time.perf_counter() - self._t0
        m = pl_module.model
        self.flops += self.flops_per_step[(m.attn_tokens, m.ffn_tokens)]

    def on_validation_epoch_end(self, trainer, pl_module):
        if trainer.sanity_checking:
            return
        acc = trainer.callback_metrics.get("val/acc1")
        self.history.append({"epoch": trainer.current_epoch + 1, "val_acc1": float(acc),
                             "train_flops": self.flops, "train_seconds": self.seconds,
                             "attn_tokens": pl_module.model.attn_tokens, "ffn_tokens": pl_module.model.ffn_tokens})


def model_args(args: argparse.Namespace, attn: int, ffn: int) -> dict[str, Any]:
    return dict(model_name="tokenformer_tiny", img_size=args.img_size, lr=args.lr, weight_decay=0.05,
                betas=(0.9, 0.95), warmup_epochs=2, min_lr=1e-5, label_smoothing=0.1,
                model_kwargs=dict(patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
                                  num_heads=args.heads, attn_tokens=attn, ffn_tokens=ffn))


def step_flops(args: argparse.Namespace, attn: int, ffn: int) -> float:
    """FLOPs of one training step (forward + backward, batch_size images) at the given widths."""
    module = ImageClassifier(num_classes=10, **model_args(args, attn, ffn))
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch_size,))
    counter = FlopCounterMode(display=False)
    with counter:
        torch.nn.functional.cross_entropy(module.model(x), y).backward()
    return float(counter.get_total_flops())


def run_arm(args: argparse.Namespace, arm: str, seed: int, flops: dict) -> list[dict[str, float]]:
    pl.seed_everything(seed, verbose=False)
    start, final = tuple(args.start), tuple(args.final)
    widths = final if arm == "scratch" else start
    meter = Meter(flops)
    callbacks: list[Callback] = [meter]
    if arm == "grow":
        callbacks.append(GrowthCallback([{"epoch": args.grow_epoch, "attn_tokens": final[0], "ffn_tokens": final[1],
                                          "rewarm_steps": args.rewarm_steps}]))
    data = DigitsDataModule(img_size=args.img_size, batch_size=args.batch_size, num_workers=0, seed=0)
    module = ImageClassifier(num_classes=10, **model_args(args, *widths))
    precision = {"float32": "32-true", "bfloat16": "bf16-mixed", "float16": "16-mixed"}[args.dtype]
    trainer = pl.Trainer(accelerator="gpu" if args.device == "cuda" else "cpu", devices=1, precision=precision,
                         max_epochs=args.epochs, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         num_sanity_val_steps=0, callbacks=callbacks)
    trainer.fit(module, datamodule=data)
    return meter.history


def to_target(history: list[dict[str, float]], target: float) -> dict[str, float] | None:
    for row in history:
        if row["val_acc1"] >= target - 1e-9:
            return row
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_device_args(parser)
    parser.add_argument("--epochs", type=int, default=24)
    parser.add_argument("--grow-epoch", type=int, default=8)
    parser.add_argument("--start", type=int, nargs=2, default=[24, 96], metavar=("ATTN", "FFN"))
    parser.add_argument("--final", type=int, nargs=2, default=[96, 384], metavar=("ATTN", "FFN"))
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--embed-dim", type=int, default=96)
    parser.add_argument("--heads", type=int, default=3)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rewarm-steps", type=int, default=0)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--arms", nargs="+", default=["scratch", "grow", "small"],
                        choices=["scratch", "grow", "small"])
    parser.add_argument("--out", default=None, help="write all histories and the summary as JSON here")
    args = parser.parse_args()
    if "scratch" not in args.arms:
        parser.error("the 'scratch' arm sets the target accuracy; keep it in --arms")
    device = resolve_device(args)

    flops = {tuple(w): step_flops(args, *w) for w in (args.start, args.final)}
    print(f"training FLOPs per step: start {args.start}: {flops[tuple(args.start)] / 1e9:.3f} G, "
          f"final {args.final}: {flops[tuple(args.final)] / 1e9:.3f} G")
    results: dict[str, Any] = {"args": vars(args), "flops_per_step": {str(k): v for k, v in flops.items()},
                               "machine": machine_info(device),
                               "runs": {}}
    for seed in args.seeds:
        for arm in args.arms:
            t0 = time.perf_counter()
            history = run_arm(args, arm, seed, flops)
            results["runs"][f"{arm}/seed{seed}"] = history
            print(f"seed {seed} {arm:8s}: final val acc1 {history[-1]['val_acc1']:.4f}, "
                  f"{history[-1]['train_flops'] / 1e12:.2f} TFLOPs, {history[-1]['train_seconds']:.0f} s train, "
                  f"{time.perf_counter() - t0:.0f} s total")
    results["machine"]["load_after"] = load()

    print("\nCompute to reach the scratch run's final val acc1 (same seed):")
    print(f"{'seed':>4} {'arm':8s} {'target':>7} {'epoch':>5} {'TFLOPs':>7} {'train s':>8} {'FLOPs/scratch':>13} "
          f"{'time/scratch':>12} {'final acc1':>10}")
    summary = []
    for seed in args.seeds:
        scratch = results["runs"][f"scratch/seed{seed}"]
        target = scratch[-1]["val_acc1"]
        ref = to_target(scratch, target)
        for arm in args.arms:
            history = results["runs"][f"{arm}/seed{seed}"]
            hit = to_target(history, target)
            row = {"seed": seed, "arm": arm, "target": target, "final_acc1": history[-1]["val_acc1"],
                   "epoch": hit["epoch"] if hit else None,
                   "train_flops": hit["train_flops"] if hit else None,
                   "train_seconds": hit["train_seconds"] if hit else None,
                   "flops_ratio": hit["train_flops"] / ref["train_flops"] if hit else None,
                   "time_ratio": hit["train_seconds"] / ref["train_seconds"] if hit else None}
            summary.append(row)
            if hit:
                print(f"{seed:>4} {arm:8s} {target:7.4f} {hit['epoch']:5d} {hit['train_flops'] / 1e12:7.2f} "
                      f"{hit['train_seconds']:8.0f} {row['flops_ratio']:13.2f} {row['time_ratio']:12.2f} "
                      f"{row['final_acc1']:10.4f}")
            else:
                print(f"{seed:>4} {arm:8s} {target:7.4f} {'never':>5} {'-':>7} {'-':>8} {'-':>13} {'-':>12} "
                      f"{row['final_acc1']:10.4f}")
    results["summary"] = summary
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
