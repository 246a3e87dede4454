#!/usr/bin/env python
"""Two implementation choices of the fast path, measured against their alternative side by side.

(1) ``gemm``: parameter-matched TokenFormer-B inference with its forward GEMMs as ``addmm`` + zero bias (the
    default, ``tokenformer_vision.ops._gemm``) vs plain ``mm``, and timm's ViT-B, interleaved over many rounds.
(2) ``qkv``: the three projections of one TokenFormer-B attention layer as one fused call (``attn.qkv``) vs the
    three layers called one by one, forward (no grad) and forward+backward.

    python scripts/bench_dispatch.py gemm --batches 1 32 --rounds 21 5 --out /tmp/gemm.json
    python scripts/bench_dispatch.py qkv --batch 8 --rounds 9
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Callable

import timm
import torch

import tokenformer_vision  # noqa: F401  (registers the models)
from tokenformer_vision import ops
from tokenformer_vision.layers import PattentionAttention


def summarise(times: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"best_ms": round(min(v) * 1e3, 2), "median_ms": round(statistics.median(v) * 1e3, 2)}
            for k, v in times.items()}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """One warm-up round, then ``rounds`` rounds calling every function once per round (load hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for r in range(rounds + 1):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            if r:
                times[name].append(time.perf_counter() - start)
    return times


def bench_gemm(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    tf = timm.create_model("tokenformer_base", attn_tokens=576, ffn_tokens=2304).eval()
    vit = timm.create_model("vit_base_patch16_224").eval()
    default_gemm = ops._gemm

    def with_gemm(gemm, x):
        def run():
            ops._gemm = gemm
            try:
                tf(x)
            finally:
                ops._gemm = default_gemm
        return run

    rows = []
    with torch.inference_mode():
        for batch, rounds in zip(args.batches, args.rounds, strict=True):
            x = torch.randn(batch, 3, 224, 224)
            times = interleaved({"tf_addmm": with_gemm(default_gemm, x), "tf_mm": with_gemm(torch.mm, x),
                                 "vit": lambda x=x: vit(x)}, rounds)
            stats = summarise(times)
            row = {"batch": batch, "rounds": rounds, **stats}
            for k in ("tf_addmm", "tf_mm"):
                row[f"ratio_{k}"] = {s: round(stats["vit"][s] / stats[k][s], 3) for s in ("best_ms", "median_ms")}
            print(f"batch {batch}: TokenFormer/ViT throughput, best (median) of {rounds}: "
                  f"addmm {row['ratio_tf_addmm']['best_ms']} ({row['ratio_tf_addmm']['median_ms']}), "
                  f"mm {row['ratio_tf_mm']['best_ms']} ({row['ratio_tf_mm']['median_ms']})", flush=True)
            rows.append(row)
    return rows


def bench_qkv(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(0)
    attn = PattentionAttention(768, 12, 576)
    x = torch.randn(args.batch, 197, 768, requires_grad=True)
    variants = {"fused": lambda: attn.qkv(x), "separate": lambda: (attn.q(x), attn.k(x), attn.v(x))}
    rows = []
    for backward in (False, True):
        def call(f=None, backward=backward):
            if backward:
                sum(o.sum() for o in f()).backward()
            else:
                with torch.no_grad():
                    f()
        times = interleaved({k: (lambda f=f: call(f)) for k, f in variants.items()}, args.rounds)
        row = {"pass": "fwd+bwd" if backward else "fwd", **summarise(times)}
        print(row, flush=True)
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    gemm = sub.add_parser("gemm")
    gemm.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    gemm.add_argument("--rounds", type=int, nargs="+", default=[21, 5], help="rounds per batch size")
    gemm.add_argument("--out", default=None)
    qkv = sub.add_parser("qkv")
    qkv.add_argument("--batch", type=int, default=8)
    qkv.add_argument("--rounds", type=int, default=9)
    qkv.add_argument("--out", default=None)
    args = parser.parse_args()
    start_load = os.getloadavg()
    rows = bench_gemm(args) if args.command == "gemm" else bench_qkv(args)
    result = {"command": args.command, "args": vars(args), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "load_before": start_load, "load_after": os.getloadavg(),
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
