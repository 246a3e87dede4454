"""TokenFormer vision transformer: a ViT whose every projection is a Pattention layer, registered in timm.

``import tokenformer_vision`` registers ``tokenformer_tiny/small/base/large`` (patch 16, 224²), after which
``timm.create_model('tokenformer_base', num_classes=..., attn_tokens=..., ffn_tokens=...)`` builds them.

The shell follows timm's ``VisionTransformer`` (conv patch embedding, cls token, learned absolute position
embedding, final LayerNorm, linear head) so that every timm utility (features_only, forward_intermediates,
pos-embed resampling, optimizer factory, EMA) works unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import (
    PatchEmbed,
    register_notrace_function,
    register_notrace_module,
    resample_abs_pos_embed,
    trunc_normal_,
)
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from timm.models._manipulate import checkpoint, checkpoint_seq
from torch import nn

from .layers import PattentionPatchEmbed, TokenFormerBlock
from .pattention import Pattention, default_value_std
from .routing import RoutingStats, check_routing_threshold

__all__ = [
    "TokenFormerViT",
    "token_counts_from_state_dict",
    "grow_to_token_counts",
    "checkpoint_filter_fn",
    "check_image_input",
]

# A Pattention validates its input and normalises in fp32: FX feature extraction keeps it as one leaf call.
register_notrace_module(Pattention)


@register_notrace_function  # data-dependent checks: FX tracing treats this call as a leaf
def check_image_input(x: torch.Tensor, in_chans: int, img_size: tuple[int, int] | None, patch_size: tuple[int, int],
                      dynamic_img_size: bool, dynamic_img_pad: bool) -> None:
    """Raise a ValueError naming the problem when ``x`` is not an image batch the model can take."""
    if x.ndim != 4:
        raise ValueError(f"expected a batch of images [B, C, H, W], got a tensor of shape {tuple(x.shape)}")
    if x.shape[1] != in_chans:
        raise ValueError(
            f"expected {in_chans} input channels, got {x.shape[1]} (input shape {tuple(x.shape)}); "
            f"build the model with in_chans={x.shape[1]} to change it"
        )
    size = tuple(x.shape[-2:])
    if not dynamic_img_size and img_size is not None and size != tuple(img_size):
        raise ValueError(
            f"input size {size} does not match the model's img_size {tuple(img_size)}; "
            "build with dynamic_img_size=True to accept any size, or call set_input_size()"
        )
    if dynamic_img_size and not dynamic_img_pad and (size[0] % patch_size[0] or size[1] % patch_size[1]):
        raise ValueError(
            f"input size {size} is not a multiple of the patch size {tuple(patch_size)}; "
            "build with dynamic_img_pad=True to pad it"
        )


class TokenFormerViT(nn.Module):
    """Vision transformer with Pattention projections (TokenFormer, arXiv 2410.23168).

    Args:
        img_size: input resolution the position embedding is laid out for.
        patch_size: patch size of the (conv) patch embedding.
        in_chans: number of input image channels.
        num_classes: classifier outputs; 0 for no head.
        global_pool: ``'token'`` (cls token), ``'avg'`` (mean of patch tokens) or ``''`` (no pooling).
        embed_dim: token width d.
        depth: number of blocks.
        num_heads: attention heads.
        attn_tokens: parameter tokens of each attention projection (Q, K, V, out); default d.
        ffn_tokens: parameter tokens of the FFN Pattention; default 4·attn_tokens.
        dynamic_scale: official τ = sqrt(current n) (growth then changes the function).
        pattention_embed: Pattention patch embedding instead of a conv (``embed_tokens`` tokens, default d).
        pattention_head: Pattention classifier head instead of a linear layer (``head_tokens``, default d).
        dynamic_img_size: accept any input size, resampling the position embedding on the fly.
        dynamic_img_pad: pad inputs whose size is not a multiple of the patch size.
        drop_rate, pos_drop_rate, attn_drop_rate, proj_drop_rate, drop_path_rate: dropout rates.
        token_routing: per-token adaptive depth (:mod:`tokenformer_vision.routing`): blocks 1.. get a gate whose
            keep-gate 1 − p scales their updates; in eval mode tokens with halting probability p above
            ``routing_threshold`` skip the block (real compute saving). Off: no extra parameters or keys.
        routing_threshold: halting-probability threshold in [0, 1] (skip iff p > threshold; 1 skips nothing).
        routing_loss_weight: λ of the compute penalty λ·mean(1 − p) returned by :meth:`routing_loss`.
        device, dtype: where and in what precision to build the parameters (``meta`` works).
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 224,
        patch_size: int | tuple[int, int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["", "token", "avg"] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        attn_tokens: int | None = None,
        ffn_tokens: int | None = None,
        dynamic_scale: bool = False,
        pattention_embed: bool = False,
        embed_tokens: int | None = None,
        pattention_head: bool = False,
        head_tokens: int | None = None,
        dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        token_routing: bool = False,
        routing_threshold: float = 0.5,
        routing_loss_weight: float = 0.0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if global_pool not in ("", "token", "avg"):
            raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
        if in_chans < 1:
            raise ValueError(f"in_chans must be ≥ 1, got {in_chans}")
        dd = dict(device=device, dtype=dtype)
        attn_tokens = embed_dim if attn_tokens is None else attn_tokens
        ffn_tokens = 4 * attn_tokens if ffn_tokens is None else ffn_tokens
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.num_prefix_tokens = 1
        self.has_class_token = True
        self.dynamic_img_size = dynamic_img_size
        self.grad_checkpointing = False
        self.pattention_head = pattention_head
        self.head_tokens = head_tokens or embed_dim
        self.token_routing = bool(token_routing)
        self._routing_threshold = check_routing_threshold(routing_threshold)
        if isinstance(routing_loss_weight, bool) or not isinstance(routing_loss_weight, (int, float)) \
                or routing_loss_weight < 0:
            raise ValueError(f"routing_loss_weight must be a float >= 0, got {routing_loss_weight!r}")
        self.routing_loss_weight = float(routing_loss_weight)

        embed_args: dict[str, Any] = {}
        if dynamic_img_size:
            embed_args.update(strict_img_size=False, output_fmt="NHWC")  # keep the grid for pos resampling
        embed_layer = partial(PattentionPatchEmbed, num_tokens=embed_tokens) if pattention_embed else PatchEmbed
        self.patch_embed = embed_layer(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            dynamic_img_pad=dynamic_img_pad, **embed_args, **dd,
        )
        num_patches = self.patch_embed.num_patches
        reduction = self.patch_embed.feat_ratio()

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim, **dd))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, embed_dim, **dd))
        self.pos_drop = nn.Dropout(pos_drop_rate)

        value_std = default_value_std(depth, embed_dim)
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]  # python floats: works on meta too
        self.blocks = nn.Sequential(*[
            TokenFormerBlock(
                embed_dim, num_heads, attn_tokens, ffn_tokens, attn_drop=attn_drop_rate,
                proj_drop=proj_drop_rate, drop_path=dpr[i], value_std=value_std, dynamic_scale=dynamic_scale,
                token_routing=self.token_routing and i > 0,  # block 0 always runs (paper)
                routing_threshold=self._routing_threshold, num_prefix_tokens=self.num_prefix_tokens, **dd,
            )
            for i in range(depth)
        ])
        self.feature_info = [dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=reduction) for i in range(depth)]
        self.norm = nn.LayerNorm(embed_dim, **dd)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = self._make_head(num_classes)
        self.init_weights()

    # ----------------------------------------------------------------------------------------------- set-up
    def _make_head(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        dd = dict(device=self.cls_token.device, dtype=self.cls_token.dtype)
        if self.pattention_head:
            return Pattention(self.embed_dim, num_classes, self.head_tokens, **dd)
        head = nn.Linear(self.embed_dim, num_classes, **dd)
        if not head.weight.is_meta:
            trunc_normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
        return head

    @torch.no_grad()
    def init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

    # ------------------------------------------------------------------------------------------- timm API
    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        return dict(
            stem=r"^cls_token|pos_embed|patch_embed",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            if global_pool not in ("", "token", "avg"):
                raise ValueError(f"global_pool must be '', 'token' or 'avg', got {global_pool!r}")
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = self._make_head(num_classes)
        self.head.train(self.training)

    def set_input_size(self, img_size: int | tuple[int, int] | None = None,
                       patch_size: int | tuple[int, int] | None = None) -> None:
        """Change the input resolution (and patch size), resampling the position embedding to the new grid."""
        prev_grid = self.patch_embed.grid_size
        self.patch_embed.set_input_size(img_size=img_size, patch_size=patch_size)
        new_grid = self.patch_embed.grid_size
        if new_grid != prev_grid:
            with torch.no_grad():
                pos = resample_abs_pos_embed(self.pos_embed, new_size=new_grid, old_size=prev_grid,
                                             num_prefix_tokens=self.num_prefix_tokens)
            self.pos_embed = nn.Parameter(pos, requires_grad=self.pos_embed.requires_grad)
        reduction = self.patch_embed.feat_ratio()
        for info in self.feature_info:
            info["reduction"] = reduction
        if hasattr(self, "pretrained_cfg"):
            self.pretrained_cfg = {**self.pretrained_cfg, "input_size": (self.in_chans, *self.patch_embed.img_size)}

    # -------------------------------------------------------------------------------------------- growth
    @property
    def attn_tokens(self) -> int:
        """Parameter tokens of each attention projection (uniform across blocks)."""
        return self.blocks[0].attn_tokens if len(self.blocks) else 0

    @property
    def ffn_tokens(self) -> int:
        """Parameter tokens of each FFN Pattention (uniform across blocks)."""
        return self.blocks[0].ffn_tokens if len(self.blocks) else 0

    def grow(self, attn_tokens: int | None = None, ffn_tokens: int | None = None, *,
             new_parameters: bool = False) -> None:
        """Append zero-key parameter tokens to every block; the model's function is preserved exactly.

        Args:
            attn_tokens: new token count of every attention projection (≥ current), or None to keep it.
            ffn_tokens: new token count of every FFN (≥ current), or None to keep it.
            new_parameters: replace grown parameters with new ``nn.Parameter`` objects (needed under DDP);
                the default swaps their data in place, which keeps optimizer references valid.
        """
        for name, new, old in (("attn_tokens", attn_tokens, self.attn_tokens),
                               ("ffn_tokens", ffn_tokens, self.ffn_tokens)):
            if new is not None and (not isinstance(new, int) or new < old):
                raise ValueError(f"grow: {name} cannot shrink: model has {old}, asked for {new!r}")
        for block in self.blocks:
            block.grow(attn_tokens, ffn_tokens, new_parameters=new_parameters)

    # ------------------------------------------------------------------------------------------- routing
    @property
    def routing_threshold(self) -> float:
        """Halting-probability threshold of eval-mode skipping: a token skips a block iff its p > threshold."""
        return self._routing_threshold

    @routing_threshold.setter
    def routing_threshold(self, value: float) -> None:
        self._routing_threshold = check_routing_threshold(value)
        for block in self.blocks:
            block.routing_threshold = self._routing_threshold

    def _routed_blocks(self) -> list[tuple[int, nn.Module]]:
        return [(i, b) for i, b in enumerate(self.blocks) if getattr(b, "router", None) is not None]

    def clear_routing_state(self) -> None:
        """Forget the gates recorded by the last forward (done at the start of every forward)."""
        for _, block in self._routed_blocks():
            block.last_keep = None
            block.last_processed = None

    def routing_loss(self) -> torch.Tensor:
        """Compute penalty λ·mean(1 − p) of the last forward (differentiable after a training forward).

        The mean runs over the routed blocks and the patch tokens (the cls token is always processed). λ is
        ``routing_loss_weight``; 0 (the default, as in the source) gives an exact zero. Add it to the task loss.
        """
        keeps = [b.last_keep[:, self.num_prefix_tokens:] for _, b in self._routed_blocks() if b.last_keep is not None]
        if not keeps:
            return self.cls_token.new_zeros(())
        penalty = torch.stack([k.float().mean() for k in keeps]).mean()
        return penalty * self.routing_loss_weight

    def routing_stats(self, strict: bool = True) -> RoutingStats | None:
        """Token-layer operations of the last forward: per-block, per-image counts of processed tokens.

        Blocks before the first routed one count as fully processed; blocks after the last one that ran
        (``forward_intermediates(stop_early=True)``) are left out. Raises RuntimeError (or returns None with
        ``strict=False``) when the model has no routing or no routed block ran since the last reset.
        """
        ran = [(i, b.last_processed) for i, b in self._routed_blocks() if b.last_processed is not None]
        if not ran:
            if strict:
                raise RuntimeError("no routing statistics: build the model with token_routing=True and run a forward")
            return None
        B, N = ran[0][1].shape
        counts = torch.full((ran[-1][0] + 1, B), N, dtype=torch.long, device=ran[0][1].device)
        for i, processed in ran:
            counts[i] = processed.sum(1)
        return RoutingStats(counts, N)

    def routing_depth_map(self) -> torch.Tensor:
        """``[B, N]`` number of blocks each token went through in the last forward (cls token included)."""
        stats = self.routing_stats()
        depth = torch.full_like(stats.processed[0][:, None].expand(-1, stats.tokens), stats.depth)
        for i, block in self._routed_blocks():
            if i < stats.depth:
                depth = depth - (~block.last_processed).long()
        return depth

    # ------------------------------------------------------------------------------------------- forward
    def _pos_embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.dynamic_img_size:
            B, H, W, C = x.shape
            pos_embed = resample_abs_pos_embed(self.pos_embed, new_size=(H, W),
                                               old_size=self.patch_embed.grid_size,
                                               num_prefix_tokens=self.num_prefix_tokens)
            x = x.reshape(B, H * W, C)
        else:
            pos_embed = self.pos_embed
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return self.pos_drop(x + pos_embed)

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.token_routing:
            self.clear_routing_state()  # stats always describe this forward (stop_early runs fewer blocks)
        check_image_input(x, self.in_chans, self.patch_embed.img_size, self.patch_embed.patch_size,
                          self.dynamic_img_size, self.patch_embed.dynamic_img_pad)
        return self._pos_embed(self.patch_embed(x))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        x = self._embed(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            x = checkpoint_seq(self.blocks, x)
        else:
            x = self.blocks(x)
        return self.norm(x)

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        pool_type = self.global_pool if pool_type is None else pool_type
        if pool_type == "token":
            return x[:, 0]
        if pool_type == "avg":
            return x[:, self.num_prefix_tokens:].mean(dim=1)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | list[int] | None = None,
        return_prefix_tokens: bool = False,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final features and/or the outputs of selected blocks (timm's feature-extraction API).

        Args:
            x: input images.
            indices: take the last n blocks if int, all if None, the listed block indices if a sequence.
            return_prefix_tokens: pair each map with its cls token.
            norm: apply the final norm to each intermediate.
            stop_early: stop after the last requested block.
            output_fmt: ``'NCHW'`` maps or ``'NLC'`` token sequences.
            intermediates_only: return only the intermediates.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        B, _, height, width = x.shape
        x = self._embed(x)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks
        intermediates = []
        for i, blk in enumerate(blocks):
            x = checkpoint(blk, x) if self.grad_checkpointing and not torch.jit.is_scripting() else blk(x)
            if i in take_indices:
                intermediates.append(self.norm(x) if norm else x)
        prefix = [y[:, : self.num_prefix_tokens] for y in intermediates]
        intermediates = [y[:, self.num_prefix_tokens:] for y in intermediates]
        if output_fmt == "NCHW":
            H, W = self.patch_embed.dynamic_feat_size((height, width))
            intermediates = [y.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates]
        if return_prefix_tokens:
            intermediates = list(zip(intermediates, prefix, strict=True))
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(self, indices: int | list[int] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> list[int]:
        """Drop the blocks (and optionally norm/head) that the requested intermediates do not need."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices


# ------------------------------------------------------------------------------------------ checkpoints
_ATTN_KEY = "attn.q.key_param"
_FFN_KEY = "mlp.key_param"


def token_counts_from_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """Read ``attn_tokens``/``ffn_tokens`` from a state dict (the token axis of each block's Pattention).

    Accepts a plain model state dict or one whose keys carry a prefix (e.g. Lightning's ``model.``).
    Raises ValueError if the blocks disagree or no Pattention block is found.
    """
    counts: dict[str, set[int]] = {"attn_tokens": set(), "ffn_tokens": set()}
    for key, value in state_dict.items():
        if ".blocks." not in f".{key}":
            continue
        if key.endswith(("attn.q.key_param", "attn.k.key_param", "attn.v.key_param", "attn.proj.key_param")):
            counts["attn_tokens"].add(int(value.shape[0]))
        elif key.endswith(_FFN_KEY) and ".attn." not in key:
            counts["ffn_tokens"].add(int(value.shape[0]))
    out = {}
    for name, found in counts.items():
        if not found:
            raise ValueError(f"no TokenFormer block weights found in the state dict (looked for '*{_ATTN_KEY}')")
        if len(found) != 1:
            raise ValueError(f"blocks in the state dict disagree on {name}: {sorted(found)}")
        out[name] = found.pop()
    return out


def grow_to_token_counts(model: TokenFormerViT, saved: Mapping[str, int], hint: str) -> None:
    """Grow ``model`` to the token counts ``saved`` (from :func:`token_counts_from_state_dict`) before loading.

    Growth only appends tokens, so a checkpoint with fewer tokens than the model is of another model: ValueError
    naming both counts, followed by ``hint`` (what the caller should do instead).
    """
    have = {"attn_tokens": model.attn_tokens, "ffn_tokens": model.ffn_tokens}
    smaller = {k: (have[k], saved[k]) for k in saved if saved[k] < have[k]}
    if smaller:
        detail = ", ".join(f"{k}: model {m}, checkpoint {c}" for k, (m, c) in smaller.items())
        raise ValueError(f"the checkpoint has fewer parameter tokens than the model ({detail}): {hint}")
    if any(saved[k] != have[k] for k in saved):
        model.grow(**saved)


def _check_head_classes(state_dict: Mapping[str, torch.Tensor], model: TokenFormerViT) -> None:
    """Weights file loaded through a pretrained cfg (``file=``/``local-dir:``): timm keeps the saved head when the
    model's num_classes equals the cfg's, so a cfg num_classes that disagrees with the file's head is an error."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    if not (cfg.get("file") or cfg.get("source")) or model.num_classes != cfg.get("num_classes"):
        return  # no weights file named by the cfg, or timm drops the head (num_classes differs): nothing to check
    if "head.weight" in state_dict:
        saved = state_dict["head.weight"].shape[0]
    elif "head.value_param" in state_dict:
        saved = state_dict["head.value_param"].shape[1]
    else:
        return
    if saved != model.num_classes:
        raise ValueError(f"the weights' classifier has {saved} classes but the pretrained cfg says num_classes="
                         f"{model.num_classes}: pass pretrained_cfg_overlay=dict(file=..., num_classes={saved}) "
                         "(add num_classes=N to create_model for a new N-class head)")


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: TokenFormerViT) -> dict[str, torch.Tensor]:
    """Adapt a saved state dict to ``model``: strip wrappers' prefixes, grow the model to the saved token counts,
    resample the position embedding to the model's grid.

    A saved model with *fewer* tokens than ``model`` cannot be loaded into it (that would need shrinking) and
    raises a ValueError naming both counts.
    """
    state_dict = state_dict.get("state_dict", state_dict)
    state_dict = state_dict.get("model", state_dict) if "model" in state_dict and isinstance(
        state_dict.get("model"), Mapping) else state_dict
    prefixes = ("model.", "module.", "_orig_mod.")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for prefix in prefixes:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    if len(model.blocks):
        try:
            saved = token_counts_from_state_dict(out)
        except ValueError as e:
            raise ValueError(f"these weights are not a TokenFormer model's: is it a checkpoint of another model? ({e})"
                             ) from e
        # timm's local-dir:/hf-hub: loading builds the model from config.json's model_args: they must match the file
        declared = getattr(model, "pretrained_model_args", None) or {}
        wrong = {k: (declared[k], saved[k]) for k in saved if declared.get(k) is not None and declared[k] != saved[k]}
        if wrong:
            detail = ", ".join(f"{k}: config.json {c}, weights file {s}" for k, (c, s) in wrong.items())
            raise ValueError(f"config.json's token counts disagree with the weights file ({detail})")
        grow_to_token_counts(model, saved, hint="build the model with the checkpoint's attn_tokens/ffn_tokens")
    _check_head_classes(out, model)
    pos = out.get("pos_embed")
    if pos is not None and pos.shape != model.pos_embed.shape:
        old_tokens = pos.shape[1] - model.num_prefix_tokens
        old_side = int(math.isqrt(old_tokens))
        if old_side * old_side != old_tokens:
            raise ValueError(f"cannot resample a non-square saved pos_embed of {old_tokens} patch tokens")
        out["pos_embed"] = resample_abs_pos_embed(pos, new_size=model.patch_embed.grid_size,
                                                  old_size=(old_side, old_side),
                                                  num_prefix_tokens=model.num_prefix_tokens)
    return out


def _create_tokenformer(variant: str, pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        TokenFormerViT, variant, pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None,
        "crop_pct": 0.875, "interpolation": "bicubic", "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
        "first_conv": "patch_embed.proj", "classifier": "head",
        "license": "apache-2.0", "paper_ids": "arXiv:2410.23168",
        **kwargs,
    }


# No public ImageNet weights exist for these models: each has one untagged cfg with no url/file, so
# ``timm.list_pretrained('tokenformer*')`` stays empty. Point at your own file with
# ``pretrained_cfg_overlay=dict(file=PATH)``.
default_cfgs = generate_default_cfgs({
    "tokenformer_tiny": _cfg(),
    "tokenformer_small": _cfg(),
    "tokenformer_base": _cfg(),
    "tokenformer_large": _cfg(),
})

PRESETS: dict[str, dict[str, int]] = {
    "tokenformer_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "tokenformer_small": dict(embed_dim=384, depth=12, num_heads=6),
    "tokenformer_base": dict(embed_dim=768, depth=12, num_heads=12),
    "tokenformer_large": dict(embed_dim=1024, depth=24, num_heads=16),
}


def _preset(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> TokenFormerViT:
    args = dict(patch_size=16, **PRESETS[variant])
    return _create_tokenformer(variant, pretrained=pretrained, **{**args, **kwargs})


@register_model
def tokenformer_tiny(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-Ti/16: d 192, 12 blocks, 3 heads, 192 attention / 768 FFN parameter tokens."""
    return _preset("tokenformer_tiny", pretrained, kwargs)


@register_model
def tokenformer_small(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-S/16: d 384, 12 blocks, 6 heads, 384 attention / 1536 FFN parameter tokens."""
    return _preset("tokenformer_small", pretrained, kwargs)


@register_model
def tokenformer_base(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-B/16: d 768, 12 blocks, 12 heads, 768 attention / 3072 FFN parameter tokens."""
    return _preset("tokenformer_base", pretrained, kwargs)


@register_model
def tokenformer_large(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-L/16: d 1024, 24 blocks, 16 heads, 1024 attention / 4096 FFN parameter tokens."""
    return _preset("tokenformer_large", pretrained, kwargs)
