"""Lightning side of growth: :class:`GrowthCallback` grows the model on a schedule inside ``Trainer.fit``.

The growth itself is :func:`tokenformer_vision.growth.grow_training_state` (model, optimizer state, EMA copy, all
in place); this module adds the schedule, the DDP re-wrap, the optional LR re-warm, the exactness check and the
logging. Optimizers and LR schedulers are kept, not rebuilt: their parameters are swapped for the grown ones.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from torch import nn

from .growth import SecondMoment, grow_training_state

__all__ = ["GrowthCallback", "GrowthStage", "validate_schedule"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GrowthStage:
    """When to grow (``at`` optimizer steps done, or at the start of epoch ``at``) and to which token counts
    (None: unchanged); ``rewarm_steps`` overrides the callback's re-warm for this stage."""

    at: int
    unit: Literal["step", "epoch"]
    attn_tokens: int | None = None
    ffn_tokens: int | None = None
    rewarm_steps: int | None = None

    def as_dict(self) -> dict[str, int]:
        d = {self.unit: self.at, **{k: v for k, v in asdict(self).items() if k not in ("at", "unit")}}
        return {k: v for k, v in d.items() if v is not None}


_STAGE_KEYS = {"step", "epoch", "attn_tokens", "ffn_tokens", "rewarm_steps"}


def validate_schedule(schedule: Sequence[Mapping[str, Any] | GrowthStage]) -> list[GrowthStage]:
    """Parse a schedule such as ``[{"epoch": 100, "attn_tokens": 1024, "ffn_tokens": 4096}]`` into stages.

    Each stage has exactly one of ``step``/``epoch`` (one unit for all stages, strictly increasing), and
    ``attn_tokens`` and/or ``ffn_tokens``, never smaller than before and growing at least one. ValueError names
    the stage and the problem.
    """
    if isinstance(schedule, Mapping) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"growth schedule must be a non-empty list of stages, got {schedule!r}")
    stages: list[GrowthStage] = []
    tokens: dict[str, int] = {}
    for i, stage in enumerate(schedule):
        stage = stage.as_dict() if isinstance(stage, GrowthStage) else stage
        where = f"growth schedule stage {i} ({dict(stage) if isinstance(stage, Mapping) else stage!r})"
        if not isinstance(stage, Mapping):
            raise ValueError(f"{where}: each stage must be a mapping")
        if set(stage) - _STAGE_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(set(stage) - _STAGE_KEYS)}; allowed: "
                             f"{sorted(_STAGE_KEYS)}")
        for key, value in stage.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{where}: {key} must be a non-negative int, got {value!r}")
        units = [k for k in ("step", "epoch") if stage.get(k) is not None]
        if len(units) != 1:
            raise ValueError(f"{where}: give exactly one of 'step' or 'epoch' (when to grow)")
        if stages and units[0] != stages[-1].unit:
            raise ValueError(f"{where}: mixes '{units[0]}' with '{stages[-1].unit}' stages; use one unit")
        if stages and stage[units[0]] <= stages[-1].at:
            raise ValueError(f"{where}: stages must be strictly increasing in {units[0]} "
                             f"({stage[units[0]]} follows {stages[-1].at})")
        counts = {k: stage[k] for k in ("attn_tokens", "ffn_tokens") if stage.get(k) is not None}
        if not counts:
            raise ValueError(f"{where}: give attn_tokens and/or ffn_tokens (the token counts to grow to)")
        for key, value in counts.items():
            if value < 1:
                raise ValueError(f"{where}: {key} must be ≥ 1, got {value}")
            if value < tokens.get(key, 0):
                raise ValueError(f"{where}: {key} shrinks from {tokens[key]} to {value}; growth only adds tokens")
        if all(tokens.get(k) == v for k, v in counts.items()):
            raise ValueError(f"{where}: token counts do not increase over the previous stage")
        tokens.update(counts)
        stages.append(GrowthStage(stage[units[0]], units[0], counts.get("attn_tokens"), counts.get("ffn_tokens"),
                                  stage.get("rewarm_steps")))
    return stages


def _images_of(batch: Any) -> torch.Tensor | None:
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if isinstance(batch, Mapping):
        return next((batch[k] for k in ("image", "images", "x", "input", "inputs", "pixel_values")
                     if torch.is_tensor(batch.get(k))), None)
    return None


@torch.no_grad()
def _eval_logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    modes = [(m, m.training) for m in net.modules()]
    net.eval()
    try:
        return net(images).float()
    finally:
        for m, mode in modes:
            m.training = mode


