"""Token reduction that pays: accuracy and wall-clock inference throughput in one run (docs/benchmarks.md,
"Token reduction: accuracy vs throughput").

One model family (a small TokenFormer), one dataset (scikit-learn's digits through ``DigitsDataModule``, upsampled
to 48² with patch 4: 144 patches + cls), several training seeds. Rows:

- the unrouted model;
- threshold routing (TSA) trained straight-through with ``routing_target`` (evaluated at the trained threshold);
- capacity routing (Mixture-of-Depths) at several capacities (trained);
- token merging (ToMe) at several rates, applied to the trained unrouted model without retraining.

Every model is trained with the same recipe, data order and seed; accuracy is the mean over seeds on the held-out
digits. Throughput is images/s at a fixed batch after warm-up, all models timed interleaved in one process
(median of the repetitions). The training runs go to ``--jobs`` worker processes (one thread each); their step
time (forward + backward + optimizer step, median over the run) is recorded as wall time and as process CPU time,
which with one thread measures the compute alone whatever the machine's load. For the routed models the Pearson
correlation between a patch's depth (blocks it went through) and its pixel variance is computed over the
validation images, raw and within patch position (both centred per position, so that the grid position alone
cannot explain it).

    OMP_NUM_THREADS=1 python scripts/benchmarks/bench_token_reduction.py --threads 1 --jobs 3 --out-dir docs/benchmarks

Writes ``token_reduction.json``, ``token_reduction.md`` (the table) and ``token_reduction_pareto.png``; with
``--save-dir`` also the seed-0 weights of the routed models (safetensors, for ``routing_map.py``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from common import add_device_args, autocast, dtype_of, load, machine_info, resolve_device, time_interleaved, timed

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import DigitsDataModule, TokenFormerViT


def build(args: argparse.Namespace, seed: int, **routing) -> TokenFormerViT:
    torch.manual_seed(seed)
    return timm.create_model("tokenformer_tiny", num_classes=10, img_size=args.img_size, patch_size=args.patch_size,
                             embed_dim=args.dim, depth=args.depth, num_heads=args.heads, global_pool=args.pool,
                             **routing)


def digits(args: argparse.Namespace) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Train and validation tensors of ``DigitsDataModule``: its images (upscaled once to ``img_size``) normalised
    with its statistics, as its evaluation transform gives them (no augmentation)."""
    dm = DigitsDataModule(img_size=args.img_size, seed=0, num_workers=0)
    cfg = dm.transform_config
    images = torch.from_numpy(dm.images).permute(0, 3, 1, 2).float() / 255.0
    images = (images - torch.tensor(cfg.mean)[:, None, None]) / torch.tensor(cfg.std)[:, None, None]
    targets = torch.as_tensor(dm.targets).long()
    return {stage: (images[getattr(dm, f"{stage}_indices")], targets[getattr(dm, f"{stage}_indices")])
            for stage in ("train", "val")}


def train(args: argparse.Namespace, seed: int, kwargs: dict) -> tuple[dict, dict]:
    """One training run (a worker process): AdamW, one warm-up epoch then cosine, label smoothing, loss +
    ``routing_loss()``; wall and process-CPU time per step. Returns the weights and the timings."""
    torch.set_num_threads(args.threads or 1)
    device, dtype = torch.device(args.device), dtype_of(args)
    x, y = digits(args)["train"]
    model = build(args, seed, **kwargs).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.05, betas=(0.9, 0.95))
    per_epoch = len(x) // args.batch
    total, warmup = args.epochs * per_epoch, args.warmup_epochs * per_epoch
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                                 0.5 * (1 + math.cos(math.pi * (s - warmup) / max(total - warmup, 1))))
    g = torch.Generator().manual_seed(seed)
    steps: list[float] = []
    cpu: list[float] = []  # process CPU time per step: with one thread, the compute alone, whatever the load
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(per_epoch):
            idx = order[i * args.batch:(i + 1) * args.batch]
            images, targets = x[idx].to(device), y[idx].to(device)
            cpu_start = time.process_time()
            with timed(device, steps):
                with autocast(device, dtype):
                    loss = F.cross_entropy(model(images), targets, label_smoothing=0.1) + model.routing_loss()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
            cpu.append(time.process_time() - cpu_start)
            schedule.step()
    info = {"train_seconds": round(time.perf_counter() - start, 1), "steps": len(steps),
            "step_ms": round(1000 * statistics.median(steps), 2),
            "step_cpu_ms": round(1000 * statistics.median(cpu), 2), "final_loss": round(float(loss.detach()), 4)}
    return {k: v.cpu() for k, v in model.state_dict().items()}, info


