"""Fast Pattention kernels: a hand-derived backward that stores one ``[tokens, n]`` tensor, fused Q/K/V.

The reference path (:func:`tokenformer_vision.pattention.pattention_normalize` + two matmuls under plain autograd)
keeps ``A``, ``τA/r`` and ``GeLU(τA/r)`` alive for backward and runs ~10 elementwise passes over ``[tokens, n]``.
The fast path here computes the same function

    A = X Kᵀ,   r = max(‖A‖₂, eps),   u = τ A / r,   S = GeLU(u),   Y = S V

with these changes:

* forward works in place on the fresh GEMM output (no extra ``[tokens, n]`` copies) and saves only ``u``
  (fp32 inputs) or ``A`` in the input dtype plus the per-row norm (bf16/fp16 inputs: half the memory, ``u`` is
  recomputed exactly); ``S`` is recomputed in backward (one GeLU pass) instead of being stored;
* the backward of ``S = GeLU(τ a/r)`` is written by hand. With ``g = ∂L/∂S ⊙ GeLU'(u)`` and ``u = τ a/r``::

      ∂L/∂a = (τ/r) · (g − u (u·g) / τ²)        if ‖a‖ ≥ eps
      ∂L/∂a = (τ/r) · g                          if ‖a‖ < eps (r = eps is a constant there)

  (from ∂u_i/∂a_j = τ δ_ij / r − τ a_i a_j / r³ and a/r = u/τ). It is evaluated in place in two passes;
* several Pattentions that read the same input (attention Q, K, V) can share one GEMM over their concatenated
  keys (:func:`pattention_fused`); each keeps its own normalisation, τ and values.

Everything is plain ``torch`` code: ``torch.compile`` traces the custom autograd function without graph breaks
and Inductor fuses the elementwise passes further. Double backward (``create_graph=True``) re-derives the
gradients from the reference formula, so it stays exact.

The fast path is on by default; :func:`set_fast_path` / :func:`fast_path` switch the process-wide default and
``Pattention(..., fast=False)`` pins a single layer to the reference path.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from timm.layers import register_notrace_function

__all__ = [
    "fast_path_enabled",
    "set_fast_path",
    "fast_path",
    "pattention",
    "pattention_fused",
    "pattention_normalize_fast",
    "pattention_reference",
]

_FAST_PATH = True

Tau = torch.Tensor | float


def fast_path_enabled() -> bool:
    """Whether Pattention layers built with ``fast=None`` (the default) use the fast path."""
    return _FAST_PATH


def set_fast_path(enabled: bool) -> None:
    """Switch the process-wide default between the fast path and the slow reference path."""
    global _FAST_PATH
    if not isinstance(enabled, bool):
        raise TypeError(f"set_fast_path expects a bool, got {enabled!r}")
    _FAST_PATH = enabled


@contextlib.contextmanager
def fast_path(enabled: bool) -> Iterator[None]:
    """Context manager form of :func:`set_fast_path` (restores the previous default on exit).

    ``torch.compile`` guards on this flag, so a compiled model recompiles when it changes.
    """
    previous = _FAST_PATH
    set_fast_path(enabled)
    try:
        yield
    finally:
        set_fast_path(previous)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # the normalisation runs in at least fp32 (DESIGN §1); float64 stays float64 so gradcheck is meaningful
    return torch.promote_types(dtype, torch.float32)


def _tau_column(taus: Sequence[Tau]) -> Tau:
    """τ of G groups as a python float (all equal floats) or a ``[G, 1]`` fp32 tensor broadcasting over [T, G, 1]."""
    if all(not isinstance(t, torch.Tensor) for t in taus) and all(t == taus[0] for t in taus):
        return float(taus[0])
    cols = [t if isinstance(t, torch.Tensor) else torch.tensor(float(t)) for t in taus]
    if len(cols) == 1:
        return cols[0].reshape(1, 1)
    return torch.stack([c.reshape(()) for c in cols]).reshape(-1, 1)


def _cast_tau(tau: Tau, dtype: torch.dtype) -> Tau:
    return tau.to(dtype) if isinstance(tau, torch.Tensor) else tau


# ----------------------------------------------------------------------------------------------- elementwise
def _normalize_inplace(w: torch.Tensor, tau: Tau, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``w ← τ w / max(‖w‖, eps)`` over the last axis, in place. Returns ``(u, raw_norm)``."""
    norm = torch.linalg.vector_norm(w, dim=-1, keepdim=True)
    return w.mul_(tau / norm.clamp_min(eps)), norm


