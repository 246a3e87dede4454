"""Image-folder scanning, robust decoding, datasets that skip unreadable images, and DataLoader helpers
(collate that drops skipped samples, an epoch-seeded training sampler, per-worker reseeding)."""

from __future__ import annotations

import multiprocessing
import multiprocessing.context
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, default_collate, get_worker_info
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .transforms import reseed_transform

__all__ = [
    "IMG_EXTENSIONS",
    "LAYOUT_HELP",
    "ArrayDataset",
    "EpochSampler",
    "ImageFileDataset",
    "SkipCounter",
    "collate_skip_none",
    "derive_seed",
    "empty_class_folders",
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
    """Decode an image file to an RGB ``uint8 [H, W, 3]`` array (grayscale, CMYK, palette, RGBA -> RGB).

    16-bit grayscale (PIL modes ``I;16*``, and ``I`` read as 0..65535) is scaled to 0..255 (``round(v / 257)``).
    """
    with Image.open(path) as img:
        if img.mode.startswith("I"):
            # PIL's convert("RGB") clips these to 255 instead of scaling them
            grey = np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
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


def _has_image(folder: str) -> bool:
    # stops at the first image, so checking every ImageNet class folder costs one directory read each
    for _, _, filenames in os.walk(folder, followlinks=True):  # the same walk as torchvision's make_dataset
        if any(f.lower().endswith(IMG_EXTENSIONS) for f in filenames):
            return True
    return False


def empty_class_folders(split_dir: str | os.PathLike, class_names: Sequence[str], raise_error: bool = True
                        ) -> list[str]:
    """Class folders of ``split_dir`` without any image (searched recursively).

    ``raise_error``: raise ``ValueError`` naming them instead (a train split needs images in every class; the
    message says "contains no images" when the whole split is empty).
    """
    split_dir = Path(split_dir)
    empty = [name for name in class_names if not _has_image(str(split_dir / name))]
    if empty and raise_error:
        if len(empty) == len(class_names):
            raise ValueError(f"split folder {split_dir} contains no images.\n{LAYOUT_HELP}")
        raise ValueError(f"{len(empty)} class folder(s) of {split_dir} contain no images: {empty[:10]}. Every "
                         f"train class folder needs at least one image: add images or remove the folder.\n"
                         f"{LAYOUT_HELP}")
    return empty


def scan_split(split_dir: str | os.PathLike, class_names: Sequence[str], require_all: bool = True
               ) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``split_dir/<class>/`` (recursively), in sorted order.

    Raises ``ValueError`` if the split holds no images, or (``require_all``) if some class folder is empty (see
    :func:`empty_class_folders`); otherwise empty class folders only warn.
    """
    split_dir = Path(split_dir)
    class_to_idx = {name: i for i, name in enumerate(class_names)}
    samples = make_dataset(str(split_dir), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
    counts = np.bincount([t for _, t in samples], minlength=len(class_names))
    empty = [class_names[i] for i in np.flatnonzero(counts == 0)]
    if empty and (require_all or not samples):
        empty_class_folders(split_dir, class_names)  # raises with the same message as the up-front check
    if empty:
        warnings.warn(f"{len(empty)} class folder(s) of {split_dir} contain no images: {empty[:10]}", stacklevel=2)
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
    method), persistent or not. Lock-free: each process adds to its own slot (by pid) and reading sums the slots.
    Pickled in any other context (a deepcopy, a checkpoint), it degrades to a new local counter starting at the
    current value instead of failing like a bare ``multiprocessing.Value`` would.
    """

    _SLOTS = 1024

    def __init__(self, start: int = 0) -> None:
        # RawArray has no SemLock, so it can also be handed to workers of another start method (spawn/forkserver)
        self._slots = multiprocessing.RawArray("q", self._SLOTS)
        self._slots[0] = start

    def reset(self, value: int = 0) -> None:
        """Set the count (e.g. restored from a checkpoint); call it while no worker is running."""
        self._slots[:] = [value] + [0] * (self._SLOTS - 1)

    def increment(self) -> None:
        # one writer per slot (barring pid collisions mod _SLOTS between simultaneously failing processes)
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

    def __getitem__(self, key: int | tuple[int, int]) -> tuple | None:
        """Sample ``key``: an index, or ``(index, augmentation seed)`` from :class:`EpochSampler`, which reseeds
        the pipeline first so that the sample's augmentation depends on nothing else (worker, worker count,
        what the worker processed before)."""
        if isinstance(key, tuple):
            key, seed = key
            self.reseed(seed)
        image = self._load(key)
        if image is None:
            return None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        target = int(self._target(key))
        return (image, target, key) if self.return_index else (image, target)

    def _load(self, index: int) -> np.ndarray | None:
        raise NotImplementedError

    def _target(self, index: int) -> int:
        raise NotImplementedError


class ImageFileDataset(_AugmentedDataset):
    """Images from ``(path, target)`` pairs. An unreadable file yields ``None`` (dropped by
    :func:`collate_skip_none`) with a warning, and bumps ``skip_counter``; it never stops an epoch."""

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None = None,
                 return_index: bool = False, skip_counter: SkipCounter | None = None) -> None:
        super().__init__(transform, return_index, skip_counter)
        self.samples = list(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def _target(self, index: int) -> int:
        return self.samples[index][1]

    def _load(self, index: int) -> np.ndarray | None:
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            self.skip_counter.increment()
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=1)
            return None


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

    def _target(self, index: int) -> int:
        return self.targets[index]

    def _load(self, index: int) -> np.ndarray:
        return self.images[index]


