#!/usr/bin/env python
"""Parameter-matched TokenFormer-B vs timm ``vit_base_patch16_224``: inference, train step and peak memory.

Both models are built in the same process and timed interleaved (A, B, B, A, ...), so machine load hits both
alike; the table reports the best of N rounds (on a shared machine the minimum is the least load-polluted
estimate; medians are kept in the JSON) and the TokenFormer / ViT ratios (throughput ratios: > 1 means TokenFormer is
faster; memory ratio: < 1 means TokenFormer needs less). On CUDA every timed call is synchronised.

TokenFormer-B here is ``tokenformer_base`` with ``attn_tokens=576, ffn_tokens=2304``: exactly ViT-B's 12·d²
parameters and GEMM FLOPs per block (docs/design.md). ``--size tiny`` compares the parameter-matched
``tokenformer_tiny`` (144/576 tokens) with ``vit_tiny_patch16_224`` instead (quick checks).

``--dtype bfloat16|float16`` runs forward and loss under ``torch.autocast`` (parameters and AdamW state stay fp32,
as in mixed-precision training; fp16 without a loss scaler: a timing, not a recipe).

Peak training memory: the live tensor bytes before the step (parameters + buffers + AdamW state) plus the peak
during one train step above what was allocated before it: on CUDA from ``torch.cuda.max_memory_allocated``; on the
CPU from the allocator's running total in ``torch.profiler`` (``profile_memory=True``; tensor bytes, not RSS:
allocator caching and Python/library overhead are left out, identically for both models).

Defaults: CPU batches 1 8 32 eager and 8 compiled; GPU batches 1 32 128 256 eager and 128 256 compiled.

Examples::

    python scripts/benchmarks/bench_model.py --quick --out bench_model.json
    python scripts/benchmarks/bench_model.py --device cpu --batches 1 8 32 --compile-batches 8 --out bench_model.json
    python scripts/benchmarks/bench_model.py --device cuda --dtype bfloat16 --out bench_model_bf16.json
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the benchlib package
from benchlib.common import (
    add_device_args,
    autocast,
    best,
    dtype_of,
    header,
    load,
    machine_info,
    median,
    memory_method,
    optimizer_state_bytes,
    peak_bytes,
    resolve_device,
    sync,
    tensor_bytes,
    time_interleaved,
    write_json,
)
from torch import nn

import tokenformer_vision  # noqa: F401  (registers the tokenformer models in timm)

PAIRS = {
    "base": {"tokenformer": ("tokenformer_base", dict(attn_tokens=576, ffn_tokens=2304)),
             "vit": ("vit_base_patch16_224", {})},
    "tiny": {"tokenformer": ("tokenformer_tiny", dict(attn_tokens=144, ffn_tokens=576)),
             "vit": ("vit_tiny_patch16_224", {})},
}
TF, VIT = "tokenformer", "vit"


def build(size: str, name: str, img_size: int, depth: int | None = None) -> nn.Module:
    timm_name, kwargs = PAIRS[size][name]
    if depth is not None:
        kwargs = {**kwargs, "depth": depth}
    torch.manual_seed(0)
    return timm.create_model(timm_name, img_size=img_size, num_classes=1000, **kwargs)


class Bench:
    """One model, its AdamW optimizer and fixed inputs on ``device``; eager or ``torch.compile``-d."""

    def __init__(self, size: str, name: str, batch: int, img_size: int, compiled: bool, device: torch.device,
                 dtype: torch.dtype, backend: str, depth: int | None = None) -> None:
        self.device, self.dtype = device, dtype
        self.model = build(size, name, img_size, depth).to(device)
        self.params = sum(p.numel() for p in self.model.parameters())
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-4)
        self.run = torch.compile(self.model, backend=backend, dynamic=False) if compiled else self.model
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(batch, 3, img_size, img_size, generator=g).to(device)
        self.y = torch.randint(0, 1000, (batch,), generator=g).to(device)

    def infer(self) -> None:
        self.model.eval()
        with torch.no_grad(), autocast(self.device, self.dtype):
            self.run(self.x)

    def train_step(self) -> None:
        self.model.train()
        self.opt.zero_grad(set_to_none=True)
        with autocast(self.device, self.dtype):
            loss = F.cross_entropy(self.run(self.x), self.y)
        loss.backward()
        self.opt.step()

    def peak_train_bytes(self) -> dict[str, int]:
        self.train_step()  # optimizer state exists from here on
        self.opt.zero_grad(set_to_none=True)
        sync(self.device)
        gc.collect()
        static = tensor_bytes(self.model.parameters()) + tensor_bytes(self.model.buffers())
        static += optimizer_state_bytes(self.opt)
        dynamic = peak_bytes(self.train_step, self.device)
        return dict(static=static, dynamic=dynamic, total=static + dynamic)


def compare(size: str, batch: int, img_size: int, compiled: bool, reps: int, warmup: int, memory: bool,
            device: torch.device, dtype: torch.dtype, backend: str = "inductor",
            depth: int | None = None) -> dict[str, Any]:
    """TokenFormer (param-matched) vs ViT at one batch size: times, throughput ratios, memory ratio."""
    if compiled:
        torch._dynamo.reset()  # a fresh compile per row: no recompile-limit or dynamic-shape carry-over
    benches = {name: Bench(size, name, batch, img_size, compiled, device, dtype, backend, depth)
               for name in (TF, VIT)}
    row: dict[str, Any] = dict(batch=batch, compiled=compiled, img_size=img_size,
                               models={n: PAIRS[size][n][0] for n in benches},
                               params={n: b.params for n, b in benches.items()})
    if compiled:  # the first calls compile (forward graph, then forward+backward): report, don't time, them
        for name, b in benches.items():
            sync(device)
            t0 = time.perf_counter()
            b.infer()
            b.train_step()
            sync(device)
            row.setdefault("compile_s", {})[name] = round(time.perf_counter() - t0, 1)
    infer = time_interleaved({n: b.infer for n, b in benches.items()}, reps, warmup, device)
    train = time_interleaved({n: b.train_step for n, b in benches.items()}, reps, warmup, device)
    row["infer_s"] = {n: best(t) for n, t in infer.items()}
    row["train_s"] = {n: best(t) for n, t in train.items()}
    row["infer_median_s"] = {n: median(t) for n, t in infer.items()}
    row["train_median_s"] = {n: median(t) for n, t in train.items()}
    row["infer_img_per_s"] = {n: batch / t for n, t in row["infer_s"].items()}
    row["train_img_per_s"] = {n: batch / t for n, t in row["train_s"].items()}
    row["infer_ratio"] = row["infer_s"][VIT] / row["infer_s"][TF]
    row["train_ratio"] = row["train_s"][VIT] / row["train_s"][TF]
    if memory:
        mem = {n: b.peak_train_bytes() for n, b in benches.items()}
        row["train_peak_bytes"] = mem
        row["memory_ratio"] = mem[TF]["total"] / mem[VIT]["total"]
    row["raw_times"] = dict(infer=infer, train=train)
    row["load_after"] = load()
    del benches
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


GOALS = dict(infer_ratio=(">=", 0.95), train_ratio=(">=", 0.90), memory_ratio=("<=", 1.15))


def verdict(key: str, value: float | None) -> str:
    if value is None:
        return "-"
    op, target = GOALS[key]
    ok = value >= target if op == ">=" else value <= target
    return f"{value:.3f} {'ok' if ok else 'MISS'}"


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the rows (also used by the GPU check's summary)."""
    lines = ["| mode | batch | TF infer img/s | ViT infer img/s | infer ratio | TF train img/s | ViT train img/s | "
             "train ratio | TF peak MiB | ViT peak MiB | memory ratio |",
             "|" + "---|" * 11]
    for r in rows:
        mem = r.get("train_peak_bytes")
        cells = (
            "compiled" if r["compiled"] else "eager", str(r["batch"]),
            f"{r['infer_img_per_s'][TF]:.3g}", f"{r['infer_img_per_s'][VIT]:.3g}",
            verdict("infer_ratio", r["infer_ratio"]),
            f"{r['train_img_per_s'][TF]:.3g}", f"{r['train_img_per_s'][VIT]:.3g}",
            verdict("train_ratio", r["train_ratio"]),
            f"{mem[TF]['total'] / 2**20:.0f}" if mem else "-",
            f"{mem[VIT]['total'] / 2**20:.0f}" if mem else "-",
            verdict("memory_ratio", r.get("memory_ratio")),
        )
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(p)
    p.add_argument("--size", choices=list(PAIRS), default="base",
                   help="base: TokenFormer-B vs ViT-B (default); tiny: TokenFormer-Ti vs ViT-Ti (quick checks)")
    p.add_argument("--batches", type=int, nargs="*", default=None,
                   help="eager batch sizes (default: 1 8 32 on CPU, 1 32 128 256 on GPU; none: compiled only)")
    p.add_argument("--compile-batches", type=int, nargs="*", default=None,
                   help="batch sizes also measured under torch.compile (default: 8 on CPU, 128 256 on GPU; "
                        "none: skip compiled figures)")
    p.add_argument("--compile-backend", default="inductor",
                   help="torch.compile backend (\"eager\": graph capture only, a quick check of the compiled path)")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--depth", type=int, default=None, help="override both models' depth (quick checks only)")
    p.add_argument("--reps", type=int, default=None, help="timed rounds per measurement (default 5 CPU, 20 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 1 CPU, 3 GPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory step")
    p.add_argument("--quick", action="store_true",
                   help="CPU: batches 1 and 8, compiled at batch 1 only, 3 rounds (a few minutes on 2 cores)")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here (after every row)")
    args = p.parse_args(argv)
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    if args.batches is None:
        args.batches = [1, 32, 128, 256] if gpu else [1, 8, 32]
    if args.compile_batches is None:
        args.compile_batches = [128, 256] if gpu else [8]
    if args.reps is None:
        args.reps = 20 if gpu else 5
    if args.warmup is None:
        args.warmup = 3 if gpu else 1
    if args.quick:
        args.batches, args.compile_batches, args.reps = [1, 8], [1], 3
    for b in [*args.batches, *args.compile_batches]:
        if b < 1:
            p.error(f"batch sizes must be >= 1, got {b}")
    if args.reps < 1 or args.warmup < 0:
        p.error("--reps must be >= 1 and --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = resolve_device(args), dtype_of(args)
    info = machine_info(device)
    print(header(info, device, dtype), flush=True)
    result: dict[str, Any] = dict(machine=info, args=vars(args), memory_method=memory_method(device), rows=[])
    for compiled, batches in ((False, args.batches), (True, args.compile_batches)):
        for batch in batches:
            result["rows"].append(compare(args.size, batch, args.img_size, compiled, args.reps, args.warmup,
                                          not args.no_memory, device, dtype, args.compile_backend, args.depth))
            print(f"# done: {'compiled' if compiled else 'eager'} batch {batch}", flush=True)
            write_json(args.out, result)  # partial results survive an interrupted run
    result["machine"]["loadavg_end"] = load()
    print(f"# ratios are TokenFormer / ViT ({args.size}): throughput (goal infer >= 0.95, train >= 0.90), peak "
          f"train memory (goal <= 1.15); best of {args.reps} rounds")
    print("\n".join(table(result["rows"])))
    for r in result["rows"]:
        if "compile_s" in r:
            print(f"# compile time (inference + train graphs) at batch {r['batch']}: {r['compile_s']} s")
    print(f"# load at end: {result['machine']['loadavg_end']}")
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
