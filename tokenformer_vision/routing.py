"""Token routing: each routed block processes only some tokens, and the saving is real compute.

Every block after the first has a router giving each token a keep probability ``k = sigmoid(logit)``; prefix (cls)
tokens are always processed (docs/token_reduction.md). **Threshold** routing processes a token when
``k ≥ 1 − threshold``: straight-through in training (skipped tokens are masked out of attention, the gradient
reaches ``k``), packed at inference so the cost follows the tokens processed. **Capacity** routing
(Mixture-of-Depths) processes the top ``capacity`` fraction of patch tokens by logit: static shapes, so training
saves compute too. Compute is counted in token-layer operations (TLOps, :class:`RoutingStats`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["RoutingConfig", "RoutingStats", "routing_loss", "routing_stats", "routing_depth_map"]


def check_fraction(name: str, value: float | None, allow_none: bool = False) -> float | None:
    """``value`` as a float in [0, 1] (or None when allowed); ValueError naming ``name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class RoutingConfig:
    """Routing settings of a model, shared by its routed blocks (changing one field changes them all).

    Attributes:
        threshold: a token skips a block when its keep probability is below ``1 − threshold`` (0.5: the paper's).
        capacity: fraction of patch tokens each routed block processes (top-k by logit); None: threshold routing.
        loss_weight, target: λ and target TLOps fraction of :func:`routing_loss` (target None: penalise compute).
        depth: number of blocks of the model; num_prefix_tokens: leading tokens always processed (cls, registers).
        bias_init: initial bias of the router's last layer (keep probability sigmoid(bias)).
        min_fraction: threshold routing: this fraction of every image's highest-logit patch tokens runs every
            routed block whatever its keep probability (None or 0: no minimum).
        anneal_steps: the per-block target falls linearly from 1 over this many training steps (0: no annealing).
        step: training steps so far, advanced by :func:`routing_loss`; not in the state dict (a resumed run
            anneals again unless it is set).
    """

    threshold: float = 0.5
    capacity: float | None = None
    loss_weight: float = 0.0
    target: float | None = None
    depth: int = 1
    num_prefix_tokens: int = 1
    bias_init: float = 1.0
    min_fraction: float | None = None
    anneal_steps: int = 0
    step: int = 0

    def __post_init__(self) -> None:
        self.threshold = check_fraction("routing_threshold", self.threshold)
        self.capacity = check_fraction("routing_capacity", self.capacity, allow_none=True)
        self.target = check_fraction("routing_target", self.target, allow_none=True)
        if isinstance(self.loss_weight, bool) or not isinstance(self.loss_weight, (int, float)) or self.loss_weight < 0:
            raise ValueError(f"routing_loss_weight must be a number >= 0, got {self.loss_weight!r}")
        self.min_fraction = check_fraction("routing min_fraction", self.min_fraction, allow_none=True)
        for name in ("anneal_steps", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"routing {name} must be an integer >= 0, got {value!r}")

    def block_target(self, routed: int) -> float | None:
        """Per-block processed fraction :func:`routing_loss` aims at now (None without a target): the TLOps
        ``target`` becomes α* = (depth · target − unrouted blocks) / routed blocks, annealed from 1."""
        if self.target is None:
            return None
        alpha = min(1.0, max(0.0, (self.depth * self.target - (self.depth - routed)) / max(routed, 1)))
        if self.anneal_steps > 0:
            alpha = 1.0 - (1.0 - alpha) * min(1.0, self.step / self.anneal_steps)
        return alpha


