"""albumentations transforms: RGB ``uint8 [H, W, 3]`` numpy arrays in, normalised ``float32 [3, H, W]`` tensors out;
preprocessing settings from timm's pretrained cfgs."""

from __future__ import annotations

import functools
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models import get_pretrained_cfg

__all__ = ["build_transforms", "reseed_transform"]

# timm / PIL interpolation names -> OpenCV flags; timm's "random" (bilinear or bicubic per image) becomes bilinear
_INTERPOLATIONS = {"nearest": cv2.INTER_NEAREST, "bilinear": cv2.INTER_LINEAR, "linear": cv2.INTER_LINEAR,
                   "bicubic": cv2.INTER_CUBIC, "cubic": cv2.INTER_CUBIC, "area": cv2.INTER_AREA,
                   "box": cv2.INTER_AREA, "lanczos": cv2.INTER_LANCZOS4, "random": cv2.INTER_LINEAR}


def interpolation_flag(name: str) -> int:
    """OpenCV interpolation flag for a timm/PIL interpolation name (``'bicubic'``, ``'bilinear'``, ...)."""
    if name.lower() not in _INTERPOLATIONS:
        raise ValueError(f"unknown interpolation {name!r}; expected one of {sorted(_INTERPOLATIONS)}")
    return _INTERPOLATIONS[name.lower()]


def _size_hw(img_size: int | Sequence[int]) -> tuple[int, int]:
    size = (img_size, img_size) if isinstance(img_size, int) else tuple(int(s) for s in img_size)
    size = size[1:] if len(size) == 3 else size  # timm's (C, H, W) input_size
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"img_size must be a positive int or (height, width), got {img_size!r}")
    return size  # type: ignore[return-value]


@dataclass(frozen=True)
class TransformConfig:
    """Resolved preprocessing settings (the subset of timm's data config the transforms need)."""

    img_size: tuple[int, int]
    crop_pct: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str


def resolve_transform_config(model_name: str | None = None, img_size: int | Sequence[int] | None = None,
                             crop_pct: float | None = None, mean: Sequence[float] | None = None,
                             std: Sequence[float] | None = None, interpolation: str | None = None) -> TransformConfig:
    """Explicit arguments, else the timm pretrained cfg of ``model_name``, else ImageNet defaults (224², crop 0.875,
    bicubic, ImageNet mean/std). Checks the interpolation name; :func:`build_transforms` checks the other values."""
    cfg: dict = {}
    if model_name is not None:  # tokenformer_* cfgs are known: importing this module imported the package
        if (pretrained_cfg := get_pretrained_cfg(model_name)) is None:
            raise ValueError(f"timm knows no model (pretrained cfg) named {model_name!r}")
        cfg = resolve_data_config(pretrained_cfg=pretrained_cfg.to_dict())
    interpolation = interpolation if interpolation is not None else cfg.get("interpolation", "bicubic")
    interpolation_flag(interpolation)
    return TransformConfig(
        _size_hw(img_size if img_size is not None else cfg.get("input_size", 224)),
        float(crop_pct if crop_pct is not None else cfg.get("crop_pct", 0.875)),
        tuple(float(m) for m in (mean if mean is not None else cfg.get("mean", IMAGENET_DEFAULT_MEAN))),
        tuple(float(s) for s in (std if std is not None else cfg.get("std", IMAGENET_DEFAULT_STD))),
        interpolation)  # type: ignore[arg-type]


def _apply_lut(image: np.ndarray, lut: np.ndarray, **kwargs) -> np.ndarray:
    return cv2.LUT(image, lut)


def rand_augment_policy(num_ops: int = 2, magnitude: float = 9.0, fill: tuple[int, ...] = (128, 128, 128),
                        p: float = 0.5) -> A.SomeOf:
    """albumentations version of timm's ``rand-m{magnitude}-n{num_ops}-inc1`` RandAugment: ``num_ops`` of timm's 15
    "increasing" ops drawn with replacement, each applied with probability ``p``, strengths from timm's level ->
    argument maps at ``magnitude / 10``, uniform in ``[0, magnitude]`` per call (timm's ``mstd`` noise: Gaussian)."""
    if not 0 <= magnitude <= 10:
        raise ValueError(f"magnitude must be in [0, 10] (timm's scale), got {magnitude}")
    m = magnitude / 10.0
    rotate, translate = 30.0 * m, 0.45 * m
    shear = math.degrees(math.atan(0.3 * m))  # timm shears by a factor 0.3·m; albumentations takes degrees
    enhance, same = (1.0 - 0.9 * m, 1.0 + 0.9 * m), (1, 1)  # PIL ImageEnhance factor range
    affine = dict(interpolation=cv2.INTER_LINEAR, border_mode=cv2.BORDER_CONSTANT, fill=fill, p=p)
    solarize_add = np.array([min(255, i + int(110 * m)) if i < 128 else i for i in range(256)], np.uint8)
    return A.SomeOf([
        A.AutoContrast(p=p), A.Equalize(p=p), A.InvertImg(p=p),
        A.Affine(rotate=(-rotate, rotate), **affine),
        A.Posterize(num_bits=(max(1, 4 - int(4 * m)), 4), p=p), A.Solarize(threshold_range=(1.0 - m, 1.0), p=p),
        A.ColorJitter(brightness=same, contrast=same, saturation=enhance, hue=(0, 0), p=p),  # timm's "Color"
        A.ColorJitter(brightness=same, contrast=enhance, saturation=same, hue=(0, 0), p=p),
        A.ColorJitter(brightness=enhance, contrast=same, saturation=same, hue=(0, 0), p=p),
        A.Sharpen(alpha=(0.0, min(1.0, 0.9 * m)), lightness=(1.0, 1.0), p=p),
        A.Affine(shear={"x": (-shear, shear), "y": (0, 0)}, **affine),
        A.Affine(shear={"x": (0, 0), "y": (-shear, shear)}, **affine),
        A.Affine(translate_percent={"x": (-translate, translate), "y": (0, 0)}, **affine),
        A.Affine(translate_percent={"x": (0, 0), "y": (-translate, translate)}, **affine),
        A.Lambda(image=functools.partial(_apply_lut, lut=solarize_add), p=p),  # timm's SolarizeAdd (picklable)
    ], n=num_ops, replace=True, p=1.0)


