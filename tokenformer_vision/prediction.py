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

__all__ = ["PredictionWriter", "read_predictions"]


class PredictionWriter(BasePredictionWriter):
    """Collect top-k predictions during ``trainer.predict`` and write one row per image at the end.

    Rows are ordered by sample index and de-duplicated (a distributed sampler pads the last batch), gathered
    from every rank and written by rank 0. Names come from the datamodule: ``predict_names()`` for the images
    and ``class_names`` for the classes (indices as strings when it has none).

    Args:
        output_path: ``*.json`` writes a list of records, anything else CSV with columns
            ``name, target, top1, prob1, ..., topk, probk``.
    """

    def __init__(self, output_path: str | os.PathLike) -> None:
        super().__init__(write_interval="batch")
        self.output_path = os.fspath(output_path)
        self._rows: list[tuple[int, int, list[int], list[float], float | None]] = []
        self._seen = 0

    def on_predict_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rows, self._seen = [], 0

    def write_on_batch_end(self, trainer: Trainer, pl_module: LightningModule, prediction: Any,
                           batch_indices: Sequence[int] | None, batch: Any, batch_idx: int,
                           dataloader_idx: int = 0) -> None:
        top_idx = prediction["topk_indices"].cpu().tolist()
        top_prob = prediction["topk_probs"].float().cpu().tolist()
        n = len(top_idx)
        indices = prediction.get("indices")
        if indices is not None:
            indices = indices.cpu().tolist()
        elif batch_indices is not None and trainer.world_size == 1:
            indices = list(batch_indices)
        else:
            # no sample indices in the batch: position in this rank's stream (exact on a single process)
            indices = list(range(self._seen, self._seen + n))
        targets = prediction.get("targets")
        targets = targets.cpu().tolist() if isinstance(targets, torch.Tensor) else [-1] * n
        tlops = prediction.get("tlops")  # token routing: per-image fraction of token-layer operations executed
        tlops = tlops.float().cpu().tolist() if isinstance(tlops, torch.Tensor) else [None] * n
        self._seen += n
        self._rows.extend(zip(indices, targets, top_idx, top_prob, tlops, strict=True))

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

    def write(self, trainer: Trainer, rows: list[tuple[int, int, list[int], list[float], float | None]]) -> None:
        dm = trainer.datamodule
        class_names = list(getattr(dm, "class_names", None) or [])
        names: list[str] = dm.predict_names() if hasattr(dm, "predict_names") else []

        def cls(i: int) -> str:
            return class_names[i] if 0 <= i < len(class_names) else str(i)

        def name(i: int) -> str:
            return names[i] if 0 <= i < len(names) else str(i)

        folder = os.path.dirname(os.path.abspath(self.output_path))
        os.makedirs(folder, exist_ok=True)
        if self.output_path.endswith(".json"):
            records = [{"name": name(i), "target": cls(t) if t >= 0 else None,
                        "topk": [{"class": cls(c), "prob": p} for c, p in zip(top, probs, strict=True)],
                        **({"tlops": tl} if tl is not None else {})}
                       for i, t, top, probs, tl in rows]
            with open(self.output_path, "w") as f:
                json.dump(records, f, indent=1)
            return
        k = max((len(r[2]) for r in rows), default=0)
        header = ["name", "target"] + [col for j in range(1, k + 1) for col in (f"top{j}", f"prob{j}")]
        routed = any(r[4] is not None for r in rows)
        with open(self.output_path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header + (["tlops"] if routed else []))
            for i, t, top, probs, tl in rows:
                cells = [cell for c, p in zip(top, probs, strict=True) for cell in (cls(c), f"{p:.6f}")]
                extra = [f"{tl:.6f}" if tl is not None else ""] if routed else []
                writer.writerow([name(i), cls(t) if t >= 0 else "", *cells, *extra])


def read_predictions(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a file written by :class:`PredictionWriter` back as records ``{name, target, topk: [(class, p)]}``."""
    path = os.fspath(path)
    if path.endswith(".json"):
        with open(path) as f:
            return [{"name": r["name"], "target": r["target"],
                     "topk": [(e["class"], float(e["prob"])) for e in r["topk"]]} for r in json.load(f)]
    with open(path, newline="") as f:
        out = []
        for row in csv.DictReader(f):
            k = sum(1 for key in row if key.startswith("top") and key[3:].isdigit())
            out.append({"name": row["name"], "target": row["target"] or None,
                        "topk": [(row[f"top{j}"], float(row[f"prob{j}"])) for j in range(1, k + 1)]})
        return out
