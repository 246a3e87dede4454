"""Lightning DataModules: ImageNet-layout image folders (``ImageFolderDataModule`` / ``ImageNetDataModule``).

Batches: train/val/test ``(images float32 [B, 3, H, W], targets int64 [B])``; predict ``(images, targets,
indices)`` with ``targets = -1`` where unknown and ``indices`` into :meth:`predict_names`. Unreadable images are
dropped from their batch; a batch whose images were all unreadable is ``None``: Lightning's training loop skips it
(with a warning), validation/test/predict steps receive it and should return ``None``.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .folder import (
    LAYOUT_HELP,
    ImageFileDataset,
    SkipCounter,
    collate_skip_none,
    find_class_names,
    list_images,
    scan_split,
    seed_worker,
)
from .transforms import TransformConfig, build_transforms, resolve_transform_config

__all__ = ["ImageClassificationDataModule", "ImageFolderDataModule", "ImageNetDataModule"]


class ImageClassificationDataModule(L.LightningDataModule):
    """Common part of the data modules: transform settings, DataLoaders (workers, pinning, reseeding, skipping).

    Subclasses set ``class_names`` in ``__init__`` and implement :meth:`_make_dataset`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        model_name: str | None = None,
        crop_pct: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        hflip: float = 0.5,
        rand_augment: bool = True,
        ra_num_ops: int = 2,
        ra_magnitude: float = 9.0,
        random_erasing: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        affine: float = 0.0,
        fill: int | tuple[int, int, int] | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {num_workers}")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.transform_config: TransformConfig = resolve_transform_config(
            model_name, img_size, crop_pct, mean, std, interpolation)
        self.augment = dict(hflip=hflip, rand_augment=rand_augment, ra_num_ops=ra_num_ops,
                            ra_magnitude=ra_magnitude, random_erasing=random_erasing, scale=tuple(scale),
                            affine=affine, fill=fill)
        self.pin_memory = pin_memory
        self.persistent_workers = persistent_workers
        self.drop_last = drop_last
        self.seed = seed
        build_transforms(True, **self._transform_kwargs())  # validate the options now, not in a worker
        self.class_names: list[str] = []
        self._skip_counter = SkipCounter()
        self._datasets: dict[str, Dataset] = {}

    # -- public attributes ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.transform_config.img_size

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped so far, by this process and its DataLoader workers (a file skipped in two
        epochs counts twice)."""
        return self._skip_counter.value

    def predict_names(self) -> list[str]:
        """Name (file path or stable id) of each predict sample, in the order of the predict batches' indices."""
        raise NotImplementedError

    # -- transforms and datasets ------------------------------------------------------------------------------
    def _transform_kwargs(self) -> dict:
        cfg = self.transform_config
        return dict(img_size=cfg.img_size, crop_pct=cfg.crop_pct, mean=cfg.mean, std=cfg.std,
                    interpolation=cfg.interpolation, seed=self.seed, **self.augment)

    def build_transform(self, train: bool):
        """The albumentations pipeline used for training (``train=True``) or evaluation."""
        return build_transforms(train, **self._transform_kwargs())

    def _make_dataset(self, stage: str) -> Dataset:
        """Dataset of ``stage`` in ``{'train', 'val', 'test', 'predict'}``."""
        raise NotImplementedError

    def dataset(self, stage: str) -> Dataset:
        """Cached dataset of a stage (``'train'``, ``'val'``, ``'test'``, ``'predict'``)."""
        if stage not in ("train", "val", "test", "predict"):
            raise ValueError(f"unknown stage {stage!r}")
        if stage not in self._datasets:
            self._datasets[stage] = self._make_dataset(stage)
        return self._datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        stages = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("predict",)}
        for name in stages.get(stage or "fit", ("train", "val")):
            self.dataset(name)

    # -- loaders ----------------------------------------------------------------------------------------------
    def _loader(self, stage: str) -> DataLoader:
        dataset = self.dataset(stage)
        train = stage == "train"
        drop_last = train and self.drop_last
        if drop_last and len(dataset) < self.batch_size:
            warnings.warn(f"training set ({len(dataset)} images) is smaller than one batch ({self.batch_size}); "
                          "keeping the partial batch instead of dropping it", stacklevel=3)
            drop_last = False
        workers = self.num_workers > 0
        rank = self.trainer.global_rank if self.trainer is not None else 0
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=train,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning without CUDA only warns
            persistent_workers=self.persistent_workers and workers,
            worker_init_fn=functools.partial(seed_worker, rank=rank) if workers else None,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


