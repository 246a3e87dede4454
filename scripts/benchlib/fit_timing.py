"""A Lightning callback that times every training step and writes the figures as JSON: add it to a
``tokenformer-vision fit`` run with ``scripts/`` on ``PYTHONPATH``::

    PYTHONPATH=scripts tokenformer-vision fit --config ... \\
        --trainer.callbacks+=benchlib.fit_timing.StepTimer --trainer.callbacks.out=step_times.json

Per step it records the compute time (``on_train_batch_start`` -> ``on_train_batch_end``, synchronised on CUDA),
the wait before it (data loading and everything else between two steps) and the parameter count, so that a
growth stage (GrowthCallback) shows up as the step where the count changes. At the end it writes the medians
before and after the growth (leaving out ``settle`` steps at the start and after the growth), images/s, the
peak CUDA memory before and after the growth, and GrowthCallback's events (``max_abs_dlogits`` among them).
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch


def _sync(module: pl.LightningModule) -> None:
    if module.device.type == "cuda":
        torch.cuda.synchronize(module.device)


def _count(module: pl.LightningModule) -> int:
    return sum(p.numel() for p in module.parameters())


def _summary(steps: list[dict[str, Any]], batch: int) -> dict[str, Any] | None:
    if not steps:
        return None
    compute = [s["compute_s"] for s in steps]
    wall = [s["compute_s"] + s["wait_s"] for s in steps]
    return {"steps": len(steps), "compute_s_median": statistics.median(compute), "compute_s_min": min(compute),
            "wall_s_median": statistics.median(wall),
            "compute_img_per_s": batch / statistics.median(compute), "wall_img_per_s": batch / statistics.median(wall)}


class StepTimer(pl.Callback):
    """Time every training step; write before/after-growth medians to ``out`` (JSON) at the end of training.

    Args:
        out: JSON file to write.
        settle: steps left out of the medians at the start of training and right after a growth (allocator,
            cuDNN/cuBLAS heuristics, the rebuilt optimizer's first step).
    """

    def __init__(self, out: str = "step_times.json", settle: int = 5) -> None:
        self.out = out
        self.settle = settle
        self.steps: list[dict[str, Any]] = []
        self.batch_size = 0
        self.growth_step: int | None = None
        self.peak_before_growth: int | None = None
        self._start = 0.0
        self._last_end: float | None = None
        self._params: int | None = None
        self._fit_start = 0.0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._params = _count(pl_module)
        self._fit_start = time.perf_counter()
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def _check_growth(self, pl_module: pl.LightningModule, index: int) -> None:
        params = _count(pl_module)
        if params != self._params and self.growth_step is None:
            self.growth_step = index
            if pl_module.device.type == "cuda":
                self.peak_before_growth = int(torch.cuda.max_memory_allocated(pl_module.device))
                torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._params = params

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        _sync(pl_module)
        self._start = time.perf_counter()
        self._check_growth(pl_module, len(self.steps))
        images = batch[0] if isinstance(batch, list | tuple) else batch
        if torch.is_tensor(images):
            self.batch_size = max(self.batch_size, int(images.shape[0]))

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        _sync(pl_module)
        end = time.perf_counter()
        self._check_growth(pl_module, len(self.steps))
        wait = 0.0 if self._last_end is None else self._start - self._last_end
        self.steps.append({"step": len(self.steps), "compute_s": end - self._start, "wait_s": wait,
                           "params": self._params})
        self._last_end = end

    def result(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, Any]:
        g = self.growth_step
        before = self.steps[self.settle:g] if g is not None else self.steps[self.settle:]
        after = self.steps[g + self.settle:] if g is not None else []
        events = []
        for cb in trainer.callbacks:
            for event in getattr(cb, "events", None) or []:
                events.append({k: (v if isinstance(v, int | float | str | bool) or v is None else str(v))
                               for k, v in event.items()})
        out: dict[str, Any] = {
            "batch_size": self.batch_size, "settle": self.settle, "growth_step": g,
            "params_first": self.steps[0]["params"] if self.steps else None,
            "params_last": self.steps[-1]["params"] if self.steps else None,
            "before_growth": _summary(before, self.batch_size), "after_growth": _summary(after, self.batch_size),
            "train_seconds": time.perf_counter() - self._fit_start, "growth_events": events,
            "device": str(pl_module.device), "precision": str(trainer.precision), "steps": self.steps,
        }
        if pl_module.device.type == "cuda":
            peak = int(torch.cuda.max_memory_allocated(pl_module.device))
            out["peak_bytes_before_growth"] = self.peak_before_growth if g is not None else peak
            out["peak_bytes_after_growth"] = peak if g is not None else None
        b, a = out["before_growth"], out["after_growth"]
        if b and a:
            out["compute_time_ratio_after_over_before"] = a["compute_s_median"] / b["compute_s_median"]
        return out

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            path = Path(self.out)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(self.result(trainer, pl_module), indent=1))
