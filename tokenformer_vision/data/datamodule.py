"""Lightning DataModules: ImageNet-layout image folders (``ImageFolderDataModule`` / ``ImageNetDataModule``).

Batches: train/val/test ``(images float32 [B, 3, H, W], targets int64 [B])``; predict ``(images, targets,
indices)`` with ``targets = -1`` where unknown and ``indices`` into :meth:`predict_names`. Unreadable images are
dropped from their batch; a batch whose images were all unreadable is ``None``: Lightning's training loop skips it
(with a warning), validation/test/predict steps receive it and should return ``None``.

Training batches (order and augmentation) are a function of ``(seed, epoch)``: see :class:`EpochSampler`. The
seed and epoch travel in Lightning checkpoints (:meth:`ImageClassificationDataModule.state_dict`), so a run resumed
at epoch k sees exactly the batches the uninterrupted run saw in epoch k.
"""

from __future__ import annotations

import functools
import inspect
import os
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from .folder import (
    LAYOUT_HELP,
    EpochSampler,
    ImageFileDataset,
    SkipCounter,
    collate_skip_none,
    derive_seed,
    empty_class_folders,
    find_class_names,
    list_images,
    scan_split,
    seed_worker,
)
from .transforms import TransformConfig, build_transforms, resolve_transform_config

__all__ = ["ImageClassificationDataModule", "ImageFolderDataModule", "ImageNetDataModule", "default_num_workers"]