class GrowthCallback(Callback):
    """Grow a TokenFormer model mid-training on a schedule, preserving its function exactly.

    At each stage, in ``on_train_batch_start`` at an optimizer-step boundary and identically on every rank, it
    grows the model, its optimizer state and its EMA copy (``pl_module.ema`` if present) with
    :func:`~tokenformer_vision.growth.grow_training_state` (zero keys, values from a generator seeded with
    ``seed + stage``, τ unchanged), re-wraps DDP, optionally re-warms the LR, and logs ``growth/*`` metrics
    (also kept in :attr:`events`), including the largest change of the eval-mode logits on the current batch.
    A model with non-finite parameters is never grown (RuntimeError).

    Args:
        schedule: stages, e.g. ``[{"epoch": 100, "attn_tokens": 1024, "ffn_tokens": 4096}]``
            (see :func:`validate_schedule`); each may set its own ``rewarm_steps``.
        rewarm_steps: optimizer steps after a stage whose LR is scaled by ``(k + 1) / (rewarm_steps + 1)`` for the
            k-th step (0 = no re-warm).
        seed: base seed of the new value tokens (stage i uses ``seed + i``), so ranks and resumed runs agree.
        second_moment: ``"mean"`` seeds the new rows' second moment from the old rows; ``"zero"`` does not.
        check_samples: images of the current batch used for the logits check (0 = skip it).
        model_attr: attribute of the LightningModule that holds the growable network.

    The LightningModule must grow itself to a checkpoint's token counts in ``on_load_checkpoint``, as
    :class:`~tokenformer_vision.ImageClassifier` does. Single-device and DDP strategies are supported; sharded
    strategies fix parameter shapes at wrap time: grow offline (``tokenformer-vision grow``) and restart.
    """

    def __init__(self, schedule: list[dict[str, int]], rewarm_steps: int = 0, seed: int = 0,
                 second_moment: SecondMoment = "mean", check_samples: int = 16, model_attr: str = "model") -> None:
        super().__init__()
        self.schedule = validate_schedule(schedule)
        for name, value in (("rewarm_steps", rewarm_steps), ("check_samples", check_samples)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"GrowthCallback: {name} must be a non-negative int, got {value!r}")
        if second_moment not in ("mean", "zero"):
            raise ValueError(f"GrowthCallback: second_moment must be 'mean' or 'zero', got {second_moment!r}")
        self.rewarm_steps = rewarm_steps
        self.seed = int(seed)
        self.second_moment: SecondMoment = second_moment
        self.check_samples = check_samples
        self.model_attr = model_attr
        self.done = [False] * len(self.schedule)
        self.events: list[dict[str, Any]] = []
        self._rewarm: tuple[int, int] | None = None  # (global step of the growth, number of re-warm steps)
        self._hooks: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=[s.as_dict() for s in self.schedule])

    def state_dict(self) -> dict[str, Any]:
        return {"done_stages": [s.as_dict() for s, d in zip(self.schedule, self.done, strict=True) if d],
                "events": [dict(e) for e in self.events], "rewarm": list(self._rewarm) if self._rewarm else None}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        done = [dict(s) for s in state_dict.get("done_stages", [])]
        self.done = [stage.as_dict() in done for stage in self.schedule]
        unmatched = [s for s in done if s not in [stage.as_dict() for stage in self.schedule]]
        if unmatched:
            log.warning("GrowthCallback: the checkpoint records growth stages %s that are not in the current "
                        "schedule; the model keeps the checkpoint's token counts", unmatched)
        self.events = [dict(e) for e in state_dict.get("events", [])]
        rewarm = state_dict.get("rewarm")
        self._rewarm = (int(rewarm[0]), int(rewarm[1])) if rewarm else None

    # ------------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            raise ValueError(f"GrowthCallback supports single-device and DDP training, not "
                             f"{type(trainer.strategy).__name__}: sharded strategies fix parameter shapes at wrap "
                             "time. Grow offline instead: save a checkpoint, run `tokenformer-vision grow`, and "
                             "restart from the grown checkpoint.")
        net = self._net(pl_module)
        if not callable(getattr(net, "grow", None)) or not hasattr(net, "token_counts"):
            raise TypeError(f"GrowthCallback: {type(pl_module).__name__}.{self.model_attr} "
                            f"({type(net).__name__}) is not a growable TokenFormer model")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a shrinking stage is a config error: say so before spending a day of compute to reach it
        for index, done in enumerate(self.done):
            if not done:
                self._check_not_shrinking(pl_module, index)
        self._install_rewarm(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if batch_idx % max(1, trainer.accumulate_grad_batches) != 0:
            return  # only at an optimizer-step boundary, never inside a gradient-accumulation window
        for index, stage in enumerate(self.schedule):
            if self.done[index]:
                continue
            if (trainer.global_step if stage.unit == "step" else trainer.current_epoch) < stage.at:
                break  # stages are ordered in time
            self._run_stage(trainer, pl_module, index, batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

    # ------------------------------------------------------------------------------------------ growth
    def _net(self, pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, self.model_attr, None)
        if net is None:
            raise AttributeError(f"GrowthCallback: {type(pl_module).__name__} has no attribute {self.model_attr!r} "
                                 "holding the TokenFormer model (see model_attr)")
        return getattr(net, "_orig_mod", net)  # torch.compile wrapper → the module itself

    def _stage_token_counts(self, pl_module: pl.LightningModule, index: int) -> dict[str, int]:
        stage, current = self.schedule[index], self._net(pl_module).token_counts
        return {k: current[k] if getattr(stage, k) is None else getattr(stage, k) for k in current}

    def _check_not_shrinking(self, pl_module: pl.LightningModule, index: int) -> None:
        current = self._net(pl_module).token_counts
        for key, want in self._stage_token_counts(pl_module, index).items():
            if want < current[key]:
                raise ValueError(f"GrowthCallback: stage {index} ({self.schedule[index].as_dict()}) would shrink "
                                 f"{key} from the model's {current[key]} to {want}; growth only adds tokens. Fix "
                                 "the schedule or the model's token counts.")

    def _run_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, batch: Any) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        start = time.perf_counter()
        self._check_not_shrinking(pl_module, index)
        net = self._net(pl_module)
        before, targets = net.token_counts, self._stage_token_counts(pl_module, index)
        self.done[index] = True
        if targets == before:  # already there (a run resumed without this callback's state)
            log.info("GrowthCallback: stage %d: the model already has %s, skipping", index, targets)
            return
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise RuntimeError(f"GrowthCallback: stage {index}: the model has non-finite parameters; refusing to "
                               "grow it (see ImageClassifier's nonfinite policy)")
        images = _images_of(batch)
        images = images[: self.check_samples] if images is not None and self.check_samples else None
        params_before = sum(p.numel() for p in net.parameters())
        logits_before = None if images is None else _eval_logits(net, images)
        grow_training_state(net, targets["attn_tokens"], targets["ffn_tokens"], optimizer=trainer.optimizers,
                            ema=getattr(pl_module, "ema", None), seed=self.seed + index,
                            second_moment=self.second_moment)
        delta = float("nan") if images is None else float((_eval_logits(net, images) - logits_before).abs().max())
        if isinstance(trainer.strategy, DDPStrategy):  # DDP's reducer holds the old parameters: wrap anew
            trainer.strategy.model = pl_module
            trainer.strategy.configure_ddp()
        rewarm = self.schedule[index].rewarm_steps
        rewarm = self.rewarm_steps if rewarm is None else rewarm
        self._rewarm = (trainer.global_step, rewarm) if rewarm > 0 else None
        after = net.token_counts
        event = {"stage": index, "step": trainer.global_step, "epoch": trainer.current_epoch,
                 **{f"{k}_before": v for k, v in before.items()}, **{f"{k}_after": v for k, v in after.items()},
                 "params_before": params_before, "params_after": sum(p.numel() for p in net.parameters()),
                 "max_abs_dlogits": delta,
                 "max_abs_logits": float("nan") if logits_before is None else float(logits_before.abs().max()),
                 "rewarm_steps": rewarm, "seconds": time.perf_counter() - start}
        self.events.append(event)
        for logger in trainer.loggers:  # straight to the loggers: a one-off event must not wait for log_every_n
            logger.log_metrics({"growth/step": float(event["step"]), "growth/attn_tokens": float(after["attn_tokens"]),
                                "growth/ffn_tokens": float(after["ffn_tokens"]),
                                "growth/params": float(event["params_after"]), "growth/max_abs_dlogits": delta,
                                "epoch": float(event["epoch"])}, step=event["step"])
        if trainer.is_global_zero:
            log.info("GrowthCallback: stage %d at step %d (epoch %d): attn tokens %d→%d, ffn tokens %d→%d, params "
                     "%s→%s, max |Δlogits| %.3g", index, event["step"], event["epoch"], before["attn_tokens"],
                     after["attn_tokens"], before["ffn_tokens"], after["ffn_tokens"], f"{params_before:,}",
                     f"{event['params_after']:,}", delta)

    # ----------------------------------------------------------------------------------------- re-warm
    def _install_rewarm(self, trainer: pl.Trainer) -> None:
        """Scale the LR only for the duration of each optimizer step (pre/post step hooks), so that LR schedulers,
        which step after it and may read the group's current LR, never see the scaled value. Installed at train
        start (the optimizers outlive growth), so hooks that users add later see the scaled LR."""
        if self._hooks:
            return
        saved: dict[int, list[float]] = {}

        def factor() -> float | None:
            if self._rewarm is None:
                return None
            k = trainer.global_step - self._rewarm[0]  # optimizer steps already taken since the growth
            if k >= self._rewarm[1]:
                self._rewarm = None
                return None
            return (k + 1) / (self._rewarm[1] + 1)

        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            f = factor()
            if f is not None:
                saved[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
                for group in optimizer.param_groups:
                    group["lr"] *= f

        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group, lr in zip(optimizer.param_groups, saved.pop(id(optimizer), []), strict=False):
                group["lr"] = lr

        for optimizer in trainer.optimizers:
            self._hooks += [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]
