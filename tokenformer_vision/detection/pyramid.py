"""ViTDet's simple feature pyramid: a multi-scale pyramid built from ONE single-stride ViT map.

Li et al., "Exploring Plain Vision Transformer Backbones for Object Detection" (ViTDet, arXiv 2203.16527):
from the last stride-16 map, stride 4 comes from two 2×2 transposed convs, stride 8 from one, stride 16 is the
map itself and stride 32 a 2×2 max-pool; each level then gets a 1×1 conv (to ``out_channels``) and a 3×3 conv,
each followed by a channel LayerNorm. The extra top levels reuse torchvision's FPN blocks, so the output is
exactly what torchvision's detectors expect from ``BackboneWithFPN``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import torch
from timm.layers import LayerNorm2d
from torch import nn
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

__all__ = ["SimpleFeaturePyramid", "anchor_sizes"]

TopBlock = Literal["pool", "p6p7"] | None
_SCALES = (4.0, 2.0, 1.0, 0.5)


def _rescale(scale: float, dim: int) -> tuple[nn.Module, int]:
    """The resampling stage of one level (ViTDet) and its output channel count."""
    if scale == 4.0:
        return nn.Sequential(
            nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2),
            LayerNorm2d(dim // 2),
            nn.GELU(),
            nn.ConvTranspose2d(dim // 2, dim // 4, kernel_size=2, stride=2),
        ), dim // 4
    if scale == 2.0:
        return nn.ConvTranspose2d(dim, dim // 2, kernel_size=2, stride=2), dim // 2
    if scale == 1.0:
        return nn.Identity(), dim
    return nn.MaxPool2d(kernel_size=2, stride=2), dim


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale NCHW pyramid from one single-stride feature map (ViTDet).

    Args:
        in_channels: channels of the input map (the ViT width).
        in_stride: stride of the input map w.r.t. the image (the patch size, 16).
        out_channels: channels of every output level.
        scale_factors: resampling of each level relative to the input map, from fine to coarse; a subset of
            ``(4.0, 2.0, 1.0, 0.5)`` (strides 4/8/16/32 for a stride-16 input).
        top_block: ``'pool'`` adds a stride-2 subsampled copy of the coarsest level named ``'pool'`` (Faster /
            Mask R-CNN's RPN level), ``'p6p7'`` adds two stride-2 3×3 convs named ``'p6'``, ``'p7'`` (RetinaNet),
            None adds nothing.

    The levels are named ``'0'``, ``'1'``, ... (fine to coarse) like torchvision's FPN, so torchvision's default
    RoI poolers (``featmap_names=['0', '1', '2', '3']``) work unchanged with the default scale factors.
    """

    def __init__(
        self,
        in_channels: int,
        in_stride: int = 16,
        out_channels: int = 256,
        scale_factors: Sequence[float] = _SCALES,
        top_block: TopBlock = "pool",
    ) -> None:
        super().__init__()
        scale_factors = tuple(float(s) for s in scale_factors)
        if not scale_factors:
            raise ValueError("scale_factors must name at least one level")
        unknown = [s for s in scale_factors if s not in _SCALES]
        if unknown:
            raise ValueError(f"unsupported scale factors {unknown}; choose from {list(_SCALES)}")
        if list(scale_factors) != sorted(set(scale_factors), reverse=True):
            raise ValueError(f"scale_factors must be distinct and ordered fine to coarse, got {scale_factors}")
        if in_channels % 4:
            raise ValueError(f"in_channels must be divisible by 4 (the stride-4 level uses in/4), got {in_channels}")
        if top_block not in ("pool", "p6p7", None):
            raise ValueError(f"top_block must be 'pool', 'p6p7' or None, got {top_block!r}")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.scale_factors = scale_factors
        self.top_block_name = top_block

        self.stages = nn.ModuleList()
        for scale in scale_factors:
            rescale, dim = _rescale(scale, in_channels)
            self.stages.append(nn.Sequential(
                rescale,
                # no conv bias: the LayerNorm that follows re-centres anyway (as in ViTDet)
                nn.Conv2d(dim, out_channels, kernel_size=1, bias=False),
                LayerNorm2d(out_channels),
                nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                LayerNorm2d(out_channels),
            ))
        self.top_block: nn.Module | None = None
        top_names: list[str] = []
        if top_block == "pool":
            self.top_block, top_names = LastLevelMaxPool(), ["pool"]
        elif top_block == "p6p7":
            self.top_block, top_names = LastLevelP6P7(out_channels, out_channels), ["p6", "p7"]
        self.names = [str(i) for i in range(len(scale_factors))] + top_names
        coarsest = in_stride / scale_factors[-1]
        self.strides = [in_stride / s for s in scale_factors] + [coarsest * 2 ** (i + 1) for i in range(len(top_names))]
        self.strides = [int(s) if float(s).is_integer() else s for s in self.strides]

    @property
    def level_names(self) -> list[str]:
        """Names of the pyramid levels that are not extra top levels (the RoI pooling levels)."""
        return self.names[: len(self.scale_factors)]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an NCHW map with {self.in_channels} channels, got shape {tuple(x.shape)}")
        results = [stage(x) for stage in self.stages]
        names = list(self.level_names)
        if self.top_block is not None:
            results, names = self.top_block(results, results, names)
        return OrderedDict(zip(names, results, strict=True))


def anchor_sizes(strides: Sequence[float], size_per_stride: float, octaves: int = 1) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level: ``size_per_stride · stride`` times ``2^(k/octaves)`` for k < octaves.

    With ``size_per_stride`` 8 (R-CNN RPN) on strides 4..64, or 4 with 3 octaves (RetinaNet) on strides 8..128,
    this reproduces torchvision's default anchors (32..512).
    """
    return tuple(
        tuple(int(size_per_stride * s * 2 ** (k / octaves)) for k in range(octaves)) for s in strides
    )
