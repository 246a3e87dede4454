"""Tests of tokenformer_vision.data: transforms, decoding, image folders, skipping, worker reseeding, epoch-seeded
training streams and resuming, CLI help, digits."""

from __future__ import annotations

import math
import pickle
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    IMAGEFOLDER_CLASSES,
    IMAGEFOLDER_CORRUPT,
    IMAGEFOLDER_TRAIN_PER_CLASS,
    IMAGEFOLDER_VAL_PER_CLASS,
    make_imagefolder,
    write_image,
)
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from tokenformer_vision.data import (
    DigitsDataModule,
    IDXDataModule,
    ImageClassificationDataModule,
    ImageFolderDataModule,
    ImageNetDataModule,
    build_transforms,
    load_rgb,
    reseed_transform,
)
from tokenformer_vision.data.datamodule import EpochSampler, collate_skip_none, default_num_workers
from tokenformer_vision.data.digits import load_digits_rgb
from tokenformer_vision.data.folder import ImageFileDataset
from tokenformer_vision.data.transforms import rand_augment_policy, resolve_transform_config

N_TRAIN = IMAGEFOLDER_TRAIN_PER_CLASS * len(IMAGEFOLDER_CLASSES)
N_VAL = IMAGEFOLDER_VAL_PER_CLASS * len(IMAGEFOLDER_CLASSES)


def small_dm(root, **kwargs) -> ImageFolderDataModule:
    kwargs = {"img_size": 32, "batch_size": 5, "num_workers": 0, **kwargs}
    return ImageFolderDataModule(str(root), **kwargs)


def drain(loader) -> list:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [batch for batch in loader if batch is not None]


# ---------------------------------------------------------------------------------------------------- transforms
def test_eval_transform_normalises_a_constant_image_exactly():
    img = np.empty((50, 70, 3), np.uint8)
    img[...] = (200, 100, 50)
    out = build_transforms(False, 32, crop_pct=0.875)(image=img)["image"]
    assert out.shape == (3, 32, 32) and out.dtype == torch.float32
    expected = (np.array([200, 100, 50]) / 255.0 - np.array(IMAGENET_DEFAULT_MEAN)) / np.array(IMAGENET_DEFAULT_STD)
    for c in range(3):
        torch.testing.assert_close(out[c], torch.full((32, 32), float(expected[c])), atol=1e-5, rtol=0)
    out = build_transforms(False, 16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))(image=img)["image"]
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([(200 / 255 - 0.5) / 0.25, (100 / 255 - 0.5) / 0.25,
                                                           (50 / 255 - 0.5) / 0.25]), atol=1e-5, rtol=0)


def _column_ramp(height: int, width: int, step: int) -> np.ndarray:
    ramp = (np.arange(width) * step).astype(np.uint8)
    return np.repeat(np.broadcast_to(ramp[None, :, None], (height, width, 1)), 3, axis=2).copy()


def test_eval_transform_resizes_shorter_side_then_centre_crops():
    plain = dict(mean=(0, 0, 0), std=(1 / 255,) * 3)  # normalisation -> identity on 0..255 values
    # shorter side already floor(40 / 0.8) = 50: no resize, centre crop rows 5..44, cols 30..69
    img = _column_ramp(50, 100, 2) + np.arange(50, dtype=np.uint8)[:, None, None]
    out = build_transforms(False, 40, crop_pct=0.8, **plain)(image=img)["image"]
    np.testing.assert_allclose(out[0].numpy(), img[5:45, 30:70, 0], atol=1e-3)
    # 100x200 -> shorter side 50 (area downscale averages 2x2 blocks: 4k+1 exactly) -> 50x100 -> cols 30..69
    img = _column_ramp(100, 200, 1)
    out = build_transforms(False, 40, crop_pct=0.8, interpolation="bicubic", **plain)(image=img)["image"]
    expected = np.broadcast_to((np.arange(30, 70) * 2 + 0.5), (40, 40))
    np.testing.assert_allclose(out[1].numpy(), np.round(expected), atol=1.0)
    # portrait image, non-square output, crop larger than the resized image (crop_pct > 1 pads)
    img = _column_ramp(90, 45, 1)
    assert build_transforms(False, (24, 40), crop_pct=1.0)(image=img)["image"].shape == (3, 24, 40)
    assert build_transforms(False, 32, crop_pct=1.25)(image=img)["image"].shape == (3, 32, 32)