class ImageFolderDataModule(ImageClassificationDataModule):
    """Image classification data in the ImageNet folder layout (``root/train/<class>/*.JPEG``,
    ``root/val/<class>/*.JPEG``), with albumentations transforms.

    Class order is the sorted train class folder names (the val split must have the same folders). Preprocessing
    (input size, mean/std, crop_pct, interpolation) comes from timm's pretrained cfg of ``model_name`` unless given.
    ``predict_root`` (any folder of images, searched recursively) replaces ``predict_split``; its targets are the
    class index when an image sits in a folder named like a class, else -1. Unreadable images are skipped with a
    warning and counted in :attr:`skipped_images`.

    Args:
        root: dataset root holding the split folders.
        img_size: input size; default: the model's pretrained cfg, else 224.
        batch_size, num_workers: DataLoader settings (per process).
        model_name: timm model whose pretrained cfg supplies the preprocessing defaults.
        crop_pct, mean, std, interpolation: preprocessing overrides.
        train_split, val_split, test_split, predict_split: split folder names (test/predict default to val).
        predict_root: folder of images to predict instead of a split.
        hflip: horizontal-flip probability. rand_augment, ra_num_ops, ra_magnitude: RandAugment policy.
        random_erasing: random-erasing probability. scale: RandomResizedCrop area range. affine: mild-affine prob.
        fill: colour uncovered by geometric augmentation (default: the mean colour).
        pin_memory: pin batches (only when CUDA is available). persistent_workers: keep workers between epochs.
        drop_last: drop the last partial training batch. seed: seed of the main-process augmentation stream.
    """

    def __init__(
        self,
        root: str,
        img_size: int | tuple[int, int] | None = None,
        batch_size: int = 64,
        num_workers: int = 4,
        model_name: str | None = None,
        crop_pct: float | None = None,
        mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None,
        interpolation: str | None = None,
        train_split: str = "train",
        val_split: str = "val",
        test_split: str | None = None,
        predict_split: str | None = None,
        predict_root: str | None = None,
        hflip: float = 0.5,
        rand_augment: bool = True,
        ra_num_ops: int = 2,
        ra_magnitude: float = 9.0,
        random_erasing: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0),
        affine: float = 0.0,
        fill: int | tuple[int, int, int] | None = None,
        pin_memory: bool = True,
        persistent_workers: bool = True,
        drop_last: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(img_size=img_size, batch_size=batch_size, num_workers=num_workers, model_name=model_name,
                         crop_pct=crop_pct, mean=mean, std=std, interpolation=interpolation, hflip=hflip,
                         rand_augment=rand_augment, ra_num_ops=ra_num_ops, ra_magnitude=ra_magnitude,
                         random_erasing=random_erasing, scale=scale, affine=affine, fill=fill,
                         pin_memory=pin_memory,
                         persistent_workers=persistent_workers, drop_last=drop_last, seed=seed)
        # model_name/img_size are the model's: logged by ImageClassifier, and a second (possibly None) copy here
        # would clash when Lightning merges the module's and the data module's hyper-parameters
        self.save_hyperparameters(ignore=["model_name", "img_size"])
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset root {self.root} does not exist or is not a folder.\n{LAYOUT_HELP}")
        self.splits = {"train": train_split, "val": val_split, "test": test_split or val_split,
                       "predict": predict_split or val_split}
        self.predict_root = Path(predict_root).expanduser() if predict_root is not None else None
        # Class names come from the train split (listdir only: cheap even for ImageNet, and needed right away
        # because the CLI links data.num_classes -> model.num_classes); a machine that only evaluates may lack
        # the train split, then the val split names the classes.
        train_dir, val_dir = self.root / train_split, self.root / val_split
        if train_dir.is_dir():
            self.class_names = find_class_names(train_dir)
        elif val_dir.is_dir():
            self.class_names = find_class_names(val_dir)
        else:
            raise FileNotFoundError(f"dataset root {self.root} has neither a {train_split!r} nor a {val_split!r} "
                                    f"split folder (found: {sorted(p.name for p in self.root.iterdir())[:10]}).\n"
                                    f"{LAYOUT_HELP}")
        for stage in ("val", "test"):
            split_dir = self.root / self.splits[stage]
            if split_dir.is_dir():
                self._check_classes(split_dir)
        self._predict_names: list[str] | None = None

    def _check_classes(self, split_dir: Path) -> None:
        names = find_class_names(split_dir)
        if names != self.class_names:
            missing = sorted(set(self.class_names) - set(names))
            extra = sorted(set(names) - set(self.class_names))
            raise ValueError(
                f"class folders of {split_dir} differ from those of {self.root / self.splits['train']}: "
                f"{len(missing)} missing {missing[:10]}, {len(extra)} unexpected {extra[:10]}. Every split needs "
                f"the same class folders (an empty folder is fine for a class without images).\n{LAYOUT_HELP}")

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            # training without a val split is allowed (e.g. limit_val_batches=0): scan val only if it exists
            self.dataset("train")
            if (self.root / self.splits["val"]).is_dir():
                self.dataset("val")
        else:
            super().setup(stage)

    def _make_dataset(self, stage: str) -> Dataset:
        if stage == "predict" and self.predict_root is not None:
            paths = list_images(self.predict_root)
            index = {name: i for i, name in enumerate(self.class_names)}
            samples = [(p, index.get(Path(p).parent.name, -1) if Path(p).parent != self.predict_root else -1)
                       for p in paths]
        else:
            split_dir = self.root / self.splits[stage]
            if stage != "train":
                self._check_classes(split_dir)  # raises FileNotFoundError with the layout if it is missing
            elif not split_dir.is_dir():
                raise FileNotFoundError(f"train split folder {split_dir} does not exist.\n{LAYOUT_HELP}")
            samples = scan_split(split_dir, self.class_names, require_all=stage == "train")
        if stage == "predict":
            self._predict_names = [path for path, _ in samples]
        return ImageFileDataset(samples, self.build_transform(stage == "train"), return_index=stage == "predict",
                                skip_counter=self._skip_counter)

    def predict_names(self) -> list[str]:
        if self._predict_names is None:
            self.dataset("predict")
        return list(self._predict_names)


class ImageNetDataModule(ImageFolderDataModule):
    """:class:`ImageFolderDataModule` under the name of its main use (ImageNet-1k in the standard layout)."""
