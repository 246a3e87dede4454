"""Training callbacks. :class:`GrowthCallback` grows the model on a schedule inside ``Trainer.fit`` with
:func:`tokenformer_vision.growth.grow_training_state`, adding DDP re-wrap, LR re-warm, exactness check and logging.
:class:`NonFiniteGuard` skips (or stops at) optimizer steps whose loss or gradients are not finite;
:class:`EMACallback` keeps an exponential moving average of the weights; :class:`ProgressiveResolution` trains on
smaller images first."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from .growth import SecondMoment, grow_training_state

__all__ = ["EMACallback", "GrowthCallback", "GrowthStage", "NonFiniteGuard", "ProgressiveResolution",
           "validate_schedule"]

log = logging.getLogger(__name__)
_STAGE_KEYS = {"step", "epoch", "attn_tokens", "ffn_tokens", "rewarm_steps"}


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


def _is_int(value: Any, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


def validate_schedule(schedule: Sequence[Mapping[str, Any] | GrowthStage]) -> list[GrowthStage]:
    """Parse a schedule such as ``[{"epoch": 100, "attn_tokens": 1024, "ffn_tokens": 4096}]`` into stages: one of
    ``step``/``epoch`` each (one unit, strictly increasing), and token counts that never shrink and grow at least
    one. ValueError names the stage and the problem."""
    if isinstance(schedule, Mapping) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"growth schedule must be a non-empty list of stages, got {schedule!r}")
    stages: list[GrowthStage] = []
    tokens: dict[str, int] = {}  # token counts so far
    for i, stage in enumerate(schedule):
        stage = stage.as_dict() if isinstance(stage, GrowthStage) else stage
        where = f"growth schedule stage {i} ({dict(stage) if isinstance(stage, Mapping) else stage!r})"
        if not isinstance(stage, Mapping):
            raise ValueError(f"{where}: each stage must be a mapping")
        if set(stage) - _STAGE_KEYS:
            raise ValueError(f"{where}: unknown keys {sorted(set(stage) - _STAGE_KEYS)}; allowed: "
                             f"{sorted(_STAGE_KEYS)}")
        for key, value in stage.items():
            if value is not None and not _is_int(value, low := int(key.endswith("_tokens"))):
                raise ValueError(f"{where}: {key} must be {'an int ≥ 1' if low else 'a non-negative int'}, "
                                 f"got {value!r}")
        units = [k for k in ("step", "epoch") if stage.get(k) is not None]
        if len(units) != 1:
            raise ValueError(f"{where}: give exactly one of 'step' or 'epoch' (when to grow)")
        unit, prev = units[0], stages[-1] if stages else None
        if prev and unit != prev.unit:
            raise ValueError(f"{where}: mixes '{unit}' with '{prev.unit}' stages; use one unit")
        if prev and stage[unit] <= prev.at:
            raise ValueError(f"{where}: stages must be strictly increasing in {unit} ({stage[unit]} follows {prev.at})")
        counts = {k: stage[k] for k in ("attn_tokens", "ffn_tokens") if stage.get(k) is not None}
        if not counts:
            raise ValueError(f"{where}: give attn_tokens and/or ffn_tokens (the token counts to grow to)")
        for key, value in counts.items():
            if value < tokens.get(key, 0):
                raise ValueError(f"{where}: {key} shrinks from {tokens[key]} to {value}; growth only adds tokens")
        if all(tokens.get(k) == v for k, v in counts.items()):
            raise ValueError(f"{where}: token counts do not increase over the previous stage")
        tokens.update(counts)
        stages.append(GrowthStage(stage[unit], unit, **counts, rewarm_steps=stage.get("rewarm_steps")))
    return stages


def _images_of(batch: Any, count: int) -> torch.Tensor | None:
    if isinstance(batch, (list, tuple)) and batch:
        batch = batch[0]
    elif isinstance(batch, Mapping):
        batch = next((batch[k] for k in ("image", "images", "x", "input", "inputs", "pixel_values")
                      if torch.is_tensor(batch.get(k))), None)
    return batch[:count] if torch.is_tensor(batch) and count else None


@torch.no_grad()
def _eval_logits(net: nn.Module, images: torch.Tensor) -> torch.Tensor:
    modes = [(m, m.training) for m in net.modules()]
    try:
        return net.eval()(images).float()
    finally:
        for m, mode in modes:
            m.training = mode


class GrowthCallback(Callback):
    """Grow a TokenFormer model mid-training on a schedule (see :func:`validate_schedule`), preserving its function.

    At each stage, at an optimizer-step boundary and identically on every rank, it grows the model, its optimizer
    state and its EMA copy (``pl_module.ema``) with :func:`~tokenformer_vision.growth.grow_training_state` (new
    values seeded with ``seed + stage``), re-wraps DDP, re-warms the LR (by ``(k + 1) / (rewarm_steps + 1)`` on the
    k-th step after it), multiplies the optimizer's updates of the appended rows by ``new_token_lr_scale`` for the
    rest of the fit (their own learning rate), and logs ``growth/*`` metrics (kept in :attr:`events`), including the
    largest change of the eval-mode logits on ``check_samples`` images of the batch. It never grows non-finite
    parameters (RuntimeError). The LightningModule must grow itself to a checkpoint's token counts in
    ``on_load_checkpoint`` (as :class:`~tokenformer_vision.ImageClassifier` does). Sharded strategies fix parameter
    shapes at wrap time: grow offline (``tokenformer-vision grow``) and restart.
    """

    def __init__(self, schedule: list[dict[str, int]], rewarm_steps: int = 0, seed: int = 0,
                 second_moment: SecondMoment = "mean", check_samples: int = 16, model_attr: str = "model",
                 new_token_lr_scale: float = 1.0) -> None:
        super().__init__()
        self.schedule = validate_schedule(schedule)
        for name, value in (("rewarm_steps", rewarm_steps), ("check_samples", check_samples)):
            if not _is_int(value):
                raise ValueError(f"GrowthCallback: {name} must be a non-negative int, got {value!r}")
        if second_moment not in ("mean", "zero"):
            raise ValueError(f"GrowthCallback: second_moment must be 'mean' or 'zero', got {second_moment!r}")
        if not (isinstance(new_token_lr_scale, int | float) and new_token_lr_scale > 0):
            raise ValueError(f"GrowthCallback: new_token_lr_scale must be > 0, got {new_token_lr_scale!r}")
        self.rewarm_steps, self.seed, self.second_moment = rewarm_steps, int(seed), second_moment
        self.new_token_lr_scale = float(new_token_lr_scale)
        self.new_rows: dict[str, int] = {}  # parameter name → its first row added by growth (scaled updates)
        self.check_samples, self.model_attr = check_samples, model_attr
        self.done = [False] * len(self.schedule)
        self.events: list[dict[str, Any]] = []
        self._rewarm: tuple[int, int] | None = None  # (global step of the growth, number of re-warm steps)
        self._hooks: list[Any] = []

    @property
    def state_key(self) -> str:
        return self._generate_state_key(schedule=[s.as_dict() for s in self.schedule])

    def state_dict(self) -> dict[str, Any]:
        return {"done_stages": [s.as_dict() for s, d in zip(self.schedule, self.done, strict=True) if d],
                "events": [dict(e) for e in self.events], "rewarm": list(self._rewarm) if self._rewarm else None,
                "new_rows": dict(self.new_rows)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        done, ours = [dict(s) for s in state_dict.get("done_stages", [])], [s.as_dict() for s in self.schedule]
        self.done = [stage in done for stage in ours]
        if any(s not in ours for s in done):
            log.warning("GrowthCallback: the checkpoint records growth stages %s that are not in the current "
                        "schedule; the model keeps the checkpoint's token counts", [s for s in done if s not in ours])
        self.events = [dict(e) for e in state_dict.get("events", [])]
        rewarm = state_dict.get("rewarm")
        self._rewarm = (int(rewarm[0]), int(rewarm[1])) if rewarm else None
        self.new_rows = {str(k): int(v) for k, v in state_dict.get("new_rows", {}).items()}

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not isinstance(trainer.strategy, (SingleDeviceStrategy, DDPStrategy)):
            name = type(trainer.strategy).__name__
            raise ValueError(f"GrowthCallback supports single-device and DDP training, not {name}: sharded strategies"
                             " fix parameter shapes; grow offline instead (`tokenformer-vision grow`) and restart")
        self._net(pl_module)  # fail early if it is not growable

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # a shrinking stage is a config error: say so before spending a day of compute to reach it
        for index in (i for i, done in enumerate(self.done) if not done):
            self._stage_token_counts(pl_module, index)
        self._warn_unreachable(trainer)
        self._install_step_hooks(trainer, pl_module)

    def _warn_unreachable(self, trainer: pl.Trainer) -> None:
        """Warn of stages that this fit ends before: at or after ``max_epochs``, or the last optimizer step."""
        steps, epochs, batches = trainer.estimated_stepping_batches, trainer.max_epochs, trainer.num_training_batches
        per_epoch = math.ceil(batches / trainer.accumulate_grad_batches) if math.isfinite(batches) else None

        def unreachable(stage: GrowthStage) -> bool:
            if stage.unit == "step":
                return stage.at >= steps  # inf without a length: never
            return (epochs not in (None, -1) and stage.at >= epochs) or bool(
                per_epoch and math.isfinite(steps) and stage.at * per_epoch >= steps)  # max_steps ends it earlier

        if late := [(i, s) for i, s in enumerate(self.schedule) if not self.done[i] and unreachable(s)]:
            where = ", ".join(f"stage {i} ({s.as_dict()})" for i, s in late)
            rank_zero_warn(f"GrowthCallback: {where} will not run: this fit ends after {steps} optimizer steps "
                           f"(max_epochs={epochs}, max_steps={trainer.max_steps}; a stage runs at the start of its "
                           "epoch, or once its number of steps is done). Move the stage earlier or train longer.")

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
        while self._hooks:
            self._hooks.pop().remove()

    def _net(self, pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, self.model_attr, None)
        net = getattr(net, "_orig_mod", net)  # torch.compile wrapper → the module itself
        if not callable(getattr(net, "grow", None)) or not hasattr(net, "token_counts"):
            raise TypeError(f"GrowthCallback: {type(pl_module).__name__}.{self.model_attr} ({type(net).__name__}) is "
                            "not a growable TokenFormer model (see model_attr)")
        return net

    def _stage_token_counts(self, pl_module: pl.LightningModule, index: int) -> dict[str, int]:
        """The token counts after stage ``index``; ValueError if that would shrink the model."""
        stage, current = self.schedule[index], self._net(pl_module).token_counts
        targets = {k: current[k] if getattr(stage, k) is None else getattr(stage, k) for k in current}
        for key, want in targets.items():
            if want < current[key]:
                raise ValueError(f"GrowthCallback: stage {index} ({stage.as_dict()}) would shrink {key} from the "
                                 f"model's {current[key]} to {want}; growth only adds tokens. Fix the schedule or "
                                 "the model's token counts.")
        return targets

    def _run_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, batch: Any) -> None:
        start, net = time.perf_counter(), self._net(pl_module)
        before, targets = net.token_counts, self._stage_token_counts(pl_module, index)
        self.done[index] = True
        if targets == before:  # already there (a run resumed without this callback's state)
            rank_zero_info(f"GrowthCallback: stage {index}: the model already has {targets}, skipping")
            return
        if not all(torch.isfinite(p).all() for p in net.parameters()):
            raise RuntimeError(f"GrowthCallback: stage {index}: the model has non-finite parameters; refusing to "
                               "grow it (see ImageClassifier's nonfinite policy)")
        images, n_params = _images_of(batch, self.check_samples), lambda: sum(p.numel() for p in net.parameters())
        params_before, logits = n_params(), None if images is None else _eval_logits(net, images)
        grown = grow_training_state(net, targets["attn_tokens"], targets["ffn_tokens"], optimizer=trainer.optimizers,
                                    ema=getattr(pl_module, "ema", None), seed=self.seed + index,
                                    second_moment=self.second_moment)
        for g in grown:  # rows added by an earlier stage stay new
            self.new_rows.setdefault(g.name, g.old_rows)
        delta = float("nan") if logits is None else float((_eval_logits(net, images) - logits).abs().max())
        if isinstance(trainer.strategy, DDPStrategy):  # DDP's reducer holds the old parameters: wrap anew
            trainer.strategy.model = pl_module
            trainer.strategy.configure_ddp()
        rewarm = next(r for r in (self.schedule[index].rewarm_steps, self.rewarm_steps) if r is not None)
        self._rewarm = (trainer.global_step, rewarm) if rewarm > 0 else None
        after, step, epoch, params_after = net.token_counts, trainer.global_step, trainer.current_epoch, n_params()
        self.events.append({"stage": index, "step": step, "epoch": epoch,
                            **{f"{k}_{w}": v for w, d in (("before", before), ("after", after)) for k, v in d.items()},
                            "params_before": params_before, "params_after": params_after, "max_abs_dlogits": delta,
                            "max_abs_logits": float("nan") if logits is None else float(logits.abs().max()),
                            "rewarm_steps": rewarm, "seconds": time.perf_counter() - start})
        for logger in trainer.loggers:  # straight to the loggers: a one-off event must not wait for log_every_n
            logger.log_metrics({"growth/step": float(step), **{f"growth/{k}": float(v) for k, v in after.items()},
                                "growth/params": float(params_after), "growth/max_abs_dlogits": delta,
                                "epoch": float(epoch)}, step=step)
        # on the console by default: Lightning's logger has a handler, this module's has none
        rank_zero_info(f"GrowthCallback: stage {index} at step {step} (epoch {epoch}): tokens {before}→{after}, "
                       f"params {params_before:,}→{params_after:,}, max |Δlogits| {delta:.3g}")

    def _install_step_hooks(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Re-warm and new_token_lr_scale act inside each optimizer step: LR schedulers, which step after it and may
        # read the LR, never see the scaled value. Installed at train start, so step hooks users add later see it.
        if self._hooks:
            return
        saved: dict[int, list[float]] = {}
        before_step: list[tuple[torch.Tensor, torch.Tensor]] = []  # (new rows of a parameter, their values)

        def new_rows() -> list[torch.Tensor]:
            if self.new_token_lr_scale == 1.0 or not self.new_rows:
                return []
            params = dict(self._net(pl_module).named_parameters())
            return [params[name].detach()[start:] for name, start in self.new_rows.items()]

        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            if self._rewarm is not None and trainer.global_step - self._rewarm[0] >= self._rewarm[1]:
                self._rewarm = None  # re-warm over
            if self._rewarm is not None:
                k = trainer.global_step - self._rewarm[0]  # optimizer steps already taken since the growth
                saved[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
                for group in optimizer.param_groups:
                    group["lr"] *= (k + 1) / (self._rewarm[1] + 1)
            before_step[:] = [(rows, rows.clone()) for rows in new_rows()]

        @torch.no_grad()
        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            for group, lr in zip(optimizer.param_groups, saved.pop(id(optimizer), []), strict=False):
                group["lr"] = lr
            for rows, old in before_step:  # the optimizer's update of the new rows, times new_token_lr_scale
                rows.copy_(old + self.new_token_lr_scale * (rows - old))
            before_step.clear()

        for optimizer in trainer.optimizers:
            self._hooks += [optimizer.register_step_pre_hook(pre_hook), optimizer.register_step_post_hook(post_hook)]


class NonFiniteGuard(Callback):
    """What a fit does with an optimizer step whose loss or gradients are not finite: ``policy="skip"`` drops its
    gradients, so that the optimizer leaves the weights and their moments as they are, with a warning, and stops the
    run (FloatingPointError) after ``max_steps`` such steps in a row; ``"stop"`` stops at the first. Every rank takes
    the same decision (gradients are checked after DDP has averaged them, the losses are agreed on). The count of
    steps skipped in a row is saved in checkpoints. :class:`~tokenformer_vision.ImageClassifier` adds one (its
    ``nonfinite`` and ``max_nonfinite_steps``)."""

    def __init__(self, policy: Literal["skip", "stop"] = "skip", max_steps: int = 10) -> None:
        if policy not in ("skip", "stop") or not _is_int(max_steps, 1):
            raise ValueError(f"NonFiniteGuard: need policy 'skip' or 'stop' and max_steps ≥ 1, got {policy!r}, "
                             f"{max_steps!r}")
        self.policy, self.max_steps = policy, max_steps
        self.streak = 0  # optimizer steps skipped in a row
        self._loss_finite = True  # every loss of the current optimizer step (gradient accumulation: several)

    def state_dict(self) -> dict[str, int]:
        return {"streak": self.streak}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.streak = int(state_dict.get("streak", 0))

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        self._loss_finite &= bool(torch.isfinite(loss.detach()).all())

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                                 optimizer: torch.optim.Optimizer) -> None:
        loss_finite, self._loss_finite = self._loss_finite, True
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:  # no backward at all (training_step returned None): no step to judge
            return
        # one host sync per step, not one per parameter
        finite = loss_finite and bool(torch.stack([torch.isfinite(p.grad).all() for p in params]).all())
        if trainer.strategy.reduce_boolean_decision(finite, all=True):
            self.streak = 0
            return
        self.streak += 1
        what = "training loss" if not loss_finite else "gradient"
        what = f"non-finite {what} at step {trainer.global_step}"
        pl_module.log("train/nonfinite_steps", float(self.streak), on_step=True, on_epoch=False)
        if self.policy == "stop" or self.streak >= self.max_steps:
            raise FloatingPointError(f"{what} ({self.streak} in a row); stopping (nonfinite={self.policy!r}, "
                                     f"max_nonfinite_steps={self.max_steps}). Lower the learning rate, check the "
                                     "data for NaN/Inf, or use precision bf16-mixed/32.")
        rank_zero_warn(f"{what}; the optimizer step is skipped (nonfinite='skip')")
        for p in params:
            p.grad = None  # the optimizer skips parameters without a gradient: no update, no moment change


class EMACallback(Callback):
    """Updates ``pl_module.ema``, a timm ``ModelEmaV3`` of ``pl_module.model``, after every optimizer step, passing the
    step number for its decay warm-up. The average lives on the module, not here: its weights are then saved in
    checkpoints (``ema.module.*``), loaded with them for validate/test/predict, and grown with the model by
    :class:`GrowthCallback`. :class:`~tokenformer_vision.ImageClassifier` adds one when ``ema_decay`` is set.
    (Lightning's ``EMAWeightAveraging`` swaps the averaged weights into the module instead, which growth cannot reach.)
    """

    def __init__(self, model_attr: str = "model", ema_attr: str = "ema") -> None:
        self.model_attr, self.ema_attr = model_attr, ema_attr
        self._updated_at = -1  # the global step of the latest update: batches of an accumulation window share it

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._updated_at = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        ema = getattr(pl_module, self.ema_attr, None)
        if ema is not None and trainer.global_step != self._updated_at:
            ema.update(getattr(pl_module, self.model_attr), step=trainer.global_step)
            self._updated_at = trainer.global_step


class ProgressiveResolution(Callback):
    """Progressive input resolution: the training batches of epochs ``< until_epoch`` are resized to ``size``²
    (bilinear, antialiased) before they reach the model; later epochs, validation, test and predict see the data
    at its own size. Fewer patches per image make those epochs cheaper (at 21² instead of 28² in 7-pixel patches:
    9 patches instead of 16, 0.59× the FLOPs), and combined with growth it starts the small model cheaper still
    (docs/benchmarks.md, growth levers).

    The model needs ``dynamic_img_size=True`` (timm then resamples the position embedding to the smaller grid)
    and ``size`` a multiple of the patch size (or ``dynamic_img_pad=True``). The resize is a forward pre-hook on
    ``pl_module.<model_attr>`` in training mode, so the data pipeline and its augmentation stay as they are; the
    epoch decides, so a resumed fit picks the right size.
    """

    def __init__(self, size: int, until_epoch: int, model_attr: str = "model") -> None:
        if not _is_int(size, 1) or not _is_int(until_epoch, 1):
            raise ValueError(f"ProgressiveResolution: size and until_epoch must be ints ≥ 1, got {size!r}, "
                             f"{until_epoch!r}")
        self.size, self.until_epoch, self.model_attr = size, until_epoch, model_attr
        self._state = {"active": False}
        self._hook: Any = None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or self._hook is not None:
            return
        net = getattr(pl_module, self.model_attr, None)
        net = getattr(net, "_orig_mod", net)
        embed = getattr(net, "patch_embed", None)
        if embed is None or not getattr(net, "dynamic_img_size", False):
            raise ValueError(f"ProgressiveResolution: {type(pl_module).__name__}.{self.model_attr} must be a ViT built "
                             "with dynamic_img_size=True (e.g. model_kwargs: {dynamic_img_size: true}), so that it "
                             "accepts the smaller images")
        patch = embed.patch_size[0]
        if self.size % patch and not getattr(embed, "dynamic_img_pad", False):
            raise ValueError(f"ProgressiveResolution: size {self.size} is not a multiple of the patch size {patch} "
                             "(the ragged edge would be dropped); pick a multiple or build with dynamic_img_pad=True")
        state, size = self._state, (self.size, self.size)

        def resize(module: nn.Module, args: tuple) -> tuple | None:
            # a closure over shared state, not a method: a deep copy of the model (FLOP counters) resizes alike
            if not (module.training and state["active"]) or tuple(args[0].shape[-2:]) == size:
                return None
            images = F.interpolate(args[0], size=size, mode="bilinear", antialias=True, align_corners=False)
            return (images, *args[1:])

        self._hook = net.register_forward_pre_hook(resize)

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._state["active"] = trainer.current_epoch < self.until_epoch

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