def collate_skip_none(batch: list) -> Any:
    """``default_collate`` without the ``None`` samples of skipped images; ``None`` if the whole batch was
    skipped (Lightning's training loop skips a ``None`` batch itself; eval/predict steps receive it)."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` (any sign) by ``numpy.random.SeedSequence``: unlike ``seed +
    epoch``, (seed 0, epoch 1) and (seed 1, epoch 0) get unrelated streams."""
    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(DistributedSampler):
    """Training sampler whose order and augmentations are a function of ``(seed, epoch)`` alone.

    Each epoch it shuffles the indices with a generator seeded from ``(seed, epoch)`` (the same on every rank, which
    then takes its ``rank::num_replicas`` share, padded like ``DistributedSampler``) and yields ``(index,
    augmentation seed)`` pairs; the datasets of this package reseed their pipeline from the second item. A run
    that sets the same epoch therefore replays that epoch's batches bit for bit — after a resume, with any number
    of DataLoader workers (and each sample's augmentation does not depend on the number of ranks either).

    Lightning calls :meth:`set_epoch` at the start of every epoch (``epoch_progress``, also after a resume), and
    being a ``DistributedSampler`` it is kept as is under DDP instead of being wrapped.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch = epoch

    def __iter__(self) -> Iterator[tuple[int, int]]:
        n = len(self.dataset)
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        aug_seeds = rng.integers(0, 2**63, size=n, dtype=np.int64)  # keyed by dataset index
        if self.total_size > n:  # pad with the first indices so every rank gets num_samples (DistributedSampler)
            order = np.resize(order, self.total_size)
        order = order[self.rank:self.total_size:self.num_replicas]
        return zip(order.tolist(), aug_seeds[order].tolist(), strict=True)


def seed_worker(worker_id: int, rank: int = 0, sampler: Any = None) -> None:
    """DataLoader ``worker_init_fn``: give each worker (and each distributed rank) its own random streams.

    Forked workers inherit identical copies of the albumentations generators (and of numpy's / Python's global
    state), so without this every worker would apply the same augmentation sequence. With a ``sampler`` that has
    ``seed`` and ``epoch`` (:class:`EpochSampler`) the streams derive from (seed, epoch at worker start, rank,
    worker id), else from ``info.seed`` (per worker and per epoch, following ``torch.manual_seed`` in the main
    process) and the rank, which is mixed in because every rank usually seeds identically.
    """
    info = get_worker_info()
    if info is None:
        return
    if hasattr(sampler, "seed") and hasattr(sampler, "epoch"):
        seed = derive_seed(sampler.seed, sampler.epoch, rank, worker_id)
    else:
        seed = derive_seed(info.seed, rank)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    torch.manual_seed(seed)
    dataset = info.dataset
    while not hasattr(dataset, "reseed") and hasattr(dataset, "dataset"):  # unwrap Subset-like wrappers
        dataset = dataset.dataset
    if hasattr(dataset, "reseed"):
        dataset.reseed(seed)
