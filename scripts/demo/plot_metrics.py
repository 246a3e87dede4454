#!/usr/bin/env python
"""Plot a run's CSV log (Lightning's CSVLogger ``metrics.csv``): training loss, validation accuracy and loss, the
learning rate, with a vertical line at every growth event (``growth/step``, logged by GrowthCallback).

    python scripts/demo/plot_metrics.py runs/digits/version_0/metrics.csv --out runs/digits/version_0/metrics.png
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: the demo runs on machines without a display
import matplotlib.pyplot as plt  # noqa: E402


def read_series(path: Path) -> dict[str, list[tuple[float, float]]]:
    """``{column: [(step, value), ...]}`` for every numeric column, from rows where the column is filled."""
    if not path.is_file():
        raise FileNotFoundError(f"no metrics file at {path} (expected a CSVLogger metrics.csv)")
    series: dict[str, list[tuple[float, float]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or "step" not in reader.fieldnames:
            raise ValueError(f"{path} has no 'step' column: is it a Lightning CSVLogger metrics.csv?")
        for row in reader:
            step = float(row["step"])
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    number = float(value)
                except ValueError:
                    continue
                if math.isfinite(number):
                    series.setdefault(key, []).append((step, number))
    return series


def plot(series: dict[str, list[tuple[float, float]]], out: Path, title: str) -> None:
    """Write a 2x2 figure: train loss, val accuracy, val loss, learning rate; growth events as dashed lines."""
    panels = [
        ("training loss", ["train/loss"]),
        ("validation accuracy", ["val/acc1", "val/acc5"]),
        ("validation loss", ["val/loss"]),
        ("learning rate", sorted(k for k in series if k.startswith("lr"))),
    ]
    growth = series.get("growth/step", [])
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), sharex=True)
    for ax, (name, keys) in zip(axes.flat, panels, strict=True):
        for key in keys:
            points = series.get(key)
            if points:
                xs, ys = zip(*points, strict=True)
                ax.plot(xs, ys, marker="o" if key.startswith("val") else None, markersize=3, label=key)
        for i, (_, step) in enumerate(growth):
            ax.axvline(step, color="tab:red", linestyle="--", linewidth=1, label="growth" if i == 0 else None)
        ax.set_title(name)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.suptitle(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def summary(series: dict[str, list[tuple[float, float]]], window: int = 5) -> list[str]:
    """Lines that say what the plot shows: the best and last validation accuracy and, for every growth event, the
    accuracy at the validations just before and after it, the lowest accuracy over the ``window`` validations after
    it, and the largest drop between two consecutive validations among the ``window`` before it (the epoch-to-epoch
    noise that a change after the growth is to be compared with)."""
    acc = series.get("val/acc1", [])
    if not acc:
        return []
    best = max(acc, key=lambda point: point[1])
    lines = [f"val/acc1: best {best[1]:.4f} (step {best[0]:.0f}), last {acc[-1][1]:.4f}"]
    for _, step in series.get("growth/step", []):
        before = [a for s, a in acc if s < step][-window - 1:]
        after = [a for s, a in acc if s >= step][:window]
        if before and after:
            noise = max((max(0.0, a - b) for a, b in zip(before[:-1], before[1:], strict=True)), default=0.0)
            lines.append(f"growth at step {step:.0f}: val/acc1 {before[-1]:.4f} just before, {after[0]:.4f} just "
                         f"after, lowest {min(after):.4f} over the next {len(after)} validations (change "
                         f"{min(after) - before[-1]:+.4f}); largest drop between consecutive validations over the "
                         f"{len(before) - 1} before it: {noise:.4f}")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("metrics", type=Path, help="a CSVLogger metrics.csv")
    parser.add_argument("--out", type=Path, help="PNG to write (default: metrics.png next to the CSV)")
    args = parser.parse_args(argv)
    series = read_series(args.metrics)
    if not series:
        print(f"{args.metrics} holds no metrics yet", file=sys.stderr)
        return 1
    out = args.out or args.metrics.with_name("metrics.png")
    acc = series.get("val/acc1")
    title = (f"{args.metrics.parent.name}: val/acc1 best {max(a for _, a in acc):.4f}, last {acc[-1][1]:.4f}"
             if acc else args.metrics.parent.name)
    plot(series, out, title)
    for line in summary(series):
        print(line)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
