#!/usr/bin/env python
"""Pattention cost vs its physical limit: its two bare GEMMs.

One Pattention layer ``[T, d] -> [T, d]`` with ``n`` tokens, forward+backward and forward only, timed interleaved
against the two bare GEMMs of the same shapes, ``(x @ Kᵀ) @ V`` under autograd (forward 2 GEMMs, backward 4).
Both run under the same ``--dtype`` (bf16/fp16: ``torch.autocast``, so the GEMMs run in low precision while the
layer's normalisation stays fp32). Shapes default to parameter-matched TokenFormer-B: d = 768, T = batch·197
tokens, n = 576 (attention projections) and 2304 (FFN). Goal: fwd+bwd <= 1.10x the bare GEMMs.

(TokenFormer-B vs ViT-B as whole models: scripts/benchmarks/bench_model.py.)

Examples::

    python scripts/benchmarks/bench_pattention.py --quick --out bench_pattention.json
    python scripts/benchmarks/bench_pattention.py --device cuda --dtype bfloat16 --batch 128 --out pattention_bf16.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch

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
    resolve_device,
    time_interleaved,
    write_json,
)

from tokenformer_vision import Pattention

GOAL = 1.10


def layer_case(tokens: int, dim: int, n: int, reps: int, warmup: int, device: torch.device,
               dtype: torch.dtype) -> dict[str, Any]:
    """One Pattention d->d with n tokens vs its bare GEMMs, fwd+bwd and fwd only."""
    torch.manual_seed(0)
    layer = Pattention(dim, dim, n).to(device)
    key = layer.key_param.detach().clone().requires_grad_()
    value = layer.value_param.detach().clone().requires_grad_()
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    dy = torch.randn(tokens, dim, device=device)
    bare = lambda: torch.mm(torch.mm(x, key.t()), value)
    fns = {"bare_gemms": (bare, (key, value)), "pattention": (lambda: layer(x), tuple(layer.parameters()))}

    def train(fn, params):
        def step():
            x.grad = None
            for p in params:
                p.grad = None
            with autocast(device, dtype):
                y = fn()
            y.backward(dy.to(y.dtype))
        return step

    def infer(fn):
        def step():
            with torch.no_grad(), autocast(device, dtype):
                fn()
        return step

    fwd_bwd = time_interleaved({k: train(f, p) for k, (f, p) in fns.items()}, reps, warmup, device)
    fwd = time_interleaved({k: infer(f) for k, (f, _) in fns.items()}, reps, warmup, device)
    # best of N (least load-polluted on a shared machine); medians kept for reference
    out: dict[str, Any] = dict(kind="pattention", tokens=tokens, dim=dim, n=n,
                               fwd_bwd_s={k: best(v) for k, v in fwd_bwd.items()},
                               fwd_s={k: best(v) for k, v in fwd.items()},
                               fwd_bwd_median_s={k: median(v) for k, v in fwd_bwd.items()},
                               fwd_median_s={k: median(v) for k, v in fwd.items()})
    for mode in ("fwd_bwd", "fwd"):
        out[f"{mode}_ratio"] = out[f"{mode}_s"]["pattention"] / out[f"{mode}_s"]["bare_gemms"]
        out[f"{mode}_median_ratio"] = (out[f"{mode}_median_s"]["pattention"]
                                       / out[f"{mode}_median_s"]["bare_gemms"])
    flops_fwd = 2 * 2 * tokens * dim * n  # two GEMMs, 2 flops per multiply-add
    out["bare_fwd_bwd_tflops"] = 3 * flops_fwd / out["fwd_bwd_s"]["bare_gemms"] / 1e12
    return out


def table(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table of the rows (also used by the GPU check's summary)."""
    lines = [f"| T | d | n | bare GEMMs fwd+bwd ms | Pattention fwd+bwd (goal <= {GOAL:.2f}x) | bare fwd ms | "
             "Pattention fwd | bare fwd+bwd TFLOP/s |", "|" + "---|" * 8]
    for r in rows:
        ok = "ok" if r["fwd_bwd_ratio"] <= GOAL else "MISS"
        lines.append(f"| {r['tokens']} | {r['dim']} | {r['n']} | {1e3 * r['fwd_bwd_s']['bare_gemms']:.3f} | "
                     f"{r['fwd_bwd_ratio']:.3f}x {ok} | {1e3 * r['fwd_s']['bare_gemms']:.3f} | "
                     f"{r['fwd_ratio']:.3f}x | {r['bare_fwd_bwd_tflops']:.2f} |")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_device_args(p)
    p.add_argument("--batch", type=int, default=8, help="images per batch (T = batch * 197 tokens)")
    p.add_argument("--seq", type=int, default=197, help="tokens per image")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[576, 2304], help="Pattention token counts n")
    p.add_argument("--reps", type=int, default=None, help="timed rounds (default 7 CPU, 50 GPU)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds first (default 2 CPU, 10 GPU)")
    p.add_argument("--quick", action="store_true", help="batch 4, 5 rounds: about a minute on 2 cores")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    gpu = (args.device or ("cuda" if torch.cuda.is_available() else "cpu")) == "cuda"
    args.reps = args.reps if args.reps is not None else (50 if gpu else 7)
    args.warmup = args.warmup if args.warmup is not None else (10 if gpu else 2)
    if args.quick:
        args.batch, args.reps = 4, 5
    if min(args.batch, args.seq, args.dim, args.reps, *args.tokens) < 1 or args.warmup < 0:
        p.error("--batch, --seq, --dim, --tokens and --reps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device, dtype = resolve_device(args), dtype_of(args)
    info = machine_info(device)
    print(header(info, device, dtype), flush=True)
    tokens = args.batch * args.seq
    rows = [layer_case(tokens, args.dim, n, args.reps, args.warmup, device, dtype) for n in args.tokens]
    info["loadavg_end"] = load()
    print(f"## Pattention vs its bare GEMMs (time ratio, lower is better), best of {args.reps} rounds")
    print("\n".join(table(rows)))
    print(f"# load at end: {info['loadavg_end']}")
    result = dict(machine=info, args=vars(args), layer=rows)
    write_json(args.out, result)
    return result


if __name__ == "__main__":
    main()