def _scores_grad(dS: torch.Tensor, u: torch.Tensor, norm: torch.Tensor, tau: Tau, eps: float,
                 scratch: torch.Tensor | None = None) -> torch.Tensor:
    """∂L/∂A from ∂L/∂S for S = GeLU(u), u = τ A / max(‖A‖, eps); all in the compute dtype, shape [..., n].

    Overwrites ``dS`` (and ``scratch``, a spare buffer of u's shape, if given): on CPU a fresh [tokens, n]
    buffer costs more in page faults than the arithmetic done on it, so the passes run in place.
    """
    g = torch.ops.aten.gelu_backward.grad_input(dS, u, grad_input=dS)
    if scratch is None:
        dot = torch.linalg.vecdot(u, g, dim=-1).unsqueeze(-1)  # [..., 1]
    else:
        dot = torch.mul(u, g, out=scratch).sum(dim=-1, keepdim=True)
    scale = tau / norm.clamp_min(eps)
    # the norm term only exists where the clamp is inactive (clamp_min passes gradient at equality, as here)
    beta = torch.where(norm >= eps, dot * scale / (tau * tau), 0.0)
    return g.mul_(scale).addcmul_(u, beta, value=-1.0)


# ------------------------------------------------------------------------------------------ reference path
def pattention_reference(x: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                         taus: Sequence[Tau], eps: float) -> list[torch.Tensor]:
    """Plain-autograd Pattention of G groups (the formula, written as in ``pattention.py``); x is [..., d_in]."""
    outs = []
    for key, value, tau in zip(keys, values, taus, strict=True):
        scores = F.linear(x, key)
        wide = scores.to(_compute_dtype(scores.dtype))
        norm = torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp_min(eps)
        weights = F.gelu(wide * (tau / norm)).to(scores.dtype)
        outs.append(torch.matmul(weights, value.to(weights.dtype)))
    return outs


