"""Token merging (ToMe): any trained model runs on fewer tokens, without retraining (docs/token_reduction.md).

In every block, between attention and the FFN, the ``r`` most similar pairs of patch tokens are merged by a
size-weighted average (:func:`merge_pairs`). A size vector ``s`` is carried from block to block and attention is
proportional, ``softmax(QKᵀ/√d + log s)``: a merged token keeps the weight of the patches it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["TokenMerging"]


def check_rate(value: int) -> int:
    """``value`` if it is an int >= 0 (tokens merged per block); ValueError otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"merge_tokens must be an int >= 0 (tokens merged per block), got {value!r}")
    return value


@dataclass
class TokenMerging:
    """Merging settings shared by a model's blocks: ``r`` tokens merged away per block (0: off), never the
    ``num_prefix_tokens`` leading ones; ``size [B, N]``: patches each current token stands for, in the running
    forward (None before its first merge)."""

    r: int = 0
    num_prefix_tokens: int = 1
    size: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.r = check_rate(self.r)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "size": None}  # per-forward state, not part of the model

    def attn_bias(self) -> torch.Tensor | None:
        """Proportional attention's additive bias ``log s`` as ``[B, 1, 1, N]`` (None while no token is merged)."""
        return None if self.size is None else self.size.log()[:, None, None, :]

    def merge(self, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        """Merge ``r`` pairs of ``x [B, N, C]`` by the similarity of ``keys [B, N, c]``; updates :attr:`size`."""
        size = self.size if self.size is not None else x.new_ones(x.shape[:2], dtype=torch.float32)
        x, self.size = merge_pairs(x, keys, size, self.r, self.num_prefix_tokens)
        return x


def merge_pairs(x: torch.Tensor, keys: torch.Tensor, size: torch.Tensor, r: int, prefix: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """One bipartite soft matching step (ToMe): ``(x [B, N − r, C], size [B, N − r])``. Patch tokens at even
    positions (after the ``prefix`` tokens) form set A, odd positions set B; the ``r`` A tokens most similar to their
    best B token (cosine of the keys) are added into it. Output: prefix tokens, unmerged A tokens, then B."""
    B, N, C = x.shape
    r = min(r, (N - prefix) // 2)
    if r <= 0:
        return x, size
    with torch.no_grad():
        metric = keys[:, prefix:].float()
        metric = metric / metric.norm(dim=-1, keepdim=True)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [B, |A|, |B|]
        best, dst = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        src, kept = order[:, :r], order[:, r:].sort(dim=-1).values
        dst = dst.gather(1, src)

    def pair(t: torch.Tensor) -> torch.Tensor:  # [B, N − prefix, c] → sums of merged pairs, [B, N − prefix − r, c]
        a, b, c = t[:, ::2], t[:, 1::2], t.shape[-1]
        b = b.scatter_add(1, dst.unsqueeze(-1).expand(B, r, c), a.gather(1, src.unsqueeze(-1).expand(B, r, c)))
        return torch.cat([a.gather(1, kept.unsqueeze(-1).expand(B, kept.shape[1], c)), b], dim=1)

    w = size[:, prefix:].unsqueeze(-1)
    total = pair(w)
    merged = pair(x[:, prefix:] * w.to(x.dtype)) / total.to(x.dtype)
    return torch.cat([x[:, :prefix], merged], dim=1), torch.cat([size[:, :prefix], total.squeeze(-1)], dim=1)
