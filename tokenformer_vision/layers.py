"""Building blocks of the TokenFormer vision backbone: attention, block, Pattention patch embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, PatchEmbed
from torch import nn

from .ops import pattention_fused
from .pattention import Pattention
from .routing import TokenGate, check_routing_threshold, routed_block_forward

__all__ = ["PattentionAttention", "TokenFormerBlock", "PattentionPatchEmbed", "PatchProjection"]


class PattentionAttention(nn.Module):
    """Multi-head self-attention whose Q, K, V and output projections are Pattention layers.

    Token-token attention is ordinary softmax attention (``F.scaled_dot_product_attention``); only the four
    projections change.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_tokens: int,
        *,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        value_std: float | None = None,
        dynamic_scale: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.attn_drop = attn_drop
        kw = dict(value_std=value_std, dynamic_scale=dynamic_scale, device=device, dtype=dtype)
        self.q = Pattention(dim, dim, num_tokens, **kw)
        self.k = Pattention(dim, dim, num_tokens, **kw)
        self.v = Pattention(dim, dim, num_tokens, **kw)
        self.proj = Pattention(dim, dim, num_tokens, **kw)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        B, N, _ = x.shape
        return x.view(B, N, self.num_heads, self.head_dim).transpose(1, 2)

    def fuses_qkv(self) -> bool:
        """Whether Q, K and V run as one fused Pattention call (one GEMM over the three concatenated key sets).

        Needs all three on the fast path with equal token counts and eps, and no hooks on them (a fused call
        would bypass their hooks). FX symbolic tracing (timm feature extraction) takes the per-layer path.
        """
        if isinstance(self.q.key_param, torch.fx.Proxy):  # FX symbolic tracing: parameters are proxies here
            return False
        layers = (self.q, self.k, self.v)
        return (
            all(p.uses_fast_path() and not (p._forward_hooks or p._forward_pre_hooks) for p in layers)
            and self.q.num_tokens == self.k.num_tokens == self.v.num_tokens
            and self.q.eps == self.k.eps == self.v.eps
        )

    def qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The three projections ``(q(x), k(x), v(x))``, each ``[..., dim]``; fused when :meth:`fuses_qkv`."""
        if not self.fuses_qkv():
            return self.q(x), self.k(x), self.v(x)
        layers = (self.q, self.k, self.v)
        q, k, v = pattention_fused(x, [p.key_param for p in layers], [p.value_param for p in layers],
                                   [p.scale() for p in layers], self.q.eps)
        return q, k, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = (self._heads(t) for t in self.qkv(x))
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))


class TokenFormerBlock(nn.Module):
    """Pre-norm transformer block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(FFN(LN(x)))``.

    The LayerNorms have no affine parameters (official TokenFormer); the FFN is a single Pattention d→d whose
    GeLU is the only non-linearity.

    ``token_routing=True`` adds a per-token gate (``.router``, see :mod:`tokenformer_vision.routing`): the
    residual updates are scaled by the keep-gate 1 − p, and in eval mode tokens with p > ``routing_threshold``
    skip the block. Without routing the block has no router, no extra state and the original forward.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        attn_tokens: int,
        ffn_tokens: int,
        *,
        attn_drop: float = 0.0,
        proj_drop: float = 0.0,
        drop_path: float = 0.0,
        value_std: float | None = None,
        dynamic_scale: bool = False,
        token_routing: bool = False,
        routing_threshold: float = 0.5,
        num_prefix_tokens: int = 1,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, **dd)
        self.attn = PattentionAttention(
            dim, num_heads, attn_tokens, attn_drop=attn_drop, proj_drop=proj_drop, value_std=value_std,
            dynamic_scale=dynamic_scale, **dd,
        )
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, **dd)
        self.mlp = Pattention(dim, dim, ffn_tokens, value_std=value_std, dynamic_scale=dynamic_scale, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        # routing: a gate only when enabled, so an unrouted block has exactly the original parameters and keys
        self.routing_threshold = check_routing_threshold(routing_threshold)
        self.router = TokenGate(dim, num_prefix_tokens=num_prefix_tokens, **dd) if token_routing else None
        self.last_keep: torch.Tensor | None = None  # [B, N] keep-gates 1 − p of the last forward
        self.last_processed: torch.Tensor | None = None  # [B, N] bool, tokens the last forward executed

    def __getstate__(self) -> dict:
        # the last forward's gates may hold an autograd graph: not part of the module's state, and they would make
        # copy.deepcopy (EMA copies) and pickling fail
        state = self.__dict__.copy()
        state["last_keep"] = state["last_processed"] = None
        return state

    @property
    def attn_tokens(self) -> int:
        return self.attn.q.num_tokens

    @property
    def ffn_tokens(self) -> int:
        return self.mlp.num_tokens

    def attn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path1(self.attn(self.norm1(x)))

    def ffn_residual(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop_path2(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.router is not None:
            return routed_block_forward(self, x)
        x = x + self.attn_residual(x)
        return x + self.ffn_residual(x)

    def grow(self, attn_tokens: int | None = None, ffn_tokens: int | None = None, *,
             new_parameters: bool = False) -> None:
        """Append parameter tokens to the four attention projections and/or the FFN (function-preserving)."""
        if attn_tokens is not None:
            for layer in (self.attn.q, self.attn.k, self.attn.v, self.attn.proj):
                layer.grow(attn_tokens, new_parameters=new_parameters)
        if ffn_tokens is not None:
            self.mlp.grow(ffn_tokens, new_parameters=new_parameters)


class PatchProjection(nn.Module):
    """NCHW image → NCHW patch grid through a Pattention over flattened patches (a conv-free patch embed)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int], num_tokens: int,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels = in_chans
        self.out_channels = embed_dim
        self.patch_size = patch_size
        self.pattention = Pattention(in_chans * patch_size[0] * patch_size[1], embed_dim, num_tokens,
                                     device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        ph, pw = self.patch_size
        gh, gw = H // ph, W // pw
        x = x[:, :, : gh * ph, : gw * pw]  # a conv with stride=patch drops the ragged edge too
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh, gw, C * ph * pw)
        return self.pattention(patches).permute(0, 3, 1, 2)


class PattentionPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` (size checks, dynamic padding, flattening) whose projection is a Pattention."""

    def __init__(self, *args, num_tokens: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        conv = self.proj
        self.proj = PatchProjection(
            conv.in_channels, conv.out_channels, self.patch_size, num_tokens or conv.out_channels,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and tuple(patch_size) != tuple(self.patch_size):
            raise NotImplementedError("PattentionPatchEmbed cannot change its patch size")
        super().set_input_size(img_size=img_size)
