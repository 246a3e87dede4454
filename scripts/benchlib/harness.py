"""One training harness for every benchmark: the library's own ``ImageClassifier`` + DataModule + Lightning
``Trainer`` path, as a user's ``tokenformer-vision fit`` runs it, returning what a benchmark needs.

```python
from benchlib.harness import train_eval
result = train_eval(lambda: ImageClassifier(...), IDXDataModule(root, ...), max_epochs=20, seed=0)
result.history[-1]["val/acc1"], result.test["test/acc1"], result.train_images_per_s, result.state_dict
```

Per epoch it records the validation metrics, optionally the test split's accuracy (``test_every_epoch``: the same
``eval_model`` the classifier validates with), the cumulative training wall time (validation excluded), the main
process' CPU time, images and optimizer steps so far, the parameter count in force and the training FLOPs so far,
measured by ``torch.utils.flop_counter.FlopCounterMode`` on one training step of the model as it then is, at the
start of every epoch and whenever the parameter count changes (so a growth stage changes the per-image cost from
the next step on). At the end ``Trainer.test`` gives the test metrics.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode


def training_flops_per_image(model: nn.Module, image_shape: Sequence[int], device: torch.device | str) -> float:
    """Forward + backward FLOPs of one image (matmuls, convolutions and attention, as counted by
    ``FlopCounterMode``), from a training step on a batch of 2 of a deep copy (the model is not touched)."""
    probe = copy.deepcopy(model).to(device).train()
    x = torch.randn(2, *image_shape, device=device)
    with FlopCounterMode(display=False) as counter:
        out = probe(x)
        out.float().sum().backward()
    return counter.get_total_flops() / 2


class EpochRecorder(L.Callback):
    """Per-epoch metrics, wall/CPU time of training (validation excluded), images seen and training FLOPs."""

    def __init__(self, test_loader_fn: Callable[[], Any] | None = None) -> None:
        self.history: list[dict[str, Any]] = []
        self.test_loader_fn = test_loader_fn
        self.train_wall = self.train_cpu = 0.0
        self.images = 0
        self.flops = 0.0
        self._flops_per_image: float | None = None
        self._params: int | None = None
        self._mark: tuple[float, float] | None = None
        self._recheck = False

    def _start(self) -> None:
        self._mark = (time.perf_counter(), time.process_time())

    def _stop(self, pl_module: L.LightningModule) -> None:
        if self._mark is not None:
            if pl_module.device.type == "cuda":
                torch.cuda.synchronize(pl_module.device)
            self.train_wall += time.perf_counter() - self._mark[0]
            self.train_cpu += time.process_time() - self._mark[1]
            self._mark = None

    def _cost(self, pl_module: L.LightningModule, images: torch.Tensor) -> float:
        params = sum(p.numel() for p in pl_module.model.parameters())
        if params != self._params:  # first step, or the model grew: measure the new per-image cost
            self._params, self._recheck = params, False
            self._flops_per_image = training_flops_per_image(pl_module.model, images.shape[1:], images.device)
        elif self._recheck:
            # an epoch boundary, where a callback may change the cost without adding parameters (blocks switched
            # on, a training resolution); under a forked RNG, so that the training's random stream is unchanged
            self._recheck = False
            cuda = [images.device] if images.device.type == "cuda" else []
            with torch.random.fork_rng(devices=cuda):
                self._flops_per_image = training_flops_per_image(pl_module.model, images.shape[1:], images.device)
        return self._flops_per_image  # type: ignore[return-value]

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._recheck = True
        self._start()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch is not None:
            images = batch[0]
            self.flops += self._cost(pl_module, images) * len(images)
            self.images += len(images)

    def on_validation_start(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._stop(pl_module)

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.training:
            self._start()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
        row = {"epoch": trainer.current_epoch + 1, "step": trainer.global_step, "images": self.images,
               "train_wall_s": self.train_wall, "train_cpu_s": self.train_cpu, "train_flops": self.flops,
               "params": sum(p.numel() for p in pl_module.model.parameters()), **metrics}
        if self.test_loader_fn is not None:
            row["test/acc1"] = evaluate_accuracy(pl_module.eval_model, self.test_loader_fn(), pl_module.device)
        self.history.append(row)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._stop(pl_module)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, loader, device: torch.device) -> float:
    """Top-1 accuracy of ``model`` (in eval mode, restored afterwards) over a loader of ``(images, targets)``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for batch in loader:
        if batch is None:
            continue
        images, targets = batch[0].to(device, non_blocking=True), batch[1].to(device, non_blocking=True)
        correct += int((model(images).argmax(-1) == targets).sum())
        total += len(targets)
    model.train(was_training)
    return correct / max(total, 1)


