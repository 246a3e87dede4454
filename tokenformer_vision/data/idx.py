"""MNIST-format (IDX) image data: MNIST, Fashion-MNIST and KMNIST share the file format and the four file names,
``{train,t10k}-{images-idx3,labels-idx1}-ubyte`` (gzipped or not). Debian ships Fashion-MNIST in
``/usr/share/datasets/fashion-mnist`` (``apt-get install dataset-fashion-mnist``).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import cv2
import numpy as np
from torch.utils.data import Dataset

from .datamodule import ImageClassificationDataModule
from .folder import ArrayDataset
from .transforms import build_transforms, interpolation_flag

__all__ = ["FASHION_MNIST_CLASSES", "IDXDataModule", "find_idx_files", "read_idx"]

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                         "Ankle boot"]
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_MAGIC = {3: 0x00000803, 1: 0x00000801}  # unsigned-byte data with 3 (images) or 1 (labels) dimensions


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """A ``uint8`` IDX file (gzipped or not) with ``ndim`` dimensions, as an array of the header's shape. Raises
    ``ValueError`` naming the file for a wrong magic number, a truncated or corrupt file."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
            raw = f.read()
    except (EOFError, OSError, zlib.error) as exc:
        raise ValueError(f"{path}: truncated or corrupt gzip file ({exc})") from None
    magic = int.from_bytes(raw[:4], "big") if len(raw) >= 4 else None
    if magic != _MAGIC[ndim]:
        found = "too short for a header" if magic is None else f"0x{magic:08x}"
        raise ValueError(f"{path}: not an IDX {'image' if ndim == 3 else 'label'} file (magic number {found}, "
                         f"expected 0x{_MAGIC[ndim]:08x})")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    if len(raw) - header != (expected := int(np.prod(shape))):
        raise ValueError(f"{path}: truncated or padded IDX data: the header says {'x'.join(map(str, shape))} = "
                         f"{expected} bytes, the file holds {len(raw) - header}")
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)


