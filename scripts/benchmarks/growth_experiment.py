#!/usr/bin/env python
"""Does growth pay? Train small and grow (GrowthCallback) vs the large and the small model from scratch, on digits.

    OMP_NUM_THREADS=1 .venv/bin/python scripts/benchmarks/growth_experiment.py --seeds 0 1 2 --jobs 2 \\
        --arms large small grow_1/4 grow_1/2 grow_1/4_rewarm grow_1/4_dyntau \\
        --first-seed-arms grow_1/3 grow_3/4 grow2 staged_40+10 --staged 40 10 \\
        --out docs/benchmarks/growth_experiment.json --plot docs/benchmarks/growth_experiment.png

More runs (another arm's other seeds) from a second invocation join with ``--from-json RESULTS --add-runs OTHER``.

Task: scikit-learn's digits through ``DigitsDataModule`` (1,437 training / 360 validation images, the default
stratified split with data seed 0, so every arm and seed sees the same split and the same per-epoch data order and
augmentation), upscaled to 32² with the module's default augmentation (RandomResizedCrop scale 0.7-1, small
affine). Model: ``tokenformer_tiny``'s shell at fixed d = 64, 4 blocks, 4 heads, patch 8 (16 patches + cls = 17
tokens per image). Widths: small 4 attention / 16 FFN parameter tokens, large 64 / 256 (16× growth at fixed d,
which is what growth changes). The budget is long enough for both to saturate (40 epochs: the large model is at
97-98% from about epoch 30; a 16-epoch budget left it still climbing and could not separate the arms, and at
2 / 8 tokens the small model stops near 78%, too far below for growth to matter at this budget).
Recipe: AdamW lr 2e-3, betas (0.9, 0.95), weight decay 0.05, 2 warm-up epochs then cosine to 1e-5 at the last
step, label smoothing 0.1, batch 64 (22 steps per epoch), gradient clip 1.0, fp32, validation every epoch. The
model seed (initialisation, new value tokens) is the run's seed.

Arms (same recipe, budget in epochs, data order and seed; only the token counts in force differ):
  large          large widths from scratch (sets the target accuracy);
  small          small widths all along;
  grow_1/4, grow_1/3, grow_1/2, grow_3/4
                 small widths, grown to large (GrowthCallback, exact) at the start of that fraction of the epochs
                 (epoch 10, 13, 20, 30 of 40); the LR schedule continues (no re-warm);
  grow2          two stages: small → mid widths (default 16 / 64) at 1/4, → large at 1/2;
  grow_1/4_rewarm
                 as grow_1/4 with ``rewarm_steps`` (default 20: the LR of the k-th step after growth is scaled by
                 (k + 1) / 21, back onto the continuing schedule);
  staged_E1+E2   (``--staged E1 E2``) the paper's staged recipe: E1 epochs small on a warm-up + cosine of their
                 own, then grown and trained E2 more epochs on a restarted one (``--stage-warmup-epochs``, peak lr
                 again): the other way to set the LR after growth;
  grow_1/4_dyntau
                 ablation: as grow_1/4 but built with ``dynamic_scale=True`` (the official code: τ = √n recomputed
                 at every call, so growth changes the function: τ rises by √16 = 4 at 16× growth);
  grow_1/4_m2zero
                 as grow_1/4 with ``second_moment="zero"``: the new tokens' AdamW second moment starts at 0 instead
                 of the old rows' mean, so their first updates are full-size (sign-like) steps.
``--arms`` run for every seed, ``--first-seed-arms`` for the first seed only (CPU budget).
For every grown arm the script records GrowthCallback's max |Δlogits| (eval-mode logits of 16 training images
before/after growth) and the full validation accuracy just before the growth (the previous epoch's, same weights)
and just after it (before the next optimizer step).

Training FLOPs are computed analytically per optimizer step from the token counts in force, for a batch of B
images of T = P + 1 tokens (P patches + cls), d = embed_dim, L blocks, n_a / n_f attention / FFN parameter tokens:
  multiply-adds per image, forward:
    patch embedding (linear, 3·p²→d per patch)      P · 3p² · d
    per block: Q, K, V, out Pattentions             4 · T · n_a · (d + d)     (a Pattention d_in→d_out with n
               FFN Pattention                       T · n_f · (d + d)          tokens: n·(d_in + d_out) per token)
               token-token attention (QKᵀ and AV)   2 · T² · d
    head (cls only)                                 d · classes
  training FLOPs per step = 3 (forward + backward ≈ 3× forward) × 2 (FLOPs per multiply-add) × B × the sum.
Normalisations, GeLU, softmax and the optimizer are not counted (elementwise, a few % at these sizes).
Validation is not counted. Wall time is the training batches only (validation excluded), measured per run; with
``--jobs 2`` two runs share the 2 cores of the machine, so wall times are noisy: FLOPs are exact.

Target and "compute to target": per seed, the large arm's final accuracy = mean val acc1 of its last 2 epochs; for
each arm, the first epoch whose val acc1 ≥ that target, and the cumulative training FLOPs and wall time there, as
ratios to the large arm's total training FLOPs / wall time (the goal metric: "≤ 0.40× of its training FLOPs") and
to the large arm's own compute to its first reach of the target.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any

SPLIT_SEED = 0  # the digits split and data order: the same for every arm and seed


# ------------------------------------------------------------------------------------------------- arms
def arms(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """name → {start: (attn, ffn), schedule: [{epoch, attn_tokens, ffn_tokens}], rewarm, dynamic_scale,
    second_moment, stages (None, or (E1, E2): two LR schedules, one per width, E1 + E2 epochs in all)}."""
    E, small, mid, large = args.epochs, tuple(args.small), tuple(args.mid), tuple(args.large)

    def at(frac: float) -> int:
        return max(1, round(E * frac))

    def stage(epoch: int, widths: tuple[int, int]) -> dict[str, int]:
        return {"epoch": epoch, "attn_tokens": widths[0], "ffn_tokens": widths[1]}

    base = dict(rewarm=0, dynamic_scale=False, second_moment="mean", stages=None)
    out: dict[str, dict[str, Any]] = {
        "large": dict(start=large, schedule=[], **base),
        "small": dict(start=small, schedule=[], **base),
    }
    for label, frac in (("1/4", 1 / 4), ("1/3", 1 / 3), ("1/2", 1 / 2), ("3/4", 3 / 4)):
        out[f"grow_{label}"] = dict(start=small, schedule=[stage(at(frac), large)], **base)
    out["grow2"] = dict(start=small, schedule=[stage(at(1 / 4), mid), stage(at(1 / 2), large)], **base)
    out["grow_1/4_rewarm"] = dict(base, start=small, schedule=[stage(at(1 / 4), large)], rewarm=args.rewarm_steps)
    out["grow_1/4_dyntau"] = dict(base, start=small, schedule=[stage(at(1 / 4), large)], dynamic_scale=True)
    out["grow_1/4_m2zero"] = dict(base, start=small, schedule=[stage(at(1 / 4), large)], second_moment="zero")
    for e1, e2 in args.staged:
        out[f"staged_{e1}+{e2}"] = dict(base, start=small, schedule=[stage(e1, large)], stages=(e1, e2))
    return out


# ------------------------------------------------------------------------------------------------ FLOPs
def step_flops(args: argparse.Namespace, attn: int, ffn: int, classes: int = 10) -> float:
    """Training FLOPs of one optimizer step (forward + backward, batch_size images) at these token counts."""
    d, p = args.embed_dim, args.patch_size
    patches = (args.img_size // p) ** 2
    T = patches + 1
    block = 4 * T * attn * (d + d) + T * ffn * (d + d) + 2 * T * T * d
    macs = patches * 3 * p * p * d + args.depth * block + d * classes
    return 3.0 * 2.0 * args.batch_size * macs


# ------------------------------------------------------------------------------------------------ one run
def run_one(args: argparse.Namespace, name: str, spec: dict[str, Any], seed: int) -> dict[str, Any]:
    os.environ["OMP_NUM_THREADS"] = "1"
    import logging
    import warnings

    import lightning.pytorch as pl
    import torch
    from lightning.pytorch.callbacks import Callback

    from tokenformer_vision import DigitsDataModule, GrowthCallback, ImageClassifier
    from tokenformer_vision.classifier import WarmupCosine

    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    class Meter(Callback):
        """Per epoch: val acc1, cumulative training FLOPs (analytic, widths in force) and training wall time;
        at each growth, the full validation accuracy right after it."""

        def __init__(self, growth: GrowthCallback | None, val_loader_fn) -> None:
            self.growth, self.val_loader_fn = growth, val_loader_fn
            self.flops = self.seconds = 0.0
            self.steps = 0
            self.history: list[dict[str, Any]] = []
            self.after_growth: list[dict[str, Any]] = []
            self._seen = 0
            self._t0 = 0.0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            # runs after GrowthCallback's hook (callback order): a new event means growth happened just now
            if self.growth is not None and len(self.growth.events) > self._seen:
                self._seen = len(self.growth.events)
                self.after_growth.append({"step": trainer.global_step, "epoch": trainer.current_epoch,
                                          "val_acc1": self._val_acc(pl_module)})
            self._t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.seconds += time.perf_counter() - self._t0
            self.flops += step_flops(args, pl_module.model.attn_tokens, pl_module.model.ffn_tokens)
            self.steps += 1

        @torch.no_grad()
        def _val_acc(self, pl_module) -> float:
            net = pl_module.model
            was = net.training
            net.eval()
            correct = total = 0
            for x, y in self.val_loader_fn():
                correct += int((net(x).argmax(-1) == y).sum())
                total += len(y)
            net.train(was)
            return correct / total

        def on_validation_epoch_end(self, trainer, pl_module):
            if trainer.sanity_checking:
                return
            self.history.append({"epoch": trainer.current_epoch + 1, "step": trainer.global_step,
                                 "val_acc1": float(trainer.callback_metrics["val/acc1"]),
                                 "train_flops": self.flops, "train_seconds": self.seconds,
                                 "attn_tokens": pl_module.model.attn_tokens,
                                 "ffn_tokens": pl_module.model.ffn_tokens})

    class StagedClassifier(ImageClassifier):
        """One warm-up + cosine per stage: E1 epochs small, then a restart over the E2 epochs at the large widths
        (the paper's staged recipe: every stage is trained with a schedule of its own)."""

        def configure_optimizers(self):
            out = super().configure_optimizers()
            scheduler, (e1, e2) = out["lr_scheduler"]["scheduler"], spec["stages"]
            per_epoch, cosine = self.trainer.num_training_batches, scheduler.lr_lambdas[0]
            first = WarmupCosine(cosine.warmup_steps, e1 * per_epoch, cosine.min_ratio)
            second = WarmupCosine(per_epoch * args.stage_warmup_epochs, e2 * per_epoch, cosine.min_ratio)
            switch = e1 * per_epoch

            def staged(step: int) -> float:
                return first(step) if step < switch else second(step - switch)

            # every param group (decay / no decay) follows the staged schedule, not only the first
            scheduler.lr_lambdas = [staged] * len(scheduler.lr_lambdas)
            return out

    pl.seed_everything(seed, verbose=False)
    data = DigitsDataModule(img_size=args.img_size, batch_size=args.batch_size, num_workers=0, seed=SPLIT_SEED,
                            persistent_workers=False, pin_memory=False)
    attn, ffn = spec["start"]
    module = (StagedClassifier if spec.get("stages") else ImageClassifier)(
        model_name="tokenformer_tiny", num_classes=10, img_size=args.img_size, lr=args.lr, weight_decay=0.05,
        betas=(0.9, 0.95), warmup_epochs=2, min_lr=1e-5, label_smoothing=0.1,
        model_kwargs=dict(patch_size=args.patch_size, depth=args.depth, embed_dim=args.embed_dim,
                          num_heads=args.heads, attn_tokens=attn, ffn_tokens=ffn,
                          dynamic_scale=spec["dynamic_scale"]))
    growth = (GrowthCallback(spec["schedule"], rewarm_steps=spec["rewarm"], seed=seed,
                             second_moment=spec.get("second_moment", "mean"))
              if spec["schedule"] else None)
    data.setup("fit")
    meter = Meter(growth, data.val_dataloader)
    callbacks = ([growth] if growth else []) + [meter]
    epochs = sum(spec["stages"]) if spec.get("stages") else args.epochs
    trainer = pl.Trainer(accelerator="cpu", devices=1, precision="32-true", max_epochs=epochs,
                         gradient_clip_val=1.0, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         callbacks=callbacks)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=data)
    events = []
    for i, event in enumerate(growth.events if growth else []):
        before = next(r["val_acc1"] for r in meter.history if r["epoch"] == event["epoch"])  # end of prior epoch
        after = meter.after_growth[i]["val_acc1"]
        events.append({k: event[k] for k in ("stage", "step", "epoch", "attn_tokens_before", "attn_tokens_after",
                                             "ffn_tokens_before", "ffn_tokens_after", "params_before",
                                             "params_after", "max_abs_dlogits", "max_abs_logits", "rewarm_steps")}
                      | {"val_acc1_before": before, "val_acc1_after": after,
                         "flops_at_growth": next(r["train_flops"] for r in meter.history
                                                 if r["epoch"] == event["epoch"])})
    return {"arm": name, "seed": seed, "history": meter.history, "growth": events,
            "steps": meter.steps, "wall_seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ summary
def first_reach(history: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((r for r in history if r["val_acc1"] >= target - 1e-9), None)


def summarise(results: dict[str, Any], names: list[str], seeds: list[int]) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        large = results["runs"][f"large/seed{seed}"]["history"]
        target = statistics.fmean(r["val_acc1"] for r in large[-2:])
        large_hit = first_reach(large, target)
        for name in names:
            hist = results["runs"][f"{name}/seed{seed}"]["history"]
            hit = first_reach(hist, target)
            rows.append({
                "seed": seed, "arm": name, "target": target,
                "final_acc1": hist[-1]["val_acc1"], "final2_acc1": statistics.fmean(r["val_acc1"] for r in hist[-2:]),
                "total_flops": hist[-1]["train_flops"], "total_seconds": hist[-1]["train_seconds"],
                "epoch": hit["epoch"] if hit else None,
                "flops": hit["train_flops"] if hit else None,
                "seconds": hit["train_seconds"] if hit else None,
                "flops_vs_large_total": hit["train_flops"] / large[-1]["train_flops"] if hit else None,
                "seconds_vs_large_total": hit["train_seconds"] / large[-1]["train_seconds"] if hit else None,
                "flops_vs_large_reach": hit["train_flops"] / large_hit["train_flops"] if hit else None,
                "growth": results["runs"][f"{name}/seed{seed}"]["growth"],
            })
    return rows


def mean_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else statistics.fmean(values)


def print_table(rows: list[dict[str, Any]], names: list[str], seeds: list[int]) -> None:
    def fmt(v: float | None, spec: str) -> str:
        return "never" if v is None else format(v, spec)

    print(f"\n{'arm':16s} " + " ".join(f"{'s' + str(s) + ' ep':>6} {'FLOPs':>6} {'wall':>6}" for s in seeds)
          + f" {'mean FLOPs':>10} {'mean wall':>9} {'final acc (mean)':>17} {'last-2 acc':>10}")
    for name in names:
        mine = [r for r in rows if r["arm"] == name]
        cells = " ".join(f"{fmt(r['epoch'], 'd'):>6} {fmt(r['flops_vs_large_total'], '.2f'):>6} "
                         f"{fmt(r['seconds_vs_large_total'], '.2f'):>6}" for r in mine)
        cells += " " * (21 * (len(seeds) - len(mine)))
        mf = mean_or_none([r["flops_vs_large_total"] for r in mine])
        mw = mean_or_none([r["seconds_vs_large_total"] for r in mine])
        print(f"{name:16s} {cells} {fmt(mf, '.2f'):>10} {fmt(mw, '.2f'):>9} "
              f"{100 * statistics.fmean(r['final_acc1'] for r in mine):16.2f}% "
              f"{100 * statistics.fmean(r['final2_acc1'] for r in mine):9.2f}%")


def markdown_table(rows: list[dict[str, Any]], names: list[str], seeds: list[int]) -> str:
    """The table of docs/benchmarks.md: per arm, epoch / FLOPs ratio / wall ratio to the target per seed, means,
    final accuracies."""
    def fmt(v: float | None, spec: str, suffix: str = "") -> str:
        return "never" if v is None else format(v, spec) + suffix

    head = ("| arm | " + " | ".join(f"seed {s}: epoch, FLOPs×, wall×" for s in seeds)
            + " | mean FLOPs× | mean wall× | final acc (mean) | last-2 acc (mean) | growth: max abs Δlogits, val acc "
            "before → after |")
    lines = [head, "|" + "---|" * (len(seeds) + 6)]
    for name in names:
        mine = {r["seed"]: r for r in rows if r["arm"] == name}
        cells = [f"{fmt(mine[s]['epoch'], 'd')}, {fmt(mine[s]['flops_vs_large_total'], '.2f')}, "
                 f"{fmt(mine[s]['seconds_vs_large_total'], '.2f')}" if s in mine and mine[s]["epoch"] is not None
                 else "never" if s in mine else "–" for s in seeds]
        mf = mean_or_none([r["flops_vs_large_total"] for r in mine.values()])
        mw = mean_or_none([r["seconds_vs_large_total"] for r in mine.values()])
        growth = mine[seeds[0]].get("growth", [])
        g = "; ".join(f"{e['max_abs_dlogits']:.2g}, {100 * e['val_acc1_before']:.1f}% → "
                      f"{100 * e['val_acc1_after']:.1f}%" for e in growth) or "–"
        n = len(mine)
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {fmt(mf, '.2f')} | {fmt(mw, '.2f')} | "
                     f"{100 * statistics.fmean(r['final_acc1'] for r in mine.values()):.1f}% | "
                     f"{100 * statistics.fmean(r['final2_acc1'] for r in mine.values()):.1f}%"
                     f"{'' if n == len(seeds) else f' ({n} seed)'} | {g} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], names: list[str], extra: list[str], seeds: list[int], path: str) -> None:
    """Left: every arm, first seed. Right: the arms run for every seed, mean over seeds. Circles: growth points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5.5), sharey=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    panels = ((axes[0], names + extra, seeds[:1], f"seed {seeds[0]}, all arms"),
              (axes[1], names, seeds, f"mean of seeds {', '.join(map(str, seeds))}"))
    for ax, arm_names, use, title in panels:
        for name in arm_names:
            color = colors[(names + extra).index(name) % len(colors)]
            runs = [results["runs"][f"{name}/seed{s}"] for s in use]
            flops = [r["train_flops"] / 1e12 for r in runs[0]["history"]]
            acc = [statistics.fmean(run["history"][e]["val_acc1"] for run in runs) for e in range(len(flops))]
            ax.plot(flops, acc, color=color, lw=1.4, label=name, ls="--" if name in ("large", "small") else "-")
            for event in runs[0]["growth"]:
                y = statistics.fmean(next(r["val_acc1"] for r in run["history"] if r["epoch"] == event["epoch"])
                                     for run in runs)
                ax.plot([event["flops_at_growth"] / 1e12], [y], marker="o", ms=7, mfc="none", color=color)
        target = statistics.fmean(statistics.fmean(r["val_acc1"] for r in results["runs"][f"large/seed{s}"]
                                                   ["history"][-2:]) for s in use)
        ax.axhline(target, color="k", lw=0.8, ls=":", label="target: large, mean of last 2 epochs")
        ax.set_ylim(0.6, 1.0)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("cumulative training FLOPs (TFLOP, analytic)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("val acc1 (circles: growth, at the accuracy of the epoch before)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


def merge_runs(results: dict[str, Any], path: str) -> None:
    """Add the runs of another invocation to ``results``; an arm that then has every seed joins the main arms."""
    with open(path) as f:
        other = json.load(f)
    for key, run in other["runs"].items():
        if key in results["runs"]:
            mine, theirs = ([r["val_acc1"] for r in x["history"]] for x in (results["runs"][key], run))
            if mine != theirs:
                raise SystemExit(f"{path}: run {key} differs from the one already in the results: not merging")
            continue
        results["runs"][key] = run
        results["arms"].setdefault(run["arm"], other["arms"][run["arm"]])
    saved = results["args"]
    for arm in list(saved["first_seed_arms"]):
        if all(f"{arm}/seed{s}" in results["runs"] for s in saved["seeds"]):
            saved["first_seed_arms"].remove(arm)
            saved["arms"] = (saved["arms"] or []) + [arm]
    results.setdefault("merged", []).append({"path": path, "args": other["args"], "wall_seconds": other["wall_seconds"],
                                             "machine": other["machine"]})


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=40, help="the budget of large, small and grow_* arms")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--small", type=int, nargs=2, default=[4, 16], metavar=("ATTN", "FFN"))
    parser.add_argument("--mid", type=int, nargs=2, default=[16, 64], metavar=("ATTN", "FFN"))
    parser.add_argument("--large", type=int, nargs=2, default=[64, 256], metavar=("ATTN", "FFN"))
    parser.add_argument("--embed-dim", type=int, default=64)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--rewarm-steps", type=int, default=20)
    parser.add_argument("--staged", type=int, nargs=2, action="append", default=[], metavar=("E1", "E2"),
                        help="adds arm staged_E1+E2: E1 epochs small on a schedule of their own, then grown and "
                        "trained E2 epochs on a restarted warm-up + cosine (repeatable)")
    parser.add_argument("--stage-warmup-epochs", type=float, default=1.0, help="warm-up of a staged arm's 2nd stage")
    parser.add_argument("--arms", nargs="+", default=None,
                        help="arms run for every seed (default all; 'large' is always run: it sets the target)")
    parser.add_argument("--first-seed-arms", nargs="+", default=[],
                        help="arms run for the first seed only (a cheaper look at more schedules)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel, one thread each")
    parser.add_argument("--out", default=None, help="JSON with all histories, growth events and the summary")
    parser.add_argument("--plot", default=None, help="PNG: val acc1 vs cumulative training FLOPs")
    parser.add_argument("--from-json", default=None, help="no training: redo table/plot/summary")
    parser.add_argument("--add-runs", nargs="+", default=[],
                        help="with --from-json: merge the runs of these JSONs (a run present in both must have the "
                        "same per-epoch accuracies: the runs are deterministic)")
    args = parser.parse_args()
    if args.from_json:
        with open(args.from_json) as f:
            results = json.load(f)
        for path in args.add_runs:
            merge_runs(results, path)
        saved = argparse.Namespace(**results["args"])
        results.setdefault("arms", {k.split("/seed")[0]: {} for k in results["runs"]})
        names = [n for n in results["arms"] if n not in getattr(saved, "first_seed_arms", []) or n == "large"]
        extra = [n for n in results["arms"] if n not in names]
        rows = summarise(results, names, saved.seeds) + summarise(results, extra, saved.seeds[:1])
        print_table(rows, names + extra, saved.seeds)
        print("\n" + markdown_table(rows, names + extra, saved.seeds))
        if args.out:
            results["summary"] = rows
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
        if args.plot:
            plot(results, names, extra, saved.seeds, args.plot)
        return

    specs = arms(args)
    names = list(specs) if args.arms is None else ["large"] + [a for a in args.arms if a != "large"]
    extra = [a for a in args.first_seed_arms if a not in names]
    unknown = set(names + extra) - set(specs)
    if unknown:
        parser.error(f"unknown arms {sorted(unknown)}; choose from {list(specs)}")
    print("training FLOPs per step: " + ", ".join(
        f"{w[0]}/{w[1]}: {step_flops(args, *w) / 1e9:.3f} G" for w in (args.small, args.mid, args.large)))

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import load, machine_info

    results: dict[str, Any] = {"args": vars(args), "arms": {n: specs[n] for n in names + extra},
                               "flops_per_step": {f"{w[0]}/{w[1]}": step_flops(args, *w)
                                                  for w in (args.small, args.mid, args.large)},
                               "machine": machine_info("cpu"), "runs": {}}
    results["machine"]["threads_per_run"] = 1
    results["machine"]["parallel_runs"] = args.jobs
    # the most expensive runs first, so the two workers finish together
    jobs = [(n, s) for s in args.seeds for n in names] + [(n, args.seeds[0]) for n in extra]
    order = sorted(jobs,
                   key=lambda ns: (-(ns[0] in ("large", "grow_1/2")), ns[1]))
    loads = []
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        futures = {pool.submit(run_one, args, n, specs[n], s): (n, s) for n, s in order}
        for future in futures:
            run = future.result()
            loads.append(load()[0])
            results["runs"][f"{run['arm']}/seed{run['seed']}"] = run
            grow = "; ".join(f"growth at epoch {e['epoch']}: max|Δlogits| {e['max_abs_dlogits']:.2g}, val acc "
                             f"{e['val_acc1_before']:.4f}→{e['val_acc1_after']:.4f}" for e in run["growth"])
            print(f"[{time.perf_counter() - t0:6.0f} s] seed {run['seed']} {run['arm']:16s} final val acc1 "
                  f"{run['history'][-1]['val_acc1']:.4f}  train {run['history'][-1]['train_seconds']:.0f} s  "
                  f"{grow}", flush=True)
    results["machine"]["load_1min_after_each_run"] = loads
    results["wall_seconds"] = time.perf_counter() - t0
    if args.out:  # the runs first, in case the summary fails
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)

    rows = summarise(results, names, args.seeds) + summarise(results, extra, args.seeds[:1])
    results["summary"] = rows
    print_table(rows, names + extra, args.seeds)
    print("\n" + markdown_table(rows, names + extra, args.seeds))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.out}")
    if args.plot:
        plot(results, names, extra, args.seeds, args.plot)


if __name__ == "__main__":
    main()
