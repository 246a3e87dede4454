#!/usr/bin/env python
"""Does growth pay? Train small and grow (GrowthCallback, exact) vs the large and the small model from scratch,
on Fashion-MNIST, through the shared harness (``benchlib.harness.train_eval``: ImageClassifier + IDXDataModule +
Trainer, the path a user's ``tokenformer-vision fit`` takes).

    # the defaults (3 seeds x 4 arms, 8 epochs at patch 7, two runs at a time): the table of docs/benchmarks.md,
    # 40 minutes on a 2-core CPU
    OMP_NUM_THREADS=1 python scripts/benchmarks/growth_experiment.py --out growth_fmnist_p7.json \
        --plot growth_fmnist_p7.png
    # GPU-sized (not yet run): 16 epochs at patch 4, about 8 hours on the 2-core CPU
    python scripts/benchmarks/growth_experiment.py --epochs 16 --patch-size 4 --jobs 6 --workers 1 \
        --device cuda --out growth.json --plot growth.png

Model: ``tokenformer_tiny``'s shell at d = ``--width`` (64), ``--depth`` (6) blocks, ``--patch-size`` 7 (16
patches + cls; 4: 49), grayscale 28². Widths: small ``--small`` (4 / 16 attention / FFN parameter tokens), mid
``--mid`` (16 / 64), large ``--large`` (64 / 256, the n = d rule): 16× growth at fixed d, which is what growth
changes.

Arms (same recipe, data order and seed; only the token counts in force differ):
  large            large widths from scratch (sets the target: its final test accuracy);
  small            small widths all along;
  grow_1/4_rewarm  small, grown to large at the start of epoch ⌈E/4⌉, LR re-warmed over ``--rewarm-steps``;
  grow2            two stages: small → mid at 1/4, mid → large at 1/2, each re-warmed;
  grow_1/2         small, grown to large at 1/2, no re-warm (``--arms`` adds it, like the three below);
  large_lowres     large, trained at ``--low-res``² until E/2 (progressive resolution, ``ProgressiveResolution``);
  grow_1/4_lowres  grow_1/4_rewarm, at ``--low-res``² until E/2;
  grow_1/4_depth   grow_1/4_rewarm from ``--start-depth`` of the blocks: the others are switched on as identity
                   blocks at the growth, then all widened (depth and width growth, ``DepthGrowth``);
  grow_1/4_newwarm grow_1/4_rewarm where only the new rows move for ``--new-rows-warmup`` steps after the growth
                   (``NewRowsWarmup``).
Training FLOPs are counted by ``torch.utils.flop_counter`` on a training step at the widths in force (the harness
re-measures after each growth) times the images seen; wall time is the training batches only. Test accuracy is
measured after every epoch, so "reach" is: the first epoch whose test top-1 ≥ large's final test top-1, and the
cumulative FLOPs / wall time there as ratios to large's totals (goal: ≤ 0.50× FLOPs, ≤ 0.70× wall).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the benchlib package
from benchlib.common import machine_info, write_json  # noqa: E402
from benchlib.runs import add_recipe_args, run_all, tokenformer_spec  # noqa: E402

ARMS = ("large", "small", "grow_1/4_rewarm", "grow2")


def stage(epoch: int, widths: list[int]) -> dict[str, int]:
    return {"epoch": epoch, "attn_tokens": widths[0], "ffn_tokens": widths[1]}


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every arm × seed of ``args`` (seed-major, so a cut-off run keeps whole seeds)."""
    E, quarter, half = args.epochs, max(1, math.ceil(args.epochs / 4)), max(1, math.ceil(args.epochs / 2))
    low_res = {"progressive_resolution": {"size": args.low_res, "until_epoch": half}}
    depth = {"depth_growth": {"epoch": quarter, "start_depth": args.start_depth}}
    arms = {  # start widths, growth stages, re-warm steps, extra spec entries (benchlib.growth_levers)
        "large": (args.large, [], 0, {}),
        "small": (args.small, [], 0, {}),
        "grow_1/4_rewarm": (args.small, [stage(quarter, args.large)], args.rewarm_steps, {}),
        "grow2": (args.small, [stage(quarter, args.mid), stage(half, args.large)], args.rewarm_steps, {}),
        "grow_1/2": (args.small, [stage(half, args.large)], 0, {}),
        "large_lowres": (args.large, [], 0, low_res),
        "grow_1/4_lowres": (args.small, [stage(quarter, args.large)], args.rewarm_steps, low_res),
        "grow_1/4_depth": (args.small, [stage(quarter, args.large)], args.rewarm_steps, depth),
        "grow_1/4_newwarm": (args.small, [stage(quarter, args.large)], args.rewarm_steps,
                             {"new_rows_warmup": args.new_rows_warmup}),
    }
    assert all(s["epoch"] < E for _, sched, _, _ in arms.values() for s in sched)
    out = []
    for seed in args.seeds:
        for name in args.arms:
            start, schedule, rewarm, extra = arms[name]
            kwargs = {"dynamic_img_size": True} if "progressive_resolution" in extra else {}
            spec = tokenformer_spec(f"growth_{name}", args.width, start[0], start[1], seed, args,
                                    arm=name, growth=schedule, rewarm_steps=rewarm, test_every_epoch=True,
                                    second_moment=args.second_moment, new_token_lr_scale=args.new_token_lr_scale,
                                    overrides={"epochs": args.epochs}, **extra)
            spec["model_kwargs"].update(kwargs)
            out.append(spec)
    return out