def test_train_transform_is_random_but_seeded():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    t1 = build_transforms(True, 32, random_erasing=0.5, seed=3)
    t2 = build_transforms(True, 32, random_erasing=0.5, seed=3)
    a = [t1(image=img)["image"] for _ in range(4)]
    b = [t2(image=img)["image"] for _ in range(4)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in a)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))  # same seed, same stream
    assert not torch.equal(a[0], a[1])  # consecutive calls differ
    c = build_transforms(True, 32, random_erasing=0.5, seed=4)(image=img)["image"]
    assert not torch.equal(a[0], c)


def test_reseed_gives_child_transforms_independent_draws():
    import albumentations as A

    # Compose.set_random_seed would give both flips identical streams: they would always flip together
    img = np.arange(16, dtype=np.uint8).reshape(4, 4, 1).repeat(3, axis=2)
    pipeline = A.Compose([A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)])
    reseed_transform(pipeline, 123)
    outcomes = Counter()
    for _ in range(40):
        out = pipeline(image=img)["image"][..., 0]
        outcomes[(bool(out[0, 0] in (3, 15)), bool(out[0, 0] in (12, 15)))] += 1
    assert len(outcomes) == 4  # all four flip combinations occur


def test_rand_augment_ops_all_run_and_change_the_image():
    rng = np.random.default_rng(1)
    img = rng.integers(30, 220, (48, 64, 3), dtype=np.uint8)
    policy = rand_augment_policy(num_ops=2, magnitude=9, p=1.0)
    changed = 0
    for op in policy.transforms:
        op.p = 1.0
        out = op(image=img)["image"]
        assert out.shape == img.shape and out.dtype == np.uint8, op
        changed += int(not np.array_equal(out, img))
    assert changed >= len(policy.transforms) - 2  # a zero-strength draw may leave an image unchanged
    with pytest.raises(ValueError, match="magnitude"):
        rand_augment_policy(magnitude=12)


def test_transform_config_from_timm_pretrained_cfg():
    cfg = resolve_transform_config("tokenformer_tiny")
    assert cfg.img_size == (224, 224) and cfg.crop_pct == 0.875 and cfg.interpolation == "bicubic"
    assert cfg.mean == IMAGENET_DEFAULT_MEAN and cfg.std == IMAGENET_DEFAULT_STD
    cfg = resolve_transform_config("vit_base_patch16_224.augreg2_in21k_ft_in1k", img_size=64, crop_pct=1.0)
    assert cfg.img_size == (64, 64) and cfg.crop_pct == 1.0 and cfg.mean == (0.5, 0.5, 0.5)
    cfg = resolve_transform_config(None, interpolation="bilinear")
    assert cfg.img_size == (224, 224) and cfg.interpolation == "bilinear"
    with pytest.raises(ValueError, match="no model"):
        resolve_transform_config("not_a_model_xyz")
    with pytest.raises(ValueError, match="interpolation"):
        resolve_transform_config(interpolation="fancy")