def default_num_workers() -> int:
    """Default DataLoader workers per process: the usable cores minus one for the main process, at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))  # honours taskset/cgroup limits, as DataLoader's own check does
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(0, min(8, cores - 1))


# One help line per __init__ argument: jsonargparse (LightningCLI --help) reads Google-style "name: text" lines,
# and a line naming several arguments documents none of them. "None: ..." says what an unset argument means.
_ARG_HELP = {
    "root": "dataset root holding the split folders (ROOT/train/<class>/*.JPEG, ROOT/val/<class>/*.JPEG).",
    "img_size": "input size, an int or (height, width); None: the pretrained cfg of model_name, else 224.",
    "batch_size": "images per batch (per process).",
    "num_workers": "DataLoader worker processes (per process); None: usable CPU cores - 1, at most 8.",
    "model_name": "timm model whose pretrained cfg supplies the preprocessing defaults.",
    "crop_pct": "evaluation crop fraction: resize the shorter side to img_size / crop_pct, then centre-crop; "
                "None: the model's, else 0.875.",
    "mean": "per-channel normalisation mean on a 0..1 scale; None: the model's, else ImageNet's.",
    "std": "per-channel normalisation standard deviation; None: the model's, else ImageNet's.",
    "interpolation": "resize interpolation (nearest, bilinear, bicubic, area, lanczos); None: the model's, "
                     "else bicubic.",
    "train_split": "name of the train split folder under root.",
    "val_split": "name of the validation split folder under root.",
    "test_split": "name of the test split folder under root; None: val_split.",
    "predict_split": "name of the predict split folder under root; None: val_split.",
    "predict_root": "folder of images (searched recursively) to predict instead of a split; an image in a folder "
                    "named like a class gets that class as target, others -1.",
    "hflip": "training horizontal-flip probability.",
    "rand_augment": "apply the RandAugment policy in training.",
    "ra_num_ops": "RandAugment operations drawn per image.",
    "ra_magnitude": "RandAugment magnitude on timm's 0..10 scale.",
    "random_erasing": "training random-erasing probability.",
    "scale": "RandomResizedCrop area range (min, max), as fractions of the image.",
    "affine": "probability of a mild random affine (rotation, shift, zoom, shear) in training.",
    "fill": "colour of areas uncovered by geometric augmentation or padding; None: the mean colour.",
    "pin_memory": "pin batches in page-locked memory (only when CUDA is available).",
    "persistent_workers": "keep DataLoader workers alive between epochs.",
    "drop_last": "drop the last partial training batch.",
    "seed": "seed of the training shuffle and augmentation; each epoch's streams derive from (seed, epoch).",
}


def _document_args(**specific: str) -> Callable[[type], type]:
    """Class decorator: append an ``Args:`` section with one ``name: help`` line per ``__init__`` parameter
    (``specific``, else the shared help); fails at import if a parameter has none."""

    def decorate(cls: type) -> type:
        helps = {**_ARG_HELP, **specific}
        names = [name for name in inspect.signature(cls.__init__).parameters if name != "self"]
        if missing := [name for name in names if name not in helps]:
            raise TypeError(f"{cls.__name__}.__init__ arguments without help text: {missing}")
        args = "\n".join(f"    {name}: {helps[name]}" for name in names)
        cls.__doc__ = f"{inspect.cleandoc(cls.__doc__ or '')}\n\nArgs:\n{args}\n"
        return cls

    return decorate


@_document_args()
class ImageClassificationDataModule(L.LightningDataModule):
    """Common part of the data modules: transform settings, DataLoaders (workers, pinning, reseeding, skipping),
    epoch-seeded training streams saved in checkpoints.

    Subclasses set ``class_names`` in ``__init__`` and implement :meth:`_make_dataset`.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
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
        num_workers = default_num_workers() if num_workers is None else num_workers
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
        self._epoch = 0
        self._sampler: EpochSampler | None = None  # of the latest train DataLoader

    # -- public attributes ------------------------------------------------------------------------------------
    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.transform_config.img_size

    @property
    def skipped_images(self) -> int:
        """Running count of unreadable images skipped by this process and all its DataLoader workers (persistent
        or not, any start method), over all stages; a file skipped in two epochs counts twice. Per rank (sum it
        over ranks when logging); restored from the checkpoint when a fit resumes."""
        return self._skip_counter.value

    # -- epochs and resuming ----------------------------------------------------------------------------------
    @property
    def epoch(self) -> int:
        """Epoch whose shuffle and augmentation the train DataLoader produces (Lightning sets it through the
        sampler's ``set_epoch`` at every epoch start; :meth:`set_epoch` sets it by hand)."""
        return self._sampler.epoch if self._sampler is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the train DataLoader (existing or future) produce the batches of ``epoch``."""
        self._epoch = int(epoch)
        if self._sampler is not None:
            self._sampler.set_epoch(self._epoch)

    def state_dict(self) -> dict[str, int]:
        """What Lightning stores in checkpoints: ``seed`` and ``epoch`` of the training streams and the
        ``skipped_images`` count (plain ints, loadable with ``torch.load(weights_only=True)``)."""
        return {"seed": self.seed, "epoch": self.epoch, "skipped_images": self.skipped_images}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning calls this when resuming, before it builds the train DataLoader).

        The checkpoint's seed wins over the configured one, with a warning if they differ, because the resumed
        epochs must replay the original run's streams.
        """
        seed = int(state_dict.get("seed", self.seed))
        if seed != self.seed:
            warnings.warn(f"data seed {self.seed} replaced by the checkpoint's {seed} so that the resumed epochs "
                          "see the batches of the original run", stacklevel=2)
        self.seed = seed
        if self._sampler is not None:
            self._sampler.seed = seed
        self.set_epoch(state_dict.get("epoch", self.epoch))
        # validate/test/predict from a training checkpoint count their own skips from zero
        if self.trainer is None or self.trainer.state.fn == "fit":
            self._skip_counter.reset(int(state_dict.get("skipped_images", self.skipped_images)))

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
        trainer = self.trainer
        rank, world_size = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = None
        if train:
            # a DistributedSampler already: Lightning keeps it under DDP rather than wrapping it
            sampler = self._sampler = EpochSampler(dataset, self.seed, self.epoch, world_size, rank)
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop_last,
            num_workers=self.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning without CUDA only warns
            persistent_workers=self.persistent_workers and workers,
            worker_init_fn=functools.partial(seed_worker, rank=rank, sampler=sampler) if workers else None,
            # every DataLoader iteration draws a base seed: from its own generator, not the global torch RNG
            generator=torch.Generator().manual_seed(derive_seed(self.seed, rank)),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")


@_document_args()
class ImageFolderDataModule(ImageClassificationDataModule):
    """Image classification data in the ImageNet folder layout (``root/train/<class>/*.JPEG``,
    ``root/val/<class>/*.JPEG``), with albumentations transforms.

    Class order is the sorted train class folder names. Every train class folder needs at least one image
    (checked here, at construction); val/test need the same class folders, which may be empty. Preprocessing
    (input size, mean/std, crop_pct, interpolation) comes from timm's pretrained cfg of ``model_name`` unless given.
    ``predict_root`` replaces ``predict_split``. Unreadable images are skipped with a warning and counted in
    :attr:`skipped_images`.
    """

    def __init__(
        self,
        root: str,
        img_size: int | tuple[int, int] | None = None,
        batch_size: int = 64,
        num_workers: int | None = None,
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
            empty_class_folders(train_dir, self.class_names)  # raises naming them: the first place they show
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
                f"the same class folders; a val/test class folder may be empty, a train class folder may not."
                f"\n{LAYOUT_HELP}")

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


@_document_args()
class ImageNetDataModule(ImageFolderDataModule):
    """:class:`ImageFolderDataModule` under the name of its main use (ImageNet-1k in the standard layout)."""
