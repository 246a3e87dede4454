"""Token-selective routing: per-token adaptive depth with real compute savings at inference.

Mechanism (Token-Selective Attention, arXiv 2605.05222, DESIGN §6), adapted to images:

- Every routed block (block 1 on; block 0 always runs) has a :class:`TokenGate`, a 2-layer MLP
  ``Linear(d→d/4) → ReLU → Linear(→1) → sigmoid`` applied to the tokens *entering* the block. It gives each token a
  halting probability ``p``; ``keep = 1 − p`` scales the block's attention AND FFN residual updates. The last bias
  starts at −1 (p ≈ 0.27, keep ≈ 0.73), so tokens start mostly active. The cls token is always processed
  (keep = 1).
- Training is soft and end-to-end differentiable. The keep-gate also weights each token's share as an attention
  *key/value* (an additive ``log(keep)`` bias on the attention logits, as DynamicViT's attention masking). That makes
  the soft path the exact relaxation of the hard one: with gates of exactly 0/1, soft and hard give the same result.
- Inference (eval mode): a token with ``p > routing_threshold`` (i.e. keep-gate below ``1 − routing_threshold``)
  is skipped by the block: it is not gathered into it at all, so attention (as query, key and value) and the FFN
  run on the kept tokens only, and the skipped token passes through unchanged. Kept tokens' updates are still scaled
  by their keep-gate. Images in a batch keep different numbers of tokens: the kept tokens of each image are
  gathered to the front, padded to the batch's largest count and the pads are masked out of attention.
- Threshold semantics: ``routing_threshold`` t ∈ [0, 1] is a halting probability. t = 1 skips nothing (the hard
  path then equals the soft path), t = 0.5 is the paper's rule, smaller t skips more.
- Compute penalty: ``routing_loss_weight`` λ (default 0, as in the source) — :meth:`TokenFormerViT.routing_loss`
  returns the differentiable λ·mean(1 − p) of the last forward, to be added to the task loss.
- Accounting: token-layer operations (TLOps). Block 0 processes every token; block i a fraction α_i. The TLOps
  fraction is Σ_i α_i / L = (1 + (L − 1)·ᾱ)/L and the saving 1 − that (the paper's formula). The cls token is
  counted (it is always processed).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

if TYPE_CHECKING:  # pragma: no cover - import cycle guard (layers imports this module)
    from .layers import TokenFormerBlock
    from .model import TokenFormerViT

__all__ = [
    "TokenGate",
    "RoutingStats",
    "RoutingMetricsCallback",  # noqa: F822 (built lazily by __getattr__)
    "routed_block_forward",
    "soft_routed_block",
    "hard_routed_block",
    "masked_attention",
    "tlops_fraction",
    "tlops_saving",
    "check_routing_threshold",
]


def check_routing_threshold(threshold: float) -> float:
    """Validate a halting-probability threshold (a float in [0, 1]) and return it as a float."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= float(threshold) <= 1.0:
        raise ValueError(f"routing_threshold must be a halting probability in [0, 1], got {threshold!r}")
    return float(threshold)


