"""ImageNet-layout image folders: scanning, decoding, datasets that skip unreadable images, and the DataModules."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from .datamodule import ImageClassificationDataModule, SkipCounter
from .transforms import reseed_transform

__all__ = ["ImageFolderDataModule", "ImageNetDataModule", "load_rgb"]

LAYOUT_HELP = (
    "Expected the ImageNet folder layout:\n"
    "  ROOT/train/<class>/xxx.JPEG   (e.g. ROOT/train/n01440764/n01440764_10026.JPEG)\n"
    "  ROOT/val/<class>/yyy.JPEG     (same class folder names as train)\n"
    f"Image extensions (case-insensitive): {', '.join(IMG_EXTENSIONS)}"
)


def load_rgb(path: str | os.PathLike) -> np.ndarray:
    """Decode an image file to RGB ``uint8 [H, W, 3]`` (alpha dropped, like torchvision/timm); 16-bit grayscale
    (PIL modes ``I;16*`` and ``I``, 0..65535) is scaled to 0..255 (``round(v / 257)``)."""
    with Image.open(path) as img:
        if img.mode.startswith("I"):  # PIL's convert("RGB") clips these to 255 instead of scaling them
            grey = np.round(np.clip(np.asarray(img, dtype=np.float64), 0, 65535) / 257.0).astype(np.uint8)
            return np.repeat(grey[..., None], 3, axis=2)
        if img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")  # PIL warns when palette transparency goes straight to RGB
        return np.asarray(img if img.mode == "RGB" else img.convert("RGB"), dtype=np.uint8)  # decodes in the `with`


def find_class_names(split_dir: str | os.PathLike) -> list[str]:
    """Sorted class folder names of a split, hidden ones excluded; raises with the layout if there are none."""
    if not Path(split_dir).is_dir():
        raise FileNotFoundError(f"split folder {split_dir} does not exist.\n{LAYOUT_HELP}")
    if not (names := sorted(e.name for e in os.scandir(split_dir) if e.is_dir() and not e.name.startswith("."))):
        raise ValueError(f"split folder {split_dir} has no class sub-folders.\n{LAYOUT_HELP}")
    return names


def check_empty(split_dir: str | os.PathLike, class_names: Sequence[str], empty: list[str], strict: bool) -> None:
    """Raise if every class folder is ``empty`` or (``strict``, for train) some is; otherwise warn about them."""
    if not empty:
        return
    if len(empty) == len(class_names):
        raise ValueError(f"split folder {split_dir} contains no images.\n{LAYOUT_HELP}")
    message = f"{len(empty)} class folder(s) of {split_dir} contain no images: {empty[:10]}"
    if strict:
        raise ValueError(f"{message}. Every train class folder needs at least one image: add images or remove the "
                         f"folder.\n{LAYOUT_HELP}")
    warnings.warn(message, stacklevel=2)


def list_images(root: str | os.PathLike) -> list[str]:
    """Every image file under ``root`` (recursively, symlinks followed, hidden folders skipped), sorted by path."""
    if not Path(root).is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    files = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files += [os.path.join(dirpath, f) for f in filenames if f.lower().endswith(IMG_EXTENSIONS)]
    if not files:
        raise ValueError(f"image folder {root} contains no images (extensions {', '.join(IMG_EXTENSIONS)})")
    return sorted(files)


class ImageFileDataset(Dataset):
    """Images from ``(path, target)`` pairs through an albumentations ``transform``, as ``(image, target[, index])``;
    an unreadable file yields ``None`` with a warning and bumps ``skip_counter``: it never stops an epoch."""

    def __init__(self, samples: Sequence[tuple[Any, int]], transform: Callable | None = None,
                 return_index: bool = False, skip_counter: SkipCounter | None = None) -> None:
        self.samples, self.transform, self.return_index = list(samples), transform, return_index
        self.skip_counter = skip_counter if skip_counter is not None else SkipCounter()

    def __len__(self) -> int:
        return len(self.samples)

    def reseed(self, seed: int) -> None:
        """New random stream for the augmentation pipeline (in each DataLoader worker, and per sample)."""
        if hasattr(self.transform, "set_random_state"):
            reseed_transform(self.transform, seed)

    def _load(self, index: int) -> np.ndarray | None:
        path = self.samples[index][0]
        try:
            return load_rgb(path)
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError, ... for broken files
            self.skip_counter.increment()
            warnings.warn(f"skipping unreadable image {path}: {type(exc).__name__}: {exc}", stacklevel=1)
            return None

    def __getitem__(self, key: int | tuple[int, int]) -> tuple | None:
        """``key``: an index, or ``(index, augmentation seed)`` from :class:`EpochSampler`, which reseeds the
        pipeline first so that the augmentation does not depend on the worker or on what it processed before."""
        if isinstance(key, tuple):
            key, seed = key
            self.reseed(seed)
        if (image := self._load(key)) is None:
            return None
        if self.transform is not None:
            image = self.transform(image=image)["image"]
        target = int(self.samples[key][1])
        return (image, target, key) if self.return_index else (image, target)


class ArrayDataset(ImageFileDataset):
    """In-memory ``uint8 [N, H, W, C]`` images (C = 3, RGB, or 1, grayscale) with integer targets."""

    def __init__(self, images: np.ndarray, targets: Sequence[int], transform: Callable | None = None,
                 return_index: bool = False) -> None:
        super().__init__(enumerate(np.asarray(targets, dtype=np.int64)), transform, return_index)
        self.images = images

    def _load(self, index: int) -> np.ndarray:
        return self.images[index]


class ImageFolderDataModule(ImageClassificationDataModule):
    """Image classification data in the ImageNet folder layout (``root/{train,val}/<class>/*.JPEG``): classes are
    the sorted train class folder names; every train class folder needs an image (checked at construction), val/test
    need the same class folders, which may be empty.

    Args:
        root: dataset root holding the split folders (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG).
        train_split: name of the train split folder under root.
        val_split: name of the validation split folder under root.
        test_split: name of the test split folder under root; None: val_split.
        predict_split: name of the predict split folder under root; None: val_split.
        predict_root: folder of images (searched recursively) to predict instead of a split; an image in a folder
            named like a class gets that class as target, others -1.
        **kwargs: the options of :class:`ImageClassificationDataModule` (img_size, batch_size, hflip, ...).
    """

    def __init__(self, root: str, train_split: str = "train", val_split: str = "val", test_split: str | None = None,
                 predict_split: str | None = None, predict_root: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.save_hyperparameters(ignore=["model_name", "img_size"])
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder.\n{LAYOUT_HELP}")
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split,
                       "predict": predict_split or val_split}
        self.predict_root = Path(predict_root).expanduser() if predict_root is not None else None
        # class names are needed now (the CLI links data.num_classes): the train split's (one listdir), else val's
        train_dir, val_dir = self.root / train_split, self.root / val_split
        if not (train_dir.is_dir() or val_dir.is_dir()):
            found = sorted(p.name for p in self.root.iterdir())[:10]
            raise FileNotFoundError(f"dataset root {self.root} has neither a {train_split!r} nor a {val_split!r} "
                                    f"split folder (found: {found}).\n{LAYOUT_HELP}")
        self.class_names = find_class_names(train_dir if train_dir.is_dir() else val_dir)
        if train_dir.is_dir():  # an empty train class folder fails now, the first place it shows
            # os.walk as in torchvision's make_dataset, stopping at the first image (about one listdir per class)
            empty = [name for name in self.class_names
                     if not any(any(f.lower().endswith(IMG_EXTENSIONS) for f in files)
                                for _, _, files in os.walk(train_dir / name, followlinks=True))]
            check_empty(train_dir, self.class_names, empty, strict=True)
        for stage in ("val", "test"):
            if (self.root / self.splits[stage]).is_dir():
                self._check_classes(stage)

    def _check_classes(self, stage: str) -> Path:
        split_dir = self.root / self.splits[stage]
        names = find_class_names(split_dir)  # raises FileNotFoundError with the layout if the split is missing
        if names != self.class_names:
            missing, extra = sorted(set(self.class_names) - set(names)), sorted(set(names) - set(self.class_names))
            raise ValueError(
                f"class folders of {split_dir} differ from those of {self.root / self.splits['train']}: "
                f"{len(missing)} missing {missing[:10]}, {len(extra)} unexpected {extra[:10]}. Every split needs "
                f"the same class folders; a val/test class folder may be empty, a train class folder may not."
                f"\n{LAYOUT_HELP}")
        return split_dir

    def setup(self, stage: str | None = None) -> None:
        # training without a val split is allowed (e.g. limit_val_batches=0): fit scans val only if it exists
        if stage in (None, "fit") and not (self.root / self.splits["val"]).is_dir():
            self.dataset("train")
        else:
            super().setup(stage)

    def _make_dataset(self, stage: str) -> Dataset:
        if stage == "predict" and self.predict_root is not None:
            index = {name: i for i, name in enumerate(self.class_names)}
            samples = [(p, index.get(Path(p).parent.name, -1) if Path(p).parent != self.predict_root else -1)
                       for p in list_images(self.predict_root)]
        else:  # sorted (path, class index) of the images under split/<class>/, recursively
            split_dir = self._check_classes(stage)
            samples = make_dataset(str(split_dir), {name: i for i, name in enumerate(self.class_names)},
                                   IMG_EXTENSIONS, allow_empty=True)
            counts = np.bincount([t for _, t in samples], minlength=self.num_classes)
            empty = [self.class_names[i] for i in np.flatnonzero(counts == 0)]
            check_empty(split_dir, self.class_names, empty, strict=stage == "train")
        return ImageFileDataset(samples, self.build_transform(stage == "train"), return_index=stage == "predict",
                                skip_counter=self._skip_counter)

    def predict_names(self) -> list[str]:
        return [path for path, _ in self.dataset("predict").samples]


class ImageNetDataModule(ImageFolderDataModule):
    """:class:`ImageFolderDataModule` under the name of its main use (ImageNet-1k in the standard layout)."""
