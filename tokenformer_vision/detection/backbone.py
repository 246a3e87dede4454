"""Multi-scale detection backbone: a timm ViT / TokenFormer trunk + ViTDet's simple feature pyramid. The trunk takes
any input size (``dynamic_img_size``, ``dynamic_img_pad``): detection transforms resize every image differently."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

from ..weights import load_weights
from .pyramid import SimpleFeaturePyramid, TopBlock

__all__ = ["ViTDetBackbone", "create_backbone", "freeze_trunk", "load_backbone_weights"]

Weights = str | os.PathLike | Mapping[str, torch.Tensor]


class ViTDetBackbone(nn.Module):
    """A plain ViT trunk (one stride-16 map) as a feature pyramid for torchvision's detectors, whose whole contract
    is this: ``forward`` returns an ``OrderedDict`` of NCHW maps, and ``out_channels`` (every level's channels).

    Args:
        trunk: a timm ViT-like model with ``forward_intermediates`` (TokenFormer or timm ``vit_*``) built with
            ``dynamic_img_size=True``; ``backbone.trunk.grow(...)`` grows a TokenFormer.
        feature_index: the block whose output feeds the pyramid (negative counts from the end; ViTDet: the last).
        norm_features: apply the trunk's final norm to it (TokenFormer's affine-free block norms leave it unscaled).
        out_channels, scale_factors, top_block: see :class:`SimpleFeaturePyramid` (``backbone.pyramid``), whose
            ``names``, ``level_names`` and ``strides`` (w.r.t. the padded input) the backbone shares.
    """

    def __init__(self, trunk: nn.Module, out_channels: int = 256, feature_index: int = -1, norm_features: bool = True,
                 scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), top_block: TopBlock = "pool") -> None:
        super().__init__()
        if not hasattr(trunk, "forward_intermediates") or not hasattr(trunk, "blocks"):
            raise TypeError(f"trunk must be a timm ViT-like model with forward_intermediates, got {type(trunk)}")
        if not getattr(trunk, "dynamic_img_size", False):
            raise ValueError("the trunk must be built with dynamic_img_size=True: detection inputs vary in size")
        depth = len(trunk.blocks)
        if not -depth <= feature_index < depth:
            raise ValueError(f"feature_index {feature_index} is out of range for a trunk with {depth} blocks")
        if (patch := tuple(trunk.patch_embed.patch_size))[0] != patch[1]:
            raise ValueError(f"the pyramid needs a square patch, got patch size {patch}")
        self.trunk, self.feature_index, self.norm_features = trunk, feature_index % depth, norm_features
        self.pyramid = SimpleFeaturePyramid(trunk.embed_dim, patch[0], out_channels, scale_factors, top_block)
        self.out_channels = out_channels
        self.names, self.level_names, self.strides = self.pyramid.names, self.pyramid.level_names, self.pyramid.strides

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The single NCHW map (stride = patch size) that feeds the pyramid."""
        return self.trunk.forward_intermediates(x, indices=[self.feature_index], norm=self.norm_features,
                                                stop_early=True, output_fmt="NCHW", intermediates_only=True)[0]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.forward_trunk(x))


def load_backbone_weights(trunk: nn.Module, weights: Weights) -> None:
    """Load classifier weights (any :func:`~tokenformer_vision.weights.load_weights` source) into a detection trunk,
    in place, without the head, growing a TokenFormer to the saved token counts."""
    load_weights(trunk, weights, head="drop", grow=True)


def freeze_trunk(trunk: nn.Module, trainable_layers: int | None) -> None:
    """Train only the last ``trainable_layers`` blocks and the final norm (None or ``depth``: all, 0: none); the
    stem (patch embedding, cls token, position embedding) trains only when every block does."""
    depth = len(trunk.blocks)
    trainable_layers = depth if trainable_layers is None else trainable_layers
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= depth:
        raise ValueError(f"trainable_layers must be an int in [0, {depth}] (the trunk's depth) or None, "
                         f"got {trainable_layers!r}")
    for name, param in trunk.named_parameters():
        if name.startswith("blocks."):
            train = int(name.split(".")[1]) >= depth - trainable_layers
        elif name.startswith(("norm.", "fc_norm.", "head.")):
            train = trainable_layers > 0
        else:
            train = trainable_layers == depth
        param.requires_grad_(train)


def create_backbone(backbone_name: str = "tokenformer_base", backbone_weights: Weights | None = None,
                    trainable_layers: int | None = None, grad_checkpointing: bool = False, *, out_channels: int = 256,
                    feature_index: int = -1, norm_features: bool = True,
                    scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5), top_block: TopBlock = "pool",
                    **model_kwargs: Any) -> ViTDetBackbone:
    """A :class:`ViTDetBackbone` (its keyword options) on the timm model ``backbone_name``, with
    ``backbone_weights`` (:func:`load_backbone_weights`; None: random init) and ``trainable_layers``
    (:func:`freeze_trunk`); ``grad_checkpointing`` recomputes the blocks in the backward pass (less memory on large
    images), and ``model_kwargs`` go to ``timm.create_model`` (``depth``, ``attn_tokens``, ``img_size``, ...)."""
    for key in ("num_classes", "dynamic_img_size", "features_only", "pretrained"):
        if key in model_kwargs:
            raise ValueError(f"{key!r} is set by the detection backbone and cannot be passed to the trunk")
    trunk = timm.create_model(backbone_name, pretrained=False, num_classes=0, global_pool="", dynamic_img_size=True,
                              **{"dynamic_img_pad": True, **model_kwargs})
    if backbone_weights is not None:
        load_backbone_weights(trunk, backbone_weights)
    # the detector never runs the blocks after the chosen one, nor the head (nor the final norm if unused)
    trunk.prune_intermediate_layers([feature_index], prune_norm=not norm_features, prune_head=True)
    freeze_trunk(trunk, trainable_layers)
    trunk.set_grad_checkpointing(grad_checkpointing)
    return ViTDetBackbone(trunk, out_channels, -1, norm_features, scale_factors, top_block)