@torch.no_grad()
def evaluate(model: TokenFormerViT, val: list, device: torch.device, dtype: torch.dtype) -> dict:
    """Top-1 (%), fraction of token-block work done (mean over blocks of tokens in / tokens at the start) and, for
    a routed model, the depth–pixel-variance correlations."""
    model.eval().to(device)
    correct = total = 0
    work: list[float] = []
    hooks = [b.register_forward_hook(lambda m, i, o: work.append((i[0].shape[1] + o.shape[1]) / 2))
             for b in model.blocks] if model.merge_tokens else []
    depths, variances, tlops = [], [], []
    for images, targets in val:
        with autocast(device, dtype):
            logits = model(images.to(device))
        correct += int((logits.argmax(-1).cpu() == targets).sum())
        total += len(targets)
        if model.token_routing:
            tlops.append(model.routing_stats().tlops * len(targets))
            depths.append(model.routing_depth_map()[:, model.num_prefix_tokens:].float().cpu())
            p = model.patch_embed.patch_size[0]
            patches = F.unfold(images, kernel_size=p, stride=p)  # [B, C·p², N], N in the patch grid's order
            variances.append(patches.var(dim=1))
    for h in hooks:
        h.remove()
    n0 = model.patch_embed.num_patches + model.num_prefix_tokens
    out = {"acc1": 100.0 * correct / total, "images": total}
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
    ax.set_ylabel("top-1 accuracy (%), mean ± std over seeds")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(rows: list[dict]) -> str:
    lines = ["| method | setting | top-1 % (mean ± std) | Δ pt | images/s | speed-up | work | train step ms | "
             "train speed-up (wall / CPU) | r(depth, var) | r within position |", "|" + "---|" * 11]
    def fmt(r: dict, key: str, spec: str = ".2f") -> str:
        return format(r[key], spec) if r.get(key) is not None else "–"

    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {r['acc1']:.2f} ± {r['acc1_std']:.2f} | "
                     f"{r['delta_pt']:+.2f} | {r['img_per_s']:.0f} | {r['speedup']:.2f}× | {fmt(r, 'work', '.3f')} | "
                     f"{fmt(r, 'step_ms', '.1f')} | {fmt(r, 'train_speedup')} / {fmt(r, 'train_speedup_cpu')} | "
                     f"{fmt(r, 'pearson_depth_variance', '.3f')} | {fmt(r, 'pearson_within_position', '.3f')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=3, help="training runs in parallel (one thread each)")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--warmup-epochs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--img-size", type=int, default=48)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--pool", default="avg", help="global_pool: 'avg' (size-weighted under merging) or 'token'")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.6], help="TSA routing_target")
    parser.add_argument("--capacities", type=float, nargs="+", default=[0.5])
    parser.add_argument("--merge-rates", type=int, nargs="+", default=[8, 16, 24, 32, 48])
    parser.add_argument("--infer-batch", type=int, default=64)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out-dir", default="docs/benchmarks")
    parser.add_argument("--save-dir", default=None, help="seed-0 weights of the routed models (safetensors)")
    args = parser.parse_args()
    device, dtype = resolve_device(args), dtype_of(args)
    info = machine_info(device)
    started = time.perf_counter()
    xv, yv = digits(args)["val"]
    val = list(zip(xv.split(128), yv.split(128), strict=True))
    infer_x = torch.cat([x for x, _ in val])[: args.infer_batch].to(device)

    configs = [("unrouted", "–", {})]
    configs += [("threshold", f"target {t:g}", dict(token_routing=True, routing_target=t)) for t in args.targets]
    configs += [("capacity", f"capacity {c:g}", dict(token_routing=True, routing_capacity=c))
                for c in args.capacities]
    runs: dict[tuple[str, str], list[dict]] = {}
    models: dict[tuple[str, str, int], TokenFormerViT] = {}
    jobs = [(seed, *config) for seed in args.seeds for config in configs]
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train, args, seed, kwargs) for seed, _, _, kwargs in jobs]
        for (seed, method, setting, kwargs), future in zip(jobs, futures, strict=True):
            state, info_train = future.result()
            model = build(args, seed, **kwargs)
            model.load_state_dict(state)
            result = {"seed": seed, **info_train, **evaluate(model, val, device, dtype)}
            runs.setdefault((method, setting), []).append(result)
            models[(method, setting, seed)] = model
            print(f"seed {seed} {method} {setting}: {result}", flush=True)
            if method != "unrouted" and seed == args.seeds[0] and args.save_dir:
                from safetensors.torch import save_file
                path = Path(args.save_dir) / f"digits48_{method}_{setting.split()[-1]}.safetensors"
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    for seed in args.seeds:
        for r in args.merge_rates:  # no retraining: the trained unrouted model with merging switched on
            model = copy.deepcopy(models[("unrouted", "–", seed)])
            model.merge_tokens = r
            result = {"seed": seed, **evaluate(model, val, device, dtype)}
            runs.setdefault(("merging", f"r={r}"), []).append(result)
            models[("merging", f"r={r}", seed)] = model
            print(f"seed {seed} merging r={r}: {result}", flush=True)
    runs = {key: runs[key] for key in [*[(m, s) for m, s, _ in configs], *[k for k in runs if k[0] == "merging"]]}

    print(f"timing {len(models)} models, batch {args.infer_batch}, {args.reps} interleaved reps", flush=True)
    fns = {}
    for key, model in models.items():
        model.eval()
        fns[key] = (lambda m: lambda: m(infer_x))(model)
    with torch.inference_mode(), autocast(device, dtype):
        times = time_interleaved(fns, reps=args.reps, warmup=args.warmup, device=device)

    rows = []
    for (method, setting), results in runs.items():
        speeds = [args.infer_batch / statistics.median(times[(method, setting, r["seed"])]) for r in results]
        accs = [r["acc1"] for r in results]
        row = {"method": method, "setting": setting, "acc1": statistics.mean(accs),
               "acc1_std": statistics.stdev(accs) if len(accs) > 1 else 0.0, "acc1_seeds": accs,
               "img_per_s": statistics.mean(speeds), "img_per_s_seeds": [round(s, 1) for s in speeds],
               "runs": results}
        for key in ("work", "step_ms", "step_cpu_ms", "pearson_depth_variance", "pearson_within_position"):
            if key in results[0]:
                row[key] = statistics.mean(r[key] for r in results)
        rows.append(row)
    base = rows[0]
    for row in rows:
        row["delta_pt"] = row["acc1"] - base["acc1"]
        row["speedup"] = row["img_per_s"] / base["img_per_s"]
        if "step_ms" in row:
            row["train_speedup"] = base["step_ms"] / row["step_ms"]
            row["train_speedup_cpu"] = base["step_cpu_ms"] / row["step_cpu_ms"]
    ok = [r for r in rows if r["delta_pt"] >= -0.5]
    best = max(ok, key=lambda r: r["speedup"])
    goals = {
        "best_within_0.5pt": f"{best['method']} {best['setting']}: {best['speedup']:.2f}× at "
                             f"{best['delta_pt']:+.2f} pt",
        "throughput_goal_1.5x_reached": best["speedup"] >= 1.5,
        "capacity_training_goal": [f"{r['setting']}: step {r['train_speedup']:.2f}× wall, "
                                   f"{r['train_speedup_cpu']:.2f}× CPU, {r['delta_pt']:+.2f} pt"
                                   for r in rows if r["method"] == "capacity"],
        "capacity_training_goal_reached": any(r["train_speedup"] >= 1.2 and r["delta_pt"] >= -0.5
                                              for r in rows if r["method"] == "capacity"),
    }
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = {"args": vars(args), "machine_start": info, "machine_end": {"loadavg": load()},
              "wall_seconds": round(time.perf_counter() - started, 1), "goals": goals, "rows": rows}
    (out / "token_reduction.json").write_text(json.dumps(result, indent=1))
    (out / "token_reduction.md").write_text(markdown(rows))
    title = (f"digits {args.img_size}² patch {args.patch_size}, d {args.dim}, depth {args.depth}, {args.epochs} "
             f"epochs, {len(args.seeds)} seeds; {info['cpu']}, {info['threads']} thread(s), batch {args.infer_batch}")
    pareto_plot(rows, out / "token_reduction_pareto.png", title)
    print(markdown(rows))
    print(json.dumps(goals, indent=1))


if __name__ == "__main__":
    main()
