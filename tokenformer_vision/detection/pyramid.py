"""ViTDet's simple feature pyramid (docs/architecture.md, References): multi-scale maps from ONE stride-16 map.

Stride 4 comes from two 2×2 transposed convs, 8 from one, 16 is the map itself and 32 a 2×2 max-pool. The extra top
levels are torchvision's FPN blocks, so the output is what torchvision's detectors expect from ``BackboneWithFPN``.
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
_TOP_NAMES = {"pool": ["pool"], "p6p7": ["p6", "p7"], None: []}


def _level(scale: float, dim: int, out_channels: int) -> nn.Sequential:
    """One level: resample by ``scale``, then 1×1 and 3×3 convs, each with a LayerNorm2d (no conv bias, as ViTDet)."""
    up = lambda cin: nn.ConvTranspose2d(cin, cin // 2, kernel_size=2, stride=2)  # halves the channels
    if scale == 4.0:
        rescale = nn.Sequential(up(dim), LayerNorm2d(dim // 2), nn.GELU(), up(dim // 2))
    else:
        rescale = up(dim) if scale == 2.0 else nn.Identity() if scale == 1.0 else nn.MaxPool2d(kernel_size=2, stride=2)
    width = {4.0: dim // 4, 2.0: dim // 2}.get(scale, dim)  # channels after the transposed convs
    return nn.Sequential(rescale, nn.Conv2d(width, out_channels, kernel_size=1, bias=False), LayerNorm2d(out_channels),
                         nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
                         LayerNorm2d(out_channels))


class SimpleFeaturePyramid(nn.Module):
    """Multi-scale NCHW pyramid from one feature map of ``in_channels`` (the ViT width) at stride ``in_stride``.

    Args:
        scale_factors: each level's resampling of the input, fine to coarse, among ``(4.0, 2.0, 1.0, 0.5)``.
        top_block: ``'pool'`` adds a stride-2 subsampled copy of the coarsest level named ``'pool'`` (the R-CNN RPN
            level), ``'p6p7'`` two stride-2 3×3 convs named ``'p6'``, ``'p7'`` (RetinaNet), None nothing.

    Levels are named ``'0'``, ``'1'``, ... like torchvision's FPN (its default RoI poolers work unchanged); ``names``
    and ``strides`` list every output, ``level_names`` those without the top block (the RoI pooling levels)."""

    def __init__(self, in_channels: int, in_stride: int = 16, out_channels: int = 256,
                 scale_factors: Sequence[float] = _SCALES, top_block: TopBlock = "pool") -> None:
        super().__init__()
        scales = tuple(float(s) for s in scale_factors)
        if unknown := [s for s in scales if s not in _SCALES]:
            raise ValueError(f"unsupported scale factors {unknown}; choose from {list(_SCALES)}")
        if not scales or list(scales) != sorted(set(scales), reverse=True):
            raise ValueError(f"scale_factors must be one or more distinct levels ordered fine to coarse, got {scales}")
        if in_channels % 4:
            raise ValueError(f"in_channels must be divisible by 4 (the stride-4 level uses in/4), got {in_channels}")
        if top_block not in _TOP_NAMES:
            raise ValueError(f"top_block must be 'pool', 'p6p7' or None, got {top_block!r}")
        self.in_channels, self.out_channels, self.scale_factors = in_channels, out_channels, scales
        self.stages = nn.ModuleList(_level(scale, in_channels, out_channels) for scale in scales)
        self.top_block = (LastLevelMaxPool() if top_block == "pool"
                          else LastLevelP6P7(out_channels, out_channels) if top_block == "p6p7" else None)
        self.level_names = [str(i) for i in range(len(scales))]
        self.names = self.level_names + _TOP_NAMES[top_block]
        strides = [in_stride / s for s in scales]
        strides += [strides[-1] * 2 ** (i + 1) for i in range(len(_TOP_NAMES[top_block]))]
        self.strides = [int(s) if s.is_integer() else s for s in strides]

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected an NCHW map with {self.in_channels} channels, got shape {tuple(x.shape)}")
        results, names = [stage(x) for stage in self.stages], list(self.level_names)  # the top block appends
        if self.top_block is not None:
            results, names = self.top_block(results, results, names)
        return OrderedDict(zip(names, results, strict=True))


def anchor_sizes(strides: Sequence[float], size_per_stride: float, octaves: int = 1) -> tuple[tuple[int, ...], ...]:
    """Anchor sizes per level, ``size_per_stride · stride · 2^(k/octaves)`` for k < octaves: 8 on strides 4..64
    (R-CNN RPN) or 4 with 3 octaves on 8..128 (RetinaNet) give torchvision's default anchors (32..512)."""
    return tuple(tuple(int(size_per_stride * s * 2 ** (k / octaves)) for k in range(octaves)) for s in strides)
