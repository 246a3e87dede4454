#!/usr/bin/env python
"""TokenFormer vs timm's ViT on Fashion-MNIST, same recipe, side by side: test top-1 (mean ± std over seeds),
parameters, training FLOPs, training and inference images/s, and a plot of test accuracy against training FLOPs.

    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_fashion_mnist.py --suites parity --seeds 0 1 2 \\
        --widths 32 64 --patch-size 7 --epochs 5 --jobs 2 --workers 0 --threads 1 --device cpu \\
        --out docs/benchmarks/fashion_mnist_parity.json --plot docs/benchmarks/fashion_mnist_parity.png

(about 80 minutes on a 2-core CPU; on one GPU, ``scripts/gpu_check.sh`` runs the larger version: d 64 and 128 at
patch 4, 12 epochs, several runs at once.)

``--suites``: ``parity`` (below), ``recipe`` (the CPU-recipe candidates: width and patch size chosen by
measurement, each trained for the epochs that fill about 30 minutes of a 2-core CPU), ``gpu_recipe`` (the
GPU-sized recipe, bf16). ``--throughput-only`` measures the side-by-side throughput of the chosen suites' models
and trains nothing (how the CPU recipe's epochs were sized).

Models (shell of the same size: ``--patch-size`` p on 28², (28/p)² patches + class token, ``--depth`` blocks, head
dim 32):
  ``vit_d{d}``           timm's ``VisionTransformer`` (qkv/MLP biases, LayerNorm affine, MLP ratio 4);
  ``tokenformer_d{d}``   every projection a Pattention, parameter- and FLOP-matched to the ViT: 0.75·d tokens per
                         attention projection and 3·d FFN tokens, so a block has 12·d² weights like the ViT's;
  ``tokenformer_d{d}_n=d`` (first width only) the paper's n = d rule: d attention and 4·d FFN tokens.
Every run trains through ``benchlib.harness.train_eval`` (``ImageClassifier`` + ``IDXDataModule`` + ``Trainer``)
with the shared recipe of ``benchlib.runs`` (AdamW, warm-up + cosine to 1e-5, label smoothing 0.1, drop-path 0.1,
gradient clip 1.0; pad-2 random crop, horizontal flip, random erasing 0.25), validating on a 5,000-image hold-out
of the train split and testing on the official 10,000-image test split.

Throughput is measured after the runs, in this process, for every model side by side (interleaved, median of
``--reps``): inference (eval forward) and training (forward + backward + AdamW step) at ``--batch-size``, so
that machine load hits the models alike; the runs' own images/s (several runs share the machine) are kept in the
JSON too. Training FLOPs are counted by ``torch.utils.flop_counter`` on a training step (matmuls, convolutions
and attention; normalisations and activations are not counted), times the images seen.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the benchlib package
from benchlib.common import machine_info, time_interleaved, write_json  # noqa: E402
from benchlib.runs import add_recipe_args, config_spec, mean_std, run_all, tokenformer_spec, vit_spec  # noqa: E402

# CPU recipe candidates: (name, d, patch, epochs). Epochs fill a little under 30 minutes of a 2-core CPU at each
# model's measured training speed there (parameter-matched tokens, depth 6, batch 128: d 64 at patch 4 736 img/s,
# d 96 at patch 4 407 img/s, d 96 at patch 7 1279 img/s; about 1.4x that in time per epoch with data loading and
# validation). cpu_d64_p4 is configs/fashion_mnist/tokenformer_cpu.yaml.
RECIPE_CANDIDATES = [("cpu_d64_p4", 64, 4, 16), ("cpu_d96_p4", 96, 4, 9), ("cpu_d96_p7", 96, 7, 25)]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "fashion_mnist"


def specs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """The runs of ``args.suites``, seed-major (a cut-off benchmark keeps whole seeds), the longest first."""
    out = []
    if "gpu_recipe" in args.suites:  # the config file itself, as users run it
        out += [config_spec(CONFIGS / "tokenformer_gpu.yaml", "gpu_recipe", seed, "gpu_recipe")
                for seed in args.gpu_seeds]
    for seed in args.seeds:
        if "parity" in args.suites:
            for i, d in enumerate(args.widths):
                out.append(vit_spec(f"vit_d{d}", d, seed, args) | {"suite": "parity"})
                out.append(tokenformer_spec(f"tokenformer_d{d}", d, round(0.75 * d), 3 * d, seed, args,
                                            suite="parity"))
                if i == 0 and not args.no_n_equals_d:
                    out.append(tokenformer_spec(f"tokenformer_d{d}_n=d", d, d, 4 * d, seed, args, suite="parity"))
        if "recipe" in args.suites:
            for name, d, patch, epochs in RECIPE_CANDIDATES:
                out.append(tokenformer_spec(name, d, round(0.75 * d), 3 * d, seed, args, patch_size=patch,
                                            suite="recipe", overrides={"epochs": epochs}))
    return out


def side_by_side_throughput(names_specs: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    """Inference and training images/s of every model, measured interleaved in this process."""
    import timm
    import torch

    import tokenformer_vision  # noqa: F401  (registers the tokenformer models)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    x = torch.randn(args.batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)
    models, optims, infer, train = {}, {}, {}, {}
    for name, spec in names_specs.items():
        torch.manual_seed(0)
        models[name] = timm.create_model(spec["model_name"], num_classes=10, img_size=28, **spec["model_kwargs"])
        models[name].to(device)
        optims[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)

        def infer_fn(m=models[name]):
            m.eval()
            with torch.no_grad():
                m(x)

        def train_fn(m=models[name], o=optims[name]):
            m.train()
            torch.nn.functional.cross_entropy(m(x), y).backward()
            o.step()
            o.zero_grad(set_to_none=True)

        infer[name], train[name] = infer_fn, train_fn
    t_inf = time_interleaved(infer, reps=args.reps, warmup=3, device=device)
    t_train = time_interleaved(train, reps=args.reps, warmup=3, device=device)
    return {name: {"inference_images_per_s": args.batch_size / statistics.median(t_inf[name]),
                   "train_images_per_s": args.batch_size / statistics.median(t_train[name])} for name in names_specs}


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per model: test top-1 mean ± std over its seeds, parameters, FLOPs, throughput."""
    rows: dict[str, dict[str, Any]] = {}
    for run in results["runs"]:
        if "error" in run:
            continue
        spec = run["spec"]
        row = rows.setdefault(spec["name"], {
            "name": spec["name"], "suite": spec.get("suite", "parity"), "family": spec["family"],
            "width": spec["width"], "depth": spec["model_kwargs"]["depth"],
            "patch": spec["model_kwargs"]["patch_size"], "epochs": len(run["history"]), "params": run["params"],
            "acc": [], "flops": [], "run_img_s": [], "train_wall_s": []})
        row["acc"].append(run["test"]["test/acc1"])
        row["flops"].append(run["train_flops"])
        row["run_img_s"].append(run["train_images_per_s"])
        row["train_wall_s"].append(run["train_wall_s"])
    out = []
    for row in rows.values():
        mean, std = mean_std(row["acc"])
        out.append({**{k: row[k] for k in ("name", "suite", "family", "width", "depth", "patch", "epochs", "params")},
                    "seeds": len(row["acc"]), "test_acc1_mean": mean, "test_acc1_std": std, "test_acc1": row["acc"],
                    "train_flops": statistics.fmean(row["flops"]),
                    "run_train_images_per_s": statistics.fmean(row["run_img_s"]),
                    "run_train_wall_s": statistics.fmean(row["train_wall_s"]),
                    **results.get("throughput", {}).get(row["name"], {})})
    return sorted(out, key=lambda r: (r["suite"], r["width"], r["family"] != "vit", r["name"]))


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | suite | d / depth / patch | epochs | params | test top-1 (mean ± std) | seeds | training "
             "TFLOPs | train img/s | infer img/s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| `{r['name']}` | {r['suite']} | {r['width']} / {r['depth']} / {r['patch']} | {r['epochs']} | "
                     f"{r['params'] / 1e6:.3f}M | {100 * r['test_acc1_mean']:.2f} ± {100 * r['test_acc1_std']:.2f} | "
                     f"{r['seeds']} | {r['train_flops'] / 1e12:.2f} | "
                     f"{r.get('train_images_per_s', float('nan')):.0f} | "
                     f"{r.get('inference_images_per_s', float('nan')):.0f} |")
    return "\n".join(lines)


