"""Growing a TokenFormer in the middle of training, without Lightning: model, optimizer state and EMA copy.

:meth:`Pattention.grow` appends zero-key tokens as new ``nn.Parameter`` objects, so what refers to the old ones
follows here (docs/growth.md). The optimizer state gets rows appended on the token axis (``step`` and the old rows
kept); the new rows' second moment is the old rows' per-column mean, so the new tokens' first updates are not
oversized (a zero second moment under a large step count gives ≈0.45·lr with β2 = 0.95, ≈3·lr with β2 = 0.999).
Under DDP, wrap the model in a new ``DistributedDataParallel`` afterwards (``GrowthCallback`` does that).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

__all__ = ["grow_training_state", "grow_model", "grow_optimizer", "grow_ema"]

SecondMoment = Literal["mean", "zero"]

# Optimizer state entries that hold a running second moment (Adam/AdamW/AMSGrad, RMSprop, Adagrad). Their new
# rows are seeded from the old rows; every other per-element entry (exp_avg, momentum_buffer, ...) starts at 0.
SECOND_MOMENT_KEYS = frozenset({"exp_avg_sq", "max_exp_avg_sq", "square_avg", "sum"})


@dataclass
class GrownParameter:
    """One parameter that growth replaced: ``old`` (the pre-growth object), ``new`` and ``old``'s row count."""

    name: str
    old: nn.Parameter
    new: nn.Parameter
    old_rows: int

    @property
    def new_rows(self) -> int:
        return self.new.shape[0]


def grow_model(model: nn.Module, attn_tokens: int | None = None, ffn_tokens: int | None = None, *,
               seed: int | None = None) -> list[GrownParameter]:
    """Grow ``model`` through its ``grow`` method to the given token counts (None: unchanged) and return the grown
    parameters, in ``named_parameters()`` order. ``seed`` seeds the new value tokens, so that every DDP rank and a
    resumed run agree (None: the global RNG)."""
    if not callable(getattr(model, "grow", None)):
        raise TypeError(f"{type(model).__name__} has no grow() method; growth needs a TokenFormer model")
    before = dict(model.named_parameters())
    generator = None if seed is None else torch.Generator().manual_seed(int(seed))
    model.grow(attn_tokens=attn_tokens, ffn_tokens=ffn_tokens, generator=generator)
    after = dict(model.named_parameters())
    return [GrownParameter(name, old, after[name], old.shape[0]) for name, old in before.items()
            if after[name] is not old]


def grow_param_state(state: Mapping[str, Any], old_rows: int, new_shape: Sequence[int] | torch.Size, *,
                     second_moment: SecondMoment = "mean") -> dict[str, Any]:
    """Grow one parameter's optimizer state from ``old_rows`` rows to ``new_shape``: the appended rows of
    :data:`SECOND_MOMENT_KEYS` entries are the old rows' per-column mean (``second_moment="mean"``), all others
    zeros; scalars (``step``) and the old rows are kept. Non-element-wise state (e.g. Adafactor's) is a ValueError.
    """
    if second_moment not in ("mean", "zero"):
        raise ValueError(f"second_moment must be 'mean' or 'zero', got {second_moment!r}")
    new_shape = tuple(int(s) for s in new_shape)
    if (extra := new_shape[0] - old_rows) < 0:
        raise ValueError(f"cannot shrink optimizer state from {old_rows} to {new_shape[0]} rows")
    out: dict[str, Any] = {}
    for key, value in state.items():
        if not torch.is_tensor(value) or value.ndim == 0 or extra == 0:
            out[key] = value
            continue
        if tuple(value.shape) != (old_rows, *new_shape[1:]):
            raise ValueError(f"cannot grow optimizer state {key!r} of shape {tuple(value.shape)} for a parameter "
                             f"that grows to {new_shape}: only element-wise state (Adam/AdamW, SGD momentum, "
                             "RMSprop, Adagrad) can be extended row-wise")
        if key in SECOND_MOMENT_KEYS and second_moment == "mean":
            rows = value.float().mean(dim=0, keepdim=True).to(value.dtype).expand(extra, *value.shape[1:])
        else:
            rows = value.new_zeros(extra, *value.shape[1:])
        out[key] = torch.cat([value, rows], dim=0)
    return out


def grow_optimizer(optimizer: torch.optim.Optimizer, grown: Iterable[GrownParameter], *,
                   second_moment: SecondMoment = "mean") -> None:
    """Move each grown parameter's param-group slot and (grown) state from its old object to the new one; LR
    schedulers refer to the optimizer and stay valid."""
    by_old = {id(g.old): g for g in grown}
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            if (g := by_old.get(id(param))) is None:
                continue
            group["params"][i] = g.new
            if state := optimizer.state.pop(param, None):
                optimizer.state[g.new] = grow_param_state(state, g.old_rows, g.new.shape, second_moment=second_moment)


def grow_ema(ema: nn.Module, model: nn.Module, grown: Iterable[GrownParameter]) -> None:
    """Grow an EMA copy (timm ``ModelEmaV3``, or a bare copy of the model) to ``model``'s token counts; its new
    rows start equal to the model's (zero keys, so the EMA's function is preserved too)."""
    target = getattr(ema, "module", ema)  # timm ModelEma* keep the averaged copy in .module
    if not callable(getattr(target, "grow", None)):
        raise TypeError(f"EMA module {type(target).__name__} has no grow() method")
    target.grow(**model.token_counts, generator=torch.Generator())  # values overwritten below; global RNG untouched
    ema_params = dict(target.named_parameters())
    with torch.no_grad():
        for g in grown:
            dst = ema_params.get(g.name)
            if dst is None or dst.shape != g.new.shape:
                raise RuntimeError(f"the EMA copy's {g.name} does not match the model's after growth: is it a copy "
                                   "of another module?")
            dst[g.old_rows:].copy_(g.new[g.old_rows:])


def grow_training_state(model: nn.Module, attn_tokens: int | None = None, ffn_tokens: int | None = None, *,
                        optimizer: torch.optim.Optimizer | Sequence[torch.optim.Optimizer] | None = None,
                        ema: nn.Module | None = None, seed: int | None = None,
                        second_moment: SecondMoment = "mean") -> list[GrownParameter]:
    """Grow a model with its optimizer(s) and EMA copy; safe at any point between two optimizer steps, also with
    the previous step's graph or a pending (accumulated) gradient still alive. Under DDP, pass the unwrapped module
    and wrap it in a new ``DistributedDataParallel`` afterwards."""
    grown = grow_model(model, attn_tokens, ffn_tokens, seed=seed)
    for opt in [optimizer] if isinstance(optimizer, torch.optim.Optimizer) else optimizer or []:
        grow_optimizer(opt, grown, second_moment=second_moment)
    if ema is not None:
        grow_ema(ema, model, grown)
    return grown
