"""The DataModules' shared base and DataLoader helpers.

Batches: train/val/test ``(images float32 [B, 3, H, W], targets int64 [B])``; predict ``(images, targets,
indices)``, ``targets = -1`` where unknown, ``indices`` into :meth:`predict_names`. Unreadable images are dropped
from their batch; a batch of only unreadable images is ``None``. Training batches depend on ``(seed, epoch)`` alone
(:class:`EpochSampler`), and a fit resumes at the next batch (:class:`ResumableDataLoader`).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, default_collate, get_worker_info

from .transforms import build_transforms, resolve_transform_config

__all__ = ["ImageClassificationDataModule"]


class SkipCounter:
    """Count of unreadable images shared by a process and its DataLoader workers (any start method): a shared-memory
    tensor with one slot per process (by pid, so no lock), summed when read; a plain pickle copies the count."""

    def __init__(self, start: int = 0) -> None:
        self.slots = torch.zeros(1024, dtype=torch.int64).share_memory_()
        self.slots[0] = start

    def reset(self, value: int = 0) -> None:
        """Set the count (e.g. restored from a checkpoint) while no worker is running."""
        self.slots.zero_()[0] = value

    def increment(self) -> None:
        self.slots[os.getpid() % len(self.slots)] += 1  # one writer per slot, barring pid collisions

    @property
    def value(self) -> int:
        return int(self.slots.sum())


def collate_skip_none(batch: list) -> Any:
    """``default_collate`` of the samples that are not ``None`` (skipped images); ``None`` if none is left."""
    batch = [sample for sample in batch if sample is not None]
    return default_collate(batch) if batch else None


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from integer ``keys`` (any sign) by ``numpy.random.SeedSequence``: unlike ``seed +
    epoch``, (seed 0, epoch 1) and (seed 1, epoch 0) get unrelated streams."""
    return int(np.random.SeedSequence([k % 2**64 for k in keys]).generate_state(1, np.uint64)[0] >> 1)


