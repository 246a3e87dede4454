"""Write ``ImageClassifier.predict_step`` outputs to a CSV or JSON file (file name, top-k class names, probs)."""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

__all__ = ["PredictionWriter"]


class PredictionWriter(BasePredictionWriter):
    """Collect top-k predictions during ``trainer.predict``; rank 0 then writes one row per image of every rank, by
    sample index, without the sampler's padding duplicates, named by the datamodule's predict_names()/class_names.

    Args:
        output_path: ``*.json``: a list of records; else CSV with columns ``name, target, top1, prob1, ..., probk``.
    """

    def __init__(self, output_path: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.output_path = os.fspath(output_path)
        self._rows: list[tuple] = []  # (sample index, target or -1, top-k classes, probs, tlops or None)
        self._seen = 0

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows, self._seen = [], 0

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        n = len(prediction["topk_indices"])
        column = lambda key, fill=None: (v.cpu().tolist() if isinstance(v := prediction.get(key), torch.Tensor)
                                         else [fill] * n)
        indices = (column("indices") if isinstance(prediction.get("indices"), torch.Tensor)
                   else list(batch_indices) if batch_indices is not None and trainer.world_size == 1
                   else list(range(self._seen, self._seen + n)))  # position in this rank's stream: exact on 1 process
        self._seen += n
        self._rows.extend(zip(indices, column("targets", -1), column("topk_indices"), column("topk_probs"),
                              column("tlops"), strict=True))

    def on_predict_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rows = self._rows
        if dist.is_available() and dist.is_initialized() and trainer.world_size > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, rows)
            rows = [row for part in gathered for row in part]
        if trainer.is_global_zero:
            unique = {row[0]: row for row in rows}  # drop the sampler's padding duplicates
            self.write(trainer, [unique[i] for i in sorted(unique)])
        self._rows = []

    def write(self, trainer: Trainer, rows: list[tuple]) -> None:
        classes = list(getattr(trainer.datamodule, "class_names", None) or [])
        names = trainer.datamodule.predict_names() if hasattr(trainer.datamodule, "predict_names") else []
        label = lambda seq, i: seq[i] if 0 <= i < len(seq) else str(i)
        records = [{"name": label(names, i), "target": label(classes, t) if t >= 0 else None,
                    "topk": [{"class": label(classes, c), "prob": p} for c, p in zip(top, probs, strict=True)],
                    **({"tlops": tl} if tl is not None else {})} for i, t, top, probs, tl in rows]
        os.makedirs(os.path.dirname(os.path.abspath(self.output_path)), exist_ok=True)
        with open(self.output_path, "w", newline="") as f:
            if self.output_path.endswith(".json"):
                json.dump(records, f, indent=1)
                return
            k, routed = max((len(r["topk"]) for r in records), default=0), any("tlops" in r for r in records)
            csv.writer(f).writerows([["name", "target", *(c for j in range(1, k + 1) for c in (f"top{j}", f"prob{j}")),
                                      *["tlops"] * routed],
                                     *([r["name"], r["target"] or "",
                                        *(cell for e in r["topk"] for cell in (e["class"], f"{e['prob']:.6f}")),
                                        *[f"{r['tlops']:.6f}" if "tlops" in r else ""] * routed] for r in records)])