def test_load_rgb_converts_modes(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_image(tmp_path / "g.jpeg", rgb, "gray")
    write_image(tmp_path / "a.png", rgb, "rgba")
    from PIL import Image

    Image.fromarray(rgb).convert("CMYK").save(tmp_path / "c.jpg")
    for name in ("g.jpeg", "a.png", "c.jpg"):
        out = load_rgb(tmp_path / name)
        assert out.shape == (20, 30, 3) and out.dtype == np.uint8, name
    np.testing.assert_array_equal(load_rgb(tmp_path / "a.png"), rgb)  # lossless PNG, alpha dropped
    gray = load_rgb(tmp_path / "g.jpeg")
    assert np.array_equal(gray[..., 0], gray[..., 1]) and np.array_equal(gray[..., 0], gray[..., 2])
    # a truncated JPEG must fail loudly (so the dataset skips it) rather than decode partially
    Image.fromarray(rgb).save(tmp_path / "t.jpg", quality=95)
    data = (tmp_path / "t.jpg").read_bytes()
    (tmp_path / "t.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(OSError, match="truncated"):
        load_rgb(tmp_path / "t.jpg")


def test_load_rgb_scales_16_bit_grayscale(tmp_path):
    from PIL import Image

    values = np.array([[0, 1, 128, 129, 257, 1000], [32767, 32896, 40000, 65278, 65534, 65535]], np.uint16)
    expected = np.round(values / 257.0).astype(np.uint8)  # 257 * k -> k exactly; 65535 -> 255
    Image.fromarray(values).save(tmp_path / "g16.png")  # 16-bit grayscale PNG (PIL mode I;16)
    Image.fromarray(values).save(tmp_path / "g16.tif")
    Image.fromarray(values.astype(np.int32)).save(tmp_path / "i32.tif")  # mode I
    assert Image.open(tmp_path / "g16.png").mode == "I;16" and Image.open(tmp_path / "i32.tif").mode == "I"
    for name in ("g16.png", "g16.tif", "i32.tif"):
        out = load_rgb(tmp_path / name)
        assert out.shape == (2, 6, 3) and out.dtype == np.uint8, name
        for c in range(3):
            np.testing.assert_array_equal(out[..., c], expected, err_msg=name)


# ---------------------------------------------------------------------------------------------- image folders
def test_imagefolder_classes_samples_and_batches(imagefolder):
    dm = small_dm(imagefolder, rand_augment=True, random_erasing=0.25)
    assert ImageNetDataModule is not ImageFolderDataModule and issubclass(ImageNetDataModule, ImageFolderDataModule)
    assert dm.class_names == ["cat", "dog", "fox"] and dm.num_classes == 3  # before setup
    dm.setup("fit")
    train, val = dm.dataset("train"), dm.dataset("val")
    assert len(train) == N_TRAIN + 1 and len(val) == N_VAL  # the corrupt file is listed, skipped on load
    assert Counter(t for _, t in val.samples) == {0: 4, 1: 4, 2: 4}
    assert any(p.endswith(".JPG") for p, _ in train.samples) and any(p.endswith(".png") for p, _ in train.samples)
    for batch in drain(dm.val_dataloader()):
        images, targets = batch
        assert images.dtype == torch.float32 and images.shape[1:] == (3, 32, 32)
        assert targets.dtype == torch.int64 and targets.min() >= 0 and targets.max() < 3
    batches = drain(dm.train_dataloader())
    assert sum(len(t) for _, t in batches) == N_TRAIN  # 25 files = 5 full batches, minus the corrupt one
    assert all(x.shape[1:] == (3, 32, 32) for x, _ in batches)
    test = drain(dm.test_dataloader())  # test defaults to val
    assert sum(len(t) for _, t in test) == N_VAL


def test_class_order_is_sorted_and_hidden_or_non_image_files_ignored(tmp_path):
    for split in ("train", "val"):
        for name in ("zebra", "Moose", "ant"):
            (tmp_path / split / name).mkdir(parents=True)
            write_image(tmp_path / split / name / "a.JpEg", np.zeros((8, 8, 3), np.uint8))
            write_image(tmp_path / split / name / "b.WEBP.jpg", np.zeros((8, 8, 3), np.uint8))
            (tmp_path / split / name / "notes.txt").write_text("not an image")
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    dm = small_dm(tmp_path)
    assert dm.class_names == ["Moose", "ant", "zebra"]
    samples = dm.dataset("train").samples
    assert [Path(p).name for p, _ in samples] == ["a.JpEg", "b.WEBP.jpg"] * 3
    assert [t for _, t in samples] == [0, 0, 1, 1, 2, 2]


def test_transform_settings_follow_model_cfg(imagefolder):
    dm = ImageFolderDataModule(str(imagefolder), model_name="tokenformer_tiny", num_workers=0)
    assert dm.img_size == (224, 224)
    resize = dm.build_transform(False).transforms[0]
    assert resize.max_size == math.floor(224 / 0.875)
    dm = ImageFolderDataModule(str(imagefolder), model_name="vit_base_patch16_224", img_size=48, crop_pct=0.5)
    assert dm.img_size == (48, 48) and dm.build_transform(False).transforms[0].max_size == 96
    assert dm.transform_config.mean == (0.5, 0.5, 0.5)


def test_corrupt_image_is_skipped_with_warning_and_counted(imagefolder):
    dm = small_dm(imagefolder, batch_size=4, drop_last=False)
    with pytest.warns(UserWarning, match="corrupt.JPEG"):
        batches = [b for b in dm.train_dataloader() if b is not None]
    assert dm.skipped_images == 1
    assert sum(len(t) for _, t in batches) == N_TRAIN
    # 25 files in batches of 4: the batch that held the corrupt file shrank by one (or, had it been the last,
    # one-file batch, that batch vanished)
    sizes = sorted(len(t) for _, t in batches)
    assert sizes in ([1, 3] + [4] * 5, [4] * 6), sizes
    # a dataset of only unreadable files yields None batches instead of crashing
    bad = ImageFileDataset([(str(imagefolder / IMAGEFOLDER_CORRUPT), 0)] * 3, dm.build_transform(False))
    with pytest.warns(UserWarning, match="unreadable"):
        assert list(DataLoader(bad, batch_size=2, collate_fn=collate_skip_none)) == [None, None]
    assert bad.skip_counter.value == 3


def test_skip_count_is_shared_with_workers_and_picklable(imagefolder):
    dm = small_dm(imagefolder, num_workers=2, persistent_workers=False)
    loader = dm.train_dataloader()
    assert loader.persistent_workers is False and loader.pin_memory == torch.cuda.is_available()
    assert sum(len(t) for _, t in drain(loader)) == N_TRAIN
    assert dm.skipped_images == 1  # counted in a worker process, visible here
    clone = pickle.loads(pickle.dumps(dm))  # outside a worker spawn the counter degrades to a local copy
    assert clone.skipped_images == 1 and clone.num_classes == 3
    dm0 = small_dm(imagefolder)
    assert dm0.train_dataloader().persistent_workers is False  # never with num_workers=0


def test_skip_count_adds_up_over_persistent_workers_and_epochs(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    for i in range(4):
        write_image(tmp_path / "train" / "a" / f"ok{i}.png", np.zeros((8, 8, 3), np.uint8))
    for i in range(6):  # spread over both workers
        (tmp_path / "train" / "a" / f"bad{i}.jpg").write_bytes(b"not an image")
    dm = small_dm(tmp_path, batch_size=1, num_workers=2, persistent_workers=True)
    assert sum(len(t) for _, t in _epoch_batches(dm, range(2))[1]) == 4
    assert dm.skipped_images == 12 and dm.state_dict()["skipped_images"] == 12


def test_worker_reseeding_gives_each_worker_its_own_augmentations(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
    (tmp_path / "train" / "only").mkdir(parents=True)
    for i in range(8):  # identical images: any difference between outputs comes from augmentation
        write_image(tmp_path / "train" / "only" / f"{i}.png", rgb)
    dm = small_dm(tmp_path, batch_size=1, num_workers=2, persistent_workers=False)
    loader = dm.train_dataloader()

    def per_worker(dl):
        outs = [x[0] for x, _ in dl]  # with 2 workers batches alternate: worker 0, worker 1, worker 0, ...
        return outs[0::2], outs[1::2]

    torch.manual_seed(0)
    w0, w1 = per_worker(loader)
    assert len(w0) == len(w1) == 4
    assert not any(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))
    assert len({x.numpy().tobytes() for x in w0 + w1}) == 8
    # control: the same loader without our worker_init_fn repeats augmentations across workers
    plain = DataLoader(loader.dataset, batch_size=1, shuffle=True, num_workers=2, collate_fn=collate_skip_none)
    w0, w1 = per_worker(plain)
    assert all(torch.equal(a, b) for a, b in zip(w0, w1, strict=True))


def test_predict_split_and_predict_root(imagefolder, tmp_path):
    dm = small_dm(imagefolder)
    names = dm.predict_names()
    assert len(names) == N_VAL and names == sorted(names) and all("/val/" in n for n in names)
    seen = []
    for images, targets, indices in drain(dm.predict_dataloader()):
        assert images.shape[1:] == (3, 32, 32) and targets.dtype == torch.int64
        for t, i in zip(targets.tolist(), indices.tolist(), strict=True):
            assert Path(names[i]).parent.name == dm.class_names[t]
            seen.append(i)
    assert seen == list(range(N_VAL))
    # a loose folder of images: unknown targets are -1, images under a class-named folder get that class
    write_image(tmp_path / "x.jpg", np.zeros((30, 20, 3), np.uint8))
    (tmp_path / "sub" / "fox").mkdir(parents=True)
    write_image(tmp_path / "sub" / "fox" / "y.png", np.zeros((30, 20, 3), np.uint8))
    (tmp_path / "sub" / "readme.md").write_text("skip me")
    dm = small_dm(imagefolder, predict_root=str(tmp_path))
    assert dm.predict_names() == [str(tmp_path / "sub" / "fox" / "y.png"), str(tmp_path / "x.jpg")]
    (images, targets, indices), = drain(dm.predict_dataloader())
    assert targets.tolist() == [2, -1] and indices.tolist() == [0, 1]


def test_layout_errors(imagefolder, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train/<class>/xxx\.JPEG"):
        small_dm(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"train/<class>"):
        small_dm(empty)
    (empty / "train").mkdir()
    with pytest.raises(ValueError, match="no class sub-folders"):
        small_dm(empty)
    (empty / "train" / "a").mkdir()
    (empty / "train" / "b").mkdir()
    with pytest.raises(ValueError, match=r"(?s)contains no images.*train/<class>"):
        small_dm(empty).setup("fit")
    write_image(empty / "train" / "a" / "1.jpg", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match=r"class folder\(s\).*\['b'\]"):
        small_dm(empty).setup("fit")
    # val with other classes than train
    make_imagefolder(tmp_path / "mismatch", train_per_class=1, val_per_class=1, corrupt=False)
    (tmp_path / "mismatch" / "val" / "fox").rename(tmp_path / "mismatch" / "val" / "wolf")
    with pytest.raises(ValueError, match=r"missing \['fox'\].*unexpected \['wolf'\]"):
        small_dm(tmp_path / "mismatch")
    # missing val split: fine until validation needs it
    make_imagefolder(tmp_path / "noval", train_per_class=1, val_per_class=1, corrupt=False)
    for f in (tmp_path / "noval" / "val").rglob("*.*"):
        f.unlink()
    with pytest.raises(ValueError, match="contains no images"):
        small_dm(tmp_path / "noval").setup("validate")
    with pytest.raises(ValueError, match="probability"):
        small_dm(imagefolder, hflip=1.5)


def test_empty_train_class_folder_fails_at_construction_and_empty_val_folder_is_allowed(tmp_path):
    make_imagefolder(tmp_path, train_per_class=1, val_per_class=1, corrupt=False)
    (tmp_path / "val" / "wolf").mkdir()
    # the mismatch message tells which splits may hold empty class folders ...
    with pytest.raises(ValueError, match=r"(?s)unexpected \['wolf'\].*a train class folder may not"):
        small_dm(tmp_path)
    # ... so an empty train folder is refused right away, naming it (not later in setup)
    (tmp_path / "train" / "wolf").mkdir()
    with pytest.raises(ValueError, match=r"1 class folder\(s\) of .*train contain no images: \['wolf'\]"):
        small_dm(tmp_path)
    (tmp_path / "train" / "wolf" / "sub").mkdir()  # images may sit in sub-folders of a class folder
    write_image(tmp_path / "train" / "wolf" / "sub" / "w.png", np.zeros((8, 8, 3), np.uint8))
    dm = small_dm(tmp_path)  # val/wolf is still empty: allowed, with a warning when the split is scanned
    assert dm.class_names == ["cat", "dog", "fox", "wolf"]
    with pytest.warns(UserWarning, match=r"class folder\(s\) of .*val contain no images: \['wolf'\]"):
        dm.setup("validate")
    assert len(dm.dataset("val")) == 3


def test_num_workers_default_follows_the_usable_cores(imagefolder, monkeypatch):
    import os

    for cores, expected in ((1, 0), (2, 1), (4, 3), (9, 8), (64, 8)):
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid, n=cores: set(range(n)), raising=False)
        assert default_num_workers() == expected
        assert ImageFolderDataModule(str(imagefolder)).num_workers == expected
    assert ImageFolderDataModule(str(imagefolder), num_workers=3).num_workers == 3
    assert DigitsDataModule().num_workers == 0  # in-memory data: no workers by default


def test_every_datamodule_argument_has_its_own_cli_help():
    import inspect

    from lightning.pytorch.cli import LightningArgumentParser

    base = [n for n in inspect.signature(ImageClassificationDataModule.__init__).parameters if n != "self"]
    for cls in (ImageFolderDataModule, ImageNetDataModule, DigitsDataModule, IDXDataModule):
        parser = LightningArgumentParser()
        parser.add_class_arguments(cls, "data")
        helps = {action.dest: action.help for action in parser._actions}
        params = inspect.signature(cls.__init__).parameters
        own = [n for n, p in params.items() if n != "self" and p.kind != p.VAR_KEYWORD]
        # options passed on through **kwargs are the base class's: the CLI must list and document them too
        names = own + [n for n in base if n not in own] if "kwargs" in params else own
        assert len(names) > 15, (cls.__name__, names)
        if cls is not IDXDataModule:  # IDX files have no RandAugment, RandomResizedCrop or eval-crop options
            assert set(base) <= set(names), (cls.__name__, names)
            assert "RandAugment" in helps["data.ra_magnitude"]
        for name in names:
            text = helps.get(f"data.{name}")
            assert isinstance(text, str) and len(text) > 10, (cls.__name__, name, text)
        assert "RandAugment" not in helps["data.hflip"]
        assert len({helps[f"data.{n}"] for n in names}) == len(names)  # no shared catch-all lines


def test_small_training_set_keeps_partial_batch(imagefolder):
    dm = small_dm(imagefolder, batch_size=64)
    with pytest.warns(UserWarning, match="smaller than one batch"):
        loader = dm.train_dataloader()
    assert loader.drop_last is False


# ---------------------------------------------------------------------------------------------------- resuming
def _epoch_batches(dm, epochs) -> dict[int, list]:
    """Train batches of each epoch, taken from ONE train DataLoader (workers persist across epochs, as in a fit)."""
    loader = dm.train_dataloader()
    out = {}
    for epoch in epochs:
        dm.set_epoch(epoch)
        out[epoch] = drain(loader)
    return out


def _same_batches(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(x, u) and torch.equal(y, v)
                                    for (x, y), (u, v) in zip(a, b, strict=True))


def test_train_epochs_replay_bit_for_bit_after_load_state_dict(imagefolder):
    kw = dict(batch_size=4, rand_augment=True, random_erasing=0.5, persistent_workers=True, drop_last=False, seed=7)
    runs = {}
    for workers in (0, 2):
        torch.manual_seed(workers)  # the global RNG must not matter
        dm = small_dm(imagefolder, num_workers=workers, **kw)
        runs[workers] = _epoch_batches(dm, range(3))
        state = dm.state_dict()
        assert state == {"seed": 7, "epoch": 2, "skipped_images": 3}  # the corrupt file, once per epoch
        resumed = small_dm(imagefolder, num_workers=workers, **kw)
        resumed.load_state_dict(state)
        assert resumed.epoch == 2 and resumed.skipped_images == 3
        assert _same_batches(drain(resumed.train_dataloader()), runs[workers][2])
        assert resumed.skipped_images == 4
        targets = [torch.cat([y for _, y in runs[workers][e]]).tolist() for e in range(3)]
        assert targets[0] != targets[1] != targets[2] != targets[0]  # each epoch has its own order
        assert sorted(targets[0]) == sorted(targets[2])
    # the batches are a function of (seed, epoch) alone: the number of workers changes nothing
    for epoch in range(3):
        assert _same_batches(runs[0][epoch], runs[2][epoch])
    # another seed, other batches; a checkpoint's seed replaces the configured one (with a warning)
    other = small_dm(imagefolder, **{**kw, "seed": 8})
    other.set_epoch(2)
    assert not _same_batches(drain(other.train_dataloader()), runs[0][2])
    with pytest.warns(UserWarning, match="seed 8 replaced by the checkpoint's 7"):
        other.load_state_dict({"seed": 7, "epoch": 2, "skipped_images": 0})
    assert _same_batches(drain(other.train_dataloader()), runs[0][2])


@pytest.mark.parametrize("workers", [0, 2])
def test_train_loader_resumes_mid_epoch_with_any_workers(imagefolder, workers):
    """The train DataLoader's state (epoch, batches handed out) continues an epoch at the next batch, restored
    through the data module (its checkpoint entry) or the loader itself (Lightning's loop state); a loader whose
    epoch is then moved on (Lightning's resume from a complete epoch) starts the new epoch at its beginning."""
    kw = dict(batch_size=4, random_erasing=0.5, drop_last=False, seed=3)

    def dm_at(epoch: int) -> ImageFolderDataModule:
        dm = small_dm(imagefolder, num_workers=workers, **kw)
        dm.set_epoch(epoch)
        return dm

    full, following = drain(dm_at(1).train_dataloader()), drain(dm_at(2).train_dataloader())
    dm = dm_at(1)
    loader = dm.train_dataloader()
    batches = iter(loader)
    first = [next(batches) for _ in range(2)]
    assert loader.state_dict() == {"epoch": 1, "batches": 2}
    assert dm.state_dict() == {"seed": 3, "epoch": 1, "skipped_images": dm.skipped_images, "batches": 2}
    resumed = small_dm(imagefolder, num_workers=workers, **kw)
    resumed.load_state_dict(dm.state_dict())
    rest = drain(resumed.train_dataloader())
    assert len(rest) == len(full) - 2 and _same_batches(first + rest, full)
    assert resumed.state_dict()["epoch"] == 1 and "batches" not in resumed.state_dict()  # the epoch is complete
    again = dm_at(0).train_dataloader()
    again.load_state_dict(loader.state_dict())
    assert _same_batches(drain(again), full[2:]) and _same_batches(drain(again), full)  # once, then from 0
    moved = small_dm(imagefolder, num_workers=workers, **kw)
    moved.load_state_dict({"seed": 3, "epoch": 1, "skipped_images": 0, "batches": 2})
    batches = iter(moved.train_dataloader())  # Lightning: iter() first, then the epoch, then the batches
    moved.set_epoch(2)
    assert _same_batches(drain(batches), following)


def test_epoch_sampler_order_seeds_and_rank_shares():
    data = list(range(10))
    sampler = EpochSampler(data, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == data and list(sampler) == first  # a permutation, repeatable
    sampler.set_epoch(1)
    assert list(sampler) != first
    # per-sample augmentation seeds belong to the index, so every rank agrees on them; ranks split the order
    shares = [list(EpochSampler(data, seed=3, epoch=1, num_replicas=3, rank=r)) for r in range(3)]
    assert all(len(share) == 4 for share in shares)  # 10 padded to 12
    merged = [pair for rank_pairs in zip(*shares, strict=True) for pair in rank_pairs]
    assert merged[:10] == list(sampler) and merged[10:] == list(sampler)[:2]
    # (seed, epoch) is mixed, not added: seed 3 / epoch 1 and seed 4 / epoch 0 are unrelated
    assert list(EpochSampler(data, seed=4, epoch=0)) != list(sampler)


@pytest.mark.parametrize("workers", [0, 2])
def test_lightning_sets_the_epoch_and_a_resumed_fit_replays_its_batches(imagefolder, tmp_path, workers):
    """Resumed from an end-of-epoch checkpoint, a fit trains the next epoch's batches; from a mid-epoch one, the
    rest of that epoch's (Lightning restores the train DataLoader's state), with or without worker processes."""
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    class Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(3, 3)
            self.seen: dict[int, list] = {}

        def training_step(self, batch, batch_idx):
            x, y = batch
            self.seen.setdefault(self.current_epoch, []).append((x.clone(), y.clone()))
            return torch.nn.functional.cross_entropy(self.layer(x.mean((2, 3))), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    def fit(ckpt_path=None) -> tuple[Recorder, ImageFolderDataModule, list[str]]:
        model, dm = Recorder(), small_dm(imagefolder, batch_size=4, random_erasing=0.5, num_workers=workers)
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                            enable_model_summary=False, limit_val_batches=0, default_root_dir=tmp_path,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1),
                                       ModelCheckpoint(dirpath=tmp_path / "steps", filename="{step}", save_top_k=-1,
                                                       every_n_train_steps=4)])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            trainer.fit(model, dm, ckpt_path=ckpt_path)
        return model, dm, [str(w.message) for w in caught]

    model, dm, _ = fit()
    assert sorted(model.seen) == [0, 1, 2] and dm.epoch == 2 and dm.skipped_images == 3
    assert not _same_batches(model.seen[1], model.seen[2])
    ckpt = torch.load(tmp_path / "epoch=1.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["ImageFolderDataModule"] == {"seed": 0, "epoch": 1, "skipped_images": 2}
    resumed, dm2, _ = fit(tmp_path / "epoch=1.ckpt")
    assert sorted(resumed.seen) == [2]
    assert _same_batches(resumed.seen[2], model.seen[2])
    assert dm2.skipped_images == 3

    assert len(model.seen[0]) == 6  # batches per epoch: the save at step 8 comes 2 batches into epoch 1
    ckpt = torch.load(tmp_path / "steps" / "step=8.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["ImageFolderDataModule"]["batches"] == 2
    resumed, _, messages = fit(tmp_path / "steps" / "step=8.ckpt")
    assert not [m for m in messages if "not resumable" in m]
    assert sorted(resumed.seen) == [1, 2] and len(resumed.seen[1]) == 4
    assert _same_batches(resumed.seen[1], model.seen[1][2:]) and _same_batches(resumed.seen[2], model.seen[2])


# ----------------------------------------------------------------------------------------------------- digits
def test_digits_images_split_and_batches():
    from sklearn.datasets import load_digits

    images, targets = load_digits_rgb()
    raw = load_digits()
    assert images.shape == (1797, 8, 8, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[..., 1], np.round(raw.images * 255 / 16).astype(np.uint8))
    assert images.max() == 255 and images.min() == 0

    dm = DigitsDataModule(batch_size=32, val_fraction=0.2, seed=0)
    assert dm.num_classes == 10 and dm.class_names == [str(i) for i in range(10)]
    train, val = dm.train_indices, dm.val_indices
    assert len(train) == 1437 and len(val) == 360
    assert not set(train) & set(val) and len(set(train) | set(val)) == 1797
    per_class = np.bincount(targets, minlength=10)
    val_per_class = np.bincount(targets[val], minlength=10)
    assert np.all(np.abs(val_per_class - 0.2 * per_class) <= 1)  # stratified
    same = DigitsDataModule(seed=0)
    other = DigitsDataModule(seed=1)
    assert np.array_equal(same.val_indices, val) and not np.array_equal(other.val_indices, val)

    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (32, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, ys = zip(*drain(dm.val_dataloader()), strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (360, 3, 32, 32)
    assert torch.equal(y, torch.from_numpy(targets[val]))
    # eval images are the upscaled digits, standardised with the training-pixel statistics
    assert abs(float(x.mean())) < 0.15 and 0.8 < float(x.std()) < 1.2
    assert len(dm.predict_names()) == 360 and dm.predict_names()[0] == f"digits_{val[0]:04d}"
    _, _, idx = next(iter(dm.predict_dataloader()))
    assert idx.tolist() == list(range(32))
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.0)