def route_block(block: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run a routed ``TokenFormerBlock`` on the tokens its router chooses, the others unchanged; records
    ``block.last_keep`` (``[B, N]`` keep probabilities, differentiable) and ``block.last_processed`` (bool)."""
    cfg = block.routing
    N = x.shape[1]
    logits = block.router(x).squeeze(-1).float()
    prefix = logits.new_full((x.shape[0], cfg.num_prefix_tokens), float("inf"))
    logits = torch.cat([prefix, logits[:, cfg.num_prefix_tokens:]], dim=1)
    keep = block.last_keep = torch.sigmoid(logits)
    if cfg.capacity is not None:
        return _route_capacity(block, x, logits, keep, cfg)
    processed = keep >= 1.0 - cfg.threshold
    if cfg.min_fraction:
        p = cfg.num_prefix_tokens
        minimum = min(N - p, math.ceil(cfg.min_fraction * (N - p)))
        if minimum > 0:
            processed = processed.scatter(1, logits[:, p:].topk(minimum, dim=1).indices + p, True)
    block.last_processed = processed
    if block.training:
        # straight-through: the forward value is exactly the hard decision (0 or 1), the gradient reaches keep
        gate = processed.to(keep.dtype) + (keep - keep.detach())
        mask = torch.zeros_like(keep).masked_fill(~processed, float("-inf"))[:, None, None, :]
        return block.forward_gated(x, gate=gate, attn_mask=mask)
    counts = processed.sum(1).cpu()  # one host sync: the shapes depend on the data
    if bool((counts == N).all()):
        return block.forward_gated(x)
    return block.forward_packed(x, processed, counts)


def _route_capacity(block: nn.Module, x: torch.Tensor, logits: torch.Tensor, keep: torch.Tensor,
                    cfg: RoutingConfig) -> torch.Tensor:
    """Mixture-of-Depths: the top-k tokens by logit run the block; static k, so it compiles without breaks."""
    B, N, C = x.shape
    k = min(N, cfg.num_prefix_tokens + math.ceil(cfg.capacity * (N - cfg.num_prefix_tokens)))
    if k >= N:
        block.last_processed = torch.ones_like(keep, dtype=torch.bool)
        return block.forward_gated(x)
    chosen = logits.topk(k, dim=1).indices.sort(dim=1).values  # prefix tokens have +inf logits
    block.last_processed = torch.zeros_like(keep, dtype=torch.bool).scatter(1, chosen, True)
    weight = keep.gather(1, chosen)
    index = chosen.unsqueeze(-1).expand(B, k, C)
    # forward value exactly 1 (the selection is the routing); the gradient reaches the router through the weight
    yk = block.forward_gated(torch.gather(x, 1, index), gate=1.0 + (weight - weight.detach()))
    return x.scatter(1, index, yk)


def _routed(blocks: Sequence[nn.Module]) -> list[tuple[int, nn.Module]]:
    return [(i, b) for i, b in enumerate(blocks) if getattr(b, "router", None) is not None]


def routing_loss(blocks: Sequence[nn.Module], cfg: RoutingConfig) -> torch.Tensor:
    """Compute penalty of the last forward: λ · fraction processed, or λ · (fraction − per-block target)²
    (:meth:`RoutingConfig.block_target`); zero when no routed block ran. The fraction is straight-through (the hard
    fraction of patch tokens processed, its gradient reaching the keep probabilities). Call it once per training
    step: after a training forward it advances ``cfg.step``."""
    ran = [b for _, b in _routed(blocks) if b.last_keep is not None]
    alpha = cfg.block_target(len(_routed(blocks)))
    if any(b.training for b in ran):
        cfg.step += 1
    if not ran or cfg.loss_weight == 0:
        ref = next((b.last_keep for b in ran), None)
        return torch.zeros((), device=None if ref is None else ref.device)
    p = cfg.num_prefix_tokens
    fractions = torch.stack([(b.last_processed[:, p:].to(b.last_keep.dtype)
                              + (b.last_keep[:, p:] - b.last_keep[:, p:].detach())).mean() for b in ran])
    if alpha is None:
        return cfg.loss_weight * fractions.mean()
    return cfg.loss_weight * ((fractions - alpha) ** 2).mean()


def routing_stats(blocks: Sequence[nn.Module], strict: bool = False) -> RoutingStats | None:
    """Tokens each block processed in the last forward, per image (blocks before the first routed one: all; blocks
    after the last one that ran, ``stop_early``: left out); None when no routed block ran (``strict``: RuntimeError)."""
    ran = [(i, b.last_processed) for i, b in _routed(blocks) if b.last_processed is not None]
    if not ran:
        if strict:
            raise RuntimeError("no routing statistics: build the model with token_routing=True and run a forward")
        return None
    B, N = ran[0][1].shape
    counts = torch.full((ran[-1][0] + 1, B), N, dtype=torch.long, device=ran[0][1].device)
    for i, processed in ran:
        counts[i] = processed.sum(1)
    return RoutingStats(counts, N)


def routing_depth_map(blocks: Sequence[nn.Module]) -> torch.Tensor:
    """``[B, N]`` number of blocks each token went through in the last forward (prefix tokens included)."""
    stats = routing_stats(blocks, strict=True)
    depth = torch.full((stats.processed.shape[1], stats.tokens), stats.depth, device=stats.processed.device)
    for i, block in _routed(blocks):
        if i < stats.depth:
            depth = depth - (~block.last_processed).long()
    return depth


@dataclass
class RoutingStats:
    """Token-layer operations of one or more forwards: ``processed [L, B]`` tokens each block processed, per image
    (block 0: all), of ``tokens`` (N, prefix included) entering each block."""

    processed: torch.Tensor
    tokens: int

    @property
    def depth(self) -> int:
        return int(self.processed.shape[0])

    @property
    def block_fractions(self) -> torch.Tensor:
        """``[L]`` fraction of token-block operations each block executed, over all images."""
        return self.processed.sum(1).double() / (self.processed.shape[1] * self.tokens)

    @property
    def tlops(self) -> float:
        """Fraction of the unrouted model's token-layer operations that were executed."""
        return float(self.processed.sum().double() / (self.processed.numel() * self.tokens))

    @property
    def saving(self) -> float:
        return 1.0 - self.tlops

    def per_image(self) -> torch.Tensor:
        """``[B]`` TLOps fraction of each image."""
        return self.processed.sum(0).double() / (self.depth * self.tokens)