def find_idx_files(root: str | os.PathLike) -> dict[str, tuple[Path, Path]]:
    """``{'train': (images, labels), 'test': (images, labels)}`` found in ``root``, ``root/raw`` or ``root/*/raw``
    (torchvision's layout), preferring uncompressed files. Raises ``FileNotFoundError`` naming what is missing."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"IDX data folder {root} does not exist (expected the four files "
                                f"{', '.join(n for pair in _FILES.values() for n in pair)}, gzipped or not; "
                                "e.g. apt-get install dataset-fashion-mnist gives /usr/share/datasets/fashion-mnist)")
    folders = [root, root / "raw", *sorted(p for p in root.glob("*/raw") if p.is_dir())]

    def locate(name: str) -> Path | None:
        return next((c for f in folders for c in (f / name, f / f"{name}.gz") if c.is_file()), None)

    found = {split: tuple(map(locate, names)) for split, names in _FILES.items()}
    missing = [name for split, names in _FILES.items()
               for name, path in zip(names, found[split], strict=True) if path is None]
    if missing:
        raise FileNotFoundError(f"IDX data folder {root} lacks {', '.join(missing)} (searched, gzipped or not: "
                                f"{', '.join(str(f) for f in folders)})")
    return found  # type: ignore[return-value]


def _load_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    if len(images) != len(labels):
        raise ValueError(f"{images_path} holds {len(images)} images but {labels_path} holds {len(labels)} labels")
    return images, labels.astype(np.int64)


class IDXDataModule(ImageClassificationDataModule):
    """MNIST-format data: ``train`` is the official train split less a seeded, stratified hold-out of ``val_size``
    images (``val``); ``test`` and ``predict`` are the official test split. The default augmentation suits 28²
    grayscale: pad-and-crop, horizontal flip, optional random erasing. Options not listed here mean what they mean
    for :class:`ImageClassificationDataModule`.

    Args:
        root: folder with the four IDX files (gzipped or not), or a torchvision root holding ``<Name>/raw``.
        img_size: input size, an int or (height, width); the 28x28 images are resized to it once.
        channels: 1 (grayscale, for ``in_chans=1`` models) or 3 (the grey level repeated, for RGB models).
        val_size: images of the train split held out (stratified, by ``seed``) for validation; 0: none.
        class_names: one name per label; None: ``"0"``, ``"1"``, ... up to the largest label.
        crop_padding: training random crop after padding every side by this many pixels (``fill``); 0: none.
        mean: per-channel normalisation mean on a 0..1 scale; None: the training pixels' mean.
        std: per-channel normalisation standard deviation; None: the training pixels' standard deviation.
        interpolation: resize interpolation when img_size is not 28 (nearest, bilinear, bicubic, area, lanczos).
        fill: grey level (0..255) of padding and erased areas; 0 is the background of these datasets.
        seed: seed of the train/val split and of the training shuffle and augmentation (per epoch: (seed, epoch)).
    """

    def __init__(
        self, root: str, img_size: int | tuple[int, int] | None = 28, batch_size: int = 128,
        num_workers: int | None = None, channels: int = 1, val_size: int = 5000,
        class_names: list[str] | None = None, crop_padding: int = 2, hflip: float = 0.5,
        random_erasing: float = 0.0, affine: float = 0.0, mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None, interpolation: str = "bilinear", fill: int = 0,
        pin_memory: bool = True, persistent_workers: bool = True, drop_last: bool = True, seed: int = 0,
    ) -> None:
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 (grayscale) or 3 (RGB), got {channels}")
        if val_size < 0:
            raise ValueError(f"val_size must be >= 0, got {val_size}")
        files = find_idx_files(root)
        train_images, train_labels = _load_split(*files["train"])
        test_images, test_labels = _load_split(*files["test"])
        num_labels = int(max(train_labels.max(), test_labels.max())) + 1
        names = list(class_names) if class_names is not None else [str(i) for i in range(num_labels)]
        if len(names) < num_labels:
            raise ValueError(f"{len(names)} class_names given, but the labels of {root} go up to {num_labels - 1}")
        self.train_indices, self.val_indices = _holdout(train_labels, val_size, seed)
        # from the histogram of grey levels: a float copy of 55,000 images would take 345 MB
        counts = np.bincount(train_images[self.train_indices].ravel(), minlength=256)
        levels = np.arange(256) / 255.0
        pixel_mean = float(counts @ levels / counts.sum())
        pixel_std = float(np.sqrt(max(counts @ levels**2 / counts.sum() - pixel_mean**2, 0.0)))
        mean = tuple(mean) if mean is not None else (pixel_mean,)
        std = tuple(std) if std is not None else (pixel_std,)
        mean, std = (mean * channels if len(mean) == 1 else mean), (std * channels if len(std) == 1 else std)
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need 1 or {channels} values, got mean={mean} std={std}")
        # read by build_transform, which the base's __init__ calls to validate the options
        self.channels, self.crop_padding, self.channel_mean, self.channel_std = channels, crop_padding, mean, std
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, crop_pct=1.0,
                         mean=(mean * 3)[:3], std=(std * 3)[:3], interpolation=interpolation, hflip=hflip,
                         rand_augment=False, random_erasing=random_erasing, affine=affine, fill=fill,
                         pin_memory=pin_memory, persistent_workers=persistent_workers, drop_last=drop_last, seed=seed)
        self.save_hyperparameters(ignore=["img_size"])
        self.root = Path(root).expanduser()
        self.class_names = names
        self.images = {"train": self._prepare(train_images), "test": self._prepare(test_images)}
        self.labels = {"train": train_labels, "test": test_labels}

    def _prepare(self, images: np.ndarray) -> np.ndarray:
        """``uint8 [N, H, W, channels]`` at ``img_size``, resized once (not per sample)."""
        h, w = self.img_size
        if (h, w) != images.shape[1:]:
            flag = interpolation_flag(self.transform_config.interpolation)
            images = np.stack([cv2.resize(img, (w, h), interpolation=flag) for img in images])
        return np.repeat(images[..., None], self.channels, axis=-1)

    def build_transform(self, train: bool):
        cfg = self.transform_config
        return build_transforms(train, cfg.img_size, 1.0, self.channel_mean, self.channel_std, cfg.interpolation,
                                seed=self.seed, crop_padding=self.crop_padding, **self.augment)

    def _make_dataset(self, stage: str) -> Dataset:
        if stage == "val" and not len(self.val_indices):
            raise ValueError("IDXDataModule: val_size=0 leaves no validation split (set val_size > 0, or "
                             "--trainer.limit_val_batches 0)")
        split = "train" if stage in ("train", "val") else "test"
        index = {"train": self.train_indices, "val": self.val_indices}.get(stage, slice(None))
        return ArrayDataset(self.images[split][index], self.labels[split][index],
                            self.build_transform(stage == "train"), return_index=stage == "predict")

    def predict_names(self) -> list[str]:
        """``test_<index in the official test file>`` of each predicted image."""
        return [f"test_{i:05d}" for i in range(len(self.labels["test"]))]


def _holdout(labels: np.ndarray, val_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted train and val indices: a stratified hold-out of ``val_size`` labels, a function of ``seed``."""
    if val_size == 0:
        return np.arange(len(labels)), np.arange(0)
    from sklearn.model_selection import train_test_split

    if val_size >= len(labels):
        raise ValueError(f"val_size {val_size} leaves no training images (the train split has {len(labels)})")
    counts = np.bincount(labels)
    stratify = labels if counts[counts > 0].min() >= 2 and val_size >= (counts > 0).sum() else None
    train, val = train_test_split(np.arange(len(labels)), test_size=val_size, stratify=stratify, random_state=seed)
    return np.sort(train), np.sort(val)