def reseed_transform(transform: A.BaseCompose, seed: int) -> None:
    """Give an albumentations pipeline one fresh random stream derived from ``seed``. (``Compose(seed=...)``
    seeds every child with the same seed, which correlates e.g. the flip decision with the crop scale.)"""
    seed = int(seed) % 2**63
    transform.set_random_state(np.random.default_rng(seed), random.Random(seed))


def build_transforms(
    train: bool, img_size: int | Sequence[int] = 224, crop_pct: float = 0.875,
    mean: Sequence[float] = IMAGENET_DEFAULT_MEAN, std: Sequence[float] = IMAGENET_DEFAULT_STD,
    interpolation: str = "bicubic", hflip: float = 0.5, rand_augment: bool = True, ra_num_ops: int = 2,
    ra_magnitude: float = 9.0, random_erasing: float = 0.0, scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3 / 4, 4 / 3), affine: float = 0.0, fill: int | Sequence[int] | None = None,
    seed: int = 0, crop_padding: int = 0,
) -> A.Compose:
    """Train or eval pipeline: ``uint8 [H, W, C]`` numpy -> normalised ``float32 [C, h, w]`` tensor, ``C =
    len(mean)`` (3 for RGB, 1 for grayscale).

    Train: ``RandomResizedCrop(scale, ratio)`` (or, with ``crop_padding`` p > 0, pad by p and random crop, for small
    images) -> flip -> mild affine (±10° rotation, ±8% shift, 0.9-1.1 zoom, ±8° shear) -> RandAugment -> random
    erasing with per-pixel noise -> normalise. Eval (like timm): resize the shorter side (non-square sizes: each side)
    to ``floor(size / crop_pct)``, centre crop, normalise. Downscaling is area interpolation (close to PIL's).
    ``fill``: colour of uncovered areas (default: mean, as timm); ``seed``: of the random stream.
    """
    h, w = _size_hw(img_size)
    mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
    if crop_pct <= 0 or crop_padding < 0:
        raise ValueError(f"need crop_pct > 0 and crop_padding >= 0, got {crop_pct} and {crop_padding}")
    if len(mean) not in (1, 3) or len(std) != len(mean) or min(std) <= 0:
        raise ValueError(f"mean and std need 1 or 3 values each (std > 0), got mean={mean} std={std}")
    for name, prob in (("hflip", hflip), ("random_erasing", random_erasing), ("affine", affine)):
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {prob}")
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
        raise ValueError(f"scale must be (min, max) with 0 < min <= max <= 1, got {scale}")
    interp = interpolation_flag(interpolation)
    fill = tuple(round(255 * m) for m in mean) if fill is None else fill
    fill = (int(fill),) * len(mean) if isinstance(fill, (int, float)) else tuple(int(f) for f in fill)
    resample = dict(interpolation=interp, area_for_downscale="image")
    pad = dict(border_mode=cv2.BORDER_CONSTANT, fill=fill)
    if train:
        ops = [A.PadIfNeeded(h + 2 * crop_padding, w + 2 * crop_padding, **pad), A.RandomCrop(h, w)] if crop_padding \
            else [A.RandomResizedCrop(size=(h, w), scale=tuple(scale), ratio=tuple(ratio), **resample)]
        if hflip > 0:
            ops.append(A.HorizontalFlip(p=hflip))
        if affine > 0:
            ops.append(A.Affine(rotate=(-10, 10), translate_percent=(-0.08, 0.08), scale=(0.9, 1.1), shear=(-8, 8),
                                interpolation=interp, p=affine, **pad))
        if rand_augment and ra_num_ops > 0:
            ops.append(rand_augment_policy(ra_num_ops, ra_magnitude, fill=fill))
        if random_erasing > 0:  # timm's RandomErasing(mode='pixel'); before Normalize: noise uniform in 0..255
            ops.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=random_erasing))
    else:
        resize = (A.SmallestMaxSize(max_size=math.floor(h / crop_pct), **resample) if h == w
                  else A.Resize(math.floor(h / crop_pct), math.floor(w / crop_pct), **resample))
        # pad_if_needed: crop_pct > 1 makes the resized image smaller than the crop
        ops = [resize, A.CenterCrop(h, w, pad_if_needed=True, **pad)]
    transform = A.Compose([*ops, A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()])
    reseed_transform(transform, seed)
    return transform
