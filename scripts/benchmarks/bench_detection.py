"""Faster R-CNN forward time and peak memory on TokenFormer trunks vs a timm ViT trunk (same pyramid, same heads).

Every model is the same torchvision Faster R-CNN with the same ViTDet simple feature pyramid; only the trunk
differs. Timing runs all models round-robin in one process (so machine load hits them alike) and splits each
forward into trunk / pyramid / rest (transform, RPN, RoI heads) with forward hooks. Peak memory is measured
for each model in a fresh subprocess: on CPU the peak resident-set growth of one inference forward (Linux
``VmHWM``, reset through ``/proc/self/clear_refs``), on CUDA ``torch.cuda.max_memory_allocated``.
``--dtype bfloat16|float16`` runs the detector under ``torch.autocast``.

    python scripts/benchmarks/bench_detection.py --json bench_detection.json
    python scripts/benchmarks/bench_detection.py --device cuda --dtype bfloat16 --json bench_detection_bf16.json
    python scripts/benchmarks/bench_detection.py --models tokenformer_tiny vit_small_patch16_224 \\
        --height 512 --width 512
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the benchlib package
from benchlib.common import add_device_args, autocast, dtype_of, load, machine_info, peak_bytes, resolve_device, sync

import tokenformer_vision  # noqa: F401  (registers the timm models)
from tokenformer_vision.detection import fasterrcnn_tokenformer

DEFAULT_MODELS = ["tokenformer_tiny", "tokenformer_small", "vit_small_patch16_224"]


def build(name: str, height: int, width: int, device: torch.device) -> torch.nn.Module:
    # min/max size = the image size: the transform keeps it (then pads to a multiple of 32)
    model = fasterrcnn_tokenformer(name, num_classes=91, min_size=min(height, width), max_size=max(height, width))
    return model.eval().to(device)


class StageTimer:
    """Split one detector forward into trunk / pyramid / the rest with forward hooks.

    The trunk runs through ``forward_intermediates`` (no module hook fires), so its time is from the start of
    the backbone to the start of the pyramid.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device) -> None:
        self.device = device
        self.marks: dict[str, float] = {}
        model.backbone.register_forward_pre_hook(self._mark("backbone_start"))
        model.backbone.pyramid.register_forward_pre_hook(self._mark("pyramid_start"))
        model.backbone.register_forward_hook(self._mark("backbone_end"))

    def _mark(self, key: str):
        def hook(*_):
            sync(self.device)
            self.marks[key] = time.perf_counter()
        return hook

    def times(self) -> dict[str, float]:
        m = self.marks
        return {"trunk": m["pyramid_start"] - m["backbone_start"], "pyramid": m["backbone_end"] - m["pyramid_start"],
                "backbone": m["backbone_end"] - m["backbone_start"]}


def measure_memory(name: str, height: int, width: int, device: torch.device,
                   dtype: torch.dtype) -> dict[str, float | str]:
    """Peak memory of one inference forward of the detector and of its backbone alone (trunk + pyramid).

    Each is measured on its second call: the first pays one-off allocations (allocator pools, oneDNN caches).
    """
    model = build(name, height, width, device)
    image = [torch.rand(3, height, width, device=device)]
    with torch.inference_mode(), autocast(device, dtype):
        batch = model.transform(image)[0].tensors  # the resized, normalised, padded input the backbone sees
        out: dict[str, float | str] = {"method": "cuda max_memory_allocated" if device.type == "cuda" else "rss"}
        for key, fn in (("peak_mib", lambda: model(image)), ("backbone_peak_mib", lambda: model.backbone(batch))):
            fn()
            gc.collect()
            out[key] = _peak_mib(fn, device)
    return out


def _peak_mib(fn, device: torch.device) -> float:
    return peak_bytes(fn, device, cpu_method="rss") / 2**20