class EpochSampler(DistributedSampler):
    """Training sampler whose order and augmentations are a function of ``(seed, epoch)`` alone, so an epoch replays
    bit for bit after a resume with any number of workers. Every rank draws the same order and takes its
    ``rank::num_replicas`` share (padded like ``DistributedSampler``); each index comes with its augmentation seed.
    Being a ``DistributedSampler``, Lightning keeps it under DDP and calls :meth:`set_epoch`."""

    def __init__(self, dataset: Dataset, seed: int = 0, epoch: int = 0, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed)
        self.epoch = epoch
        self.start = 0  # samples of this rank's share that the next iteration skips (set by ResumableDataLoader)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.start = self.start, 0  # one iteration only: the next epoch starts at its beginning
        n = len(self.dataset)
        rng = np.random.default_rng(derive_seed(self.seed, self.epoch))
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        aug_seeds = rng.integers(0, 2**63, size=n, dtype=np.int64)
        order = np.resize(order, self.total_size)[self.rank:self.total_size:self.num_replicas][start:]
        return zip(order.tolist(), aug_seeds[order].tolist(), strict=True)


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose state (the sampler's epoch, the batches of it handed out) Lightning checkpoints: a fit
    resumed from a mid-epoch checkpoint continues with the next batch, with any number of workers. Resumed batches
    are skipped through the sampler's ``start`` (:class:`EpochSampler`) without loading them, or else dropped."""

    _resume: tuple[int, int] | None = None  # (epoch, batches) restored by load_state_dict, used by the next iteration
    _progress: list[int] | None = None  # [epoch, batches handed out] of the latest iteration

    def state_dict(self) -> dict[str, int]:
        """``{"epoch", "batches"}``: the epoch of the latest iteration and the batches it has handed out."""
        epoch, batches = self._resume or self._progress or (getattr(self.sampler, "epoch", 0), 0)
        return {"epoch": int(epoch), "batches": int(batches)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next iteration continue ``state_dict``'s epoch after its ``batches``, unless the sampler's epoch
        is changed before it starts (as Lightning does when that epoch was complete)."""
        epoch, batches = int(state_dict["epoch"]), int(state_dict["batches"])
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self._resume = (epoch, batches)

    def __iter__(self) -> Iterator[Any]:
        # a generator, started by the first next(): Lightning calls iter() before it sets the sampler's epoch, and
        # workers draw the sampler's indices as soon as the DataLoader iterator exists
        epoch, skip = int(getattr(self.sampler, "epoch", 0)), 0
        if self._resume is not None:
            skip = self._resume[1] if self._resume[0] == epoch else 0
            self._resume = None
        progress = self._progress = [epoch, skip]
        by_sampler = skip and self.batch_size is not None and hasattr(self.sampler, "start")
        if by_sampler:
            self.sampler.start = skip * self.batch_size
        iterator = super().__iter__()
        for _ in range(0 if by_sampler else skip):
            next(iterator, None)
        for batch in iterator:
            progress[1] += 1
            yield batch


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: reseed the dataset's augmentation, which forked workers would share, from the
    worker's seed (torch seeds the global generators with it; distinct per worker, rank and iteration)."""
    info = get_worker_info()
    if hasattr(info.dataset, "reseed"):
        info.dataset.reseed(info.seed)


def default_num_workers() -> int:
    """Default DataLoader workers per process: the usable cores minus one for the main process, at most 8."""
    # sched_getaffinity (Linux) honours taskset/cgroup limits, as DataLoader's own check does
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(0, min(8, cores - 1))


class ImageClassificationDataModule(L.LightningDataModule):
    """Base of the data modules: transform settings, DataLoaders, epoch-seeded training streams saved in checkpoints.
    Subclasses set ``class_names`` in ``__init__``, implement :meth:`_make_dataset` and :meth:`predict_names`, and
    save their hyper-parameters without ``model_name`` and ``img_size`` (the model's: Lightning would see a clash).

    Args:
        img_size: input size, an int or (height, width); None: the pretrained cfg of model_name, else 224.
        batch_size: images per batch (per process).
        num_workers: DataLoader worker processes (per process); None: usable CPU cores - 1, at most 8.
        model_name: timm model whose pretrained cfg supplies the preprocessing defaults.
        crop_pct: eval crop: resize the shorter side to img_size / crop_pct, centre-crop; None: model's, else 0.875.
        mean: per-channel normalisation mean on a 0..1 scale; None: the model's, else ImageNet's.
        std: per-channel normalisation standard deviation; None: the model's, else ImageNet's.
        interpolation: resize interpolation (nearest, bilinear, bicubic, area, lanczos); None: model's, else bicubic.
        hflip: training horizontal-flip probability.
        rand_augment: apply the RandAugment policy in training.
        ra_num_ops: RandAugment operations drawn per image.
        ra_magnitude: RandAugment magnitude on timm's 0..10 scale.
        random_erasing: training random-erasing probability.
        scale: RandomResizedCrop area range (min, max), as fractions of the image.
        affine: probability of a mild random affine (rotation, shift, zoom, shear) in training.
        fill: colour of areas uncovered by geometric augmentation or padding; None: the mean colour.
        pin_memory: pin batches in page-locked memory (only when CUDA is available).
        persistent_workers: keep DataLoader workers alive between epochs.
        drop_last: drop the last partial training batch.
        seed: seed of the training shuffle and augmentation; each epoch's streams derive from (seed, epoch).
    """

    def __init__(
        self, img_size: int | tuple[int, int] | None = None, batch_size: int = 64, num_workers: int | None = None,
        model_name: str | None = None, crop_pct: float | None = None, mean: tuple[float, float, float] | None = None,
        std: tuple[float, float, float] | None = None, interpolation: str | None = None, hflip: float = 0.5,
        rand_augment: bool = True, ra_num_ops: int = 2, ra_magnitude: float = 9.0, random_erasing: float = 0.0,
        scale: tuple[float, float] = (0.08, 1.0), affine: float = 0.0, fill: int | tuple[int, int, int] | None = None,
        pin_memory: bool = True, persistent_workers: bool = True, drop_last: bool = True, seed: int = 0,
    ) -> None:
        super().__init__()
        self.batch_size = batch_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        if batch_size < 1 or self.num_workers < 0:
            raise ValueError(f"need batch_size >= 1 and num_workers >= 0, got {batch_size} and {num_workers}")
        self.transform_config = resolve_transform_config(model_name, img_size, crop_pct, mean, std, interpolation)
        self.augment = dict(hflip=hflip, rand_augment=rand_augment, ra_num_ops=ra_num_ops, ra_magnitude=ra_magnitude,
                            random_erasing=random_erasing, scale=tuple(scale), affine=affine, fill=fill)
        self.pin_memory, self.persistent_workers, self.drop_last = pin_memory, persistent_workers, drop_last
        self.seed = seed
        self.build_transform(True)  # validates the options now, not in a worker
        self.class_names: list[str] = []
        self._skip_counter = SkipCounter()
        self._datasets: dict[str, Dataset] = {}
        self._epoch = 0
        self._train_loader: ResumableDataLoader | None = None  # the latest train DataLoader
        self._resume_batches = 0  # batches of `epoch` done before the checkpoint, for the next train DataLoader

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def img_size(self) -> tuple[int, int]:
        return self.transform_config.img_size

    @property
    def skipped_images(self) -> int:
        """Unreadable images skipped by this process and all its DataLoader workers, over all stages (a file
        skipped in two epochs counts twice); per rank; restored from the checkpoint when a fit resumes."""
        return self._skip_counter.value

    @property
    def epoch(self) -> int:
        """Epoch whose batches the train DataLoader produces (Lightning sets it every epoch via the sampler)."""
        return self._train_loader.sampler.epoch if self._train_loader is not None else self._epoch

    def set_epoch(self, epoch: int) -> None:
        """Make the train DataLoader (existing or future) produce the batches of ``epoch``."""
        self._epoch = int(epoch)
        if self._train_loader is not None:
            self._train_loader.sampler.set_epoch(self._epoch)

    def state_dict(self) -> dict[str, int]:
        """Saved in Lightning checkpoints: ``seed``, ``epoch`` and ``skipped_images`` (plain ints), plus ``batches``
        when the train DataLoader is inside ``epoch``: the batches it has handed out."""
        state = {"seed": self.seed, "epoch": self.epoch, "skipped_images": self.skipped_images}
        batches = self._resume_batches
        if self._train_loader is not None:
            loader = self._train_loader.state_dict()
            batches = loader["batches"] if loader["epoch"] == state["epoch"] else 0
            batches = batches if batches < len(self._train_loader) else 0  # a complete epoch: nothing to resume
        return {**state, "batches": batches} if batches else state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (Lightning does it before building the train DataLoader when resuming). The
        checkpoint's seed wins over the configured one, with a warning, so the resumed epochs replay the original's."""
        seed = int(state_dict.get("seed", self.seed))
        if seed != self.seed:
            warnings.warn(f"data seed {self.seed} replaced by the checkpoint's {seed} so that the resumed epochs "
                          "see the batches of the original run", stacklevel=2)
        self.seed = seed
        self._epoch = int(state_dict.get("epoch", self.epoch))
        # Lightning restores the train DataLoader's own state only if it builds the loader after the checkpoint's
        # loops, but `trainer.estimated_stepping_batches` in configure_optimizers builds it before: keep it here too
        self._resume_batches = int(state_dict.get("batches", 0))
        if self._train_loader is not None:
            self._train_loader.sampler.seed = seed
            self._train_loader.load_state_dict({"epoch": self._epoch, "batches": self._resume_batches})
        # validate/test/predict from a training checkpoint count their own skips from zero
        if self.trainer is None or self.trainer.state.fn == "fit":
            self._skip_counter.reset(int(state_dict.get("skipped_images", self.skipped_images)))

    def predict_names(self) -> list[str]:
        """Name (file path or stable id) of each predict sample, in the order of the predict batches' indices."""
        raise NotImplementedError

    def build_transform(self, train: bool):
        """The albumentations pipeline used for training (``train=True``) or evaluation."""
        cfg = self.transform_config
        return build_transforms(train, cfg.img_size, cfg.crop_pct, cfg.mean, cfg.std, cfg.interpolation,
                                seed=self.seed, **self.augment)

    def dataset(self, stage: str) -> Dataset:
        """Cached dataset of a stage (``'train'``, ``'val'``, ``'test'``, ``'predict'``)."""
        if stage not in ("train", "val", "test", "predict"):
            raise ValueError(f"unknown stage {stage!r}")
        if stage not in self._datasets:
            self._datasets[stage] = self._make_dataset(stage)
        return self._datasets[stage]

    def setup(self, stage: str | None = None) -> None:
        for name in {"validate": ["val"], "test": ["test"], "predict": ["predict"]}.get(stage, ["train", "val"]):
            self.dataset(name)

    def _loader(self, stage: str) -> DataLoader:
        dataset, train = self.dataset(stage), stage == "train"
        drop_last = train and self.drop_last
        if drop_last and len(dataset) < self.batch_size:
            warnings.warn(f"training set ({len(dataset)} images) is smaller than one batch ({self.batch_size}); "
                          "keeping the partial batch instead of dropping it", stacklevel=3)
            drop_last = False
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        sampler = EpochSampler(dataset, self.seed, self.epoch, world_size, rank) if train else None
        loader = (ResumableDataLoader if train else DataLoader)(
            dataset, batch_size=self.batch_size, sampler=sampler, drop_last=drop_last, num_workers=self.num_workers,
            collate_fn=collate_skip_none,
            pin_memory=self.pin_memory and torch.cuda.is_available(),  # pinning without CUDA only warns
            persistent_workers=self.persistent_workers and self.num_workers > 0,
            worker_init_fn=seed_worker if self.num_workers else None,
            # the workers' seeds: from the loader's own generator (per rank), not the global torch RNG
            generator=torch.Generator().manual_seed(derive_seed(self.seed, rank)))
        if train:
            self._train_loader = loader
            if self._resume_batches:  # the loader now holds the position (its state_dict reports it until used)
                loader.load_state_dict({"epoch": self.epoch, "batches": self._resume_batches})
                self._resume_batches = 0
        return loader

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")
