"""torchvision detectors (Faster R-CNN, Mask R-CNN, RetinaNet) on a TokenFormer (or timm ViT) backbone."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from .backbone import ViTDetBackbone, create_backbone
from .pyramid import anchor_sizes

__all__ = ["fasterrcnn_tokenformer", "maskrcnn_tokenformer", "retinanet_tokenformer"]

Weights = str | os.PathLike | Mapping[str, torch.Tensor] | None
_ASPECT_RATIOS = (0.5, 1.0, 2.0)


def _normalization(backbone: ViTDetBackbone, kwargs: dict[str, Any]) -> None:
    """Normalise detector inputs with the mean/std the trunk was (pre)trained with."""
    cfg = getattr(backbone.trunk, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:
        kwargs.setdefault("image_mean", list(cfg["mean"]))
        kwargs.setdefault("image_std", list(cfg["std"]))


def _check_anchors(generator: AnchorGenerator, backbone: ViTDetBackbone, arg: str) -> None:
    levels = len(getattr(generator, "sizes", ()))
    if levels and levels != len(backbone.names):
        raise ValueError(f"{arg} has anchors for {levels} feature maps but the backbone returns "
                         f"{len(backbone.names)} ({backbone.names})")


def _rcnn_kwargs(backbone: ViTDetBackbone, kwargs: dict[str, Any], mask: bool) -> dict[str, Any]:
    _normalization(backbone, kwargs)
    if kwargs.get("rpn_anchor_generator") is None:
        # 8 × stride: torchvision's defaults (32..512) on the default strides 4..64
        sizes = anchor_sizes(backbone.strides, 8)
        kwargs["rpn_anchor_generator"] = AnchorGenerator(sizes, (_ASPECT_RATIOS,) * len(sizes))
    _check_anchors(kwargs["rpn_anchor_generator"], backbone, "rpn_anchor_generator")
    # the R-CNN heads pool from the pyramid levels, not from the extra RPN-only top level
    if kwargs.get("box_roi_pool") is None:
        kwargs["box_roi_pool"] = MultiScaleRoIAlign(backbone.level_names, output_size=7, sampling_ratio=2)
    if mask and kwargs.get("mask_roi_pool") is None:
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(backbone.level_names, output_size=14, sampling_ratio=2)
    return kwargs


def _backbone(backbone_name: str, backbone_weights: Weights, trainable_layers: int | None,
              grad_checkpointing: bool, backbone_kwargs: Mapping[str, Any] | None,
              defaults: Mapping[str, Any] | None = None) -> ViTDetBackbone:
    options = {**(defaults or {}), **(backbone_kwargs or {})}
    return create_backbone(backbone_name, backbone_weights, trainable_layers, grad_checkpointing, **options)


def fasterrcnn_tokenformer(
    backbone_name: str = "tokenformer_base",
    num_classes: int = 91,
    backbone_weights: Weights = None,
    trainable_layers: int | None = None,
    grad_checkpointing: bool = False,
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> FasterRCNN:
    """Faster R-CNN on a TokenFormer trunk with a ViTDet simple feature pyramid (strides 4–32 + pooled 64).

    Args:
        backbone_name: timm model name of the trunk (``tokenformer_*``, or a timm ``vit_*`` for comparison).
        num_classes: detector classes including background.
        backbone_weights: classifier weights for the trunk (Lightning ``.ckpt``, ``.pth``, ``.safetensors``).
        trainable_layers: number of last trunk blocks to train (None: all, 0: frozen trunk).
        grad_checkpointing: recompute trunk blocks in the backward pass to save memory on large images.
        backbone_kwargs: options of :func:`~tokenformer_vision.detection.create_backbone` (``out_channels``,
            ``feature_index``, ``scale_factors``, ...) and of the timm trunk (``depth``, ``attn_tokens``, ...).
        **kwargs: passed to ``torchvision.models.detection.FasterRCNN`` (``min_size``, ``max_size``,
            ``box_score_thresh``, ...). Anchors, RoI pooler and image mean/std default to the backbone's.
    """
    backbone = _backbone(backbone_name, backbone_weights, trainable_layers, grad_checkpointing, backbone_kwargs)
    return FasterRCNN(backbone, num_classes=num_classes, **_rcnn_kwargs(backbone, kwargs, mask=False))


def maskrcnn_tokenformer(
    backbone_name: str = "tokenformer_base",
    num_classes: int = 91,
    backbone_weights: Weights = None,
    trainable_layers: int | None = None,
    grad_checkpointing: bool = False,
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> MaskRCNN:
    """Mask R-CNN on a TokenFormer trunk; arguments as :func:`fasterrcnn_tokenformer` (kwargs go to ``MaskRCNN``)."""
    backbone = _backbone(backbone_name, backbone_weights, trainable_layers, grad_checkpointing, backbone_kwargs)
    return MaskRCNN(backbone, num_classes=num_classes, **_rcnn_kwargs(backbone, kwargs, mask=True))


def retinanet_tokenformer(
    backbone_name: str = "tokenformer_base",
    num_classes: int = 91,
    backbone_weights: Weights = None,
    trainable_layers: int | None = None,
    grad_checkpointing: bool = False,
    *,
    backbone_kwargs: Mapping[str, Any] | None = None,
    **kwargs: Any,
) -> RetinaNet:
    """RetinaNet on a TokenFormer trunk; arguments as :func:`fasterrcnn_tokenformer` (kwargs go to ``RetinaNet``).

    The pyramid defaults to RetinaNet's levels, strides 8/16/32 plus P6/P7 convs (64/128), with anchors of
    4 × stride at three octave scales (torchvision's RetinaNet anchors, 32..512). Override the layout with
    ``backbone_kwargs=dict(scale_factors=..., top_block=...)``; the anchors follow the backbone's strides.
    """
    backbone = _backbone(backbone_name, backbone_weights, trainable_layers, grad_checkpointing, backbone_kwargs,
                         defaults=dict(scale_factors=(2.0, 1.0, 0.5), top_block="p6p7"))
    _normalization(backbone, kwargs)
    if kwargs.get("anchor_generator") is None:
        sizes = anchor_sizes(backbone.strides, 4, octaves=3)
        kwargs["anchor_generator"] = AnchorGenerator(sizes, (_ASPECT_RATIOS,) * len(sizes))
    _check_anchors(kwargs["anchor_generator"], backbone, "anchor_generator")
    return RetinaNet(backbone, num_classes=num_classes, **kwargs)
