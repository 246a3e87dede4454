"""The Pattention kernel: one GEMM for the scores of G layers sharing an input, a hand-derived backward.

For input ``x``, keys ``K [n, d_in]`` and values ``V [n, d_out]`` (docs/architecture.md, "Pattention")::

    A = x Kᵀ,   r = max(‖A‖₂, eps),   u = τ A / r,   S = GeLU(u),   Y = S V

Compared with plain autograd (which keeps ``A``, ``u`` and ``S`` alive and runs ~10 passes over ``[tokens, n]``),
the forward works in place on the fresh GEMM output and saves only ``u`` (fp32) or ``A`` in the input dtype
(bf16/fp16: half the memory, ``u`` is recomputed exactly); ``S`` is recomputed in backward, whose part for
``S = GeLU(τ a/r)`` is written by hand. With ``g = ∂L/∂S ⊙ GeLU'(u)`` (from ∂u_i/∂a_j = τ δ_ij / r − τ a_i a_j / r³
and a/r = u/τ)::

      ∂L/∂a = (τ/r) · (g − u (u·g) / τ²)        if ‖a‖ ≥ eps
      ∂L/∂a = (τ/r) · g                          if ‖a‖ < eps (r = eps is a constant there)

The norm, τ and GeLU run in at least fp32. Plain torch code, so ``torch.compile`` traces it without graph breaks.
Double backward (``create_graph=True``) differentiates :func:`_formula` instead, exact to any order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = ["pattention_fused"]

Tau = torch.Tensor | float


def _tau_column(taus: Sequence[Tau]) -> Tau:
    """τ of G layers as one float (all equal floats) or a ``[G, 1]`` tensor broadcasting over ``[T, G, n]``."""
    if all(not isinstance(t, torch.Tensor) for t in taus) and all(t == taus[0] for t in taus):
        return float(taus[0])
    return torch.stack([t.reshape(()) if torch.is_tensor(t) else torch.tensor(float(t)) for t in taus])[:, None]


def _normalize_inplace(w: torch.Tensor, tau: Tau, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``w ← τ w / max(‖w‖, eps)`` over the last axis, in place. Returns ``(u, raw_norm)``."""
    norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    return w.mul_(tau / norm.clamp_min(eps)), norm


def _formula(x2d: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], tau: Tau,
             eps: float) -> list[torch.Tensor]:
    """The formula under plain autograd; used only to differentiate the backward (double backward)."""
    outs = []
    for i, (key, value) in enumerate(zip(keys, values, strict=True)):
        scores = x2d @ key.t()
        wide = scores.to(torch.promote_types(scores.dtype, torch.float32))
        t = tau[i, 0] if isinstance(tau, torch.Tensor) else tau
        weights = F.gelu(wide * (t / torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp_min(eps)))
        outs.append(weights.to(scores.dtype) @ value)
    return outs