@dataclass
class RunResult:
    """What :func:`train_eval` measured. ``state_dict``: the trained classifier's (``model.*`` and ``ema.*``)."""

    history: list[dict[str, Any]]
    test: dict[str, float]
    wall_s: float
    cpu_s: float
    train_wall_s: float
    train_images_per_s: float
    train_flops: float
    params: int
    state_dict: dict[str, torch.Tensor] = field(repr=False)
    module: L.LightningModule | None = field(default=None, repr=False)

    def summary(self) -> dict[str, Any]:
        """JSON-ready: everything but the weights."""
        return {"history": self.history, "test": self.test, "wall_s": self.wall_s, "cpu_s": self.cpu_s,
                "train_wall_s": self.train_wall_s, "train_images_per_s": self.train_images_per_s,
                "train_flops": self.train_flops, "params": self.params}


def train_eval(model: L.LightningModule | Callable[[], L.LightningModule], data: L.LightningDataModule, *,
               max_epochs: int, seed: int = 0, callbacks: Sequence[L.Callback] = (), accelerator: str = "auto",
               precision: str = "32-true", test: bool = True, test_every_epoch: bool = False,
               gradient_clip_val: float | None = None, log_dir: str | None = None, keep_module: bool = False,
               **trainer_kwargs: Any) -> RunResult:
    """Fit ``model`` (or ``model()``, built after seeding, so the initialisation is a function of ``seed``) on
    ``data`` for ``max_epochs`` with a Lightning ``Trainer`` on one device, validating every epoch, then test.

    ``log_dir``: a CSVLogger folder (default: no logger, no checkpoints: a benchmark keeps only what it returns).
    ``trainer_kwargs`` go to ``Trainer`` (e.g. ``limit_train_batches``).
    """
    L.seed_everything(seed, workers=True, verbose=False)
    module = model() if not isinstance(model, L.LightningModule) else model
    test_loader_fn = None
    if test_every_epoch:
        data.setup("test")
        test_loader_fn = data.test_dataloader
    recorder = EpochRecorder(test_loader_fn)
    logger = L.pytorch.loggers.CSVLogger(log_dir, name="", version="") if log_dir else False
    trainer = L.Trainer(accelerator=accelerator, devices=1, precision=precision, max_epochs=max_epochs,
                        logger=logger, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, gradient_clip_val=gradient_clip_val,
                        callbacks=[recorder, *callbacks], log_every_n_steps=trainer_kwargs.pop("log_every_n_steps", 10),
                        **trainer_kwargs)
    wall0, cpu0 = time.perf_counter(), time.process_time()
    trainer.fit(module, datamodule=data)
    test_metrics = {k: float(v) for k, v in trainer.test(module, datamodule=data, verbose=False)[0].items()} if test \
        else {}
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
    return RunResult(history=recorder.history, test=test_metrics, wall_s=wall, cpu_s=cpu,
                     train_wall_s=recorder.train_wall,
                     train_images_per_s=recorder.images / max(recorder.train_wall, 1e-9),
                     train_flops=recorder.flops, params=sum(p.numel() for p in module.model.parameters()),
                     state_dict=state, module=module if keep_module else None)


@torch.no_grad()
def inference_images_per_s(model: nn.Module, image_shape: Sequence[int], device: torch.device | str,
                           batch_size: int = 256, reps: int = 10, warmup: int = 3,
                           dtype: torch.dtype = torch.float32) -> float:
    """Eval-mode forward throughput at ``batch_size`` (synchronised on CUDA; median of ``reps`` timed calls)."""
    import statistics

    model = model.to(device).eval()
    x = torch.randn(batch_size, *image_shape, device=device)
    autocast = torch.autocast(torch.device(device).type, dtype=dtype, enabled=dtype != torch.float32)
    times = []
    for i in range(warmup + reps):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        with autocast:
            model(x)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return batch_size / statistics.median(times)