# --------------------------------------------------------------------------------------------- fused path
def _gemm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` for the forward GEMMs, written as ``addmm`` with a zero bias (the same result: x + 0 = x).

    ``nn.Linear`` reaches the BLAS through ``addmm``, and on the development CPU that dispatch ran the small-M GEMMs
    of batch-1 inference faster than ``mm`` (TokenFormer-B at batch 1: 0.91x -> 0.97x of ViT-B's throughput, no
    change at batch 8 and 32; docs/benchmarks.md).
    """
    return torch.addmm(a.new_zeros(b.shape[1]), a, b)


def _fused_forward(x2d: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], tau: Tau,
                   eps: float, for_backward: bool) -> tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]:
    """Forward of G Pattentions sharing the input ``x2d [T, d_in]``: one GEMM for all scores.

    Returns the G outputs ``[T, d_out]``, the tensor to save for backward (``u`` [T, G, n] in the compute dtype,
    or the raw scores ``A`` [T, G·n] in the input dtype when that is narrower; None when ``for_backward`` is off)
    and the raw row norms ``[T, G, 1]``.
    """
    groups, n = len(keys), keys[0].shape[0]
    rows = x2d.shape[0]
    key_cat = keys[0] if groups == 1 else torch.cat(list(keys), dim=0)
    scores = _gemm(x2d, key_cat.t())  # [T, G·n], a fresh buffer we may overwrite
    cdt = _compute_dtype(scores.dtype)
    widened = scores.dtype != cdt
    w = scores.view(rows, groups, n)
    w = w.to(cdt) if widened else w
    u, norm = _normalize_inplace(w, _cast_tau(tau, cdt), eps)
    if for_backward:
        saved = scores if widened else u
        weights = F.gelu(u)
    else:
        saved = None
        weights = torch.ops.aten.gelu_(u)  # inference: nothing is kept, so overwrite u as well
    weights = weights.to(x2d.dtype)
    # each group's slice [T, n] has row stride G·n: a valid BLAS leading dimension, so no copy is made
    outs = [_gemm(weights[:, i], values[i]) for i in range(groups)]
    return outs, saved, norm


class _FusedPattention(torch.autograd.Function):
    """Autograd function of :func:`_fused_forward`; saves x, the parameters, u (or A) and the row norms."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, tau: Tau, eps: float, groups: int, *params: torch.Tensor):
        keys, values = params[:groups], params[groups:]
        outs, saved, norm = _fused_forward(x2d, keys, values, tau, eps, for_backward=True)
        ctx.groups, ctx.eps, ctx.saved_is_u = groups, eps, saved is not None and saved.dim() == 3
        ctx.tau_tensor = isinstance(tau, torch.Tensor)
        ctx.tau_float = None if ctx.tau_tensor else tau
        extra = (tau,) if ctx.tau_tensor else ()
        ctx.save_for_backward(x2d, saved, norm, *params, *extra)
        return tuple(outs)

    @staticmethod
    def backward(ctx, *grad_outputs: torch.Tensor):
        groups, eps = ctx.groups, ctx.eps
        x2d, saved, norm, *rest = ctx.saved_tensors
        params = rest[: 2 * groups]
        tau = rest[2 * groups] if ctx.tau_tensor else ctx.tau_float
        keys, values = params[:groups], params[groups:]
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():
            # create_graph=True: differentiate the reference formula instead, so higher derivatives are exact
            grads = _reference_backward(x2d, keys, values, tau, eps, grad_outputs, needs[0], needs[4:])
            return (grads[0], None, None, None, *grads[1:])

        rows, n = x2d.shape[0], keys[0].shape[0]
        cdt = _compute_dtype(x2d.dtype)
        tau_c = _cast_tau(tau, cdt)
        if ctx.saved_is_u:
            u = saved
        else:  # narrow input dtype: A was saved, recompute u exactly as the forward did
            u, _ = _normalize_inplace(saved.view(rows, groups, n).to(cdt), tau_c, eps)
        weights = F.gelu(u)  # recomputed instead of stored
        weights_in = weights.to(x2d.dtype)

        grad_values, grad_weights = [], []
        for i, dy in enumerate(grad_outputs):
            grad_values.append(torch.mm(weights_in[:, i].t(), dy) if needs[4 + groups + i] else None)
            grad_weights.append(torch.mm(dy, values[i].t()))
        del weights_in
        dS = grad_weights[0].unsqueeze(1) if groups == 1 else torch.stack(grad_weights, dim=1)
        del grad_weights
        # the recomputed weights are dead now: reuse their buffer for the u·g product
        dA = _scores_grad(dS.to(cdt), u, norm, tau_c, eps, scratch=weights).to(x2d.dtype).view(rows, groups * n)

        grad_x = None
        if needs[0]:
            key_cat = keys[0] if groups == 1 else torch.cat(list(keys), dim=0)
            grad_x = torch.mm(dA, key_cat)
        grad_keys: list[torch.Tensor | None] = [None] * groups
        if any(needs[4: 4 + groups]):
            grad_key_cat = torch.mm(dA.t(), x2d)
            grad_keys = list(grad_key_cat.split(n, dim=0)) if groups > 1 else [grad_key_cat]
        return (grad_x, None, None, None, *grad_keys, *grad_values)


def _reference_backward(x2d, keys, values, tau, eps, grad_outputs, need_x, need_params):
    """Gradients through the reference formula with create_graph=True (used only for double backward)."""
    inputs = [t for t, need in zip((x2d, *keys, *values), (need_x, *need_params), strict=True) if need]
    with torch.enable_grad():
        taus = [tau[i, 0] if isinstance(tau, torch.Tensor) else tau for i in range(len(keys))]
        outs = pattention_reference(x2d, keys, values, taus, eps)
        got = iter(torch.autograd.grad(outs, inputs, grad_outputs, create_graph=True, allow_unused=True))
    return [next(got) if need else None for need in (need_x, *need_params)]


def _gemm_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the two GEMMs run in: the autocast dtype when autocast is on (as F.linear would), else x's."""
    device = x.device.type
    if not torch.amp.is_autocast_available(device):  # e.g. meta tensors (timm builds models on meta)
        return x.dtype
    if x.dtype in (torch.float32, torch.float16, torch.bfloat16) and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype


@register_notrace_function  # timm FX feature extraction: keep the fused call as one leaf
def pattention_fused(x: torch.Tensor, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor],
                     taus: Sequence[Tau], eps: float) -> list[torch.Tensor]:
    """G Pattentions on the same input ``x [..., d_in]`` with one GEMM for all their scores.

    Args:
        x: input tokens ``[..., d_in]``.
        keys: G key matrices ``[n, d_in]`` (same n).
        values: G value matrices ``[n, d_out_i]``.
        taus: G scales τ (tensors or floats).
        eps: floor of the row norms.

    Returns:
        The G outputs ``[..., d_out_i]``, equal to running each Pattention on its own.
    """
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
    lead = x.shape[:-1]
    dtype = _gemm_dtype(x)
    x2d = x.reshape(-1, d_in).to(dtype)
    keys = [k.to(dtype) for k in keys]
    values = [v.to(dtype) for v in values]
    tau = _tau_column(list(taus))
    params = (*keys, *values)
    if torch.is_grad_enabled() and (x2d.requires_grad or any(p.requires_grad for p in params)):
        outs = _FusedPattention.apply(x2d, tau, eps, groups, *params)
    else:
        outs, _, _ = _fused_forward(x2d, keys, values, tau, eps, for_backward=False)
    return [out.view(*lead, out.shape[-1]) for out in outs]


def pattention(x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tau: Tau, eps: float) -> torch.Tensor:
    """Fast Pattention ``GeLU(τ · A / max(‖A‖, eps)) V`` with ``A = x Kᵀ``; same result as the reference path."""
    return pattention_fused(x, (key,), (value,), (tau,), eps)[0]


# ------------------------------------------------------------------------------------ normalisation only
class _Normalize(torch.autograd.Function):
    """S = GeLU(τ A / max(‖A‖, eps)) with the hand-derived backward; saves A (input dtype) and the row norms."""

    @staticmethod
    def forward(ctx, scores: torch.Tensor, tau: Tau, eps: float):
        cdt = _compute_dtype(scores.dtype)
        u, norm = _normalize_inplace(scores.to(cdt, copy=True), _cast_tau(tau, cdt), eps)
        ctx.eps, ctx.tau_tensor = eps, isinstance(tau, torch.Tensor)
        ctx.tau_float = None if ctx.tau_tensor else tau
        # A is the input, already alive in the caller's graph; u is recomputed in backward (one pass)
        ctx.save_for_backward(scores, norm, *((tau,) if ctx.tau_tensor else ()))
        return F.gelu(u).to(scores.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        scores, norm, *rest = ctx.saved_tensors
        tau = rest[0] if ctx.tau_tensor else ctx.tau_float
        eps = ctx.eps
        cdt = _compute_dtype(scores.dtype)
        tau_c = _cast_tau(tau, cdt)
        if torch.is_grad_enabled():  # double backward: differentiate the reference formula, exact to any order
            with torch.enable_grad():
                wide = scores.to(cdt)
                ref = F.gelu(wide * (tau_c / torch.linalg.vector_norm(wide, dim=-1, keepdim=True).clamp_min(eps)))
                (out,) = torch.autograd.grad(ref.to(scores.dtype), scores, grad, create_graph=True)
            return out, None, None
        u, _ = _normalize_inplace(scores.to(cdt, copy=True), tau_c, eps)
        # copy: _scores_grad works in place and the incoming gradient is not ours to overwrite
        return _scores_grad(grad.to(cdt, copy=True), u, norm, tau_c, eps).to(scores.dtype), None, None


def pattention_normalize_fast(scores: torch.Tensor, tau: Tau, eps: float = 1e-6) -> torch.Tensor:
    """Same as :func:`tokenformer_vision.pattention.pattention_normalize`, with the cheaper hand-written backward."""
    if isinstance(tau, torch.Tensor) and tau.requires_grad:
        raise ValueError("pattention_normalize_fast: τ must not require grad")
    if torch.is_grad_enabled() and scores.requires_grad:
        return _Normalize.apply(scores, tau, eps)
    cdt = _compute_dtype(scores.dtype)
    u, _ = _normalize_inplace(scores.to(cdt, copy=True), _cast_tau(tau, cdt), eps)
    return torch.ops.aten.gelu_(u).to(scores.dtype)
