"""Multi-scale detection backbone: a timm ViT / TokenFormer trunk + ViTDet's simple feature pyramid.

:class:`ViTDetBackbone` returns an ``OrderedDict[str, Tensor]`` of NCHW maps and has ``out_channels``, which is
the whole contract of torchvision's detectors (``FasterRCNN``, ``MaskRCNN``, ``RetinaNet``). The trunk takes any
input size (``dynamic_img_size``: the position embedding is resampled on the fly; ``dynamic_img_pad``: sizes that
are not multiples of the patch are padded), because detection transforms resize every image differently.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import timm
import torch
from torch import nn

from ..checkpoint import adapt_state_dict, load_strict, load_weights
from .pyramid import SimpleFeaturePyramid, TopBlock

__all__ = ["ViTDetBackbone", "create_backbone", "freeze_trunk", "load_backbone_weights"]

class ViTDetBackbone(nn.Module):
    """A plain ViT trunk (one stride-16 map) turned into a feature pyramid for torchvision detectors.

    Args:
        trunk: a timm ViT-like model with ``forward_intermediates`` (TokenFormer or timm ``vit_*``) built with
            ``dynamic_img_size=True``.
        out_channels: channels of every pyramid level.
        feature_index: the block whose output feeds the pyramid (negative counts from the end; ViTDet uses the
            last one).
        norm_features: apply the trunk's final LayerNorm to that output. TokenFormer's blocks use affine-free
            norms, so the raw residual stream is unnormalised; the final norm (trained with the classifier) puts
            it back at unit scale before the pyramid.
        scale_factors, top_block: pyramid layout, see :class:`SimpleFeaturePyramid`.

    Attributes:
        trunk: the ViT (grow it with ``backbone.trunk.grow(...)`` for a TokenFormer).
        pyramid: the :class:`SimpleFeaturePyramid`.
        out_channels: channels of every output map (read by torchvision's detectors).
    """

    def __init__(
        self,
        trunk: nn.Module,
        out_channels: int = 256,
        feature_index: int = -1,
        norm_features: bool = True,
        scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
        top_block: TopBlock = "pool",
    ) -> None:
        super().__init__()
        if not hasattr(trunk, "forward_intermediates") or not hasattr(trunk, "blocks"):
            raise TypeError(f"trunk must be a timm ViT-like model with forward_intermediates, got {type(trunk)}")
        if not getattr(trunk, "dynamic_img_size", False):
            raise ValueError("the trunk must be built with dynamic_img_size=True: detection inputs vary in size")
        depth = len(trunk.blocks)
        if not -depth <= feature_index < depth:
            raise ValueError(f"feature_index {feature_index} is out of range for a trunk with {depth} blocks")
        patch = tuple(trunk.patch_embed.patch_size)
        if patch[0] != patch[1]:
            raise ValueError(f"the pyramid needs a square patch, got patch size {patch}")
        self.trunk = trunk
        self.feature_index = feature_index % depth
        self.norm_features = norm_features
        self.pyramid = SimpleFeaturePyramid(
            trunk.embed_dim, patch[0], out_channels, scale_factors=scale_factors, top_block=top_block
        )
        self.out_channels = out_channels

    @property
    def names(self) -> list[str]:
        """Names of the output maps, fine to coarse."""
        return self.pyramid.names

    @property
    def level_names(self) -> list[str]:
        """Names of the output maps without the extra top levels (what RoI poolers should read)."""
        return self.pyramid.level_names

    @property
    def strides(self) -> list[int | float]:
        """Stride of each output map w.r.t. the (padded) input image."""
        return self.pyramid.strides

    def forward_trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The single NCHW map (stride = patch size) that feeds the pyramid."""
        (feature,) = self.trunk.forward_intermediates(
            x, indices=[self.feature_index], norm=self.norm_features, stop_early=True, output_fmt="NCHW",
            intermediates_only=True,
        )
        return feature

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.pyramid(self.forward_trunk(x))


# --------------------------------------------------------------------------------------------- weights
def load_backbone_weights(trunk: nn.Module, weights: str | os.PathLike | Mapping[str, torch.Tensor]) -> None:
    """Load classifier weights into a detection trunk (in place), dropping the classifier head.

    ``weights``: a Lightning checkpoint of ImageClassifier (its EMA weights when it kept them), a ``.pth`` state
    dict or ``.safetensors`` (:mod:`tokenformer_vision.checkpoint`), or a state dict. The trunk's family adapts
    them (a TokenFormer trunk grows to the saved token counts; the position embedding is resampled). Weights of
    another model raise a ValueError naming the difference (embed_dim, depth, token counts).
    """
    source = str(weights) if not isinstance(weights, Mapping) else "the given state dict"
    state = load_weights(weights) if not isinstance(weights, Mapping) else dict(weights)
    if not any(k.startswith("blocks.") for k in state):
        raise ValueError(f"{source} holds no transformer blocks ('blocks.N.*' keys): not weights of a ViT trunk")
    classifier = (getattr(trunk, "pretrained_cfg", None) or {}).get("classifier", "head")
    heads = tuple(f"{h}." for h in ((classifier,) if isinstance(classifier, str) else classifier))
    state = adapt_state_dict(trunk, {k: v for k, v in state.items() if not k.startswith(heads)})
    own_head = {k: v for k, v in trunk.state_dict().items() if k.startswith(heads)}  # after any growth
    load_strict(trunk, {**state, **own_head}, source)


# ------------------------------------------------------------------------------------------- trainability
def freeze_trunk(trunk: nn.Module, trainable_layers: int | None) -> None:
    """Train only the last ``trainable_layers`` blocks (and the final norm); None or ``depth`` trains all.

    The stem (patch embedding, cls token, position embedding) is trained only when every block is; with 0
    the whole trunk is frozen and only the pyramid and the detector heads learn.
    """
    depth = len(trunk.blocks)
    if trainable_layers is None:
        trainable_layers = depth
    if not isinstance(trainable_layers, int) or not 0 <= trainable_layers <= depth:
        raise ValueError(f"trainable_layers must be an int in [0, {depth}] (the trunk's depth) or None, "
                         f"got {trainable_layers!r}")
    first = depth - trainable_layers
    for name, param in trunk.named_parameters():
        if name.startswith("blocks."):
            train = int(name.split(".")[1]) >= first
        elif name.startswith(("norm.", "fc_norm.", "head.")):
            train = trainable_layers > 0
        else:
            train = trainable_layers == depth
        param.requires_grad_(train)


# -------------------------------------------------------------------------------------------------- factory
def create_backbone(
    backbone_name: str = "tokenformer_base",
    backbone_weights: str | os.PathLike | Mapping[str, torch.Tensor] | None = None,
    trainable_layers: int | None = None,
    grad_checkpointing: bool = False,
    *,
    out_channels: int = 256,
    feature_index: int = -1,
    norm_features: bool = True,
    scale_factors: Sequence[float] = (4.0, 2.0, 1.0, 0.5),
    top_block: TopBlock = "pool",
    **model_kwargs: Any,
) -> ViTDetBackbone:
    """Build a :class:`ViTDetBackbone` on the timm model ``backbone_name`` (``tokenformer_*`` or a timm ``vit_*``).

    Args:
        backbone_name: timm model name.
        backbone_weights: classifier weights (Lightning ``.ckpt``, ``.pth``, ``.safetensors`` or a state dict);
            None keeps the random init.
        trainable_layers: number of last blocks to train (None: all; 0: frozen trunk), see :func:`freeze_trunk`.
        grad_checkpointing: recompute the blocks in the backward pass (large images, less memory).
        out_channels, feature_index, norm_features, scale_factors, top_block: see :class:`ViTDetBackbone`.
        **model_kwargs: passed to ``timm.create_model`` (e.g. ``depth``, ``attn_tokens``, ``img_size``,
            ``drop_path_rate``).
    """
    for key in ("num_classes", "dynamic_img_size", "features_only", "pretrained"):
        if key in model_kwargs:
            raise ValueError(f"{key!r} is set by the detection backbone and cannot be passed to the trunk")
    model_kwargs.setdefault("dynamic_img_pad", True)
    trunk = timm.create_model(backbone_name, pretrained=False, num_classes=0, global_pool="",
                              dynamic_img_size=True, **model_kwargs)
    if backbone_weights is not None:
        load_backbone_weights(trunk, backbone_weights)
    # the detector never runs the blocks after the chosen one, nor the head (nor the final norm if unused)
    trunk.prune_intermediate_layers([feature_index], prune_norm=not norm_features, prune_head=True)
    freeze_trunk(trunk, trainable_layers)
    if grad_checkpointing:
        trunk.set_grad_checkpointing(True)
    return ViTDetBackbone(trunk, out_channels=out_channels, feature_index=-1, norm_features=norm_features,
                          scale_factors=scale_factors, top_block=top_block)