class TokenGate(nn.Module):
    """Per-token router ``Linear(d→d/4) → ReLU → Linear(→1)``: returns halting logits ``z`` (``p = sigmoid(z)``).

    The logits are returned instead of ``p`` so that ``keep = sigmoid(−z)`` and ``log(keep) = logsigmoid(−z)`` are
    computed stably (no ``log(1 − p)`` of a rounded ``p``). The last bias starts at ``bias_init`` (−1: p ≈ 0.27).
    """

    def __init__(self, dim: int, *, hidden: int | None = None, bias_init: float = -1.0, num_prefix_tokens: int = 1,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        hidden = hidden or max(dim // 4, 1)
        self.num_prefix_tokens = num_prefix_tokens
        self.bias_init = bias_init
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(hidden, 1, device=device, dtype=dtype)
        if not self.fc2.bias.is_meta:
            nn.init.constant_(self.fc2.bias, bias_init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Halting logits ``[B, N]`` in fp32 (thresholds compare in fp32 even under autocast)."""
        return self.fc2(self.act(self.fc1(x))).squeeze(-1).float()


def tlops_fraction(block_fractions: Iterable[float] | torch.Tensor) -> float:
    """Fraction of token-layer operations executed: mean over blocks of the processed fraction α_i."""
    fractions = torch.as_tensor(list(block_fractions) if not torch.is_tensor(block_fractions) else block_fractions,
                                dtype=torch.float64)
    if fractions.numel() == 0:
        raise ValueError("tlops_fraction needs at least one block")
    if bool(((fractions < 0) | (fractions > 1)).any()):
        raise ValueError(f"block fractions must lie in [0, 1], got {fractions.tolist()}")
    return float(fractions.mean())


def tlops_saving(alpha: float, depth: int) -> float:
    """The paper's TLOps saving ``1 − (1 + (L − 1)·α)/L`` for mean active fraction α over the L − 1 routed blocks."""
    if depth < 1:
        raise ValueError(f"depth must be >= 1, got {depth}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
    return 1.0 - (1.0 + (depth - 1) * alpha) / depth


@dataclass
class RoutingStats:
    """Token-layer operations of one or more forwards.

    Attributes:
        processed: ``[L, B]`` number of tokens each block processed, per image (block 0: all of them).
        tokens: tokens per image entering each block (N, cls included).
    """

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

    def merge(self, other: RoutingStats) -> RoutingStats:
        """Stats of both sets of images (same depth and token count)."""
        if other.tokens != self.tokens or other.depth != self.depth:
            raise ValueError(f"cannot merge routing stats of depth/tokens {self.depth}/{self.tokens} "
                             f"with {other.depth}/{other.tokens}")
        return RoutingStats(torch.cat([self.processed, other.processed.to(self.processed.device)], 1), self.tokens)


# ------------------------------------------------------------------------------------------ block execution
def masked_attention(attn: nn.Module, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``PattentionAttention`` forward with an additive key bias ``[B, 1, 1, N]`` (log keep-gate / −inf for pads).

    Relies on the documented contract of ``PattentionAttention`` (``.qkv()`` giving the three projections, ``.proj``,
    ``num_heads``, ``attn_drop``, ``proj_drop``); the unrouted model keeps calling the class's own ``forward``.
    """
    B, N, C = x.shape
    heads = attn.num_heads

    def split(t: torch.Tensor) -> torch.Tensor:
        return t.view(B, N, heads, C // heads).transpose(1, 2)

    q, k, v = (split(t) for t in attn.qkv(x))  # one fused GEMM for Q, K, V where the layers allow it
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                         dropout_p=attn.attn_drop if attn.training else 0.0)
    return attn.proj_drop(attn.proj(out.transpose(1, 2).reshape(B, N, C)))


def soft_routed_block(block: TokenFormerBlock, x: torch.Tensor, keep: torch.Tensor,
                      log_keep: torch.Tensor) -> torch.Tensor:
    """Soft routing: every token runs; updates scaled by ``keep [B, N]``, keys weighted by ``exp(log_keep)``."""
    g = keep.unsqueeze(-1).to(x.dtype)
    bias = log_keep[:, None, None, :]
    x = x + g * block.drop_path1(masked_attention(block.attn, block.norm1(x), bias))
    return x + g * block.drop_path2(block.mlp(block.norm2(x)))


def hard_routed_block(block: TokenFormerBlock, x: torch.Tensor, keep: torch.Tensor, log_keep: torch.Tensor,
                      processed: torch.Tensor) -> torch.Tensor:
    """Hard skipping: only tokens with ``processed [B, N]`` enter the block; the others pass through unchanged.

    The kept tokens of each image are moved to the front (stable order), padded to the batch's largest kept count
    K and run through the block as a ``[B, K, C]`` sequence whose pads are masked out of attention as keys; their
    (discarded) query rows cost ``K − k_b`` token-operations per image.
    """
    B, N, C = x.shape
    counts = processed.sum(1)
    # one host sync per block: the gathered length is data-dependent
    K, all_full = torch.stack([counts.max(), (keep == 1).all().to(counts.dtype)]).tolist()
    if all_full:  # every gate exactly 1: the block's own unrouted forward (bit-identical to routing off)
        x = x + block.attn_residual(x)
        return x + block.ffn_residual(x)
    if K == N:  # nothing skipped in any image: no gather needed
        return soft_routed_block(block, x, keep, log_keep)
    # stable sort of "not processed" puts the processed tokens first, in their original order
    order = torch.argsort((~processed).to(torch.uint8), dim=1, stable=True)[:, :K]
    valid = torch.arange(K, device=x.device).unsqueeze(0) < counts.unsqueeze(1)  # [B, K]; False = pad slot
    index = order.unsqueeze(-1).expand(B, K, C)
    xk = torch.gather(x, 1, index)
    gk = torch.gather(keep, 1, order)
    bias = torch.gather(log_keep, 1, order).masked_fill(~valid, float("-inf"))[:, None, None, :]
    g = gk.unsqueeze(-1).to(x.dtype)
    yk = xk + g * block.drop_path1(masked_attention(block.attn, block.norm1(xk), bias))
    yk = yk + g * block.drop_path2(block.mlp(block.norm2(yk)))
    # pad slots point at distinct skipped tokens: write their original values back, so the scatter is exact
    yk = torch.where(valid.unsqueeze(-1), yk, xk)
    return x.scatter(1, index, yk)


def routed_block_forward(block: TokenFormerBlock, x: torch.Tensor) -> torch.Tensor:
    """Forward of a routed block: gate the tokens entering it, then the soft (training) or hard (eval) path.

    Records ``block.last_keep`` (``[B, N]`` keep-gates, differentiable in training: used by the compute penalty)
    and ``block.last_processed`` (``[B, N]`` bool, tokens the block executes at inference / would execute at the
    current threshold in training).
    """
    router: TokenGate = block.router
    z = router(x)
    prefix = router.num_prefix_tokens
    # the cls (prefix) tokens are always processed with their full update
    z = torch.cat([torch.full_like(z[:, :prefix], float("-inf")), z[:, prefix:]], dim=1)
    keep = torch.sigmoid(-z)
    log_keep = F.logsigmoid(-z)
    processed = torch.sigmoid(z) <= block.routing_threshold
    block.last_keep = keep
    block.last_processed = processed.detach()
    if block.training:
        return soft_routed_block(block, x, keep, log_keep)
    return hard_routed_block(block, x, keep, log_keep, processed)


# ---------------------------------------------------------------------------------------- Lightning
def _routed_backbones(module: nn.Module) -> list[TokenFormerViT]:
    from .model import TokenFormerViT

    return [m for m in module.modules() if isinstance(m, TokenFormerViT) and m.token_routing]


def _latest_stats(module: nn.Module) -> RoutingStats | None:
    for backbone in _routed_backbones(module):
        stats = backbone.routing_stats(strict=False)
        if stats is not None:
            return stats
    return None


def _clear(module: nn.Module) -> None:
    for backbone in _routed_backbones(module):
        backbone.clear_routing_state()


def _make_callback_class() -> type:
    import lightning as L  # imported on first use: `import tokenformer_vision` stays as cheap as timm

    class RoutingMetricsCallback(L.Callback):
        """Logs token-routing compute (TLOps) and adds it to predictions; a no-op for models without routing.

        - validation: ``val/tlops`` (fraction of the unrouted model's token-layer operations executed, exact counts
          summed over the epoch and over DDP ranks), ``val/tlops_saving`` and ``val/tlops_block{i}`` per block;
        - training (``log_train=True``): ``train/tlops`` (what the current gates would skip at inference) and
          ``train/routing_loss`` (λ·mean(1 − p) of the step) on each step;
        - predict: when a predict step returns a dict, adds ``tlops`` ``[B]`` (per-image fraction) and
          ``tlops_blocks`` ``[B, L]``; the totals of the whole predict run are in :attr:`predict_stats`.

        Works on any LightningModule holding a ``TokenFormerViT`` built with ``token_routing=True``.
        """

        def __init__(self, log_train: bool = True) -> None:
            super().__init__()
            self.log_train = log_train
            self._val_processed: torch.Tensor | None = None  # [L] token-block operations executed this epoch
            self._val_tokens = 0  # token slots per block this epoch (images · N)
            self.predict_stats: RoutingStats | None = None

        # validation
        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._val_processed, self._val_tokens = None, 0

        def on_validation_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                      batch_idx: int, dataloader_idx: int = 0) -> None:
            _clear(pl_module)  # only this batch's forward counts (not an EMA copy's or a skipped batch's)

        def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any,
                                    batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
            stats = _latest_stats(pl_module)
            if stats is None:
                return
            processed = stats.processed.detach().sum(1).double()
            if self._val_processed is not None and self._val_processed.shape != processed.shape:
                raise ValueError(f"routing stats of different depths in one epoch: {self._val_processed.numel()} "
                                 f"and {processed.numel()} blocks")
            self._val_processed = processed if self._val_processed is None else self._val_processed + processed
            self._val_tokens += stats.processed.shape[1] * stats.tokens

        def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            if self._val_processed is None or trainer.sanity_checking:
                return
            processed = trainer.strategy.reduce(self._val_processed, reduce_op="sum")
            total = torch.tensor(float(self._val_tokens), dtype=torch.float64, device=processed.device)
            total = trainer.strategy.reduce(total, reduce_op="sum")
            fractions = (processed / total).float()
            tlops = fractions.mean()
            pl_module.log("val/tlops", tlops)
            pl_module.log("val/tlops_saving", 1.0 - tlops)
            for i, value in enumerate(fractions):
                pl_module.log(f"val/tlops_block{i}", value)

        # training
        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            if not self.log_train:
                return
            for backbone in _routed_backbones(pl_module):
                stats = backbone.routing_stats(strict=False)
                if stats is not None:
                    pl_module.log("train/tlops", stats.tlops, on_step=True, on_epoch=False)
                    pl_module.log("train/routing_loss", backbone.routing_loss().detach(), on_step=True,
                                  on_epoch=False)
                    return

        # predict
        def on_predict_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.predict_stats = None

        def on_predict_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                   batch_idx: int, dataloader_idx: int = 0) -> None:
            _clear(pl_module)

        def on_predict_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                 batch_idx: int, dataloader_idx: int = 0) -> None:
            stats = _latest_stats(pl_module)
            if stats is None:
                return
            stats = RoutingStats(stats.processed.detach().cpu(), stats.tokens)
            self.predict_stats = stats if self.predict_stats is None else self.predict_stats.merge(stats)
            if isinstance(outputs, dict):
                outputs["tlops"] = stats.per_image().float()
                outputs["tlops_blocks"] = (stats.processed.T.double() / stats.tokens).float()

    RoutingMetricsCallback.__module__ = __name__
    RoutingMetricsCallback.__qualname__ = "RoutingMetricsCallback"  # picklable, importable by class path
    return RoutingMetricsCallback


def __getattr__(name: str) -> Any:
    # RoutingMetricsCallback subclasses lightning's Callback: built on first access so that importing the model
    # (which imports this module) does not import lightning.
    if name == "RoutingMetricsCallback":
        cls = _make_callback_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
