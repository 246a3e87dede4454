"""Image-folder scanning, robust decoding, datasets that skip unreadable images, and DataLoader helpers
(collate that drops skipped samples, per-worker reseeding of the augmentation pipeline)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import random
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, default_collate, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .transforms import reseed_transform

__all__ = [
    "IMG_EXTENSIONS",
    "LAYOUT_HELP",
    "ArrayDataset",
    "ImageFileDataset",
    "SkipCounter",
    "collate_skip_none",
    "find_class_names",
    "list_images",
    "load_rgb",
    "scan_split",
    "seed_worker",
]

LAYOUT_HELP = (
    "Expected the ImageNet folder layout:\n"
    "  ROOT/train/<class>/xxx.JPEG   (e.g. ROOT/train/n01440764/n01440764_10026.JPEG)\n"
    "  ROOT/val/<class>/yyy.JPEG     (same class folder names as train)\n"
    f"Image extensions (case-insensitive): {', '.join(IMG_EXTENSIONS)}"
)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to an RGB ``uint8 [H, W, 3]`` array (grayscale, CMYK, palette, RGBA -> RGB)."""
    with Image.open(path) as img:
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
        if img.mode != "RGB":
            img = img.convert("RGB")  # also decodes; alpha is dropped like torchvision/timm do
        return np.asarray(img, dtype=np.uint8)  # forces the decode inside the `with`


def _visible_dirs(path: Path) -> list[str]:
    # hidden folders (.ipynb_checkpoints, .DS_Store dirs, ...) are never classes
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def find_class_names(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class folder names of one split; raises with the expected layout if there are none."""
    split_dir = Path(split_dir)
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist.\n{LAYOUT_HELP}")
    names = _visible_dirs(split_dir)
    if not names:
        raise ValueError(f"split folder {split_dir} has no class sub-folders.\n{LAYOUT_HELP}")
    return names


def scan_split(split_dir: str | os.PathLike, class_names: Sequence[str], require_all: bool = True
               ) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``split_dir/<class>/`` (recursively), in sorted order.

    Raises ``ValueError`` if the split holds no images, or (``require_all``) if some class folder is empty.
    """
    split_dir = Path(split_dir)
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    if not samples:
        raise ValueError(f"split folder {split_dir} contains no images.\n{LAYOUT_HELP}")
    counts = np.bincount([t for _, t in samples], minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty:
        msg = f"{len(empty)} class folder(s) of {split_dir} contain no images: {empty[:10]}"
        if require_all:
            raise ValueError(f"{msg}.\n{LAYOUT_HELP}")
        warnings.warn(msg, stacklevel=2)
    return samples


def list_images(root: str | os.PathLike) -> list[str]:
    """Every image file under ``root`` (recursively, symlinks followed, hidden folders skipped), sorted by path."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files += [os.path.join(dirpath, f) for f in sorted(filenames) if f.lower().endswith(IMG_EXTENSIONS)]
    files.sort()
    if not files:
        raise ValueError(f"image folder {root} contains no images (extensions {', '.join(IMG_EXTENSIONS)})")
    return files


class SkipCounter:
    """Count of skipped (unreadable) images, shared by the main process and its DataLoader workers.

    Backed by shared memory that DataLoader workers inherit (fork) or receive while being spawned (any start
    method). Lock-free: each process adds to its own slot (by pid) and reading sums the slots. Pickled in any other
    context (a deepcopy, a checkpoint), it degrades to a new local counter starting at the current value instead of
    failing like a bare ``multiprocessing.Value`` would.
    """

    _SLOTS = 256

    def __init__(self, start: int = 0) -> None:
        # RawArray has no SemLock, so it can also be handed to workers of another start method (spawn/forkserver)
        self._slots = multiprocessing.RawArray("q", self._SLOTS)
        self._slots[0] = start

    def increment(self) -> None:
        # one writer per slot (barring pid collisions mod 256 between simultaneously failing processes)
        self._slots[os.getpid() % self._SLOTS] += 1

    @property
    def value(self) -> int:
        return int(sum(self._slots))

    def __getstate__(self) -> dict[str, Any]:
        if multiprocessing.context.get_spawning_popen() is not None:
            return {"shared": self._slots}
        return {"start": self.value}

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "shared" in state:
            self._slots = state["shared"]
        else:
            self.__init__(state["start"])


class _AugmentedDataset(Dataset):
    """Shared logic: decode (or fetch) an RGB image, skip it if unreadable, apply the albumentations pipeline."""

    def __init__(self, transform: Callable | None, return_index: bool, skip_counter: SkipCounter | None) -> None:
        self.transform = transform
        self.return_index = return_index
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter()

    def reseed(self, seed: int) -> None:
        """New random stream for the augmentation pipeline (called in each DataLoader worker)."""
        if self.transform is not None and hasattr(self.transform, "set_random_state"):
            reseed_transform(self.transform, seed)

    def _output(self, image: np.ndarray, target: int, index: int) -> tuple:
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        return (image, target, index) if self.return_index else (image, target)


class ImageFileDataset(_AugmentedDataset):
    """Images from ``(path, target)`` pairs. An unreadable file yields ``None`` (dropped by
    :func:`collate_skip_none`) with a warning, and bumps ``skip_counter``; it never stops an epoch."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None,
                 return_index: bool = False, skip_counter: SkipCounter | None = None) -> None:
        super().__init__(transform, return_index, skip_counter)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple | None:
        path, target = self.samples[index]
        try:
            image = load_rgb(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            self.skip_counter.increment()
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=1)
            return None
        return self._output(image, target, index)


class ArrayDataset(_AugmentedDataset):
    """In-memory RGB ``uint8 [N, H, W, 3]`` images with integer targets."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform: Callable | None = None,
                 return_index: bool = False) -> None:
        super().__init__(transform, return_index, None)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N, H, W, 3], got {images.dtype} {images.shape}")
        if len(images) != len(targets):
            raise ValueError(f"{len(images)} images but {len(targets)} targets")
        self.images = images
        self.targets = np.asarray(targets, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple:
        return self._output(self.images[index], int(self.targets[index]), index)


def collate_skip_none(batch: list) -> Any:
    """``default_collate`` without the ``None`` samples of skipped images; ``None`` if the whole batch was
    skipped (Lightning's training loop skips a ``None`` batch itself; eval/predict steps receive it)."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


def seed_worker(worker_id: int, rank: int = 0) -> None:
    """DataLoader ``worker_init_fn``: give each worker (and each distributed rank) its own augmentation stream.

    Forked workers inherit identical copies of the albumentations generators (and of numpy's / Python's global
    state), so without this every worker would apply the same augmentation sequence. ``info.seed`` differs per
    worker and per epoch (unless workers persist) and follows ``torch.manual_seed`` in the main process; the rank
    is mixed in because every rank usually seeds identically.
    """
    info = get_worker_info()
    if info is None:
        return
    seed = int(np.random.SeedSequence([info.seed, rank]).generate_state(1, dtype=np.uint64)[0])
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.manual_seed(seed)
    dataset = info.dataset
    while not hasattr(dataset, "reseed") and hasattr(dataset, "dataset"):  # unwrap Subset-like wrappers
        dataset = dataset.dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
