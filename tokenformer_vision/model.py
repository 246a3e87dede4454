"""TokenFormer vision transformer: timm's ``VisionTransformer`` with every projection a Pattention, registered with
timm as ``tokenformer_tiny/small/base/large`` (patch 16, 224²)."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any, Literal

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import register_notrace_module, to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models import vision_transformer as timm_vit

from . import merging, routing
from .block import PattentionPatchEmbed, TokenFormerBlock
from .pattention import Pattention, default_value_std
from .weights import architecture, grow_to_weights, head_classes, token_counts

__all__ = ["TokenFormerViT", "checkpoint_filter_fn", "PRESETS"]

# A Pattention normalises in fp32 through a custom autograd function: FX feature extraction keeps it as one leaf.
register_notrace_module(Pattention)


class TokenFormerViT(timm_vit.VisionTransformer):
    """Vision transformer with Pattention projections (TokenFormer; docs/architecture.md, "References"), built
    through the hooks of timm's class (``block_fn``, ``embed_layer``, the head): forward, intermediates, pruning,
    input resizing, pooling and dynamic sizes are timm's own.

    Args:
        img_size, patch_size, in_chans, num_classes, global_pool, embed_dim (d), depth, num_heads, class_token,
            reg_tokens, fc_norm, dynamic_img_size, dynamic_img_pad, the dropout rates, device, dtype: as in timm's
            ``VisionTransformer`` (``num_classes=0``: no head; ``device='meta'`` works).
        attn_tokens: parameter tokens of each attention projection (Q, K, V, out); default d.
        ffn_tokens: parameter tokens of the FFN Pattention; default 4·attn_tokens.
        dynamic_scale: official τ = sqrt(current n) (growth then changes the function).
        pattention_embed, embed_tokens: Pattention patch embedding instead of a conv, with ``embed_tokens`` (d).
        pattention_head, head_tokens: Pattention classifier head instead of a linear one, with ``head_tokens`` (d).
        token_routing, routing_threshold, routing_capacity, routing_target: token routing (blocks 1.. get a router),
            its settings as in :class:`~tokenformer_vision.routing.RoutingConfig`.
        routing_loss_weight: λ of :meth:`routing_loss` (default 0, or 2 with ``routing_target``).
        merge_tokens: token merging (ToMe, :mod:`tokenformer_vision.merging`): tokens merged away per block (0:
            off); also a settable attribute, so a trained model can be switched on. Not with ``token_routing``.
    """

    def __init__(
        self, img_size: int | tuple[int, int] = 224, patch_size: int | tuple[int, int] = 16, in_chans: int = 3,
        num_classes: int = 1000, global_pool: Literal["", "token", "avg", "max", "avgmax"] = "token",
        embed_dim: int = 768, depth: int = 12, num_heads: int = 12, attn_tokens: int | None = None,
        ffn_tokens: int | None = None, dynamic_scale: bool = False, pattention_embed: bool = False,
        embed_tokens: int | None = None, pattention_head: bool = False, head_tokens: int | None = None,
        class_token: bool = True, reg_tokens: int = 0, fc_norm: bool | None = None, dynamic_img_size: bool = False,
        dynamic_img_pad: bool = False, drop_rate: float = 0.0, pos_drop_rate: float = 0.0,
        patch_drop_rate: float = 0.0, attn_drop_rate: float = 0.0, proj_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0, token_routing: bool = False, routing_threshold: float = 0.5,
        routing_capacity: float | None = None, routing_loss_weight: float | None = None,
        routing_target: float | None = None, merge_tokens: int = 0, device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        if global_pool not in ("", "token", "avg", "max", "avgmax"):
            raise ValueError(f"global_pool must be '', 'token', 'avg', 'max' or 'avgmax', got {global_pool!r}")
        # the patch embedding floors the grid: without dynamic_img_pad, a ragged edge would be dropped silently
        if img_size is not None and not dynamic_img_pad:
            (h, w), (ph, pw) = to_2tuple(img_size), to_2tuple(patch_size)
            if h % ph or w % pw:
                fits = f"{max(ph, round(h / ph) * ph)}×{max(pw, round(w / pw) * pw)}"
                raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}: the {h // ph}×"
                                 f"{w // pw} patch grid would leave out the last {h % ph} rows and {w % pw} columns "
                                 f"of every image. Use an img_size that is a multiple (e.g. {fits}), another "
                                 "patch_size, or pad each image up to the grid with dynamic_img_pad=True and "
                                 "dynamic_img_size=True.")
        attn_tokens = embed_dim if attn_tokens is None else attn_tokens
        weight = (2.0 if routing_target is not None else 0.0) if routing_loss_weight is None else routing_loss_weight
        config = routing.RoutingConfig(threshold=routing_threshold, capacity=routing_capacity, loss_weight=weight,
                                       target=routing_target, depth=depth,
                                       num_prefix_tokens=int(class_token) + reg_tokens) if token_routing else None
        block_fn = partial(TokenFormerBlock, attn_tokens=attn_tokens, routing=config, dynamic_scale=dynamic_scale,
                           ffn_tokens=4 * attn_tokens if ffn_tokens is None else ffn_tokens,
                           value_std=default_value_std(depth, embed_dim))
        embed = partial(PattentionPatchEmbed, num_tokens=embed_tokens) if pattention_embed else timm_vit.PatchEmbed
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes,
            global_pool=global_pool, embed_dim=embed_dim, depth=depth, num_heads=num_heads, class_token=class_token,
            reg_tokens=reg_tokens, fc_norm=fc_norm, dynamic_img_size=dynamic_img_size,
            dynamic_img_pad=dynamic_img_pad, drop_rate=drop_rate, pos_drop_rate=pos_drop_rate,
            patch_drop_rate=patch_drop_rate, proj_drop_rate=proj_drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, embed_layer=embed, block_fn=block_fn, device=device, dtype=dtype,
        )
        self.routing = config
        self.merging = merging.TokenMerging(num_prefix_tokens=self.num_prefix_tokens)
        for block in self.blocks:
            block.merging = self.merging
        self.merge_tokens = merge_tokens
        self.pattention_head, self.head_tokens = pattention_head, head_tokens or embed_dim
        if pattention_head:
            self.reset_classifier(num_classes)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        if getattr(self, "pattention_head", False) and num_classes > 0:
            self.head = Pattention(self.embed_dim, num_classes, self.head_tokens, device=self.head.weight.device,
                                   dtype=self.head.weight.dtype)
            self.head.train(self.training)

    @property
    def token_counts(self) -> dict[str, int]:
        """``{"attn_tokens": ..., "ffn_tokens": ...}``: parameter tokens of every block's projections and FFN."""
        return self.blocks[0].token_counts if len(self.blocks) else {"attn_tokens": 0, "ffn_tokens": 0}

    @property
    def attn_tokens(self) -> int:
        return self.token_counts["attn_tokens"]

    @property
    def ffn_tokens(self) -> int:
        return self.token_counts["ffn_tokens"]

    def grow(self, attn_tokens: int | None = None, ffn_tokens: int | None = None, *,
             generator: torch.Generator | None = None) -> None:
        """Append zero-key parameter tokens to every block, preserving the function: ``attn_tokens`` / ``ffn_tokens``
        (≥ current, None: keep) per attention projection / FFN; ``generator`` draws the new values. The grown tensors
        are new ``nn.Parameter`` objects (:func:`tokenformer_vision.growth.grow_training_state` moves an optimizer's
        state to them)."""
        have = self.token_counts
        for name, new in (("attn_tokens", attn_tokens), ("ffn_tokens", ffn_tokens)):
            if new is not None and (isinstance(new, bool) or not isinstance(new, int) or new < have[name]):
                raise ValueError(f"grow: {name} cannot shrink: model has {have[name]}, asked for {new!r}")
        for block in self.blocks:
            block.grow(attn_tokens, ffn_tokens, generator=generator)

    @property
    def token_routing(self) -> bool:
        return self.routing is not None

    @property
    def routing_threshold(self) -> float:
        """Threshold routing: a token skips a block when its keep probability is below 1 − threshold."""
        return self.routing.threshold if self.routing is not None else 0.5

    @routing_threshold.setter
    def routing_threshold(self, value: float) -> None:
        if self.routing is None:
            raise ValueError("routing_threshold: the model was built without token_routing")
        self.routing.threshold = routing.check_fraction("routing_threshold", value)

    def clear_routing_state(self) -> None:
        """Forget the routing decisions of the last forward (done at the start of every forward)."""
        for block in self.blocks:
            block.last_keep = block.last_processed = None

    def routing_loss(self) -> torch.Tensor:
        """Differentiable compute penalty of the last training forward (0 without routing or with λ = 0)."""
        if self.routing is None:
            return torch.zeros((), device=self.pos_embed.device if self.pos_embed is not None else None)
        return routing.routing_loss(list(self.blocks), self.routing)

    def routing_stats(self, strict: bool = True) -> routing.RoutingStats | None:
        """Tokens processed per block and image in the last forward (none ran: RuntimeError, or None if not strict)."""
        return routing.routing_stats(list(self.blocks), strict)

    def routing_depth_map(self) -> torch.Tensor:
        """``[B, N]`` number of blocks each token went through in the last forward."""
        return routing.routing_depth_map(list(self.blocks))

    @property
    def merge_tokens(self) -> int:
        """Token merging: tokens merged away per block (0: off, exactly the unreduced model)."""
        return self.merging.r

    @merge_tokens.setter
    def merge_tokens(self, value: int) -> None:
        if merging.check_rate(value) and self.routing is not None:
            raise ValueError("merge_tokens: token merging does not combine with token routing (routing decisions "
                             "and statistics assume every block sees the same tokens)")
        self.merging.r = value

    def pool(self, x: torch.Tensor, pool_type: str | None = None) -> torch.Tensor:
        """timm's pooling; after token merging, ``'avg'``/``'avgmax'`` weight each token's mean by its size."""
        pool_type = self.global_pool if pool_type is None else pool_type
        size = self.merging.size
        if size is None or pool_type not in ("avg", "avgmax") or size.shape != x.shape[:2]:
            return super().pool(x, pool_type)
        p = 0 if self.pool_include_prefix else self.num_prefix_tokens
        w = size[:, p:, None].to(x.dtype)
        mean = (x[:, p:] * w).sum(1) / w.sum(1)
        return mean if pool_type == "avg" else 0.5 * (x[:, p:].amax(1) + mean)

    def _begin_forward(self) -> None:
        if self.routing is not None:
            self.clear_routing_state()  # the statistics describe this forward only (stop_early runs fewer blocks)
        self.merging.size = None

    def forward_features(self, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self._begin_forward()
        if self.merging.r and self.grad_checkpointing and torch.is_grad_enabled():
            raise ValueError("token merging does not combine with grad checkpointing (the recomputed blocks would "
                             "see the final token sizes)")
        return super().forward_features(x, **kwargs)

    def forward_intermediates(self, x: torch.Tensor, *args: Any, output_fmt: str = "NCHW", **kwargs: Any) -> Any:
        self._begin_forward()
        if self.merging.r and output_fmt == "NCHW":
            raise ValueError("token merging leaves no patch grid: NCHW intermediates (features_only, detection "
                             "backbones) need merge_tokens=0; output_fmt='NLC' gives the merged tokens")
        return super().forward_intermediates(x, *args, output_fmt=output_fmt, **kwargs)


def checkpoint_filter_fn(state_dict: Mapping[str, torch.Tensor], model: TokenFormerViT) -> dict[str, torch.Tensor]:
    """Adapt a saved state dict to ``model``: grow the model to the saved token counts, then timm's own filter
    (position-embedding resampling). Weights with *fewer* tokens than ``model`` are a ValueError naming both counts.
    First-release ``blocks.N.mlp.*`` keys are renamed ``blocks.N.ffn.*``."""
    # wrapper prefixes (module., _orig_mod.) are gone already: timm's load_state_dict cleans every file it reads
    state = {k.replace(".mlp.", ".ffn.") if ".blocks." in f".{k}" else k: v for k, v in state_dict.items()}
    found, have = architecture(state), architecture(model.state_dict())
    other = [f"{k}: weights {found[k]}, model {have[k]}" for k in ("embed_dim", "depth")
             if found[k] and have[k] and found[k] != have[k]]
    if other:
        raise ValueError(f"the weights are of another model ({', '.join(other)})")
    saved = token_counts(state)
    if saved is None and found["depth"] and len(model.blocks):
        raise ValueError("the weights have no TokenFormer block weights (no 'blocks.N.attn.q.key_param'): they are "
                         "of another model")
    if saved is not None and len(model.blocks):
        # timm's local-dir:/hf-hub: loading builds the model from config.json's model_args: they must match
        declared = getattr(model, "pretrained_model_args", None) or {}
        wrong = [f"{k}: config.json {declared[k]}, weights {v}" for k, v in saved.items()
                 if declared.get(k) is not None and declared[k] != v]
        if wrong:
            raise ValueError(f"config.json's token counts disagree with the weights file ({', '.join(wrong)})")
        grow_to_weights(model, state)
    pos = state.get("pos_embed")
    if pos is not None and model.pos_embed is not None and pos.shape != model.pos_embed.shape:
        patches = pos.shape[1] - (0 if model.no_embed_class else model.num_prefix_tokens)
        if math.isqrt(patches) ** 2 != patches:  # timm would guess a grid for it: refuse instead
            raise ValueError(f"cannot resample a non-square saved pos_embed of {patches} patch tokens")
    cfg = getattr(model, "pretrained_cfg", None) or {}
    saved_classes = head_classes(state)
    if (cfg.get("file") or cfg.get("source")) and model.num_classes == cfg.get("num_classes") and saved_classes \
            and saved_classes != model.num_classes:
        # timm keeps the saved head when the model's num_classes equals the cfg's: they must agree with the file
        raise ValueError(f"the weights' classifier has {saved_classes} classes but the pretrained cfg says "
                         f"num_classes={model.num_classes}: pass pretrained_cfg_overlay=dict(file=..., "
                         f"num_classes={saved_classes}) (add num_classes=N to create_model for a new N-class head)")
    return timm_vit.checkpoint_filter_fn(state, model)


PRESETS: dict[str, dict[str, int]] = {
    "tokenformer_tiny": dict(embed_dim=192, depth=12, num_heads=3),
    "tokenformer_small": dict(embed_dim=384, depth=12, num_heads=6),
    "tokenformer_base": dict(embed_dim=768, depth=12, num_heads=12),
    "tokenformer_large": dict(embed_dim=1024, depth=24, num_heads=16),
}

# No public ImageNet weights exist: one untagged cfg per model, no url/file, so timm.list_pretrained('tokenformer*')
# stays empty. Point at your own file with ``pretrained_cfg_overlay=dict(file=PATH)``.
default_cfgs = generate_default_cfgs({name: {
    "url": "", "num_classes": 1000, "input_size": (3, 224, 224), "pool_size": None, "crop_pct": 0.875,
    "interpolation": "bicubic", "fixed_input_size": True, "mean": IMAGENET_DEFAULT_MEAN, "std": IMAGENET_DEFAULT_STD,
    "first_conv": "patch_embed.proj", "classifier": "head", "license": "apache-2.0", "paper_ids": "arXiv:2410.23168",
} for name in PRESETS})


def _create(variant: str, pretrained: bool, kwargs: dict[str, Any]) -> TokenFormerViT:
    out_indices = kwargs.pop("out_indices", 3)
    model = build_model_with_cfg(TokenFormerViT, variant, pretrained, pretrained_filter_fn=checkpoint_filter_fn,
                                 feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
                                 **{"patch_size": 16, **PRESETS[variant], **kwargs})
    # timm's resolve_data_config reads the pretrained cfg: report the size the model is built at (a 32² export
    # loaded through pretrained_cfg_overlay would otherwise claim the preset's 224²)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = (kwargs.get("in_chans", 3), *to_2tuple(kwargs.get("img_size", 224)))
    if cfg.get("input_size") is not None and tuple(cfg["input_size"]) != size:
        model.pretrained_cfg = {**cfg, "input_size": size}
    return model


@register_model
def tokenformer_tiny(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-Ti/16: d 192, 12 blocks, 3 heads, 192 attention / 768 FFN parameter tokens."""
    return _create("tokenformer_tiny", pretrained, kwargs)


@register_model
def tokenformer_small(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-S/16: d 384, 12 blocks, 6 heads, 384 attention / 1536 FFN parameter tokens."""
    return _create("tokenformer_small", pretrained, kwargs)


@register_model
def tokenformer_base(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-B/16: d 768, 12 blocks, 12 heads, 768 attention / 3072 FFN parameter tokens."""
    return _create("tokenformer_base", pretrained, kwargs)


@register_model
def tokenformer_large(pretrained: bool = False, **kwargs: Any) -> TokenFormerViT:
    """TokenFormer-L/16: d 1024, 24 blocks, 16 heads, 1024 attention / 4096 FFN parameter tokens."""
    return _create("tokenformer_large", pretrained, kwargs)
