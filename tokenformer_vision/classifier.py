"""Lightning image classifier around any timm model (TokenFormer by default): the paper's training recipe, top-k
prediction, a policy for non-finite steps, the routing penalty and TLOps metrics, growth to a checkpoint's counts."""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import numpy as np
import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from .callbacks import EMACallback, NonFiniteGuard
from .weights import describe_mismatch, load_weights, select_weights, token_counts

__all__ = ["ImageClassifier", "TLOps"]

log = logging.getLogger(__name__)

# Same type as ``lightning.pytorch.cli.OptimizerCallable``; spelled out so this module does not import the CLI.
OptimizerCallable = Callable[[Iterable], Optimizer]


def _rng_states() -> dict[str, Any]:
    """This process's random states (torch CPU and CUDA, numpy's global, Python's), in types that a weights-only
    ``torch.load`` reads back."""
    name, key, pos, has_gauss, gauss = np.random.get_state()
    return {"torch": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [name, torch.from_numpy(key.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate()}


def _set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`_rng_states` (the CUDA states only onto as many devices as they were saved from)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and len(states["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, key, pos, has_gauss, gauss = states["numpy"]
    np.random.set_state((name, key.numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))


class TLOps(Metric):
    """Token-layer operations executed by a routed model, as fractions of the unrouted model's, summed exactly
    over batches and DDP ranks: ``compute()`` gives the ``[depth]`` per-block fractions."""

    full_state_update = False

    def __init__(self, depth: int) -> None:
        super().__init__()
        self.add_state("processed", torch.zeros(depth, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("slots", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, processed: torch.Tensor, tokens: int) -> None:
        """``processed [L, B]`` tokens per block and image (:class:`~tokenformer_vision.routing.RoutingStats`)."""
        counts = processed.sum(1).double()
        self.processed[: len(counts)] += counts
        self.slots += processed.shape[1] * tokens

    def compute(self) -> torch.Tensor:
        return self.processed / self.slots.clamp_min(1)


class ImageClassifier(LightningModule):
    """Image classification with a timm model (``self.model``), ready for ``LightningCLI``.

    Args:
        model_name: timm model name (tokenformer_tiny/small/base/large, or any timm model).
        num_classes: classifier outputs; None: the datamodule's, in setup() (the CLI links it from data.num_classes).
        img_size: input resolution of the model (None: the model's default, or the datamodule's img_size).
        model_kwargs: extra timm.create_model arguments, e.g. patch_size, depth, attn_tokens, token_routing.
        pretrained: local weights file (.safetensors, .pth or a Lightning .ckpt) loaded into the new model (the EMA
            weights when it has them); a classifier head of another size is re-initialised (fine-tuning).
        optimizer: optimizer factory called with the parameter groups (--model.optimizer torch.optim.SGD
            --model.optimizer.lr 0.1); the decayed group then uses the factory's own weight decay. Default AdamW.
        lr: peak learning rate of the default AdamW.
        weight_decay: weight decay of the default AdamW (not applied to norms, biases, cls token, pos embedding).
        betas: AdamW's (beta1, beta2).
        warmup_steps: linear warmup length in optimizer steps (give this or warmup_epochs).
        warmup_epochs: linear warmup length in epochs (counts gradient accumulation).
        min_lr: the cosine schedule ends at this learning rate, at the trainer's last step.
        label_smoothing: label smoothing of the training loss (also inside Mixup/CutMix targets).
        mixup: Mixup alpha (0 disables it).
        cutmix: CutMix alpha (0 disables it).
        mixup_prob: probability of mixing a batch.
        mixup_switch_prob: probability of CutMix instead of Mixup when both are on.
        drop_path_rate: stochastic depth rate, passed to timm.
        ema_decay: decay of an EMA copy of the weights (timm ModelEmaV3) used to validate, test, predict; None/0: off.
        ema_warmup: ramp the EMA decay up from 0 (useful for short runs).
        top_k: classes returned per image by predict.
        nonfinite: on a non-finite loss or gradient, "skip" the optimizer step (with a warning) or "stop" the run.
        max_nonfinite_steps: with "skip", stop the run after this many consecutive skipped steps.
    """

    def __init__(self, model_name: str = "tokenformer_base", num_classes: int | None = None,
                 img_size: int | None = None, model_kwargs: dict[str, Any] | None = None,
                 pretrained: str | None = None, optimizer: OptimizerCallable | None = None, lr: float = 1e-3,
                 weight_decay: float = 0.05, betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0,
                 warmup_epochs: float = 0.0, min_lr: float = 0.0, label_smoothing: float = 0.0, mixup: float = 0.0,
                 cutmix: float = 0.0, mixup_prob: float = 1.0, mixup_switch_prob: float = 0.5,
                 drop_path_rate: float = 0.0, ema_decay: float | None = None, ema_warmup: bool = False,
                 top_k: int = 5, nonfinite: Literal["skip", "stop"] = "skip", max_nonfinite_steps: int = 10) -> None:
        super().__init__()
        # The optimizer factory is code, not a hyperparameter: it cannot go into a weights-only checkpoint.
        self.save_hyperparameters(ignore=["optimizer"])
        self._check_args(self.hparams)
        self.optimizer_fn = optimizer
        self.model: nn.Module | None = None  # built by _build(), with the EMA copy and the Mixup function
        self.ema: ModelEmaV3 | None = None
        self.mixup_fn: Mixup | None = None
        self.val_tlops: TLOps | None = None  # a routed model's validation TLOps
        self._nonfinite_guard: NonFiniteGuard | None = None  # the latest fit's non-finite policy
        self._resumed_rng_states: dict[str, Any] | None = None  # a resumed fit's, set when its training starts
        if num_classes is not None:
            self._build(num_classes)

    @staticmethod
    def _check_args(a: Mapping[str, Any]) -> None:
        is_int = lambda v: isinstance(v, int) and not isinstance(v, bool)
        nonneg, unit = (lambda v: v >= 0, "≥ 0"), (lambda v: 0.0 <= v <= 1.0, "in [0, 1]")
        pos_int = (lambda v: is_int(v) and v >= 1, "a positive int")
        pos_or_none = (lambda v: v is None or pos_int[0](v), "a positive int or None")
        rules = {  # name: (valid?, what it must be)
            "num_classes": pos_or_none, "img_size": pos_or_none, "lr": (lambda v: v > 0, "> 0"),
            "min_lr": (lambda v: 0.0 <= v <= a["lr"], f"in [0, lr={a['lr']}]"),
            **dict.fromkeys("weight_decay warmup_steps warmup_epochs mixup cutmix drop_path_rate".split(), nonneg),
            "betas": (lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)"),
            "label_smoothing": (lambda v: 0.0 <= v < 1.0, "in [0, 1)"), "mixup_prob": unit, "mixup_switch_prob": unit,
            "ema_decay": (lambda v: v is None or 0.0 <= v < 1.0, "in [0, 1) or None"), "top_k": pos_int,
            "max_nonfinite_steps": pos_int, "nonfinite": (lambda v: v in ("skip", "stop"), "'skip' or 'stop'"),
        }
        for name, (valid, rule) in rules.items():
            if not valid(a[name]):
                raise ValueError(f"ImageClassifier: {name} must be {rule}, got {a[name]!r}")
        if a["warmup_steps"] and a["warmup_epochs"]:
            raise ValueError("ImageClassifier: give warmup_steps or warmup_epochs, not both "
                             f"(got {a['warmup_steps']} and {a['warmup_epochs']})")
        if clash := {"num_classes", "img_size", "drop_path_rate", "pretrained"} & set(a["model_kwargs"] or {}):
            raise ValueError(f"ImageClassifier: set {sorted(clash)} as ImageClassifier arguments, not in model_kwargs")

    def _build(self, num_classes: int) -> None:
        """Create the timm model, its EMA copy, the metrics and the Mixup function for ``num_classes``."""
        hp = self.hparams
        kwargs = {**(hp.model_kwargs or {}), **({"img_size": hp.img_size} if hp.img_size is not None else {}),
                  **({"drop_path_rate": hp.drop_path_rate} if hp.drop_path_rate else {})}
        if not timm.is_model(hp.model_name):
            raise ValueError(f"ImageClassifier: unknown timm model {hp.model_name!r}; e.g. "
                             f"{timm.list_models('tokenformer*')}")
        self.model = timm.create_model(hp.model_name, num_classes=num_classes, **kwargs)
        if hp.pretrained:
            self._load_pretrained(hp.pretrained)
        self.num_classes = num_classes
        if hp.ema_decay:
            self.ema = ModelEmaV3(self.model, decay=hp.ema_decay, use_warmup=hp.ema_warmup)
            self.ema.requires_grad_(False)  # no gradients, not in the optimizer, invisible to DDP's reducer
            # ModelEmaV3 puts its copy in eval mode, which Lightning reports at the start of training; the copy only
            # runs in validation, test and predict, where Lightning switches the whole module to eval mode anyway
            self.ema.train(self.training)

        def accuracy(stage: str) -> MetricCollection:  # logged as {stage}/acc1 and {stage}/acc5
            top = {f"acc{k}": MulticlassAccuracy(num_classes, top_k=min(k, num_classes), average="micro")
                   for k in (1, 5)}
            # no compute groups: top-1 and top-5 states that agree after the first batch would be merged for good
            return MetricCollection(top, prefix=f"{stage}/", compute_groups=False)

        self.val_metrics, self.test_metrics = accuracy("val"), accuracy("test")
        if getattr(self.model, "token_routing", False):
            self.val_tlops = TLOps(len(self.model.blocks))
        if hp.mixup > 0 or hp.cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                                  switch_prob=hp.mixup_switch_prob, label_smoothing=hp.label_smoothing,
                                  num_classes=num_classes)
        self.train_loss_fn: nn.Module = (SoftTargetCrossEntropy() if self.mixup_fn is not None
                                         else nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing))

    def _load_pretrained(self, path: str) -> None:
        """Load a weights file into ``self.model`` (EMA weights when present, grown to the saved token counts); a
        head of another size stays freshly initialised (fine-tuning)."""
        if load_weights(self.model, path, head="auto", grow=True)["head"] == "reset":
            log.info("pretrained %s: classifier head re-initialised (other classes)", path)

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer_or_none(), "datamodule", None)
        dm_classes = getattr(dm, "num_classes", None)
        if self.model is None:
            if dm_classes is None:
                raise ValueError("ImageClassifier: num_classes is None and the datamodule does not provide one; "
                                 "pass num_classes=")
            self.hparams["num_classes"] = int(dm_classes)
            size = getattr(dm, "img_size", None)  # build at the datamodule's size, saved so checkpoints reload
            size = size[0] if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1] else size
            if self.hparams.img_size is None and isinstance(size, int):
                self.hparams["img_size"] = int(size)
            self._build(int(dm_classes))
        elif dm_classes is not None and int(dm_classes) != self.num_classes:
            raise ValueError(f"ImageClassifier: the datamodule has {dm_classes} classes but the model was built "
                             f"for num_classes={self.num_classes}")

    def _trainer_or_none(self) -> Any:
        try:
            return self.trainer
        except RuntimeError:  # not attached to a Trainer (e.g. load_from_checkpoint, or built by hand)
            return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._require_model()(x)

    def _require_model(self) -> nn.Module:
        if self.model is None:
            raise RuntimeError("ImageClassifier: the model is not built yet (num_classes=None); it is built in "
                               "setup() from the datamodule, or pass num_classes=")
        return self.model

    @property
    def eval_model(self) -> nn.Module:
        """The network used for validation/test/prediction: the EMA copy when enabled, else the model."""
        return self.ema.module if self.ema is not None else self._require_model()

    @staticmethod
    def _routing_stats(model: nn.Module) -> Any:
        return model.routing_stats(strict=False) if getattr(model, "token_routing", False) else None

    def _mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix with soft targets. timm's Mixup needs an even batch: an odd last sample is kept unmixed
        (with smoothed one-hot targets) rather than dropped."""
        n = len(images) - len(images) % 2
        if n == len(images):
            return self.mixup_fn(images, targets)
        tail = mixup_target(targets[n:], self.num_classes, lam=1.0, smoothing=self.hparams.label_smoothing)
        if n == 0:
            return images, tail
        mixed, soft = self.mixup_fn(images[:n], targets[:n])
        return torch.cat([mixed, images[n:]]), torch.cat([soft, tail])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable (the data module counts them)
            return None
        images, targets = batch[0], batch[1]
        if self.mixup_fn is not None:
            images, targets = self._mix(images, targets)
        loss = self.train_loss_fn(self.model(images), targets)
        step_log = dict(on_step=True, on_epoch=False, batch_size=len(images))
        self.log("train/loss", loss, prog_bar=True, **step_log)
        if getattr(self.model, "token_routing", False):
            loss = loss + (penalty := self.model.routing_loss())  # exactly 0 at the default λ = 0
            self.log("train/routing_loss", penalty.detach(), **step_log)
            if (stats := self._routing_stats(self.model)) is not None:
                self.log("train/tlops", stats.tlops, **step_log)
        return loss  # a non-finite one: NonFiniteGuard (configure_callbacks) skips its optimizer step

    def configure_callbacks(self) -> list[Callback]:
        """The non-finite policy (``nonfinite``, ``max_nonfinite_steps``) as a :class:`NonFiniteGuard`, and the EMA
        updates (``ema_decay``) as an :class:`EMACallback`."""
        self._nonfinite_guard = NonFiniteGuard(self.hparams.nonfinite, self.hparams.max_nonfinite_steps)
        return [self._nonfinite_guard, *([EMACallback()] if self.hparams.ema_decay else [])]

    @property
    def nonfinite_streak(self) -> int:
        """Optimizer steps skipped in a row by the latest fit's non-finite policy."""
        return self._nonfinite_guard.streak if self._nonfinite_guard is not None else 0

    def on_train_epoch_end(self) -> None:
        self._log_skipped_images()

    def _log_skipped_images(self) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if getattr(dm, "skipped_images", None) is not None:
            self.log("data/skipped_images", float(dm.skipped_images), rank_zero_only=True)

    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable (the data module counts them)
            return None
        images, targets = batch[0], batch[1]
        logits = self.eval_model(images)
        loss = F.cross_entropy(logits, targets)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=len(images))
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, targets)
        for name, metric in metrics.items():
            self.log(name, metric, on_step=False, on_epoch=True, prog_bar=name.endswith("acc1"), batch_size=len(images))
        if stage == "val" and (stats := self._routing_stats(self.eval_model)) is not None:
            self.val_tlops.update(stats.processed, stats.tokens)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._evaluate(batch, "val")

    def on_validation_epoch_end(self) -> None:
        if (tlops := self.val_tlops) is not None:
            if not self.trainer.sanity_checking:
                fractions = tlops.compute().float()
                self.log_dict({"val/tlops": fractions.mean(), "val/tlops_saving": 1.0 - fractions.mean(),
                               **{f"val/tlops_block{i}": value for i, value in enumerate(fractions)}})
            tlops.reset()
        self._log_skipped_images()

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor] | None:
        """Top-k classes of each image: ``{"topk_indices" [B, k], "topk_probs" [B, k], "targets", "indices"}``
        (plus ``tlops [B]`` for a routed model). Accepts ``images``, ``(images, targets)`` or ``(images, targets,
        sample_indices)`` batches; a batch of unreadable images gives None."""
        if batch is None:
            return None
        batch = (batch,) if isinstance(batch, torch.Tensor) else batch
        probs = self.eval_model(batch[0]).float().softmax(dim=-1)
        top_probs, top_idx = probs.topk(min(self.hparams.top_k, probs.shape[-1]), dim=-1)
        out = {"topk_indices": top_idx, "topk_probs": top_probs, "targets": batch[1] if len(batch) > 1 else None,
               "indices": batch[2] if len(batch) > 2 else None}
        if (stats := self._routing_stats(self.eval_model)) is not None:  # per image, fraction of the unrouted TLOps
            out["tlops"] = stats.per_image().float()
        return out

    def param_groups(self) -> list[dict[str, Any]]:
        """Parameter groups ``decay`` then ``no_decay`` (1-d tensors and the model's ``no_weight_decay()``: cls
        token, pos embedding). The decayed group carries ``weight_decay`` with the default AdamW only."""
        model = self._require_model()
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        decay = {"weight_decay": self.hparams.weight_decay} if self.optimizer_fn is None else {}
        # weight_decay=1.0 only marks the decayed group (timm puts everything in no-decay when it is 0)
        groups = [{"params": g["params"], **({"name": "decay", **decay} if g["weight_decay"] > 0
                                             else {"name": "no_decay", "weight_decay": 0.0})}
                  for g in param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=skip)]
        return sorted(groups, key=lambda g: g["name"])

    def warmup_steps_total(self) -> int:
        """Warmup length in optimizer steps (``warmup_epochs`` converted with the trainer's steps per epoch)."""
        if not self.hparams.warmup_epochs:
            return int(self.hparams.warmup_steps)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("ImageClassifier: warmup_epochs needs a train dataloader with a length; use warmup_steps")
        return round(self.hparams.warmup_epochs * max(1, math.ceil(batches / self.trainer.accumulate_grad_batches)))

    def _schedule_length(self) -> tuple[int, int]:
        """(warm-up steps, total optimizer steps) of the schedule, for the trainer's current length."""
        steps = int(self.trainer.estimated_stepping_batches)  # first: it also sets up the train dataloader
        warmup = self.warmup_steps_total()
        return warmup, max(steps, warmup + 1)

    def configure_optimizers(self) -> dict[str, Any]:
        """The optimizer over :meth:`param_groups`, and per step a linear warm-up from ``lr / warmup`` to ``lr``, then
        a half cosine down to ``min_lr`` at the trainer's last step."""
        hp, groups = self.hparams, self.param_groups()
        optimizer = (self.optimizer_fn(groups) if self.optimizer_fn is not None else
                     torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay))
        warmup, total = self._schedule_length()
        self._cosine = CosineAnnealingLR(optimizer, T_max=total - warmup,
                                         eta_min=min(hp.min_lr, optimizer.param_groups[0]["lr"]))
        scheduler: LRScheduler = self._cosine
        if warmup:
            ramp = LinearLR(optimizer, start_factor=1 / warmup, total_iters=warmup - 1)
            scheduler = SequentialLR(optimizer, [ramp, self._cosine], milestones=[warmup])
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "name": "lr"}}

    def on_train_start(self) -> None:
        """A resumed fit restores the checkpoint's schedule, whose cosine ends where the first run ended: follow
        the trainer's current total of steps instead (e.g. ``--trainer.max_epochs`` raised), and say so. A logging
        interval longer than an epoch (Lightning's default 50 on small data) shortens to one epoch, so that
        ``train/*`` reaches the loggers. A resumed fit gets the random states of the checkpoint and the routing
        annealing step of its global step."""
        self._fit_log_interval()
        if getattr(self.model, "routing", None) is not None:  # an annealed routing target continues where it was
            self.model.routing.step = int(self.global_step)
        if self._resumed_rng_states is not None:  # not earlier: loading the checkpoint draws random numbers
            _set_rng_states(self._resumed_rng_states)
            self._resumed_rng_states = None
        cosine, (warmup, total) = self._cosine, self._schedule_length()
        if cosine.T_max != total - warmup:
            log.warning("ImageClassifier: the LR schedule of the checkpoint ends at step %d; this run ends at step %d:"
                        " the cosine now follows the new length", cosine.T_max + warmup, total)
            cosine.T_max = total - warmup
            if self.global_step > warmup:  # in the cosine: move to the new curve's value (then it follows it)
                for group, base in zip(cosine.optimizer.param_groups, cosine.base_lrs, strict=True):
                    group["lr"] = cosine.eta_min + (base - cosine.eta_min) * 0.5 * (
                        1 + math.cos(math.pi * (self.global_step - warmup) / cosine.T_max))

    def _fit_log_interval(self) -> None:
        trainer, batches = self.trainer, self.trainer.num_training_batches
        if not trainer.loggers or not math.isfinite(batches) or batches < 1:
            return
        steps = math.ceil(batches / trainer.accumulate_grad_batches)  # the interval counts optimizer steps
        if trainer.log_every_n_steps > steps:
            rank_zero_info(f"ImageClassifier: log_every_n_steps {trainer.log_every_n_steps} is longer than an epoch "
                           f"({steps} steps): logging every {steps} steps")
            trainer.log_every_n_steps = steps

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Mixup, CutMix, drop path and dropout draw from the global generators, which Lightning does not save: a
        # resumed fit restores them, and draws what the uninterrupted run drew after this point
        checkpoint["rng_states"] = _rng_states()
        if self.model is not None and hasattr(self.model, "token_counts"):
            checkpoint["token_counts"] = dict(self.model.token_counts)
        dm = getattr(self._trainer_or_none(), "datamodule", None)
        if names := getattr(dm, "class_names", None):  # class names and preprocessing, read by `export`
            checkpoint["class_names"] = [str(n) for n in names]
        if (cfg := getattr(dm, "transform_config", None)) is not None:
            checkpoint["data_config"] = {"mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std],
                                         "crop_pct": float(cfg.crop_pct), "interpolation": str(cfg.interpolation)}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before the weights load: grow the fresh model (and EMA copy) to the checkpoint's token counts,
        check that the weights fit (one error naming what differs), and reconcile EMA weights with ``ema_decay``.
        A fit resumes the random states saved with the checkpoint, once training starts."""
        trainer = self._trainer_or_none()
        fitting = trainer is not None and trainer.state.fn == "fit"
        if fitting and any("lr_lambdas" in s for s in checkpoint.get("lr_schedulers", [])):
            raise ValueError("this checkpoint's LR schedule is a LambdaLR (tokenformer_vision 0.2), which this version "
                             "cannot resume; start a new fit from its weights with --model.pretrained PATH")
        if "rng_states" in checkpoint and fitting:
            self._resumed_rng_states = checkpoint["rng_states"]  # restoring and building below draw random numbers
        state: dict[str, torch.Tensor] = checkpoint["state_dict"]
        model = self._require_model()
        weights = select_weights(checkpoint, ema=False)
        counts, have = checkpoint.get("token_counts") or token_counts(weights), getattr(model, "token_counts", None)
        if counts and hasattr(model, "grow") and dict(counts) != have and all(counts[k] >= have[k] for k in have):
            log.info("growing the model from %s to the checkpoint's %s", have, dict(counts))
            model.grow(**counts)
            if self.ema is not None:
                self.ema.module.grow(**counts)
        if problem := describe_mismatch(model, weights):
            raise ValueError(f"the checkpoint does not fit this {self.hparams.model_name}: {problem}")
        ema_keys = [k for k in state if k.startswith("ema.")]
        if self.ema is not None and not ema_keys:  # trained without EMA: start the average from its weights
            state.update({f"ema.module.{k}": v for k, v in weights.items()})
        for key in ema_keys if self.ema is None else []:  # EMA weights, but no EMA copy to load them into
            del state[key]
