#!/usr/bin/env python
"""Pattention cost vs its physical limit (its two bare GEMMs), and TokenFormer-B vs ViT-B.

(1) One Pattention layer ``[T, d] -> [T, d]`` with ``n`` tokens, forward+backward (and forward only), timed
    interleaved against the two bare GEMMs of the same shapes, ``(x @ Kᵀ) @ V`` under autograd (forward 2 GEMMs,
    backward 4): reference path (plain autograd through the formula) and fast path (tokenformer_vision.ops).
    Shapes default to parameter-matched TokenFormer-B: d = 768, T = batch·197 tokens, n = 576 (attention
    projections) and 2304 (FFN); plus Q/K/V as three layers vs one fused call vs its bare GEMMs.
    Goal: fast fwd+bwd <= 1.10x bare GEMMs.
(2) Parameter-matched TokenFormer-B vs timm vit_base_patch16_224 at one batch size: inference and a train step
    (see scripts/bench_model.py for the table over batch sizes, compiled figures and memory).

Example::

    python scripts/bench_pattention.py --quick --out bench_pattention.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_model import best, compare, machine_info, median, time_interleaved  # noqa: E402

from tokenformer_vision import Pattention, ops  # noqa: E402

GOAL = 1.10


def layer_case(tokens: int, dim: int, n: int, reps: int, warmup: int) -> dict[str, Any]:
    """One Pattention d->d with n tokens: bare GEMMs vs reference vs fast, fwd+bwd and fwd only."""
    torch.manual_seed(0)
    ref = Pattention(dim, dim, n, fast=False)
    fast = Pattention(dim, dim, n, fast=True)
    fast.load_state_dict(ref.state_dict())
    key = ref.key_param.detach().clone().requires_grad_()
    value = ref.value_param.detach().clone().requires_grad_()
    x = torch.randn(tokens, dim, requires_grad=True)
    dy = torch.randn(tokens, dim)
    bare = lambda: torch.mm(torch.mm(x, key.t()), value)
    fns = {"bare_gemms": (bare, (key, value)), "reference": (lambda: ref(x), tuple(ref.parameters())),
           "fast": (lambda: fast(x), tuple(fast.parameters()))}
    return _time_variants(fns, x, dy, reps, warmup) | dict(kind="pattention", tokens=tokens, dim=dim, n=n)


def qkv_case(tokens: int, dim: int, n: int, reps: int, warmup: int) -> dict[str, Any]:
    """Q, K, V on one input: bare GEMMs (one over concatenated keys + three value GEMMs) vs three reference
    layers vs three fast layers vs one fused call."""
    torch.manual_seed(0)
    layers = [Pattention(dim, dim, n, fast=False) for _ in range(3)]
    key_cat = torch.cat([p.key_param.detach() for p in layers]).requires_grad_()
    values = [p.value_param.detach().clone().requires_grad_() for p in layers]
    x = torch.randn(tokens, dim, requires_grad=True)
    dy = torch.randn(tokens, dim)

    def bare():
        a = torch.mm(x, key_cat.t())
        return sum(torch.mm(a[:, i * n:(i + 1) * n], values[i]) for i in range(3))

    def separate(fast: bool):
        with ops.fast_path(fast):
            return sum(torch.nn.Module.__call__(_unpin(p), x) for p in layers)

    def fused():
        outs = ops.pattention_fused(x, [p.key_param for p in layers], [p.value_param for p in layers],
                                    [p.tau for p in layers], layers[0].eps)
        return sum(outs)

    params = tuple(q for p in layers for q in p.parameters())
    fns = {"bare_gemms": (bare, (key_cat, *values)), "reference": (lambda: separate(False), params),
           "fast_separate": (lambda: separate(True), params), "fast": (fused, params)}
    return _time_variants(fns, x, dy, reps, warmup) | dict(kind="qkv", tokens=tokens, dim=dim, n=n)


def _unpin(layer: Pattention) -> Pattention:
    layer.fast = None  # follow the process-wide switch set by ops.fast_path()
    return layer


def _time_variants(fns, x, dy, reps, warmup) -> dict[str, Any]:
    def train(fn, params):
        def step():
            x.grad = None
            for p in params:
                p.grad = None
            fn().backward(dy)
        return step

    def infer(fn):
        def step():
            with torch.no_grad():
                fn()
        return step

    fwd_bwd = time_interleaved({k: train(f, p) for k, (f, p) in fns.items()}, reps, warmup)
    fwd = time_interleaved({k: infer(f) for k, (f, _) in fns.items()}, reps, warmup)
    # best of N (least load-polluted on a shared machine); medians kept for reference
    out: dict[str, Any] = dict(fwd_bwd_s={k: best(v) for k, v in fwd_bwd.items()},
                               fwd_s={k: best(v) for k, v in fwd.items()},
                               fwd_bwd_median_s={k: median(v) for k, v in fwd_bwd.items()},
                               fwd_median_s={k: median(v) for k, v in fwd.items()})
    for mode in ("fwd_bwd", "fwd"):
        base = out[f"{mode}_s"]["bare_gemms"]
        out[f"{mode}_ratio"] = {k: v / base for k, v in out[f"{mode}_s"].items() if k != "bare_gemms"}
    return out


def print_layer_table(rows: list[dict[str, Any]]) -> None:
    print(f"## Pattention vs its bare GEMMs (time ratio, lower is better; goal fast fwd+bwd <= {GOAL:.2f}x)")
    header = ("case", "T", "d", "n", "bare fwd+bwd ms", "ref fwd+bwd", "fast fwd+bwd", "bare fwd ms",
              "ref fwd", "fast fwd")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for r in rows:
        fb, f = r["fwd_bwd_ratio"], r["fwd_ratio"]
        extra = "" if "fast_separate" not in fb else f" (separate {fb['fast_separate']:.3f}x)"
        extra_f = "" if "fast_separate" not in f else f" (separate {f['fast_separate']:.3f}x)"
        ok = "ok" if fb["fast"] <= GOAL else "MISS"
        print(f"| {r['kind']} | {r['tokens']} | {r['dim']} | {r['n']} | {1e3 * r['fwd_bwd_s']['bare_gemms']:.1f} | "
              f"{fb['reference']:.3f}x | {fb['fast']:.3f}x {ok}{extra} | {1e3 * r['fwd_s']['bare_gemms']:.1f} | "
              f"{f['reference']:.3f}x | {f['fast']:.3f}x{extra_f} |")


def print_model_row(row: dict[str, Any]) -> None:
    print(f"## TokenFormer-B (param-matched, {row['params']['tokenformer_b_pm']:,} params) vs ViT-B "
          f"({row['params']['vit_b']:,} params), batch {row['batch']}, "
          f"{'compiled' if row['compiled'] else 'eager'}")
    print(f"inference: TF {1e3 * row['infer_s']['tokenformer_b_pm']:.1f} ms, ViT {1e3 * row['infer_s']['vit_b']:.1f} ms"
          f" -> throughput ratio {row['infer_ratio']:.3f} (goal >= 0.95)")
    print(f"train step: TF {1e3 * row['train_s']['tokenformer_b_pm']:.1f} ms, ViT {1e3 * row['train_s']['vit_b']:.1f}"
          f" ms -> throughput ratio {row['train_ratio']:.3f} (goal >= 0.90)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=8, help="images per batch (T = batch * 197 tokens)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--tokens", type=int, nargs="+", default=[576, 2304], help="Pattention token counts n")
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--skip-model", action="store_true", help="only the layer benchmark (1)")
    p.add_argument("--model-compiled", action="store_true", help="also compare the models under torch.compile")
    p.add_argument("--quick", action="store_true", help="batch 4, 5 rounds: about a minute on 2 cores")
    p.add_argument("--out", type=str, default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.reps = 4, 5
    if args.batch < 1 or args.dim < 1 or any(n < 1 for n in args.tokens) or args.reps < 1:
        p.error("--batch, --dim, --tokens and --reps must be positive")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    info = machine_info()
    print(f"# machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, {info['threads']} threads")
    print(f"# load: {info['uptime']}")
    tokens = args.batch * 197
    layer_rows = [layer_case(tokens, args.dim, n, args.reps, args.warmup) for n in args.tokens]
    layer_rows.append(qkv_case(tokens, args.dim, min(args.tokens), args.reps, args.warmup))
    print_layer_table(layer_rows)
    model_rows = []
    if not args.skip_model:
        for compiled in (False, True) if args.model_compiled else (False,):
            model_rows.append(compare(args.batch, 224, compiled, max(3, args.reps // 2), 1, memory=False))
            print_model_row(model_rows[-1])
    import subprocess

    info["uptime_end"] = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    print(f"# load at end: {info['uptime_end']}")
    result = dict(machine=info, args=vars(args), layer=layer_rows, model=model_rows)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
