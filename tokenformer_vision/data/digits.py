"""Embedded default data: scikit-learn's handwritten digits (1,797 8×8 images, 10 classes, shipped inside
scikit-learn, so no download), as RGB images through the same transforms and DataLoaders as image folders."""

from __future__ import annotations

import cv2
import numpy as np
from torch.utils.data import Dataset

from .datamodule import ImageClassificationDataModule
from .folder import ArrayDataset
from .transforms import interpolation_flag

__all__ = ["DigitsDataModule"]


def load_digits_rgb() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits as RGB ``uint8 [N, 8, 8, 3]`` (16 grey levels 0..16 scaled to 0..255) and int64 targets."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    grey = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=-1), digits.target.astype(np.int64)


class DigitsDataModule(ImageClassificationDataModule):
    """scikit-learn's digits as a 10-class image dataset (class names ``"0"`` .. ``"9"``), upscaled once to
    ``img_size`` so that crops and affines act on a fine grid; mild, flip-free augmentation (digits are not mirror
    symmetric). Options not listed here mean what they mean for :class:`ImageClassificationDataModule`, with other
    defaults.

    Args:
        img_size: input size, an int or (height, width); the 8x8 digits are upscaled to it once.
        num_workers: DataLoader worker processes (per process); the images are in memory, so 0 is usually fastest.
        val_fraction: fraction of the images held out (stratified) for validation, test and predict.
        seed: seed of the train/val split and of the training shuffle and augmentation (per epoch: (seed, epoch)).
        crop_pct: eval crop: resize the shorter side to img_size / crop_pct, centre-crop.
        mean: per-channel normalisation mean on a 0..1 scale; None: the training pixels' mean.
        std: per-channel normalisation standard deviation; None: the training pixels' standard deviation.
        interpolation: resize interpolation (nearest, bilinear, bicubic, area, lanczos).
        fill: colour of areas uncovered by geometric augmentation; 0: black, the background; None: the mean colour.
    """

    def __init__(
        self, img_size: int | tuple[int, int] | None = 32, batch_size: int = 64, num_workers: int = 0,
        val_fraction: float = 0.2, seed: int = 0, model_name: str | None = None, crop_pct: float | None = 1.0,
        mean: tuple[float, float, float] | None = None, std: tuple[float, float, float] | None = None,
        interpolation: str | None = "bilinear", hflip: float = 0.0, rand_augment: bool = False, ra_num_ops: int = 2,
        ra_magnitude: float = 5.0, random_erasing: float = 0.0, scale: tuple[float, float] = (0.7, 1.0),
        affine: float = 0.5, fill: int | tuple[int, int, int] | None = 0, pin_memory: bool = True,
        persistent_workers: bool = True, drop_last: bool = True,
    ) -> None:
        from sklearn.model_selection import train_test_split

        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        images, self.targets = load_digits_rgb()
        train, val = train_test_split(np.arange(len(images)), test_size=val_fraction, stratify=self.targets,
                                      random_state=seed)
        self.train_indices, self.val_indices = np.sort(train), np.sort(val)
        pixels = images[self.train_indices, ..., 0] / 255.0  # all channels equal
        mean = mean if mean is not None else (float(pixels.mean()),) * 3
        std = std if std is not None else (float(pixels.std()),) * 3
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, model_name=model_name,
                         crop_pct=crop_pct, mean=mean, std=std, interpolation=interpolation, hflip=hflip,
                         rand_augment=rand_augment, ra_num_ops=ra_num_ops, ra_magnitude=ra_magnitude,
                         random_erasing=random_erasing, scale=scale, affine=affine, fill=fill, pin_memory=pin_memory,
                         persistent_workers=persistent_workers, drop_last=drop_last, seed=seed)
        self.save_hyperparameters(ignore=["model_name", "img_size"])
        self.val_fraction = val_fraction
        self.class_names = [str(i) for i in range(10)]
        size, flag = max(self.img_size), interpolation_flag(self.transform_config.interpolation)
        self.images = np.stack([cv2.resize(img, (size, size), interpolation=flag) for img in images])

    def _make_dataset(self, stage: str) -> Dataset:
        idx = self.train_indices if stage == "train" else self.val_indices
        return ArrayDataset(self.images[idx], self.targets[idx], self.build_transform(stage == "train"),
                            return_index=stage == "predict")

    def predict_names(self) -> list[str]:
        """``digits_<index in sklearn's load_digits order>`` of each held-out image."""
        return [f"digits_{i:04d}" for i in self.val_indices]
