"""Pattention: token-parameter attention, the layer that replaces every linear projection in TokenFormer.

Input tokens are queries; the layer's parameters are ``n`` key tokens ``K [n, d_in]`` and ``n`` value tokens
``V [n, d_out]``::

    A = X Kᵀ                                   # scores against the parameter tokens, [..., n]
    S = GeLU(τ · A / max(‖A‖₂ over n, eps))    # exact (erf) GeLU, row-wise L2 normalisation
    Y = S V                                    # [..., d_out]

τ is fixed at creation (``sqrt(n0)``) and kept as a buffer, so appending zero keys (:meth:`Pattention.grow`)
leaves the function unchanged. ``dynamic_scale=True`` gives the official behaviour, τ = sqrt(current n).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from . import ops

__all__ = ["Pattention", "pattention_normalize", "default_value_std"]


def default_value_std(depth: int, dim: int) -> float:
    """Official "wang init" std of the value tokens: 2 / (depth · sqrt(dim))."""
    return 2.0 / (depth * math.sqrt(dim))


def pattention_normalize(scores: torch.Tensor, tau: torch.Tensor | float, eps: float = 1e-6) -> torch.Tensor:
    """GeLU(τ · A / max(‖A‖₂, eps)) over the last axis, computed in (at least) fp32, returned in ``scores.dtype``.

    The norm runs in fp32 because a bf16/fp16 sum of squares over thousands of tokens loses the precision the
    normalisation depends on (the official JAX port saw NaN losses in fp16); ``eps`` keeps an all-zero row finite.
    """
    wide = scores.to(torch.promote_types(scores.dtype, torch.float32))  # fp16/bf16 -> fp32; fp64 stays fp64
    norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp_min(eps)
    return F.gelu(wide * (tau / norm)).to(scores.dtype)


class Pattention(nn.Module):
    """Token-parameter attention layer (TokenFormer, arXiv 2410.23168), a drop-in for a bias-free ``nn.Linear``.

    Args:
        in_features: size of each input token (d_in).
        out_features: size of each output token (d_out).
        num_tokens: number of parameter tokens n (key/value pairs).
        dynamic_scale: official behaviour, τ = sqrt(current n) on every call. Growth then changes the function.
        eps: floor of the row norm (keeps all-zero rows finite).
        key_std: std of the key tokens' normal init (official 0.02).
        value_std: std of the value tokens' normal init; default ``2 / sqrt(in_features)`` (wang init at depth 1).
            Models pass ``default_value_std(depth, embed_dim)``.
        fast: use the fast kernels of :mod:`tokenformer_vision.ops` (same function, cheaper backward); ``False``
            pins the slow reference path; ``None`` follows :func:`tokenformer_vision.ops.set_fast_path`.
    """

    tau: torch.Tensor

    def __init__(
        self,
        in_features: int,
        out_features: int,
        num_tokens: int,
        *,
        dynamic_scale: bool = False,
        eps: float = 1e-6,
        key_std: float = 0.02,
        value_std: float | None = None,
        fast: bool | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_tokens", num_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Pattention: {name} must be a positive int, got {value!r}")
        dd = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.dynamic_scale = dynamic_scale
        self.eps = eps
        self.fast = fast
        self.key_std = key_std
        self.value_std = value_std if value_std is not None else default_value_std(1, in_features)
        self.key_param = nn.Parameter(torch.empty(num_tokens, in_features, **dd))
        self.value_param = nn.Parameter(torch.empty(num_tokens, out_features, **dd))
        # τ is part of the function, not of the optimiser: a persistent buffer, saved with the weights so that a
        # grown checkpoint keeps the τ it was trained with.
        self.register_buffer("tau", torch.tensor(math.sqrt(num_tokens), device=device, dtype=torch.float32))
        self.reset_parameters()

    @property
    def num_tokens(self) -> int:
        """Current number of parameter tokens n."""
        return self.key_param.shape[0]

    def reset_parameters(self) -> None:
        nn.init.normal_(self.key_param, std=self.key_std)
        nn.init.normal_(self.value_param, std=self.value_std)
        if not self.tau.is_meta:
            self.tau.fill_(math.sqrt(self.num_tokens))

    def scale(self) -> torch.Tensor | float:
        """The τ used by :meth:`forward`."""
        return math.sqrt(self.num_tokens) if self.dynamic_scale else self.tau

    def uses_fast_path(self) -> bool:
        """Whether :meth:`forward` takes the fast kernels (``fast`` argument, else the process-wide default)."""
        return ops.fast_path_enabled() if self.fast is None else self.fast

    def token_weights(self, x: torch.Tensor) -> torch.Tensor:
        """The normalised scores S = GeLU(τ · A / ‖A‖) of ``x`` against the key tokens, shape ``[..., n]``."""
        scores = F.linear(x, self.key_param)
        if self.uses_fast_path():
            return ops.pattention_normalize_fast(scores, self.scale(), self.eps)
        return pattention_normalize(scores, self.scale(), self.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"Pattention expects inputs with last dimension {self.in_features}, got shape {tuple(x.shape)}"
            )
        if self.uses_fast_path():
            return ops.pattention(x, self.key_param, self.value_param, self.scale(), self.eps)
        # slow reference: plain autograd through the formula (kept for tests and as the spec of the fast path)
        weights = pattention_normalize(F.linear(x, self.key_param), self.scale(), self.eps)
        return torch.matmul(weights, self.value_param.to(weights.dtype))

    @torch.no_grad()
    def grow(self, num_tokens: int, *, new_parameters: bool = False) -> None:
        """Append parameter tokens up to ``num_tokens``: zero keys, N(0, value_std²) values, τ unchanged.

        Zero keys score exactly 0 against every input, GeLU(0) = 0 and the row norm is unchanged, so the
        layer's function is preserved exactly (up to summation order). The values are random, not zero, so the
        new tokens receive gradient through their keys and start learning.

        Args:
            num_tokens: the new total n; must be ≥ the current n.
            new_parameters: replace ``key_param``/``value_param`` with new ``nn.Parameter`` objects instead of
                swapping their data in place. Needed under DDP, which remembers parameter shapes (DESIGN §3).
        """
        old = self.num_tokens
        if not isinstance(num_tokens, int) or num_tokens < old:
            raise ValueError(
                f"Pattention.grow: cannot shrink or keep a non-int token count: have {old} tokens, "
                f"asked for {num_tokens!r}"
            )
        if num_tokens == old:
            return
        extra = num_tokens - old
        key, value = self.key_param, self.value_param
        new_keys = key.new_zeros(extra, self.in_features)
        new_values = value.new_empty(extra, self.out_features)
        if not new_values.is_meta:
            new_values.normal_(std=self.value_std)
        grown_key = torch.cat([key.detach(), new_keys], dim=0)
        grown_value = torch.cat([value.detach(), new_values], dim=0)
        # a pending gradient (e.g. mid gradient accumulation) keeps its rows; the new tokens' rows are zero, as
        # they took no part in the forward that produced it. Left at the old shape, it would break the next step.
        grads = [None if p.grad is None else torch.cat([p.grad, p.grad.new_zeros(extra, *p.grad.shape[1:])])
                 for p in (key, value)]
        if new_parameters:
            self.key_param = nn.Parameter(grown_key, requires_grad=key.requires_grad)
            self.value_param = nn.Parameter(grown_value, requires_grad=value.requires_grad)
            key.grad = value.grad = None
        else:
            key.grad = value.grad = None  # before .data changes shape: a grad must match its parameter
            key.data = grown_key
            value.data = grown_value
        self.key_param.grad, self.value_param.grad = grads

    def extra_repr(self) -> str:
        tau = "dynamic" if self.dynamic_scale else f"{float(self.tau):.4g}" if not self.tau.is_meta else "meta"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"num_tokens={self.num_tokens}, tau={tau}")
