"""The TokenFormer block: timm's pre-norm ViT block with every projection a Pattention, and the patch embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed
from torch import nn

from .kernel import pattention_fused
from .merging import TokenMerging
from .pattention import Pattention
from .routing import RoutingConfig, route_block

__all__ = ["PattentionAttention", "TokenFormerBlock"]


class PattentionAttention(nn.Module):
    """Multi-head self-attention whose Q, K, V and output projections are Pattention layers; ``attn_mask`` as in
    timm's ``Attention`` (bool, or an additive float bias broadcasting to ``[B, heads, N, N]``)."""

    def __init__(self, dim: int, num_heads: int, num_tokens: int, *, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 value_std: float | None = None, dynamic_scale: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"embed_dim ({dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.attn_drop = num_heads, attn_drop
        kw = dict(value_std=value_std, dynamic_scale=dynamic_scale, device=device, dtype=dtype)
        self.q, self.k, self.v, self.proj = (Pattention(dim, dim, num_tokens, **kw) for _ in range(4))
        self.proj_drop = nn.Dropout(proj_drop)

    def qkv(self, x: torch.Tensor) -> list[torch.Tensor]:
        """``[q(x), k(x), v(x)]``: one kernel call over the three key sets, unless a layer has hooks, the token counts
        differ or FX is tracing (parameters are proxies)."""
        layers = (self.q, self.k, self.v)
        if (isinstance(self.q.key_param, torch.fx.Proxy) or len({p.num_tokens for p in layers}) > 1
                or any(p._forward_hooks or p._forward_pre_hooks for p in layers)):
            return [p(x) for p in layers]
        return pattention_fused(x, [p.key_param for p in layers], [p.value_param for p in layers],
                                [p.scale() for p in layers], self.q.eps)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False,
                return_keys: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Attention over ``x [B, N, C]``; ``return_keys``: also the head-mean keys ``[B, N, C/heads]`` (merging)."""
        B, N, C = x.shape
        q, k, v = (t.view(B, N, self.num_heads, -1).transpose(1, 2) for t in self.qkv(x))
        if isinstance(attn_mask, torch.Tensor) and attn_mask.is_floating_point():  # not an FX proxy
            attn_mask = attn_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                           dropout_p=self.attn_drop if self.training else 0.0)
        out = self.proj_drop(self.proj(x.transpose(1, 2).reshape(B, N, C)))
        return (out, k.mean(1)) if return_keys else out


class TokenFormerBlock(nn.Module):
    """Pre-norm block ``x + DropPath(Attn(LN(x)))``, ``x + DropPath(FFN(LN(x)))`` (official TokenFormer) with
    affine-free LayerNorms; the FFN is one Pattention d→d (``self.ffn``) whose GeLU is the only non-linearity.

    Takes timm's ``block_fn`` arguments (``depth``: the block's index; the unused ones, ``mlp_ratio`` etc., go to
    ``timm_block_args``). ``attn_tokens``/``ffn_tokens``: parameter tokens of each attention projection / the FFN.
    ``routing``: the model's shared settings; with it (and ``depth > 0``) the block gets a router (``self.router``,
    timm ``Mlp(d → d/4 → 1)`` giving the keep logit) and :func:`~tokenformer_vision.routing.route_block` picks the
    tokens it processes.
    """

    merging: TokenMerging | None = None  # the model's token merging (tokenformer_vision.merging), shared by its blocks

    def __init__(self, dim: int, num_heads: int, *, attn_tokens: int, ffn_tokens: int, value_std: float | None = None,
                 dynamic_scale: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0, drop_path: float = 0.0,
                 depth: int = 0, routing: RoutingConfig | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, **timm_block_args: object) -> None:
        super().__init__()
        dd = dict(device=device, dtype=dtype)
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, **dd)
        self.attn = PattentionAttention(dim, num_heads, attn_tokens, attn_drop=attn_drop, proj_drop=proj_drop,
                                        value_std=value_std, dynamic_scale=dynamic_scale, **dd)
        self.drop_path1 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, **dd)
        self.ffn = Pattention(dim, dim, ffn_tokens, value_std=value_std, dynamic_scale=dynamic_scale, **dd)
        self.drop_path2 = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.routing = routing if depth > 0 else None
        self.router = (Mlp(dim, max(dim // 4, 1), out_features=1, act_layer=nn.ReLU, **dd)
                       if self.routing is not None else None)
        self.last_keep: torch.Tensor | None = None  # [B, N] keep probabilities of the last routed forward
        self.last_processed: torch.Tensor | None = None  # [B, N] bool, tokens the last forward processed

    def __getstate__(self) -> dict:
        # per-forward tensors, not state: an autograd graph in them breaks deepcopy (EMA copies) and pickling
        return {**self.__dict__, "last_keep": None, "last_processed": None}

    def init_weights(self) -> None:
        """Called by timm's ``VisionTransformer.init_weights`` after its children (their Linear layers)."""
        if self.router is not None and not self.router.fc2.bias.is_meta:
            nn.init.constant_(self.router.fc2.bias, self.routing.bias_init)

    @property
    def token_counts(self) -> dict[str, int]:
        return {"attn_tokens": self.attn.q.num_tokens, "ffn_tokens": self.ffn.num_tokens}

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """timm's block forward, through the router if any; with token merging on (``self.merging.r > 0``, set by
        the model) tokens are merged between attention and FFN."""
        if self.merging is not None and self.merging.r > 0:
            if attn_mask is not None or is_causal:
                raise ValueError("token merging does not combine with an external attn_mask or is_causal")
            y, keys = self.attn(self.norm1(x), attn_mask=self.merging.attn_bias(), return_keys=True)
            x = self.merging.merge(x + self.drop_path1(y), keys)
            return x + self.drop_path2(self.ffn(self.norm2(x)))
        if self.router is None:
            return self.forward_gated(x, attn_mask=attn_mask, is_causal=is_causal)
        if attn_mask is not None or is_causal:
            raise ValueError("token routing does not combine with an external attn_mask or is_causal")
        return route_block(self, x)

    def forward_gated(self, x: torch.Tensor, gate: torch.Tensor | None = None,
                      attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        """The block on every token of ``x``; ``gate [B, N]`` scales each token's two residual updates."""
        g = 1.0 if gate is None else gate.unsqueeze(-1).to(x.dtype)
        x = x + g * self.drop_path1(self.attn(self.norm1(x), attn_mask=attn_mask, is_causal=is_causal))
        return x + g * self.drop_path2(self.ffn(self.norm2(x)))

    def forward_packed(self, x: torch.Tensor, processed: torch.Tensor, counts: torch.Tensor,
                       groups: int = 4) -> torch.Tensor:
        """Inference on the ``processed [B, N]`` tokens of each image alone, the others unchanged (``forward_gated``
        on each image's processed tokens). The per-token layers run on the processed tokens of the whole batch packed
        together; attention on each image's, the images sorted by ``counts`` (``[B]``, on the host) into ``groups``
        groups, each padded to its own largest count (pads masked as keys)."""
        B, N, C = x.shape
        image, token = processed.nonzero(as_tuple=True)  # row-major: each image's tokens in their order
        slot = processed.long().cumsum(1)[image, token] - 1  # position among the image's processed tokens
        xt = x[image, token]  # [T, C]
        q, k, v = self.attn.qkv(self.norm1(xt))
        y = torch.empty_like(q)
        for members in torch.argsort(counts).chunk(min(groups, B)):  # images with similar counts together
            size, longest = len(members), int(counts[members].max())
            rank = torch.full((B,), -1, dtype=torch.long)
            rank[members] = torch.arange(size)
            rank = rank.to(x.device)[image]  # [T]: the token's image's row in this group, -1 if not in it
            chosen = rank >= 0
            index = (rank[chosen], slot[chosen])
            padded = [t.new_zeros(size, longest, C).index_put_(index, t[chosen]) for t in (q, k, v)]
            mask = None
            if int(counts[members].min()) < longest:
                mask = torch.arange(longest).unsqueeze(0) < counts[members].unsqueeze(1)
                mask = mask.to(x.device)[:, None, None, :]
            heads = (t.view(size, longest, self.attn.num_heads, -1).transpose(1, 2) for t in padded)
            out = F.scaled_dot_product_attention(*heads, attn_mask=mask)
            y[chosen] = out.transpose(1, 2).reshape(size, longest, C)[index]
        xt = xt + self.drop_path1(self.attn.proj_drop(self.attn.proj(y)))
        xt = xt + self.drop_path2(self.ffn(self.norm2(xt)))
        return x.index_put((image, token), xt.to(x.dtype))

    def grow(self, attn_tokens: int | None = None, ffn_tokens: int | None = None, *,
             generator: torch.Generator | None = None) -> None:
        """Append parameter tokens to the four attention projections and/or the FFN (function-preserving)."""
        if attn_tokens is not None:
            for layer in (self.attn.q, self.attn.k, self.attn.v, self.attn.proj):
                layer.grow(attn_tokens, generator=generator)
        if ffn_tokens is not None:
            self.ffn.grow(ffn_tokens, generator=generator)


class _PatchPattention(nn.Module):
    """NCHW image → NCHW patch grid through a Pattention over flattened patches (a conv-free patch embedding)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: tuple[int, int], num_tokens: int,
                 *, device=None, dtype=None) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.patch_size = in_chans, embed_dim, patch_size
        self.pattention = Pattention(in_chans * patch_size[0] * patch_size[1], embed_dim, num_tokens,
                                     device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        if C != self.in_channels:
            raise ValueError(f"expected {self.in_channels} input channels, got {C} (input shape {tuple(x.shape)})")
        (ph, pw), gh, gw = self.patch_size, H // self.patch_size[0], W // self.patch_size[1]
        x = x[:, :, : gh * ph, : gw * pw]  # a conv with stride=patch drops the ragged edge too
        patches = x.reshape(B, C, gh, ph, gw, pw).permute(0, 2, 4, 1, 3, 5).reshape(B, gh, gw, C * ph * pw)
        return self.pattention(patches).permute(0, 3, 1, 2)


class PattentionPatchEmbed(PatchEmbed):
    """timm ``PatchEmbed`` (size checks, dynamic padding, flattening) whose projection is a Pattention."""

    def __init__(self, *args, num_tokens: int | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        conv = self.proj
        self.proj = _PatchPattention(conv.in_channels, conv.out_channels, self.patch_size,
                                     num_tokens or conv.out_channels, device=conv.weight.device,
                                     dtype=conv.weight.dtype)

    def set_input_size(self, img_size=None, patch_size=None) -> None:
        if patch_size is not None and tuple(patch_size) != tuple(self.patch_size):
            raise NotImplementedError("PattentionPatchEmbed cannot change its patch size")
        super().set_input_size(img_size=img_size)
