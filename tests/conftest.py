"""Shared pytest fixtures.

``imagefolder``: a tiny ImageNet-layout dataset generated once per session (treat it as read-only)::

    root/train/{cat,dog,fox}/  8 readable images each (+ train/cat/corrupt.JPEG: random bytes)
    root/val/{cat,dog,fox}/    4 images each

Images are 40-90 px, mostly non-square, a mix of RGB and grayscale JPEGs plus a few PNGs (one RGBA) and an upper-
case ``.JPG``. Each class has its own colour cast plus noise, so a small model can learn to tell them apart.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

IMAGEFOLDER_CLASSES = ("cat", "dog", "fox")
IMAGEFOLDER_TRAIN_PER_CLASS = 8
IMAGEFOLDER_VAL_PER_CLASS = 4
IMAGEFOLDER_CORRUPT = "train/cat/corrupt.JPEG"


def _class_image(rng: np.random.Generator, class_idx: int, height: int, width: int) -> np.ndarray:
    """RGB uint8 image: noise around a class-specific colour, with a bright square at a random spot."""
    base = np.full(3, 60.0)
    base[class_idx % 3] = 190.0
    img = base + rng.normal(0.0, 25.0, size=(height, width, 3))
    y, x = rng.integers(0, height // 2), rng.integers(0, width // 2)
    img[y:y + height // 3, x:x + width // 3] = 240.0
    return np.clip(img, 0, 255).astype(np.uint8)


def write_image(path: Path, rgb: np.ndarray, kind: str = "rgb") -> None:
    """Save ``rgb`` as ``kind``: ``'rgb'``, ``'gray'`` (mode L) or ``'rgba'`` (PNG with alpha); format from suffix."""
    img = Image.fromarray(rgb)
    if kind == "gray":
        img = img.convert("L")
    elif kind == "rgba":
        img = img.convert("RGBA")
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    img.save(path, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def make_imagefolder(root: Path, classes=IMAGEFOLDER_CLASSES, train_per_class: int = IMAGEFOLDER_TRAIN_PER_CLASS,
                     val_per_class: int = IMAGEFOLDER_VAL_PER_CLASS, corrupt: bool = True, seed: int = 0) -> Path:
    """Write an ImageNet-layout folder under ``root`` (see the module docstring) and return ``root``."""
    rng = np.random.default_rng(seed)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                height, width = (int(v) for v in rng.integers(40, 91, size=2))
                if i == 0:
                    width = height  # one square image per class
                kind = ("rgb", "gray", "rgb", "rgba")[i % 4]
                suffix = ".png" if kind == "rgba" else (".JPG" if i % 5 == 2 else ".JPEG")
                write_image(folder / f"{name}_{split}_{i:03d}{suffix}", _class_image(rng, c, height, width), kind)
    if corrupt:
        (root / IMAGEFOLDER_CORRUPT).write_bytes(rng.integers(0, 256, size=2048, dtype=np.uint8).tobytes())
    return root


@pytest.fixture(scope="session")
def imagefolder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Root of a tiny read-only ImageNet-layout dataset (classes cat/dog/fox, 8 train + 4 val images per class,
    one corrupt file ``train/cat/corrupt.JPEG``)."""
    return make_imagefolder(tmp_path_factory.mktemp("imagefolder"))
