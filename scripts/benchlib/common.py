"""Shared benchmark harness: device/dtype arguments, synchronised interleaved timing, peak memory, machine info.

Scripts import it from the ``benchlib`` package (``scripts/`` on ``sys.path``)::

    from benchlib.common import add_device_args, autocast, machine_info, resolve_device, time_interleaved

- ``--device cpu|cuda`` (default: cuda when available) and ``--dtype float32|bfloat16|float16`` (default float32;
  bf16/fp16 run the model under ``torch.autocast``, see :func:`autocast`), ``--threads``.
- :func:`time_interleaved` runs the compared functions in alternating order (machine load hits them alike) and
  calls ``torch.cuda.synchronize`` around every timed call on CUDA.
- :func:`peak_bytes`: on CUDA ``torch.cuda.max_memory_allocated`` over one call; on the CPU either the peak of the
  allocator's running total (``torch.profiler``, tensor bytes) or the peak resident-set growth (``VmHWM``).
- :func:`machine_info`: CPU, cores, load, versions, and the GPU when one is used.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------------------------------------- arguments
def add_device_args(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--dtype`` and ``--threads``, the same for every benchmark."""
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None,
                        help="where to run (default: cuda when available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32",
                        help="float32, or bfloat16/float16 autocast around the model (parameters stay fp32)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def resolve_device(args: argparse.Namespace) -> torch.device:
    """The ``torch.device`` of ``args.device`` (applies ``--threads``); exits if CUDA is asked for but absent."""
    if getattr(args, "threads", None):
        torch.set_num_threads(args.threads)
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available")
    args.device = name
    return torch.device(name)


def dtype_of(args: argparse.Namespace) -> torch.dtype:
    return DTYPES[args.dtype]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """``torch.autocast(device, dtype)`` for bf16/fp16, a no-op for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ------------------------------------------------------------------------------------------------ timing
def sync(device: torch.device | str) -> None:
    """Wait for the device's queued work (CUDA); no-op on the CPU."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def timed(device: torch.device | str, out: list[float]) -> Iterator[None]:
    """Append the synchronised wall time (seconds) of the block to ``out``."""
    sync(device)
    start = time.perf_counter()
    yield
    sync(device)
    out.append(time.perf_counter() - start)


def time_interleaved(fns: dict[str, Callable[[], Any]], reps: int, warmup: int,
                     device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Run every function ``warmup`` times, then ``reps`` rounds alternating the order; seconds per call.

    On CUDA each timed call is bracketed by ``torch.cuda.synchronize`` so that the time is the device's.
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            with timed(device, times[name]):
                fns[name]()
    return times


def best(values: list[float]) -> float:
    """Minimum: on a shared machine the least load-polluted estimate."""
    return min(values)


def median(values: list[float]) -> float:
    return statistics.median(values)


# ------------------------------------------------------------------------------------------------ memory
def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    return tensor_bytes(v for state in opt.state.values() for v in state.values() if isinstance(v, torch.Tensor))


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device | str = "cuda") -> int:
    """Peak of ``torch.cuda.max_memory_allocated`` during ``fn`` above what was allocated before it."""
    torch.cuda.synchronize(device)
    gc.collect()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device) - base)


def profiled_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak of the CPU allocator's running total (tensor bytes allocated since the start) while ``fn`` runs."""
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


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def rss_peak_bytes(fn: Callable[[], Any]) -> int:
    """Peak resident-set growth while ``fn`` runs (Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``)."""
    gc.collect()
    with contextlib.suppress(OSError):  # hand freed heap pages back to the OS so the baseline is what is in use
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")
    base = _status_kib("VmRSS")
    fn()
    return (_status_kib("VmHWM") - base) * 1024


def peak_bytes(fn: Callable[[], Any], device: torch.device | str, cpu_method: str = "profiler") -> int:
    """Peak memory of one call of ``fn`` beyond what was live before it: CUDA ``max_memory_allocated``; CPU
    ``cpu_method`` ``"profiler"`` (allocator tensor bytes) or ``"rss"`` (resident-set growth)."""
    if torch.device(device).type == "cuda":
        return cuda_peak_bytes(fn, device)
    return profiled_peak_bytes(fn) if cpu_method == "profiler" else rss_peak_bytes(fn)


def memory_method(device: torch.device | str, cpu_method: str = "profiler") -> str:
    if torch.device(device).type == "cuda":
        return "torch.cuda.max_memory_allocated"
    return "torch.profiler allocator peak" if cpu_method == "profiler" else "peak RSS growth (VmHWM)"


# ------------------------------------------------------------------------------------------------ machine
def _run(cmd: list[str]) -> str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info(device: torch.device | str | None = None) -> dict[str, Any]:
    """CPU model, cores, load, Python/torch/timm/Lightning versions and, on CUDA, the GPU and its driver."""
    import timm

    cpu = platform.processor() or platform.machine()
    for line in _run(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            cpu = line.split(":", 1)[1].strip()
    info: dict[str, Any] = dict(
        cpu=cpu, cores=os.cpu_count(), threads=torch.get_num_threads(), platform=platform.platform(),
        python=platform.python_version(), torch=torch.__version__, timm=timm.__version__, loadavg=load(),
    )
    with contextlib.suppress(ImportError):
        import lightning

        info["lightning"] = lightning.__version__
    if device is not None and torch.device(device).type == "cuda":
        dev = torch.device(device)
        props = torch.cuda.get_device_properties(dev)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    gpu_capability=f"{props.major}.{props.minor}", cuda=torch.version.cuda,
                    cudnn=torch.backends.cudnn.version(),
                    driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    return info


def header(info: dict[str, Any], device: torch.device | str, dtype: torch.dtype) -> str:
    """One comment line describing where and how a benchmark ran."""
    where = f"GPU {info['gpu']} (CUDA {info['cuda']})" if "gpu" in info else f"CPU {info['cpu']}"
    return (f"# {where}, {info['cores']} cores, {info['threads']} threads, torch {info['torch']}, "
            f"timm {info['timm']}, device {device}, dtype {str(dtype).removeprefix('torch.')}, "
            f"load {info['loadavg']}")


def write_json(path: str | os.PathLike | None, result: dict[str, Any]) -> None:
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=1))


# ---------------------------------------------------------------------------------------------- test data
# (width, height) of typical ImageNet photos
IMAGENET_SIZES = [(500, 375), (375, 500), (500, 333), (500, 500), (640, 480), (500, 400), (333, 500), (800, 600)]


def make_jpeg(path: Path, width: int, height: int, seed: int, quality: int = 90) -> None:
    """One photo-like JPEG (smooth colour fields + texture) so that file size and decode cost are realistic."""
    import cv2
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(height // 32 + 2, width // 32 + 2, 3), dtype=np.uint8)
    img = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC).astype(np.int16)
    img += rng.normal(0, 12, size=(height, width, 3)).astype(np.int16)
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=quality)


def make_jpegs(folder: Path, count: int, seed: int = 0, sizes: list[tuple[int, int]] | None = None) -> list[Path]:
    """``count`` photo-like JPEGs at ImageNet sizes (cycling through ``sizes``) in ``folder``."""
    sizes = sizes or IMAGENET_SIZES
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        w, h = sizes[i % len(sizes)]
        path = folder / f"img_{i:05d}.JPEG"
        make_jpeg(path, w, h, seed * 1_000_003 + i)
        paths.append(path)
    return paths
