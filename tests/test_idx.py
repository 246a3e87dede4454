"""``IDXDataModule``: MNIST-format files (gzipped or not, Debian's or torchvision's layout), the seeded stratified
hold-out, 1/3 channels, pad-and-crop augmentation, epoch-seeded batches, one-line errors for broken files, and a
fit through the CLI. The IDX files are written by the tests (small, with a class-dependent pattern)."""

from __future__ import annotations

import gzip
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tokenformer_vision.data import FASHION_MNIST_CLASSES, IDXDataModule, build_transforms, find_idx_files, read_idx

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of a uint8 array (magic 0x0000080N, big-endian dimensions, data)."""
    header = (0x800 + array.ndim).to_bytes(4, "big") + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def make_split(rng: np.random.Generator, n: int, classes: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """``n`` 28x28 images whose bright column band encodes the label, and the labels (balanced)."""
    labels = np.arange(n) % classes
    rng.shuffle(labels)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    for i, label in enumerate(labels):
        images[i, 4:24, 4 + 5 * label:8 + 5 * label] = 220
    return images, labels.astype(np.uint8)


def write_idx(folder: Path, train: int = 200, test: int = 40, gz: bool = True, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    (tr_x, tr_y), (te_x, te_y) = make_split(rng, train), make_split(rng, test)
    arrays = dict(zip(FILES, (tr_x, tr_y, te_x, te_y), strict=True))
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            with gzip.open(folder / f"{name}.gz", "wb") as f:
                f.write(data)
        else:
            (folder / name).write_bytes(data)
    return arrays


def module(root: Path, **kwargs) -> IDXDataModule:
    kwargs = {"num_workers": 0, "val_size": 40, "batch_size": 16, **kwargs}
    return IDXDataModule(str(root), **kwargs)


@pytest.mark.parametrize("gz", [True, False])
def test_reads_files_and_splits(tmp_path, gz):
    arrays = write_idx(tmp_path, gz=gz)
    dm = module(tmp_path, seed=3)
    assert dm.num_classes == 4 and dm.class_names == ["0", "1", "2", "3"]
    assert len(dm.train_indices) == 160 and len(dm.val_indices) == 40
    assert not set(dm.train_indices) & set(dm.val_indices)
    # stratified: every class keeps its share in the hold-out
    assert np.bincount(arrays["train-labels-idx1-ubyte"][dm.val_indices]).tolist() == [10, 10, 10, 10]
    # the hold-out is a function of the seed
    assert np.array_equal(module(tmp_path, seed=3).val_indices, dm.val_indices)
    assert not np.array_equal(module(tmp_path, seed=4).val_indices, dm.val_indices)
    dm.setup("test")
    test = dm.dataset("test")
    assert len(test) == 40
    image, target = test[7]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    assert target == int(arrays["t10k-labels-idx1-ubyte"][7])
    # eval transform: normalisation by the training pixels' statistics only, no other change
    expected = (arrays["t10k-images-idx3-ubyte"][7] / 255.0 - dm.channel_mean[0]) / dm.channel_std[0]
    torch.testing.assert_close(image[0], torch.from_numpy(expected).float(), atol=1e-5, rtol=1e-5)
    train_pixels = arrays["train-images-idx3-ubyte"][dm.train_indices] / 255.0
    assert dm.channel_mean[0] == pytest.approx(train_pixels.mean())


def test_torchvision_layout_rgb_and_resize(tmp_path):
    write_idx(tmp_path / "FashionMNIST" / "raw", gz=False)
    found = find_idx_files(tmp_path)
    assert found["train"][0] == tmp_path / "FashionMNIST" / "raw" / "train-images-idx3-ubyte"
    dm = module(tmp_path, channels=3, img_size=32, class_names=FASHION_MNIST_CLASSES)
    assert dm.class_names[9] == "Ankle boot" and dm.num_classes == 10
    dm.setup("fit")
    image, _ = dm.dataset("val")[0]
    assert image.shape == (3, 32, 32)
    torch.testing.assert_close(image[0], image[2])  # the grey level repeated


def test_pad_and_crop_shifts_the_image(tmp_path):
    image = np.random.default_rng(0).integers(0, 256, size=(28, 28, 1), dtype=np.uint8)
    transform = build_transforms(True, 28, 1.0, (0.0,), (1.0,), "bilinear", hflip=0.0, rand_augment=False,
                                 crop_padding=3, fill=0)
    padded = np.pad(image[..., 0] / 255.0, 3)
    shifts = set()
    for seed in range(40):
        from tokenformer_vision.data import reseed_transform

        reseed_transform(transform, seed)
        out = transform(image=image)["image"][0].numpy()
        match = [(dy, dx) for dy in range(7) for dx in range(7)
                 if np.allclose(out, padded[dy:dy + 28, dx:dx + 28], atol=1e-6)]
        assert match, "the output is not a 28x28 window of the zero-padded image"
        shifts.add(match[0])
    assert len(shifts) > 5  # the window position varies


def test_training_batches_depend_on_seed_and_epoch_only(tmp_path):
    write_idx(tmp_path)

    def first_batch(dm: IDXDataModule, epoch: int) -> torch.Tensor:
        dm.setup("fit")
        dm.set_epoch(epoch)
        return next(iter(dm.train_dataloader()))[0]

    kwargs = dict(hflip=0.5, random_erasing=0.5, seed=1)
    a, b = first_batch(module(tmp_path, **kwargs), 2), first_batch(module(tmp_path, **kwargs), 2)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert not torch.equal(a, first_batch(module(tmp_path, **kwargs), 3))


@pytest.mark.parametrize("damage, message", [
    ("missing_dir", "does not exist"),
    ("missing_file", "lacks t10k-labels-idx1-ubyte"),
    ("truncated_gz", "truncated or corrupt gzip"),
    ("magic", "not an IDX image file (magic number 0x00000801"),
    ("short_data", "truncated or padded IDX data"),
    ("count_mismatch", "holds 200 images but"),
])
def test_broken_files_give_one_line_errors(tmp_path, damage, message):
    root = tmp_path / "data"
    arrays = write_idx(root)
    if damage == "missing_dir":
        root = tmp_path / "nowhere"
    elif damage == "missing_file":
        (root / "t10k-labels-idx1-ubyte.gz").unlink()
    elif damage == "truncated_gz":
        path = root / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    elif damage == "magic":
        with gzip.open(root / "train-images-idx3-ubyte.gz", "wb") as f:
            f.write(idx_bytes(arrays["train-labels-idx1-ubyte"]))
    elif damage == "short_data":
        with gzip.open(root / "t10k-images-idx3-ubyte.gz", "wb") as f:
            f.write(idx_bytes(arrays["t10k-images-idx3-ubyte"])[:-100])
    elif damage == "count_mismatch":
        with gzip.open(root / "train-labels-idx1-ubyte.gz", "wb") as f:
            f.write(idx_bytes(arrays["train-labels-idx1-ubyte"][:150]))
    with pytest.raises((FileNotFoundError, ValueError)) as info:
        module(root)
    text = str(info.value)
    assert message in text and "\n" not in text


def test_read_idx_round_trip(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    (tmp_path / "x").write_bytes(idx_bytes(array))
    assert np.array_equal(read_idx(tmp_path / "x", 3), array)


def test_bad_options(tmp_path):
    write_idx(tmp_path)
    with pytest.raises(ValueError, match="channels must be 1"):
        module(tmp_path, channels=2)
    with pytest.raises(ValueError, match="class_names"):
        module(tmp_path, class_names=["a", "b"])
    with pytest.raises(ValueError, match="crop_padding"):
        module(tmp_path, crop_padding=-1)


@pytest.mark.slow
def test_cli_fit_on_idx_folder(tmp_path):
    write_idx(tmp_path / "fmnist")
    args = ["fit", "--data", "IDXDataModule", "--data.root", str(tmp_path / "fmnist"), "--data.val_size", "40",
            "--data.num_workers", "0", "--data.batch_size", "16", "--model.model_name", "tokenformer_tiny",
            "--model.img_size", "28", "--model.model_kwargs",
            '{"patch_size": 7, "depth": 1, "embed_dim": 32, "num_heads": 2, "in_chans": 1}',
            "--trainer.max_epochs", "2", "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.save_dir", "runs", "--model.lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "tokenformer_vision.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    ckpts = list((tmp_path / "runs").rglob("last.ckpt"))
    assert ckpts
    ckpt = torch.load(ckpts[0], weights_only=True)
    assert ckpt["hyper_parameters"]["num_classes"] == 4 and ckpt["global_step"] == 2 * (160 // 16)


def test_every_argument_has_its_own_cli_help():
    import inspect

    from lightning.pytorch.cli import LightningArgumentParser

    parser = LightningArgumentParser()
    parser.add_class_arguments(IDXDataModule, "data")
    helps = {action.dest: action.help for action in parser._actions}
    names = [n for n in inspect.signature(IDXDataModule.__init__).parameters if n != "self"]
    for name in names:
        text = helps.get(f"data.{name}")
        assert isinstance(text, str) and len(text) > 10, (name, text)
    assert len({helps[f"data.{n}"] for n in names}) == len(names)