def plot(results: dict[str, Any], rows: list[dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for r in (r for r in rows if r["suite"] == "parity"):
        colour = "tab:blue" if r["family"] == "vit" else ("tab:green" if "n=d" in r["name"] else "tab:orange")
        ax.errorbar(r["train_flops"], 100 * r["test_acc1_mean"], yerr=100 * r["test_acc1_std"], fmt="o",
                    color=colour, capsize=3, label=r["name"])
        ax.scatter([r["train_flops"]] * len(r["test_acc1"]), [100 * a for a in r["test_acc1"]], color=colour,
                   s=8, alpha=0.4)
    ax.set_xscale("log")
    ax.set_xlabel("training FLOPs (forward + backward, all epochs)")
    ax.set_ylabel("Fashion-MNIST test top-1 (%)")
    ax.set_title(f"TokenFormer vs ViT, {results['args']['epochs']} epochs, {len(results['args']['seeds'])} seeds")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_args(parser, epochs=30)
    parser.add_argument("--suites", nargs="+", default=["parity"], choices=["parity", "recipe", "gpu_recipe"],
                        help="parity: ViT vs TokenFormer at --widths; recipe: the CPU-recipe candidates; "
                             "gpu_recipe: the GPU-sized recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gpu-seeds", type=int, nargs="+", default=[0], help="seeds of the gpu_recipe suite")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--no-n-equals-d", action="store_true", help="leave out the n = d TokenFormer")
    parser.add_argument("--reps", type=int, default=10, help="timed calls per model in the throughput comparison")
    parser.add_argument("--out", default=None, help="JSON of every run and the summary")
    parser.add_argument("--plot", default=None, help="PNG: test accuracy against training FLOPs")
    parser.add_argument("--save-weights", default=None, help="folder for each run's trained weights (.pt)")
    parser.add_argument("--throughput-only", action="store_true", help="only the side-by-side throughput")
    parser.add_argument("--from-json", default=None,
                        help="summarise (table, --plot) the runs of an earlier --out file instead of training")
    args = parser.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        results["summary"] = summarise(results)
        print(markdown(results["summary"]))
        if args.plot:
            plot(results, results["summary"], args.plot)
        return
    all_specs = specs(args)
    if args.throughput_only:
        names_specs = {s["name"]: s for s in all_specs}
        for name, r in side_by_side_throughput(names_specs, args).items():
            print(f"{name:24s} train {r['train_images_per_s']:8.1f} img/s   "
                  f"infer {r['inference_images_per_s']:8.1f} img/s")
        return
    header = {"command": " ".join(sys.argv), "args": vars(args), "machine": machine_info(args.device)}
    results = run_all(all_specs, args, args.out, header)
    unique = {s["name"]: s for s in all_specs if s.get("suite") != "gpu_recipe"}
    results["throughput"] = side_by_side_throughput(unique, args)
    results["summary"] = summarise(results)
    table = markdown(results["summary"])
    results["markdown"] = table
    write_json(args.out, results)
    print(table)
    if args.plot:
        plot(results, results["summary"], args.plot)


if __name__ == "__main__":
    main()