def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` as ``addmm`` with a zero bias, as ``nn.Linear`` does: on CPU that dispatch runs the small-M GEMMs
    of batch-1 inference faster than ``mm`` (docs/benchmarks.md)."""
    return torch.addmm(a.new_zeros(b.shape[1]), a, b)


def _forward(x2d: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], tau: Tau, eps: float,
             for_backward: bool) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """G outputs ``[T, d_out]``, the tensor saved for backward (``u [T, G, n]`` in the compute dtype, or the raw
    scores ``A [T, G·n]`` when the input dtype is narrower; None for inference) and the row norms ``[T, G, 1]``."""
    groups, n = len(keys), keys[0].shape[0]
    key_cat = keys[0] if groups == 1 else torch.cat(list(keys), dim=0)
    scores = _gemm(x2d, key_cat.t())  # [T, G·n], a fresh buffer we may overwrite
    cdt = torch.promote_types(scores.dtype, torch.float32)
    widened = scores.dtype != cdt
    w = scores.view(x2d.shape[0], groups, n)
    u, norm = _normalize_inplace(w.to(cdt) if widened else w, tau.to(cdt) if torch.is_tensor(tau) else tau, eps)
    if for_backward:
        saved, weights = (scores if widened else u), F.gelu(u)
    else:
        saved, weights = None, torch.ops.aten.gelu_(u)  # nothing is kept: overwrite u as well
    weights = weights.to(x2d.dtype)
    # each layer's slice [T, n] has row stride G·n: a valid BLAS leading dimension, so no copy is made
    return [_gemm(weights[:, i], values[i]) for i in range(groups)], saved, norm


class _FusedPattention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2d: torch.Tensor, tau: Tau, eps: float, groups: int, *params: torch.Tensor):
        outs, saved, norm = _forward(x2d, params[:groups], params[groups:], tau, eps, for_backward=True)
        ctx.groups, ctx.eps, ctx.tau_float = groups, eps, None if isinstance(tau, torch.Tensor) else tau
        ctx.save_for_backward(x2d, saved, norm, *params, *(() if ctx.tau_float is not None else (tau,)))
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        groups, eps = ctx.groups, ctx.eps
        x2d, saved, norm, *rest = ctx.saved_tensors
        keys, values = rest[:groups], rest[groups: 2 * groups]
        tau = rest[2 * groups] if ctx.tau_float is None else ctx.tau_float
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiate the formula, exact to any order
            inputs = [t for t, need in zip((x2d, *keys, *values), (needs[0], *needs[4:]), strict=True) if need]
            with torch.enable_grad():
                got = iter(torch.autograd.grad(_formula(x2d, keys, values, tau, eps), inputs, grad_outputs,
                                               create_graph=True, allow_unused=True))
            grads = [next(got) if need else None for need in (needs[0], *needs[4:])]
            return (grads[0], None, None, None, *grads[1:])
        rows, n, cdt = x2d.shape[0], keys[0].shape[0], torch.promote_types(x2d.dtype, torch.float32)
        tau = tau.to(cdt) if torch.is_tensor(tau) else tau
        u = saved if saved.dim() == 3 else _normalize_inplace(saved.view(rows, groups, n).to(cdt), tau, eps)[0]
        weights = F.gelu(u)  # recomputed instead of stored
        weights_in = weights.to(x2d.dtype)
        grad_values: list[torch.Tensor | None] = []
        for i, dy in enumerate(grad_outputs):  # a loop, not a comprehension: Dynamo cannot trace `del` of a cell
            grad_values.append(torch.mm(weights_in[:, i].t(), dy) if needs[4 + groups + i] else None)
        del weights_in
        dS = torch.stack([torch.mm(dy, values[i].t()) for i, dy in enumerate(grad_outputs)], dim=1).to(cdt)
        # ∂L/∂A in place, in the compute dtype; the dead recomputed weights take the u·g product (on CPU a fresh
        # [tokens, n] buffer costs more in page faults than the arithmetic done on it)
        g = torch.ops.aten.gelu_backward.grad_input(dS, u, grad_input=dS)
        dot = torch.mul(u, g, out=weights).sum(dim=-1, keepdim=True)
        scale = tau / norm.clamp_min(eps)
        # the norm term exists only where the clamp is inactive (clamp_min passes gradient at equality, as here)
        beta = torch.where(norm >= eps, dot * scale / (tau * tau), 0.0)
        dA = g.mul_(scale).addcmul_(u, beta, value=-1.0).to(x2d.dtype).view(rows, groups * n)
        grad_x = torch.mm(dA, torch.cat(list(keys), dim=0)) if needs[0] else None
        grad_keys = torch.mm(dA.t(), x2d).split(n, dim=0) if any(needs[4: 4 + groups]) else (None,) * groups
        return (grad_x, None, None, None, *grad_keys, *grad_values)


@register_notrace_function  # timm FX feature extraction: keep the kernel call as one leaf
def pattention_fused(x: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                     taus: Sequence[Tau], eps: float) -> list[torch.Tensor]:
    """G Pattentions on the same input ``x [..., d_in]``, with one GEMM for all their scores: G keys ``[n, d_in]``
    (the same n), values ``[n, d_out_i]`` and scales τ (tensors or floats, never trainable); ``eps`` floors the row
    norms. Returns the G outputs ``[..., d_out_i]``."""
    groups = len(keys)
    if groups == 0 or len(values) != groups or len(taus) != groups:
        raise ValueError(f"pattention_fused: need G ≥ 1 matching keys/values/taus, got {len(keys)}, "
                         f"{len(values)}, {len(taus)}")
    n, d_in = keys[0].shape
    for key, value in zip(keys, values, strict=True):
        if key.shape != (n, d_in) or value.dim() != 2 or value.shape[0] != n:
            raise ValueError(f"pattention_fused: every key must be [{n}, {d_in}] and every value [{n}, d_out], "
                             f"got {tuple(key.shape)} and {tuple(value.shape)}")
    if x.shape[-1] != d_in:
        raise ValueError(f"Pattention expects inputs with last dimension {d_in}, got shape {tuple(x.shape)}")
    if any(isinstance(t, torch.Tensor) and t.requires_grad for t in taus):
        raise ValueError("pattention_fused: τ must not require grad (it is a buffer, not a parameter)")
    dev = x.device.type  # GEMMs in the autocast dtype, as F.linear's; meta tensors (timm builds on meta) have none
    dtype = torch.get_autocast_dtype(dev) if torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev) \
        and x.dtype in (torch.float32, torch.float16, torch.bfloat16) else x.dtype
    x2d = x.reshape(-1, d_in).to(dtype)
    params = tuple(p.to(dtype) for p in (*keys, *values))
    tau = _tau_column(list(taus))
    if torch.is_grad_enabled() and (x2d.requires_grad or any(p.requires_grad for p in params)):
        outs = _FusedPattention.apply(x2d, tau, eps, groups, *params)
    else:
        outs, _, _ = _forward(x2d, params[:groups], params[groups:], tau, eps, for_backward=False)
    return [out.view(*x.shape[:-1], out.shape[-1]) for out in outs]