def time_models(names: list[str], height: int, width: int, reps: int, warmup: int,
                device: torch.device, dtype: torch.dtype) -> dict[str, dict[str, Any]]:
    models = {n: build(n, height, width, device) for n in names}
    timers = {n: StageTimer(m, device) for n, m in models.items()}
    image = [torch.rand(3, height, width, device=device)]
    samples: dict[str, dict[str, list[float]]] = {n: {"total": [], "trunk": [], "pyramid": [], "heads": []}
                                                  for n in names}
    with torch.inference_mode(), autocast(device, dtype):
        for rep in range(warmup + reps):
            for name in names:  # round-robin: load changes hit every model alike
                sync(device)
                start = time.perf_counter()
                models[name](image)
                sync(device)
                total = time.perf_counter() - start
                if rep < warmup:
                    continue
                stage = timers[name].times()
                samples[name]["total"].append(total)
                samples[name]["trunk"].append(stage["trunk"])
                samples[name]["pyramid"].append(stage["pyramid"])
                samples[name]["heads"].append(total - stage["backbone"])
                print(f"  rep {rep - warmup + 1}/{reps} {name}: {total:.2f}s", flush=True)
    out = {}
    for name, model in models.items():
        trunk = model.backbone.trunk
        out[name] = {
            "trunk_params_m": sum(p.numel() for p in trunk.parameters()) / 1e6,
            "detector_params_m": sum(p.numel() for p in model.parameters()) / 1e6,
            **{f"{k}_s": statistics.median(v) for k, v in samples[name].items()},
            "total_s_all": samples[name]["total"],
        }
    return out


def _load() -> str:
    return " ".join(f"{v:.2f}" for v in load())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    parser.add_argument("--height", type=int, default=800)
    parser.add_argument("--width", type=int, default=1333)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    add_device_args(parser)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    parser.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: one model's memory
    args = parser.parse_args(argv)
    device, dtype = resolve_device(args), dtype_of(args)
    torch.manual_seed(0)

    if args.memory_worker:
        print(json.dumps(measure_memory(args.memory_worker, args.height, args.width, device, dtype)))
        return

    env = {**machine_info(device), "device": str(device), "dtype": args.dtype, "load_before": _load(),
           "image": [args.height, args.width], "reps": args.reps}
    print(f"Faster R-CNN forward at {args.height}x{args.width}, {env['device']}, {env['threads']} threads, "
          f"torch {env['torch']}, load {env['load_before']}", flush=True)
    results = time_models(args.models, args.height, args.width, args.reps, args.warmup, device, dtype)
    env["load_after_timing"] = _load()

    if not args.no_memory:
        for name in args.models:
            cmd = [sys.executable, __file__, "--memory-worker", name, "--height", str(args.height),
                   "--width", str(args.width), "--device", args.device, "--dtype", args.dtype]
            if args.threads:
                cmd += ["--threads", str(args.threads)]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            results[name].update(json.loads(proc.stdout.strip().splitlines()[-1]))
    env["load_after"] = _load()

    ref = args.models[-1]
    header = (f"| trunk | trunk params (M) | forward (s) | trunk (s) | pyramid (s) | RPN+RoI (s) | peak mem (MiB) "
              f"| backbone peak mem (MiB) | forward vs {ref} |")
    print("\n" + header)
    print("|" + "---|" * (header.count("|") - 1))
    for name, r in results.items():
        mem, bmem = (f"{r[k]:.0f}" if k in r else "-" for k in ("peak_mib", "backbone_peak_mib"))
        print(f"| {name} | {r['trunk_params_m']:.1f} | {r['total_s']:.2f} | {r['trunk_s']:.2f} | "
              f"{r['pyramid_s']:.2f} | {r['heads_s']:.2f} | {mem} | {bmem} | "
              f"{r['total_s'] / results[ref]['total_s']:.2f}x |")
    print(f"load: before {env['load_before']}, after timing {env['load_after_timing']}, after {env['load_after']}")
    if args.json:
        args.json.write_text(json.dumps({"env": env, "results": results}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
