"""Pattention: token-parameter attention, the layer that replaces every linear projection in TokenFormer.

Input tokens are queries against ``n`` key tokens ``K [n, d_in]`` and value tokens ``V [n, d_out]``:
``Y = GeLU(τ · A / max(‖A‖₂ over n, eps)) V`` with ``A = X Kᵀ`` (:mod:`tokenformer_vision.kernel`). τ is fixed at
creation (``sqrt(n0)``, a buffer), so appending zero keys (:meth:`Pattention.grow`) leaves the function unchanged;
``dynamic_scale=True`` gives the official behaviour, τ = sqrt(current n).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .kernel import pattention_fused

__all__ = ["Pattention", "default_value_std"]


def default_value_std(depth: int, dim: int) -> float:
    """Official "wang init" std of the value tokens: 2 / (depth · sqrt(dim))."""
    return 2.0 / (depth * math.sqrt(dim))


class Pattention(nn.Module):
    """Token-parameter attention layer (TokenFormer), a drop-in for a bias-free ``nn.Linear``.

    ``in_features``/``out_features`` are d_in/d_out and ``num_tokens`` is n. ``eps`` floors the row norm. Keys are
    drawn from N(0, ``key_std``²) (official 0.02), values from N(0, ``value_std``²), default ``2 / sqrt(in_features)``
    (wang init at depth 1; models pass ``default_value_std(depth, embed_dim)``).
    """

    tau: torch.Tensor

    def __init__(self, in_features: int, out_features: int, num_tokens: int, *, dynamic_scale: bool = False,
                 eps: float = 1e-6, key_std: float = 0.02, value_std: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features), ("num_tokens", num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Pattention: {name} must be a positive int, got {value!r}")
        self.in_features, self.out_features, self.dynamic_scale = in_features, out_features, dynamic_scale
        self.eps, self.key_std = eps, key_std
        self.value_std = value_std if value_std is not None else default_value_std(1, in_features)
        self.key_param = nn.Parameter(torch.empty(num_tokens, in_features, device=device, dtype=dtype))
        self.value_param = nn.Parameter(torch.empty(num_tokens, out_features, device=device, dtype=dtype))
        # a persistent buffer, not a parameter: a grown checkpoint keeps the τ it was trained with
        self.register_buffer("tau", torch.tensor(math.sqrt(num_tokens), device=device, dtype=torch.float32))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        return self.key_param.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param, std=self.key_std)
        nn.init.normal_(self.value_param, std=self.value_std)
        if not self.tau.is_meta:
            self.tau.fill_(math.sqrt(self.num_tokens))

    def scale(self) -> torch.Tensor | float:
        """The τ used by :meth:`forward`."""
        return math.sqrt(self.num_tokens) if self.dynamic_scale else self.tau

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return pattention_fused(x, (self.key_param,), (self.value_param,), (self.scale(),), self.eps)[0]

    @torch.no_grad()
    def grow(self, num_tokens: int, *, generator: torch.Generator | None = None) -> None:
        """Append parameter tokens up to ``num_tokens``: zero keys, N(0, value_std²) values, τ unchanged.

        Zero keys score 0 against every input, GeLU(0) = 0 and the row norm is unchanged, so the function is
        preserved (up to summation order); random values let the new keys receive gradient. The grown tensors are
        new ``nn.Parameter`` objects, as autograd's gradient accumulator and DDP's reducer hold the old shape.
        ``generator`` draws the new values on the CPU, so that every rank and a resumed run agree.
        """
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < self.num_tokens:
            raise ValueError(f"Pattention.grow: cannot shrink or keep a non-int token count: have {self.num_tokens} "
                             f"tokens, asked for {num_tokens!r}")
        if (extra := num_tokens - self.num_tokens) == 0:
            return
        values = torch.randn(extra, self.out_features, generator=generator) * self.value_std
        for name, rows in (("key_param", torch.zeros(extra, self.in_features)), ("value_param", values)):
            old = getattr(self, name)
            new = nn.Parameter(torch.cat([old, rows.to(old.device, old.dtype)]), requires_grad=old.requires_grad)
            if old.grad is not None:  # mid accumulation: the new tokens took no part in the pending gradient
                new.grad = torch.cat([old.grad, old.grad.new_zeros(extra, *old.grad.shape[1:])])
            setattr(self, name, new)

    def extra_repr(self) -> str:
        tau = "dynamic" if self.dynamic_scale else "meta" if self.tau.is_meta else f"{float(self.tau):.4g}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_tokens={self.num_tokens}, tau={tau}")
