"""Growing TokenFormer models mid-training: model, optimizer state, EMA copy, and a Lightning callback.

Growth appends parameter tokens with zero keys to every Pattention (see :meth:`Pattention.grow`), which leaves
the network's function unchanged. Everything that remembers parameter shapes has to follow:

- the optimizer's per-parameter state (Adam ``exp_avg``/``exp_avg_sq``) gets new rows appended on the token axis
  (axis 0); the old rows and ``step`` are kept, the new rows' second moment is seeded with the per-column mean of
  the old rows so that the new tokens' first updates are not oversized (a zero second moment under a large step
  count gives an update of ≈0.45·lr with β2 = 0.95, ≈3·lr with β2 = 0.999);
- parameters that were replaced by new objects (``new_parameters=True``, needed under DDP) take over their old
  object's optimizer state and param-group slot;
- an EMA copy (timm ``ModelEmaV3``) grows too; its new rows start equal to the model's new rows.

Plain PyTorch: :func:`grow_training_state` (or :func:`grow_model` + :func:`grow_optimizer` + :func:`grow_ema`).
Lightning: :class:`GrowthCallback`, which also rebuilds the optimizer, carries the LR scheduler over, re-wraps
DDP and can re-warm the learning rate.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

from .pattention import Pattention

__all__ = [
    "GrownParameter",
    "GrowthCallback",
    "grow_model",
    "grow_optimizer",
    "grow_param_state",
    "grow_ema",
    "grow_training_state",
    "validate_schedule",
]

SecondMoment = Literal["mean", "zero"]

# Optimizer state entries that hold a running second moment (Adam/AdamW/AMSGrad, RMSprop, Adagrad). Their new
# rows are seeded from the old rows; every other per-element entry (exp_avg, momentum_buffer, ...) starts at 0.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


# ------------------------------------------------------------------------------------------- torch level
@dataclass
class GrownParameter:
    """One parameter that growth changed: ``old`` (pre-growth object), ``new`` (the model's parameter now; the
    same object as ``old`` when grown in place) and the number of rows it had before."""

    name: str
    old: nn.Parameter
    new: nn.Parameter
    old_rows: int

    @property
    def new_rows(self) -> int:
        return self.new.shape[0]


def _token_counts(model: nn.Module) -> dict[str, int]:
    return {"attn_tokens": int(model.attn_tokens), "ffn_tokens": int(model.ffn_tokens)}


@contextmanager
def _isolated_rng(module: nn.Module):
    """Keep the global RNG streams (CPU and the module's CUDA devices) untouched by what runs inside."""
    devices = sorted({p.device.index or 0 for p in module.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        yield


def grow_model(
    model: nn.Module,
    attn_tokens: int | None = None,
    ffn_tokens: int | None = None,
    *,
    new_parameters: bool = False,
    seed: int | None = None,
) -> list[GrownParameter]:
    """Grow ``model`` through ``model.grow(attn_tokens=, ffn_tokens=, new_parameters=)`` and report what changed.

    Args:
        model: a module with TokenFormer's ``grow`` method (e.g. :class:`~tokenformer_vision.TokenFormerViT`).
        attn_tokens: new token count of every attention projection, None to keep it.
        ffn_tokens: new token count of every FFN Pattention, None to keep it.
        new_parameters: replace grown parameters with new ``nn.Parameter`` objects (needed under DDP).
        seed: if given, the new value tokens are drawn from a generator seeded with it, without touching the
            global RNG, so that every DDP rank and a resumed run draw the same values. None uses the global RNG.

    Returns:
        The grown parameters, in ``model.named_parameters()`` order.
    """
    if not callable(getattr(model, "grow", None)):
        raise TypeError(f"{type(model).__name__} has no grow() method; growth needs a TokenFormer model")
    before = {name: (p, tuple(p.shape)) for name, p in model.named_parameters()}
    old_tokens = {name: m.num_tokens for name, m in model.named_modules() if isinstance(m, Pattention)}
    if seed is None:
        model.grow(attn_tokens=attn_tokens, ffn_tokens=ffn_tokens, new_parameters=new_parameters)
    else:
        with _isolated_rng(model):
            model.grow(attn_tokens=attn_tokens, ffn_tokens=ffn_tokens, new_parameters=new_parameters)
        # Redraw the new value rows from a private CPU generator: identical on every rank, device and resume.
        generator = torch.Generator().manual_seed(int(seed))
        with torch.no_grad():
            for name, module in model.named_modules():
                if isinstance(module, Pattention) and module.num_tokens > old_tokens.get(name, module.num_tokens):
                    rows = module.value_param[old_tokens[name]:]
                    fresh = torch.randn(rows.shape, generator=generator, dtype=torch.float32) * module.value_std
                    rows.copy_(fresh.to(rows.dtype))

    grown = []
    after = dict(model.named_parameters())
    if set(after) != set(before):
        raise RuntimeError(f"{type(model).__name__}.grow changed the set of parameter names: "
                           f"added {sorted(set(after) - set(before))}, removed {sorted(set(before) - set(after))}")
    for name, (old, old_shape) in before.items():
        new = after[name]
        if tuple(new.shape) == old_shape and new is old:
            continue
        if new.ndim != len(old_shape) or tuple(new.shape[1:]) != old_shape[1:] or new.shape[0] < old_shape[0]:
            raise RuntimeError(f"growth may only append rows (axis 0) to a parameter; {name} went from "
                               f"{old_shape} to {tuple(new.shape)}")
        grown.append(GrownParameter(name, old, new, old_shape[0]))
    return grown


def grow_param_state(
    state: Mapping[str, Any],
    old_rows: int,
    new_shape: Sequence[int] | torch.Size,
    *,
    second_moment: SecondMoment = "mean",
) -> dict[str, Any]:
    """Grow one parameter's optimizer state from ``old_rows`` rows to ``new_shape`` by appending rows.

    Element-wise entries (shape ``[old_rows, *new_shape[1:]]``) get ``new_shape[0] - old_rows`` rows appended:
    second-moment entries (:data:`SECOND_MOMENT_KEYS`) the per-column mean of the old rows when
    ``second_moment="mean"``, everything else zeros. Scalars (``step``) are kept. The old rows are kept exactly.
    Any other shape raises ValueError (e.g. factored Adafactor state, which cannot be grown row-wise).
    """
    if second_moment not in ("mean", "zero"):
        raise ValueError(f"second_moment must be 'mean' or 'zero', got {second_moment!r}")
    new_shape = tuple(int(s) for s in new_shape)
    extra = new_shape[0] - old_rows
    if extra < 0:
        raise ValueError(f"cannot shrink optimizer state from {old_rows} to {new_shape[0]} rows")
    old_shape = (old_rows, *new_shape[1:])
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.ndim == 0 or extra == 0:
            out[key] = value
            continue
        if tuple(value.shape) != old_shape:
            raise ValueError(
                f"cannot grow optimizer state {key!r} of shape {tuple(value.shape)} for a parameter that grows "
                f"from {old_shape} to {new_shape}: only element-wise state (Adam/AdamW, SGD momentum, RMSprop, "
                "Adagrad) can be extended row-wise"
            )
        if key in SECOND_MOMENT_KEYS and second_moment == "mean":
            rows = value.float().mean(dim=0, keepdim=True).to(value.dtype).expand(extra, *value.shape[1:])
        else:
            rows = value.new_zeros(extra, *value.shape[1:])
        out[key] = torch.cat([value, rows], dim=0)
    return out


def grow_optimizer(
    optimizer: torch.optim.Optimizer,
    grown: Iterable[GrownParameter],
    *,
    second_moment: SecondMoment = "mean",
) -> None:
    """Make ``optimizer`` follow a growth: grow the state of every grown parameter it holds and, where the
    parameter was replaced by a new object, move the state and the param-group slot to the new object."""
    by_old = {id(g.old): g for g in grown}
    for group in optimizer.param_groups:
        params = group["params"]
        for i, param in enumerate(params):
            g = by_old.get(id(param))
            if g is None:
                continue
            params[i] = g.new
            state = optimizer.state.pop(param, None)
            if state:
                optimizer.state[g.new] = grow_param_state(state, g.old_rows, g.new.shape, second_moment=second_moment)


def _ema_target(ema: nn.Module) -> nn.Module:
    return getattr(ema, "module", ema)  # timm ModelEma* keep the averaged copy in .module


def grow_ema(ema: nn.Module, model: nn.Module, grown: Iterable[GrownParameter]) -> None:
    """Grow an EMA copy (timm ``ModelEmaV3`` or a bare model copy) to ``model``'s token counts.

    The EMA's new rows are set to the model's new rows: their keys are zero, so the EMA's function is preserved
    too, and the running average of the new tokens starts where the model's tokens start.
    """
    target = _ema_target(ema)
    if not callable(getattr(target, "grow", None)):
        raise TypeError(f"EMA module {type(target).__name__} has no grow() method")
    target.grow(**_token_counts(model))  # in place: the EMA copy is not wrapped by DDP
    ema_params = dict(target.named_parameters())
    with torch.no_grad():
        for g in grown:
            if g.name not in ema_params:
                raise KeyError(f"EMA copy has no parameter {g.name!r}; is it a copy of a different module?")
            dst = ema_params[g.name]
            if dst.shape != g.new.shape:
                raise RuntimeError(f"EMA parameter {g.name} has shape {tuple(dst.shape)} after growth, the model's "
                                   f"has {tuple(g.new.shape)}")
            dst[g.old_rows:].copy_(g.new[g.old_rows:])


def grow_training_state(
    model: nn.Module,
    attn_tokens: int | None = None,
    ffn_tokens: int | None = None,
    *,
    optimizer: torch.optim.Optimizer | None = None,
    ema: nn.Module | None = None,
    new_parameters: bool = False,
    seed: int | None = None,
    second_moment: SecondMoment = "mean",
) -> list[GrownParameter]:
    """Grow a model together with its optimizer state and EMA copy (plain PyTorch training loops).

    Under DDP pass ``new_parameters=True`` and wrap the model in a new ``DistributedDataParallel`` afterwards.
    """
    grown = grow_model(model, attn_tokens, ffn_tokens, new_parameters=new_parameters, seed=seed)
    if optimizer is not None:
        grow_optimizer(optimizer, grown, second_moment=second_moment)
    if ema is not None:
        grow_ema(ema, model, grown)
    return grown


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------------------------- schedule
_STAGE_KEYS = {"step", "epoch", "attn_tokens", "ffn_tokens", "rewarm_steps"}


def validate_schedule(schedule: Sequence[Mapping[str, Any]]) -> list[dict[str, int]]:
    """Check a growth schedule and return it normalised (plain dicts, ints).

    Each stage has exactly one of ``step``/``epoch`` (the same unit for all stages, strictly increasing),
    ``attn_tokens`` and/or ``ffn_tokens`` (each never smaller than in an earlier stage, and every stage must grow
    at least one of them), optionally ``rewarm_steps``. Raises ValueError naming the stage and the problem.
    """
    if isinstance(schedule, Mapping) or not isinstance(schedule, Sequence) or not schedule:
        raise ValueError(f"growth schedule must be a non-empty list of stages, got {schedule!r}")
    out: list[dict[str, int]] = []
    unit = None
    last_time = -1
    last_tokens: dict[str, int] = {}
    for i, stage in enumerate(schedule):
        where = f"growth schedule stage {i} ({dict(stage) if isinstance(stage, Mapping) else stage!r})"
        if not isinstance(stage, Mapping):
            raise ValueError(f"{where}: each stage must be a mapping")
        unknown = set(stage) - _STAGE_KEYS
        if unknown:
            raise ValueError(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(_STAGE_KEYS)}")
        for key, value in stage.items():
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{where}: {key} must be a non-negative int, got {value!r}")
        times = [k for k in ("step", "epoch") if stage.get(k) is not None]
        if len(times) != 1:
            raise ValueError(f"{where}: give exactly one of 'step' or 'epoch' (when to grow)")
        if unit is not None and times[0] != unit:
            raise ValueError(f"{where}: mixes '{times[0]}' with '{unit}' stages; use one unit for the schedule")
        unit = times[0]
        when = stage[unit]
        if when <= last_time:
            raise ValueError(f"{where}: stages must be strictly increasing in {unit} ({when} follows {last_time})")
        last_time = when
        norm: dict[str, int] = {unit: when}
        grows = False
        for key in ("attn_tokens", "ffn_tokens"):
            value = stage.get(key)
            if value is None:
                continue
            if value < 1:
                raise ValueError(f"{where}: {key} must be ≥ 1, got {value}")
            if key in last_tokens and value < last_tokens[key]:
                raise ValueError(f"{where}: {key} shrinks from {last_tokens[key]} to {value}; growth only adds tokens")
            grows |= key not in last_tokens or value > last_tokens[key]
            last_tokens[key] = norm[key] = value
        if "attn_tokens" not in norm and "ffn_tokens" not in norm:
            raise ValueError(f"{where}: give attn_tokens and/or ffn_tokens (the token counts to grow to)")
        if not grows:
            raise ValueError(f"{where}: token counts do not increase over the previous stage")
        if stage.get("rewarm_steps") is not None:
            norm["rewarm_steps"] = stage["rewarm_steps"]
        out.append(norm)
    return out


# ------------------------------------------------------------------------------------------- Lightning
def _images_of(batch: Any) -> torch.Tensor | None:
    if torch.is_tensor(batch):
        return batch
    if isinstance(batch, (list, tuple)) and batch and torch.is_tensor(batch[0]):
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("image", "images", "x", "input", "inputs", "pixel_values"):
            if torch.is_tensor(batch.get(key)):
                return batch[key]
    return None


@contextmanager
def _eval_mode(module: nn.Module):
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class GrowthCallback(Callback):
    """Grow a TokenFormer model mid-training on a schedule, preserving its function exactly.

    At each stage, in ``on_train_batch_start`` right after an optimizer step and identically on every rank, the
    callback: grows the model (zero keys, seeded random values, τ unchanged) and its EMA copy (``pl_module.ema``
    if present); under DDP re-wraps the model; rebuilds the optimizer through ``configure_optimizers`` and
    carries the old optimizer's state over (old rows and step kept, new rows appended, second moment seeded),
    its param-group hyper-parameters and the LR schedulers' state; optionally re-warms the learning rate; and
    logs the event (``growth/*`` metrics; also kept in :attr:`events`), including the largest change of the
    logits on the current batch (eval mode), which should be ~1e-5 in fp32.

    Args:
        schedule: stages, e.g. ``[{"epoch": 100, "attn_tokens": 1024, "ffn_tokens": 4096}]``; each has ``step``
            (optimizer steps done) or ``epoch`` (grow at the start of that epoch), ``attn_tokens`` and/or
            ``ffn_tokens`` (omitted = unchanged) and optionally ``rewarm_steps``.
        rewarm_steps: default number of optimizer steps after a stage whose LR is scaled by
            ``(k + 1) / (rewarm_steps + 1)`` for the k-th step (0 = no re-warm).
        seed: base seed of the new value tokens (stage i uses ``seed + i``), so ranks and resumed runs agree.
        second_moment: ``"mean"`` seeds the new rows' second moment from the old rows; ``"zero"`` does not.
        check_samples: how many images of the current batch to use for the logits check (0 = skip it).
        model_attr: attribute of the LightningModule that holds the growable network.

    The LightningModule must build its optimizer in ``configure_optimizers`` from its current parameters
    (not LightningCLI's auto-built optimizer) and grow itself to a checkpoint's token counts in
    ``on_load_checkpoint``, as :class:`~tokenformer_vision.ImageClassifier` does. Single-device and DDP
    strategies are supported; FSDP/DeepSpeed shard parameters at wrap time and are not: grow offline
    (``scripts/grow_checkpoint.py``) and restart.
    """

    def __init__(
        self,
        schedule: list[dict[str, int]],
        rewarm_steps: int = 0,
        seed: int = 0,
        second_moment: SecondMoment = "mean",
        check_samples: int = 16,
        model_attr: str = "model",
    ) -> None:
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
        return self._generate_state_key(schedule=self.schedule)

    # ------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "done_stages": [dict(s) for s, d in zip(self.schedule, self.done, strict=True) if d],
            "events": [dict(e) for e in self.events],
            "rewarm": list(self._rewarm) if self._rewarm else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        done = [dict(s) for s in state_dict.get("done_stages", [])]
        self.done = [stage in done for stage in self.schedule]
        unmatched = [s for s in done if s not in self.schedule]
        if unmatched:
            rank_zero_warn(f"GrowthCallback: the checkpoint records growth stages {unmatched} that are not in the "
                           "current schedule; the model keeps the checkpoint's token counts")
        self.events = [dict(e) for e in state_dict.get("events", [])]
        rewarm = state_dict.get("rewarm")
        self._rewarm = (int(rewarm[0]), int(rewarm[1])) if rewarm else None

    # ------------------------------------------------------------------------------------- hooks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        from lightning.pytorch.strategies import DDPStrategy, SingleDeviceStrategy

        strategy = trainer.strategy
        if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy)) or type(strategy).__name__ in (
                "DeepSpeedStrategy",):
            raise ValueError(
                f"GrowthCallback supports single-device and DDP training, not {type(strategy).__name__}: sharded "
                "strategies fix parameter shapes at wrap time. Grow offline instead: save a checkpoint, run "
                "scripts/grow_checkpoint.py, and restart from the grown weights."
            )
        net = self._net(pl_module)
        if not callable(getattr(net, "grow", None)) or not hasattr(net, "attn_tokens"):
            raise TypeError(f"GrowthCallback: {type(pl_module).__name__}.{self.model_attr} "
                            f"({type(net).__name__}) is not a growable TokenFormer model")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Shrinking stages are a config error: say so before spending a day of compute to reach them.
        self._check_not_shrinking(pl_module, [i for i, d in enumerate(self.done) if not d])
        if self._rewarm is not None:  # resumed inside a re-warm window
            self._install_rewarm(trainer)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Only at an optimizer-step boundary: never in the middle of a gradient-accumulation window.
        if batch_idx % max(1, trainer.accumulate_grad_batches) != 0:
            return
        for index, stage in enumerate(self.schedule):
            if self.done[index]:
                continue
            now = trainer.global_step if "step" in stage else trainer.current_epoch
            if now < stage["step" if "step" in stage else "epoch"]:
                break  # stages are ordered in time
            self._run_stage(trainer, pl_module, index, batch)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._remove_hooks()

    # ------------------------------------------------------------------------------------- growth
    def _net(self, pl_module: pl.LightningModule) -> nn.Module:
        net = getattr(pl_module, self.model_attr, None)
        if net is None:
            raise AttributeError(f"GrowthCallback: {type(pl_module).__name__} has no attribute "
                                 f"{self.model_attr!r} holding the TokenFormer model (see model_attr)")
        return getattr(net, "_orig_mod", net)  # torch.compile wrapper → the module itself

    def _targets(self, pl_module: pl.LightningModule, index: int) -> dict[str, int]:
        net = self._net(pl_module)
        current = _token_counts(net)
        return {k: self.schedule[index].get(k, current[k]) for k in current}

    def _check_not_shrinking(self, pl_module: pl.LightningModule, indices: Sequence[int]) -> None:
        current = _token_counts(self._net(pl_module))
        for index in indices:
            stage = self.schedule[index]
            for key, have in current.items():
                if key in stage and stage[key] < have:
                    raise ValueError(
                        f"GrowthCallback: stage {index} ({stage}) would shrink {key} from the model's {have} to "
                        f"{stage[key]}; growth only adds tokens. Fix the schedule or the model's token counts."
                    )

    @torch.no_grad()
    def _logits(self, net: nn.Module, images: torch.Tensor | None) -> torch.Tensor | None:
        if images is None:
            return None
        with _eval_mode(net):
            return net(images).float()

    def _run_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, batch: Any) -> None:
        from lightning.pytorch.strategies import DDPStrategy

        start = time.perf_counter()
        stage = self.schedule[index]
        self._check_not_shrinking(pl_module, [index])
        net = self._net(pl_module)
        before_counts = _token_counts(net)
        targets = self._targets(pl_module, index)
        if targets == before_counts:
            # Already there (a run resumed without this callback's state): nothing to grow.
            self.done[index] = True
            rank_zero_info(f"GrowthCallback: stage {index} {stage}: model already has {targets}, skipping")
            return

        strategy = trainer.strategy
        ddp = isinstance(strategy, DDPStrategy)
        images = _images_of(batch)
        if images is not None and self.check_samples:
            images = images[: self.check_samples]
        elif images is None and self.check_samples:
            rank_zero_warn("GrowthCallback: could not find the images in the batch; skipping the logits check")
        params_before = count_parameters(net)
        old_named = dict(pl_module.named_parameters())
        old_optimizers = list(strategy.optimizers)
        old_schedulers = list(strategy.lr_scheduler_configs)
        logits_before = self._logits(net, images if self.check_samples else None)

        # DDP remembers parameter shapes in its reducer: grow into new Parameter objects and re-wrap (DESIGN §3).
        grown = grow_model(net, targets["attn_tokens"], targets["ffn_tokens"], new_parameters=ddp,
                           seed=self.seed + index)
        ema = getattr(pl_module, "ema", None)
        if ema is not None:
            grow_ema(ema, net, grown)

        logits_after = self._logits(net, images if self.check_samples else None)
        delta = (float((logits_after - logits_before).abs().max())
                 if logits_before is not None and logits_after is not None else float("nan"))

        if ddp:
            strategy.model = pl_module
            strategy.configure_ddp()
        self._remove_hooks()
        strategy.setup_optimizers(trainer)
        self._carry_optimizers(old_optimizers, strategy.optimizers, old_named, pl_module, grown)
        self._carry_schedulers(old_schedulers, strategy.lr_scheduler_configs)
        del old_optimizers, old_schedulers, old_named

        rewarm = stage.get("rewarm_steps", self.rewarm_steps)
        self._rewarm = (trainer.global_step, rewarm) if rewarm > 0 else None
        if self._rewarm is not None:
            self._install_rewarm(trainer)

        self.done[index] = True
        after_counts = _token_counts(net)
        event = {
            "stage": index,
            "step": trainer.global_step,
            "epoch": trainer.current_epoch,
            "attn_tokens_before": before_counts["attn_tokens"],
            "attn_tokens_after": after_counts["attn_tokens"],
            "ffn_tokens_before": before_counts["ffn_tokens"],
            "ffn_tokens_after": after_counts["ffn_tokens"],
            "params_before": params_before,
            "params_after": count_parameters(net),
            "max_abs_dlogits": delta,
            "max_abs_logits": float(logits_before.abs().max()) if logits_before is not None else float("nan"),
            "rewarm_steps": rewarm,
            "seconds": time.perf_counter() - start,
        }
        self.events.append(event)
        self._log(trainer, event)
        rank_zero_info(
            f"GrowthCallback: stage {index} at step {event['step']} (epoch {event['epoch']}): attn tokens "
            f"{event['attn_tokens_before']}→{event['attn_tokens_after']}, ffn tokens {event['ffn_tokens_before']}→"
            f"{event['ffn_tokens_after']}, params {params_before:,}→{event['params_after']:,}, "
            f"max |Δlogits| {delta:.3g}"
        )

    def _log(self, trainer: pl.Trainer, event: Mapping[str, Any]) -> None:
        # Straight to the loggers: values logged through pl_module.log(on_step=True) only reach them on
        # log_every_n_steps boundaries, and a one-off event must not be dropped.
        metrics = {
            "growth/step": float(event["step"]),
            "growth/attn_tokens": float(event["attn_tokens_after"]),
            "growth/ffn_tokens": float(event["ffn_tokens_after"]),
            "growth/params": float(event["params_after"]),
            "growth/max_abs_dlogits": float(event["max_abs_dlogits"]),
            "epoch": float(event["epoch"]),
        }
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=event["step"])

    def _carry_optimizers(self, old_optimizers: Sequence[torch.optim.Optimizer],
                          new_optimizers: Sequence[torch.optim.Optimizer], old_named: Mapping[str, nn.Parameter],
                          pl_module: pl.LightningModule, grown: Sequence[GrownParameter]) -> None:
        """Move the old optimizers' state and group hyper-parameters onto the rebuilt ones, growing rows."""
        if len(old_optimizers) != len(new_optimizers):
            raise RuntimeError(f"configure_optimizers returned {len(new_optimizers)} optimizers after growth, "
                               f"{len(old_optimizers)} before")
        new_name = {id(p): n for n, p in pl_module.named_parameters()}
        old_name = {id(p): n for n, p in old_named.items()}
        old_rows = {f"{self.model_attr}.{g.name}": g.old_rows for g in grown}
        for old_opt, new_opt in zip(old_optimizers, new_optimizers, strict=True):
            if len(old_opt.param_groups) != len(new_opt.param_groups):
                raise RuntimeError("configure_optimizers built a different number of param groups after growth "
                                   f"({len(new_opt.param_groups)} vs {len(old_opt.param_groups)})")
            for gi, (old_group, new_group) in enumerate(zip(old_opt.param_groups, new_opt.param_groups, strict=True)):
                old_names = [old_name.get(id(p)) for p in old_group["params"]]
                new_names = [new_name.get(id(p)) for p in new_group["params"]]
                if None in old_names or None in new_names or sorted(old_names) != sorted(new_names):
                    raise RuntimeError(f"param group {gi} holds different parameters after growth; the optimizer "
                                       "state cannot be carried over")
                # Hyper-parameters as they are now (LR set by the scheduler, initial_lr, ...), not as configured.
                for key, value in old_group.items():
                    if key != "params":
                        new_group[key] = value
                for param in new_group["params"]:
                    name = new_name[id(param)]
                    state = old_opt.state.get(old_named[name])
                    if not state:
                        continue
                    if name in old_rows:
                        state = grow_param_state(state, old_rows[name], param.shape, second_moment=self.second_moment)
                    new_opt.state[param] = dict(state)

    @staticmethod
    def _carry_schedulers(old_configs: Sequence[Any], new_configs: Sequence[Any]) -> None:
        """Put the rebuilt LR schedulers at the old ones' position (step count, base LRs, internal state)."""
        if len(old_configs) != len(new_configs):
            raise RuntimeError(f"configure_optimizers returned {len(new_configs)} LR schedulers after growth, "
                               f"{len(old_configs)} before")
        for old, new in zip(old_configs, new_configs, strict=True):
            if type(old.scheduler) is not type(new.scheduler):
                raise RuntimeError(f"LR scheduler changed type on rebuild: {type(old.scheduler).__name__} → "
                                   f"{type(new.scheduler).__name__}")
            new.scheduler.load_state_dict(old.scheduler.state_dict())

    # ------------------------------------------------------------------------------------- re-warm
    def _rewarm_factor(self, trainer: pl.Trainer) -> float | None:
        if self._rewarm is None:
            return None
        start, steps = self._rewarm
        k = trainer.global_step - start  # optimizer steps already taken since the growth
        if k >= steps:
            return None
        return (k + 1) / (steps + 1)

    def _install_rewarm(self, trainer: pl.Trainer) -> None:
        """Scale the LR only for the duration of each optimizer step (pre/post step hooks), so that LR schedulers,
        which step after it and may read the group's current LR, never see the scaled value."""
        self._remove_hooks()
        saved: dict[int, list[float]] = {}

        def pre_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            factor = self._rewarm_factor(trainer)
            if factor is None:
                self._rewarm = None
                return
            saved[id(optimizer)] = [group["lr"] for group in optimizer.param_groups]
            for group in optimizer.param_groups:
                group["lr"] = group["lr"] * factor

        def post_hook(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            lrs = saved.pop(id(optimizer), None)
            if lrs is not None:
                for group, lr in zip(optimizer.param_groups, lrs, strict=True):
                    group["lr"] = lr

        for optimizer in trainer.strategy.optimizers:
            self._hooks.append(optimizer.register_step_pre_hook(pre_hook))
            self._hooks.append(optimizer.register_step_post_hook(post_hook))

    def _remove_hooks(self) -> None:
        for handle in self._hooks:
            handle.remove()
        self._hooks = []

