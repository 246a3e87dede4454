"""Lightning image classifier around any timm model (TokenFormer by default): the training recipe of DESIGN §2.

AdamW without weight decay on norms/biases/cls/pos, per-step linear warmup then cosine to ``min_lr``, label
smoothing, Mixup/CutMix, drop path, EMA weights (timm ``ModelEmaV3``), top-1/top-5 accuracy, top-k prediction.

Growth-aware by construction (DESIGN §3): the optimizer and scheduler are built in :meth:`configure_optimizers`
from the model's *current* parameters (``trainer.strategy.setup_optimizers(trainer)`` after growth rebuilds them),
checkpoints record the token counts, and :meth:`on_load_checkpoint` grows a freshly built model (and its EMA copy)
to the checkpoint's counts before the weights load.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable
from typing import Any

import timm
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from timm.models import load_state_dict as timm_load_state_dict
from timm.optim import param_groups_weight_decay
from timm.utils import ModelEmaV3
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.classification import MulticlassAccuracy

from .model import TokenFormerViT, checkpoint_filter_fn, token_counts_from_state_dict

__all__ = ["ImageClassifier", "WarmupCosine"]

log = logging.getLogger(__name__)

# Same type as ``lightning.pytorch.cli.OptimizerCallable``; spelled out so this module does not import the CLI.
OptimizerCallable = Callable[[Iterable], Optimizer]


class WarmupCosine:
    """LR factor for ``LambdaLR``: linear warmup over ``warmup_steps`` optimizer steps, then a half cosine from
    1 down to ``min_ratio`` at ``total_steps``, flat afterwards.

    ``factor(s) = (s + 1) / warmup_steps`` for ``s < warmup_steps`` (the first step already moves, the last
    warmup step reaches the full lr), then ``min_ratio + (1 - min_ratio) · ½(1 + cos(π · p))`` with
    ``p = (s - warmup_steps) / (total_steps - warmup_steps)`` clamped to [0, 1].

    A callable object, not a closure, so ``LambdaLR.state_dict()`` saves its settings with the checkpoint.
    """

    def __init__(self, warmup_steps: int, total_steps: int, min_ratio: float = 0.0) -> None:
        if warmup_steps < 0 or total_steps < 1:
            raise ValueError(f"WarmupCosine: need warmup_steps ≥ 0 and total_steps ≥ 1, got {warmup_steps}, "
                             f"{total_steps}")
        if not 0.0 <= min_ratio <= 1.0:
            raise ValueError(f"WarmupCosine: min_ratio must be in [0, 1], got {min_ratio}")
        self.warmup_steps = int(warmup_steps)
        self.total_steps = int(total_steps)
        self.min_ratio = float(min_ratio)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        progress = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
        progress = min(max(progress, 0.0), 1.0)
        return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ImageClassifier(LightningModule):
    """Image classification with a timm model (``self.model``), ready for ``LightningCLI``.

    Args:
        model_name: timm model name (``tokenformer_tiny/small/base/large`` or any timm model).
        num_classes: classifier outputs. The CLI links it from ``data.num_classes``; in Python it may be left
            None, and is then taken from the trainer's datamodule in :meth:`setup` (ValueError if there is none).
        img_size: input resolution passed to ``timm.create_model`` (None: the model's default, or the
            datamodule's ``img_size`` adopted in :meth:`setup`).
        model_kwargs: extra ``timm.create_model`` arguments (e.g. ``patch_size``, ``depth``, ``attn_tokens``).
        pretrained: optional local weights file (safetensors, ``.pth`` or a Lightning ``.ckpt``) loaded into the
            new model; a classifier head of another size is left freshly initialised (fine-tuning).
        optimizer: optimizer factory called with the parameter groups (CLI: ``--model.optimizer AdamW
            --model.optimizer.lr ...``); the decayed group then uses the factory's own weight decay.
            Default: AdamW(``lr``, ``betas``, ``weight_decay``).
        lr, weight_decay, betas: the default AdamW's settings (peak lr).
        warmup_steps, warmup_epochs: linear warmup length in optimizer steps or epochs (give at most one).
        min_lr: the cosine schedule ends at this lr.
        label_smoothing: label smoothing of the training loss (also applied inside Mixup/CutMix targets).
        mixup, cutmix: Mixup / CutMix alphas; 0 disables each.
        mixup_prob: probability of mixing a batch; mixup_switch_prob: probability of CutMix when both are on.
        drop_path_rate: stochastic depth, passed to timm.
        ema_decay: keep an EMA copy of the weights (``self.ema``, timm ``ModelEmaV3``) with this decay and
            validate/test/predict with it; None or 0 disables.
        ema_warmup: ramp the EMA decay up from 0 (``ModelEmaV3(use_warmup=True)``), useful for short runs.
        top_k: classes returned per image by :meth:`predict_step` (capped at ``num_classes``).
    """

    def __init__(
        self,
        model_name: str = "tokenformer_base",
        num_classes: int | None = None,
        img_size: int | None = None,
        model_kwargs: dict[str, Any] | None = None,
        pretrained: str | None = None,
        optimizer: OptimizerCallable | None = None,
        lr: float = 1e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        warmup_steps: int = 0,
        warmup_epochs: float = 0.0,
        min_lr: float = 0.0,
        label_smoothing: float = 0.0,
        mixup: float = 0.0,
        cutmix: float = 0.0,
        mixup_prob: float = 1.0,
        mixup_switch_prob: float = 0.5,
        drop_path_rate: float = 0.0,
        ema_decay: float | None = None,
        ema_warmup: bool = False,
        top_k: int = 5,
    ) -> None:
        super().__init__()
        self._check_args(num_classes=num_classes, img_size=img_size, lr=lr, weight_decay=weight_decay, betas=betas,
                         warmup_steps=warmup_steps, warmup_epochs=warmup_epochs, min_lr=min_lr,
                         label_smoothing=label_smoothing, mixup=mixup, cutmix=cutmix, mixup_prob=mixup_prob,
                         mixup_switch_prob=mixup_switch_prob, drop_path_rate=drop_path_rate, ema_decay=ema_decay,
                         top_k=top_k, model_kwargs=model_kwargs)
        # The optimizer factory is code, not a hyperparameter: it cannot go into a weights-only checkpoint.
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer_fn = optimizer
        self.model: nn.Module | None = None
        self.ema: ModelEmaV3 | None = None
        self.mixup_fn: Mixup | None = None
        if num_classes is not None:
            self._build(num_classes)

    # ---------------------------------------------------------------------------------------------- set-up
    @staticmethod
    def _check_args(**a: Any) -> None:
        def bad(name: str, rule: str) -> ValueError:
            return ValueError(f"ImageClassifier: {name} must be {rule}, got {a[name]!r}")

        if a["num_classes"] is not None and (not isinstance(a["num_classes"], int) or a["num_classes"] < 1):
            raise bad("num_classes", "a positive int or None")
        if a["img_size"] is not None and (not isinstance(a["img_size"], int) or a["img_size"] < 1):
            raise bad("img_size", "a positive int or None")
        if not a["lr"] > 0:
            raise bad("lr", "> 0")
        if a["weight_decay"] < 0:
            raise bad("weight_decay", "≥ 0")
        if len(a["betas"]) != 2 or not all(0.0 <= b < 1.0 for b in a["betas"]):
            raise bad("betas", "two numbers in [0, 1)")
        if a["warmup_steps"] < 0 or a["warmup_epochs"] < 0:
            raise ValueError(f"ImageClassifier: warmup must be ≥ 0, got warmup_steps={a['warmup_steps']}, "
                             f"warmup_epochs={a['warmup_epochs']}")
        if a["warmup_steps"] and a["warmup_epochs"]:
            raise ValueError("ImageClassifier: give warmup_steps or warmup_epochs, not both "
                             f"(got {a['warmup_steps']} and {a['warmup_epochs']})")
        if not 0.0 <= a["min_lr"] <= a["lr"]:
            raise ValueError(f"ImageClassifier: min_lr must be in [0, lr={a['lr']}], got {a['min_lr']}")
        if not 0.0 <= a["label_smoothing"] < 1.0:
            raise bad("label_smoothing", "in [0, 1)")
        for name in ("mixup", "cutmix", "drop_path_rate"):
            if a[name] < 0:
                raise bad(name, "≥ 0")
        for name in ("mixup_prob", "mixup_switch_prob"):
            if not 0.0 <= a[name] <= 1.0:
                raise bad(name, "in [0, 1]")
        if a["ema_decay"] is not None and not 0.0 <= a["ema_decay"] < 1.0:
            raise bad("ema_decay", "in [0, 1) or None")
        if not isinstance(a["top_k"], int) or a["top_k"] < 1:
            raise bad("top_k", "a positive int")
        clash = {"num_classes", "img_size", "drop_path_rate", "pretrained"} & set(a["model_kwargs"] or {})
        if clash:
            raise ValueError(f"ImageClassifier: set {sorted(clash)} as ImageClassifier arguments, not in model_kwargs")

    def _build(self, num_classes: int) -> None:
        """Create the timm model, its EMA copy, the metrics and the Mixup function for ``num_classes``."""
        hp = self.hparams
        kwargs = dict(hp.model_kwargs or {})
        if hp.img_size is not None:
            kwargs["img_size"] = hp.img_size
        if hp.drop_path_rate:
            kwargs["drop_path_rate"] = hp.drop_path_rate
        try:
            self.model = timm.create_model(hp.model_name, num_classes=num_classes, **kwargs)
        except RuntimeError as err:
            if "Unknown model" in str(err):
                raise ValueError(f"ImageClassifier: unknown timm model {hp.model_name!r}; e.g. "
                                 f"{timm.list_models('tokenformer*')}") from err
            raise
        if hp.pretrained:
            self._load_pretrained(hp.pretrained)
        self.num_classes = num_classes
        if hp.ema_decay:
            self.ema = ModelEmaV3(self.model, decay=hp.ema_decay, use_warmup=hp.ema_warmup)
            # no gradients, not in the optimizer, and invisible to DDP's reducer
            self.ema.requires_grad_(False)
        k5 = min(5, num_classes)
        for stage in ("val", "test"):
            setattr(self, f"{stage}_acc1", MulticlassAccuracy(num_classes, top_k=1, average="micro"))
            setattr(self, f"{stage}_acc5", MulticlassAccuracy(num_classes, top_k=k5, average="micro"))
        if hp.mixup > 0 or hp.cutmix > 0:
            self.mixup_fn = Mixup(mixup_alpha=hp.mixup, cutmix_alpha=hp.cutmix, prob=hp.mixup_prob,
                                  switch_prob=hp.mixup_switch_prob, label_smoothing=hp.label_smoothing,
                                  num_classes=num_classes)
        self.train_loss_fn: nn.Module = (SoftTargetCrossEntropy() if self.mixup_fn is not None
                                         else nn.CrossEntropyLoss(label_smoothing=hp.label_smoothing))

    def _load_pretrained(self, path: str) -> None:
        """Load a weights file into ``self.model``; a head of another shape stays freshly initialised."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ImageClassifier: pretrained weights file {path!r} does not exist")
        state = timm_load_state_dict(path, use_ema=True)  # safetensors / .pth; takes 'state_dict' if present
        # A Lightning checkpoint holds 'model.*' and, with EMA, 'ema.module.*': prefer the averaged weights.
        for prefix in ("ema.module.", "model."):
            sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
            if sub:
                state = sub
                break
        if isinstance(self.model, TokenFormerViT):
            state = checkpoint_filter_fn(state, self.model)  # grows to the saved token counts, resamples pos
        own = self.model.state_dict()
        dropped = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
        for key in dropped:
            del state[key]
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        head = getattr(self.model, "pretrained_cfg", {}).get("classifier", "head")
        bad_missing = [k for k in missing if k not in dropped]
        bad_dropped = [k for k in dropped if not k.startswith(f"{head}.")]
        if bad_missing or unexpected or bad_dropped:
            raise ValueError(f"ImageClassifier: {path} does not fit {self.hparams.model_name}: missing "
                             f"{bad_missing[:5]}, unexpected {unexpected[:5]}, shape mismatch {bad_dropped[:5]}")
        if dropped:
            log.info("pretrained %s: classifier %s re-initialised (shape differs)", path, dropped)

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        dm_classes = getattr(dm, "num_classes", None)
        if self.model is None:
            if dm_classes is None:
                raise ValueError("ImageClassifier: num_classes is None and the datamodule does not provide one; "
                                 "pass num_classes=")
            self.hparams["num_classes"] = int(dm_classes)
            self._adopt_img_size(dm)
            self._build(int(dm_classes))
        elif dm_classes is not None and int(dm_classes) != self.num_classes:
            raise ValueError(f"ImageClassifier: the datamodule has {dm_classes} classes but the model was built "
                             f"for num_classes={self.num_classes}")

    def _adopt_img_size(self, dm: Any) -> None:
        """Without an explicit ``img_size``, build at the datamodule's size (saved so checkpoints reload)."""
        size = getattr(dm, "img_size", None)
        if isinstance(size, (tuple, list)) and len(size) == 2 and size[0] == size[1]:
            size = size[0]  # square inputs only: the model's img_size argument here is one int
        if self.hparams.img_size is None and isinstance(size, int):
            self.hparams["img_size"] = int(size)

    # ------------------------------------------------------------------------------------------ forward
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

    # ----------------------------------------------------------------------------------------- training
    def _mix(self, images: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mixup/CutMix with soft targets. timm's Mixup pairs samples and needs an even batch: an odd last
        sample is kept unmixed (with smoothed one-hot targets) rather than dropped."""
        assert self.mixup_fn is not None
        smoothing = self.hparams.label_smoothing
        n = len(images) - len(images) % 2
        if n == len(images):
            return self.mixup_fn(images, targets)
        tail = mixup_target(targets[n:], self.num_classes, lam=1.0, smoothing=smoothing)
        if n == 0:
            return images, tail
        mixed, soft = self.mixup_fn(images[:n], targets[:n])
        return torch.cat([mixed, images[n:]]), torch.cat([soft, tail])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        if self.mixup_fn is not None:
            images, targets = self._mix(images, targets)
        loss = self.train_loss_fn(self.model(images), targets)
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True, batch_size=len(images))
        if getattr(self.model, "token_routing", False):
            # token routing's compute penalty λ·mean(1 − p) of this forward (exactly 0 at the default λ = 0)
            loss = loss + self.model.routing_loss()
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.ema is not None:
            # after the weights moved; global_step counts completed steps, so this is the 1-based step number
            self.ema.update(self.model, step=self.trainer.global_step + 1)

    # --------------------------------------------------------------------------------------- evaluation
    def _evaluate(self, batch: Any, stage: str) -> torch.Tensor:
        images, targets = batch[0], batch[1]
        logits = self.eval_model(images)
        loss = F.cross_entropy(logits, targets)
        acc1, acc5 = getattr(self, f"{stage}_acc1"), getattr(self, f"{stage}_acc5")
        acc1.update(logits, targets)
        acc5.update(logits, targets)
        bs = len(images)
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, sync_dist=True, batch_size=bs)
        self.log(f"{stage}/acc1", acc1, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs)
        self.log(f"{stage}/acc5", acc5, on_step=False, on_epoch=True, batch_size=bs)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict[str, torch.Tensor | None]:
        """Top-k classes of each image: ``{"topk_indices" [B, k], "topk_probs" [B, k], "targets", "indices"}``.

        Accepts ``images``, ``(images, targets)`` or ``(images, targets, sample_indices)`` batches.
        """
        if isinstance(batch, torch.Tensor):
            images, targets, indices = batch, None, None
        else:
            images = batch[0]
            targets = batch[1] if len(batch) > 1 else None
            indices = batch[2] if len(batch) > 2 else None
        model = self.eval_model
        probs = model(images).float().softmax(dim=-1)
        top_probs, top_idx = probs.topk(min(self.hparams.top_k, probs.shape[-1]), dim=-1)
        out = {"topk_indices": top_idx, "topk_probs": top_probs, "targets": targets, "indices": indices}
        stats = model.routing_stats(strict=False) if getattr(model, "token_routing", False) else None
        if stats is not None:  # per-image fraction of the unrouted model's token-layer operations executed
            out["tlops"] = stats.per_image().float()
        return out

    def configure_callbacks(self) -> list[Any]:
        """With token routing, add :class:`~tokenformer_vision.routing.RoutingMetricsCallback` (``val/tlops``
        and per-block fractions in validation) unless the trainer already has one."""
        if not getattr(self.model, "token_routing", False):
            return []
        from .routing import RoutingMetricsCallback

        trainer = self._trainer
        if trainer is not None and any(isinstance(c, RoutingMetricsCallback) for c in trainer.callbacks):
            return []
        return [RoutingMetricsCallback()]

    # ------------------------------------------------------------------------------------------ optimizer
    def param_groups(self) -> list[dict[str, Any]]:
        """AdamW parameter groups of the model's current parameters: no weight decay on 1-d tensors (norms,
        biases), ``*.bias`` and the model's ``no_weight_decay()`` names (cls token, pos embedding).

        Rebuilt on every call, so growth can call it (through ``configure_optimizers``) after replacing
        parameters. With the default AdamW the decayed group carries ``weight_decay``; with a user factory it
        is left out so the factory's own setting applies.
        """
        model = self._require_model()
        skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
        # weight_decay=1.0 only marks the decayed group (timm puts everything in no-decay when it is 0)
        groups = param_groups_weight_decay(model, weight_decay=1.0, no_weight_decay_list=skip)
        out = []
        for group in groups:
            decayed = group["weight_decay"] > 0
            new: dict[str, Any] = {"params": group["params"], "name": "decay" if decayed else "no_decay"}
            if not decayed:
                new["weight_decay"] = 0.0
            elif self.optimizer_fn is None:
                new["weight_decay"] = self.hparams.weight_decay
            out.append(new)
        return sorted(out, key=lambda g: g["name"])  # "decay" first, then "no_decay"

    def warmup_steps_total(self) -> int:
        """Warmup length in optimizer steps (``warmup_epochs`` converted with the trainer's steps per epoch)."""
        if not self.hparams.warmup_epochs:
            return int(self.hparams.warmup_steps)
        batches = self.trainer.num_training_batches
        if not math.isfinite(batches):
            raise ValueError("ImageClassifier: warmup_epochs needs a train dataloader with a length; "
                             "use warmup_steps")
        per_epoch = max(1, math.ceil(batches / self.trainer.accumulate_grad_batches))
        return round(self.hparams.warmup_epochs * per_epoch)

    def configure_optimizers(self) -> dict[str, Any]:
        groups = self.param_groups()
        if self.optimizer_fn is not None:
            optimizer = self.optimizer_fn(groups)
        else:
            optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, betas=tuple(self.hparams.betas),
                                          weight_decay=self.hparams.weight_decay)
        total = int(self.trainer.estimated_stepping_batches)  # also sets up the train dataloader
        warmup = self.warmup_steps_total()
        base_lr = optimizer.param_groups[0]["lr"]
        min_ratio = min(1.0, self.hparams.min_lr / base_lr) if base_lr > 0 else 0.0
        scheduler = LambdaLR(optimizer, WarmupCosine(warmup, max(total, 1), min_ratio))
        return {"optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1, "name": "lr"}}

    # ---------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.model is not None and hasattr(self.model, "grow"):
            checkpoint["token_counts"] = {"attn_tokens": int(self.model.attn_tokens),
                                          "ffn_tokens": int(self.model.ffn_tokens)}
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if dm is not None:  # class names + preprocessing, read by `tokenformer-vision export`
            from .export import datamodule_metadata

            checkpoint.update(datamodule_metadata(dm))

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Runs before the weights load: grow the fresh model (and EMA copy) to the checkpoint's token counts,
        and reconcile EMA weights between the checkpoint and this module's ``ema_decay`` setting."""
        state: dict[str, torch.Tensor] = checkpoint["state_dict"]
        model = self._require_model()
        if hasattr(model, "grow"):
            counts = checkpoint.get("token_counts")
            if counts is None:
                try:
                    counts = token_counts_from_state_dict({k: v for k, v in state.items()
                                                           if k.startswith("model.")})
                except ValueError:
                    counts = None
            if counts:
                have = {"attn_tokens": model.attn_tokens, "ffn_tokens": model.ffn_tokens}
                if dict(counts) != have:
                    log.info("growing the model from %s to the checkpoint's %s", have, dict(counts))
                    model.grow(**counts)
                    if self.ema is not None:
                        self.ema.module.grow(**counts)
        has_ema = any(k.startswith("ema.") for k in state)
        if self.ema is not None and not has_ema:
            # checkpoint trained without EMA: start the average from its weights
            state.update({f"ema.module.{k[len('model.'):]}": v for k, v in list(state.items())
                          if k.startswith("model.")})
        elif self.ema is None and has_ema:
            for key in [k for k in state if k.startswith("ema.")]:
                del state[key]
