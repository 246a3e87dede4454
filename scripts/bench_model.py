#!/usr/bin/env python
"""Parameter-matched TokenFormer-B vs timm ``vit_base_patch16_224``: inference, train step and peak memory.

Both models are built in the same process and timed interleaved (A, B, B, A, ...), so machine load hits both
alike; the table reports the best of N rounds (on a shared machine the minimum is the least load-polluted
estimate; medians are kept in the JSON) and the TokenFormer / ViT ratios (throughput ratios: > 1 means TokenFormer is
faster; memory ratio: < 1 means TokenFormer needs less).

TokenFormer-B here is ``tokenformer_base`` with ``attn_tokens=576, ffn_tokens=2304``: exactly ViT-B's 12·d²
parameters and GEMM FLOPs per block (DESIGN §2).

Peak training memory (CPU): the live tensor bytes before the step (parameters + AdamW state) plus the peak of
the allocator's running total during one profiled train step (``torch.profiler`` with ``profile_memory=True``,
"Total Allocated" of its [memory] events: activations, gradients and optimizer temporaries). Tensor bytes, not
RSS: allocator caching and Python/library overhead are left out, identically for both models.

Examples::

    python scripts/bench_model.py --quick --out bench_model.json
    python scripts/bench_model.py --batches 1 8 32 --compile-batches 8 --out bench_model.json
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import tokenformer_vision  # noqa: F401  (registers the tokenformer models in timm)
from tokenformer_vision import ops

MODELS = {
    "tokenformer_b_pm": ("tokenformer_base", dict(attn_tokens=576, ffn_tokens=2304)),
    "vit_b": ("vit_base_patch16_224", {}),
}


# ---------------------------------------------------------------------------------------------- helpers
def machine_info() -> dict[str, Any]:
    """CPU model, core count, torch version, threads and the current load (``uptime``)."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines():
            if line.startswith("Model name:"):
                cpu = line.split(":", 1)[1].strip()
    except OSError:
        pass
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        uptime = ""
    return dict(
        cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, timm=timm.__version__,
        threads=torch.get_num_threads(), python=platform.python_version(), uptime=uptime,
        loadavg=list(os.getloadavg()),
    )


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int) -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``reps`` rounds alternating the order; seconds per call."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def best(values: list[float]) -> float:
    return min(values)


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def profiled_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's running total (bytes allocated since the start) while ``fn`` runs."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    totals = [e["args"]["Total Allocated"] for e in events
              if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0]
    return max([0, *totals])


def build(name: str, img_size: int) -> nn.Module:
    timm_name, kwargs = MODELS[name]
    torch.manual_seed(0)
    return timm.create_model(timm_name, img_size=img_size, num_classes=1000, **kwargs)


class Bench:
    """One model, its AdamW optimizer and fixed inputs; eager or ``torch.compile``-d."""

    def __init__(self, name: str, batch: int, img_size: int, compiled: bool) -> None:
        self.name = name
        self.model = build(name, img_size)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.run = torch.compile(self.model) if compiled else self.model
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, img_size, img_size, generator=g)
        self.y = torch.randint(0, 1000, (batch,), generator=g)

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad():
            self.run(self.x)

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(self.run(self.x), self.y)
        loss.backward()
        self.opt.step()

    def peak_train_bytes(self) -> dict[str, int]:
        self.train_step()  # optimizer state exists from here on
        self.opt.zero_grad(set_to_none=True)
        gc.collect()
        static = tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers())
        static += optimizer_state_bytes(self.opt)
        dynamic = profiled_peak_bytes(self.train_step)
        return dict(static=static, dynamic=dynamic, total=static + dynamic)


