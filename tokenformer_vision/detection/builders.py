"""torchvision detectors (Faster R-CNN, Mask R-CNN, RetinaNet) on a TokenFormer (or timm ViT) backbone."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torchvision.models.detection import FasterRCNN, MaskRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign

from .backbone import Weights, create_backbone
from .pyramid import anchor_sizes

__all__ = ["fasterrcnn_tokenformer", "maskrcnn_tokenformer", "retinanet_tokenformer"]


def _build(detector: type, backbone_name: str, num_classes: int, backbone_weights: Weights | None,
           trainable_layers: int | None, grad_checkpointing: bool, backbone_kwargs: Mapping[str, Any] | None,
           kwargs: dict[str, Any]) -> Any:
    """``detector`` on :func:`create_backbone`, with anchors, RoI poolers and image mean/std from the backbone."""
    retina = detector is RetinaNet
    options = {**(dict(scale_factors=(2.0, 1.0, 0.5), top_block="p6p7") if retina else {}), **(backbone_kwargs or {})}
    backbone = create_backbone(backbone_name, backbone_weights, trainable_layers, grad_checkpointing, **options)
    cfg = getattr(backbone.trunk, "pretrained_cfg", None) or {}
    if "mean" in cfg and "std" in cfg:  # normalise inputs as the trunk was (pre)trained
        kwargs = {"image_mean": list(cfg["mean"]), "image_std": list(cfg["std"]), **kwargs}
    anchors = "anchor_generator" if retina else "rpn_anchor_generator"
    if kwargs.get(anchors) is None:
        # torchvision's default anchors (32..512): 4 × stride at 3 octaves (RetinaNet), 8 × stride (R-CNN RPN)
        sizes = anchor_sizes(backbone.strides, 4, octaves=3) if retina else anchor_sizes(backbone.strides, 8)
        kwargs[anchors] = AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes))
    if (levels := len(getattr(kwargs[anchors], "sizes", ()))) and levels != len(backbone.names):
        raise ValueError(f"{anchors} has anchors for {levels} feature maps but the backbone returns "
                         f"{len(backbone.names)} ({backbone.names})")
    # the R-CNN heads pool from the pyramid levels, not from the extra RPN-only top level
    pools = {"box_roi_pool": 7, "mask_roi_pool": 14} if detector is MaskRCNN else {} if retina else {"box_roi_pool": 7}
    for key, size in pools.items():
        if kwargs.get(key) is None:
            kwargs[key] = MultiScaleRoIAlign(backbone.level_names, output_size=size, sampling_ratio=2)
    return detector(backbone, num_classes=num_classes, **kwargs)


def fasterrcnn_tokenformer(backbone_name: str = "tokenformer_base", num_classes: int = 91,
                           backbone_weights: Weights | None = None, trainable_layers: int | None = None,
                           grad_checkpointing: bool = False, *, backbone_kwargs: Mapping[str, Any] | None = None,
                           **kwargs: Any) -> FasterRCNN:
    """Faster R-CNN on a TokenFormer trunk with a ViTDet simple feature pyramid (strides 4–32 + pooled 64).

    Args:
        backbone_name: timm model name of the trunk (``tokenformer_*``, or a timm ``vit_*`` for comparison).
        num_classes: detector classes including background.
        backbone_weights: classifier weights for the trunk (Lightning ``.ckpt``, ``.pth``, ``.safetensors``).
        trainable_layers: number of last trunk blocks to train (None: all, 0: frozen trunk).
        grad_checkpointing: recompute trunk blocks in the backward pass to save memory on large images.
        backbone_kwargs: options of :func:`~tokenformer_vision.detection.create_backbone` (``out_channels``,
            ``scale_factors``, ...) and of the timm trunk (``depth``, ``attn_tokens``, ...).
        **kwargs: to ``torchvision.models.detection.FasterRCNN`` (``min_size``, ``box_score_thresh``, ...).
            Anchors, RoI pooler and image mean/std default to the backbone's.
    """
    return _build(FasterRCNN, backbone_name, num_classes, backbone_weights, trainable_layers, grad_checkpointing,
                  backbone_kwargs, kwargs)


def maskrcnn_tokenformer(backbone_name: str = "tokenformer_base", num_classes: int = 91,
                         backbone_weights: Weights | None = None, trainable_layers: int | None = None,
                         grad_checkpointing: bool = False, *, backbone_kwargs: Mapping[str, Any] | None = None,
                         **kwargs: Any) -> MaskRCNN:
    """Mask R-CNN on a TokenFormer trunk; arguments as :func:`fasterrcnn_tokenformer` (kwargs go to ``MaskRCNN``)."""
    return _build(MaskRCNN, backbone_name, num_classes, backbone_weights, trainable_layers, grad_checkpointing,
                  backbone_kwargs, kwargs)


def retinanet_tokenformer(backbone_name: str = "tokenformer_base", num_classes: int = 91,
                          backbone_weights: Weights | None = None, trainable_layers: int | None = None,
                          grad_checkpointing: bool = False, *, backbone_kwargs: Mapping[str, Any] | None = None,
                          **kwargs: Any) -> RetinaNet:
    """RetinaNet on a TokenFormer trunk; arguments as :func:`fasterrcnn_tokenformer` (kwargs go to ``RetinaNet``).
    Its pyramid: strides 8/16/32 plus P6/P7 convs (64/128) with torchvision's anchors (4 × stride at 3 octaves);
    ``backbone_kwargs=dict(scale_factors=..., top_block=...)`` changes the layout."""
    return _build(RetinaNet, backbone_name, num_classes, backbone_weights, trainable_layers, grad_checkpointing,
                  backbone_kwargs, kwargs)