def first_reach(history: list[dict[str, Any]], target: float) -> dict[str, Any] | None:
    return next((r for r in history if r["test/acc1"] >= target - 1e-9), None)


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    runs = {(r["spec"]["arm"], r["spec"]["seed"]): r for r in results["runs"]
            if "error" not in r and "arm" in r["spec"]}
    rows = []
    for (arm, seed), run in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        large = runs.get(("large", seed))
        if large is None:
            continue
        target = large["history"][-1]["test/acc1"]
        hist = run["history"]
        hit = first_reach(hist, target)
        rows.append({"arm": arm, "seed": seed, "target": target, "final_test_acc1": hist[-1]["test/acc1"],
                     "test_acc1": run["test"].get("test/acc1"), "reach_epoch": hit["epoch"] if hit else None,
                     "flops_x": hit["train_flops"] / large["train_flops"] if hit else None,
                     "wall_x": hit["train_wall_s"] / large["train_wall_s"] if hit else None,
                     "total_flops_x": run["train_flops"] / large["train_flops"],
                     "total_wall_x": run["train_wall_s"] / large["train_wall_s"],
                     "growth": run.get("growth_events", [])})
    return rows


def markdown(rows: list[dict[str, Any]]) -> str:
    def fmt(v: float | None, spec: str = ".2f") -> str:
        return "never" if v is None else format(v, spec)

    lines = ["| arm | final test top-1 (mean ± std) | reaches large's final: epoch, FLOPs×, wall× per seed | "
             "mean FLOPs× | mean wall× | total FLOPs× | max abs Δlogits at growth |", "|---|---|---|---|---|---|---|"]
    for arm in dict.fromkeys(r["arm"] for r in rows):
        mine = [r for r in rows if r["arm"] == arm]
        accs = [100 * r["final_test_acc1"] for r in mine]
        std = statistics.stdev(accs) if len(accs) > 1 else 0.0
        cells = "; ".join(f"{fmt(r['reach_epoch'], 'd')}, {fmt(r['flops_x'])}, {fmt(r['wall_x'])}"
                          if r["reach_epoch"] else "never" for r in mine)
        flops = [r["flops_x"] for r in mine]
        walls = [r["wall_x"] for r in mine]
        mean_f = None if None in flops else statistics.fmean(flops)
        mean_w = None if None in walls else statistics.fmean(walls)
        dl = max((e.get("max_abs_dlogits", 0.0) for r in mine for e in r["growth"]), default=None)
        lines.append(f"| {arm} | {statistics.fmean(accs):.2f} ± {std:.2f} ({len(mine)} seeds) | {cells} | "
                     f"{fmt(mean_f)} | {fmt(mean_w)} | {statistics.fmean(r['total_flops_x'] for r in mine):.2f} | "
                     f"{'–' if dl is None else format(dl, '.2g')} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"large": "tab:blue", "small": "tab:gray", "grow_1/4_rewarm": "tab:orange", "grow2": "tab:green",
               "grow_1/2": "tab:red", "large_lowres": "tab:cyan", "grow_1/4_lowres": "tab:purple",
               "grow_1/4_depth": "tab:brown", "grow_1/4_newwarm": "tab:olive"}
    fig, ax = plt.subplots(figsize=(7, 4.5))
    seen = set()
    for run in results["runs"]:
        if "error" in run or "arm" not in run["spec"]:
            continue
        arm = run["spec"]["arm"]
        hist = run["history"]
        ax.plot([r["train_flops"] for r in hist], [100 * r["test/acc1"] for r in hist], color=colours.get(arm),
                alpha=0.7, lw=1.2, label=None if arm in seen else arm)
        seen.add(arm)
        for event in run.get("growth_events", []):
            row = next((r for r in hist if r["epoch"] == event.get("epoch")), None)
            if row is not None:
                ax.scatter([row["train_flops"]], [100 * row["test/acc1"]], facecolors="none",
                           edgecolors=colours.get(arm), s=40)
    ax.set_xlabel("cumulative training FLOPs")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_ylim(bottom=80)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Growth vs training from scratch (circles: growth points)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def add_growth_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width", type=int, default=64, help="embed_dim d (fixed: growth adds tokens)")
    parser.add_argument("--small", type=int, nargs=2, default=[4, 16], help="attention, FFN tokens of small")
    parser.add_argument("--mid", type=int, nargs=2, default=[16, 64])
    parser.add_argument("--large", type=int, nargs=2, default=[64, 256])
    parser.add_argument("--rewarm-steps", type=int, default=200)
    parser.add_argument("--second-moment", choices=["mean", "zero"], default="mean",
                        help="GrowthCallback second_moment: Adam's second moment of the new rows")
    parser.add_argument("--new-token-lr-scale", type=float, default=1.0,
                        help="GrowthCallback new_token_lr_scale: the new rows' learning rate, times the schedule's")
    parser.add_argument("--low-res", type=int, default=21,
                        help="*_lowres arms: training resolution until E/2 (21 at patch 7: 3×3 patches)")
    parser.add_argument("--start-depth", type=int, default=3, help="grow_1/4_depth: blocks trained before growth")
    parser.add_argument("--new-rows-warmup", type=int, default=100,
                        help="grow_1/4_newwarm: optimizer steps after growth in which only the new rows move")
    parser.add_argument("--arms", nargs="+", default=list(ARMS),
                        choices=["large", "small", "grow_1/4_rewarm", "grow2", "grow_1/2", "large_lowres",
                                 "grow_1/4_lowres", "grow_1/4_depth", "grow_1/4_newwarm"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_args(parser, epochs=8)
    parser.set_defaults(patch_size=7, jobs=2, workers=0)
    add_growth_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--reference", default=None,
                        help="an earlier JSON of this script whose --reference-arms runs are reused (wall× then "
                             "compares two runs of the machine)")
    parser.add_argument("--reference-arms", nargs="+", default=["large"])
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    header = {"command": " ".join(sys.argv), "args": vars(args), "machine": machine_info(args.device)}
    results = run_all(specs(args), args, args.out, header)
    if args.reference:  # runs of an earlier JSON for the arm × seed pairs not run now (deterministic on a CPU)
        have = {(r["spec"].get("arm"), r["spec"]["seed"]) for r in results["runs"]}
        reference = json.loads(Path(args.reference).read_text())["runs"]
        results["runs"] += [{**r, "from_reference": args.reference} for r in reference
                            if r["spec"].get("arm") in args.reference_arms and r["spec"]["seed"] in args.seeds
                            and (r["spec"]["arm"], r["spec"]["seed"]) not in have]
    results["summary"] = summarise(results)
    results["markdown"] = markdown(results["summary"])
    write_json(args.out, results)
    print(results["markdown"])
    if args.plot:
        plot(results, args.plot)


if __name__ == "__main__":
    main()