def compare(batch: int, img_size: int, compiled: bool, reps: int, warmup: int, memory: bool) -> dict[str, Any]:
    """TokenFormer-B (param-matched) vs ViT-B at one batch size: times, throughput ratios, memory ratio."""
    benches = {name: Bench(name, batch, img_size, compiled) for name in MODELS}
    tf, vit = benches["tokenformer_b_pm"], benches["vit_b"]
    row: dict[str, Any] = dict(batch=batch, compiled=compiled, params={n: b.params for n, b in benches.items()})
    t0 = time.perf_counter()
    if compiled:  # the first calls compile (forward graph, then forward+backward): report, don't time, them
        for b in benches.values():
            b.infer()
            b.train_step()
        row["compile_s"] = round(time.perf_counter() - t0, 1)
    infer = time_interleaved({n: b.infer for n, b in benches.items()}, reps, warmup)
    train = time_interleaved({n: b.train_step for n, b in benches.items()}, reps, warmup)
    row["infer_s"] = {n: best(t) for n, t in infer.items()}
    row["train_s"] = {n: best(t) for n, t in train.items()}
    row["infer_median_s"] = {n: median(t) for n, t in infer.items()}
    row["train_median_s"] = {n: median(t) for n, t in train.items()}
    row["infer_img_per_s"] = {n: batch / t for n, t in row["infer_s"].items()}
    row["train_img_per_s"] = {n: batch / t for n, t in row["train_s"].items()}
    row["infer_ratio"] = row["infer_s"]["vit_b"] / row["infer_s"]["tokenformer_b_pm"]
    row["train_ratio"] = row["train_s"]["vit_b"] / row["train_s"]["tokenformer_b_pm"]
    if memory:
        mem = {n: b.peak_train_bytes() for n, b in benches.items()}
        row["train_peak_bytes"] = mem
        row["memory_ratio"] = mem["tokenformer_b_pm"]["total"] / mem["vit_b"]["total"]
    row["raw_times"] = dict(infer=infer, train=train)
    del tf, vit, benches
    gc.collect()
    return row


GOALS = dict(infer_ratio=(">=", 0.95), train_ratio=(">=", 0.90), memory_ratio=("<=", 1.15))


def verdict(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    op, target = GOALS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{value:.3f} {'ok' if ok else 'MISS'}"


def print_table(rows: list[dict[str, Any]], info: dict[str, Any]) -> None:
    print(f"# machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, timm {info['timm']}, "
          f"{info['threads']} threads")
    print(f"# load: {info['uptime']}")
    print("# ratios are TokenFormer-B(param-matched) / ViT-B: throughput (goal infer >= 0.95, train >= 0.90), "
          "peak train memory (goal <= 1.15)")
    header = ("mode", "batch", "TF infer ms", "ViT infer ms", "infer ratio", "TF train ms", "ViT train ms",
              "train ratio", "TF peak MB", "ViT peak MB", "memory ratio")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        mem = r.get("train_peak_bytes")
        cells = (
            "compiled" if r["compiled"] else "eager", str(r["batch"]),
            f"{1e3 * r['infer_s']['tokenformer_b_pm']:.1f}", f"{1e3 * r['infer_s']['vit_b']:.1f}",
            verdict("infer_ratio", r["infer_ratio"]),
            f"{1e3 * r['train_s']['tokenformer_b_pm']:.1f}", f"{1e3 * r['train_s']['vit_b']:.1f}",
            verdict("train_ratio", r["train_ratio"]),
            f"{mem['tokenformer_b_pm']['total'] / 2**20:.0f}" if mem else "-",
            f"{mem['vit_b']['total'] / 2**20:.0f}" if mem else "-",
            verdict("memory_ratio", r.get("memory_ratio")),
        )
        print("| " + " | ".join(cells) + " |")
    for r in rows:
        if "compile_s" in r:
            print(f"# compile time (both models, inference + train graphs) at batch {r['batch']}: {r['compile_s']} s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8, 32], help="eager batch sizes")
    p.add_argument("--compile-batches", type=int, nargs="*", default=[8],
                   help="batch sizes also measured under torch.compile (none: skip compiled figures)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--reps", type=int, default=5, help="timed rounds per measurement (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory step")
    p.add_argument("--reference", action="store_true", help="TokenFormer on the slow reference Pattention path")
    p.add_argument("--quick", action="store_true",
                   help="batches 1 and 8, compiled at batch 1 only, 3 rounds (a few minutes on 2 cores)")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.batches, args.compile_batches, args.reps = [1, 8], [1], 3
    for b in [*args.batches, *args.compile_batches]:
        if b < 1:
            p.error(f"batch sizes must be >= 1, got {b}")
    if args.reps < 1:
        p.error("--reps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ops.set_fast_path(not args.reference)
    info = machine_info()
    rows = []
    for compiled, batches in ((False, args.batches), (True, args.compile_batches)):
        for batch in batches:
            rows.append(compare(batch, args.img_size, compiled, args.reps, args.warmup, not args.no_memory))
            print(f"# done: {'compiled' if compiled else 'eager'} batch {batch}", flush=True)
    info["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print_table(rows, info)
    print(f"# load at end: {info['uptime_end']}")
    result = dict(machine=info, args=vars(args), fast_path=not args.reference, rows=rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
