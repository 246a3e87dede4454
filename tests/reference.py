"""The Pattention formula in plain autograd: the oracle the tests compare the layer against (docs/design.md, section 1),
and the learning-rate schedule in closed form.

    A = x Kᵀ                                   # [..., n]
    S = GeLU(τ · A / max(‖A‖₂ over n, eps))    # exact (erf) GeLU
    Y = S V                                    # [..., d_out]

The norm, τ and GeLU run in at least fp32 (fp16/bf16 -> fp32, fp64 stays fp64); the two products run in the
dtype of their inputs (so under autocast they follow autocast, as the layer's may). The result is cast back to
``x``'s dtype. Nothing here is shared with the package: it is written from the formula alone.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def pattention_reference(x: torch.Tensor, key: torch.Tensor, value: torch.Tensor, tau: torch.Tensor | float,
                         eps: float = 1e-6) -> torch.Tensor:
    """``GeLU(τ·A / max(‖A‖₂ over n, eps)) @ V`` with ``A = x @ key.T``; ``key [n, d_in]``, ``value [n, d_out]``."""
    scores = torch.matmul(x, key.t())
    wide_dtype = torch.promote_types(scores.dtype, torch.float32)
    wide = scores.to(wide_dtype)
    tau = torch.as_tensor(tau, device=wide.device).to(wide_dtype)
    norm = torch.linalg.vector_norm(wide, ord=2, dim=-1, keepdim=True).clamp_min(eps)
    weights = F.gelu(tau * wide / norm, approximate="none")
    out = torch.matmul(weights.to(scores.dtype), value.to(scores.dtype))
    return out.to(x.dtype)


def warmup_cosine_lr(step: int, lr: float, warmup: int, total: int, min_lr: float = 0.0) -> float:
    """The learning rate ImageClassifier's schedule gives optimizer step ``step`` (0-based): ``lr·(step+1)/warmup``
    during the warm-up, then a half cosine from ``lr`` to ``min_lr`` at step ``total``."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / (total - warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
