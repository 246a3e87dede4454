"""The non-finite policy: a NaN in a batch skips the step (or stops the run); nothing non-finite is saved as best
or grown."""

from __future__ import annotations

import os
import subprocess
import sys

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tokenformer_vision import GrowthCallback, ImageClassifier
from tokenformer_vision.callbacks import NonFiniteGuard
from tokenformer_vision.durable_checkpoints import LastAndBestCheckpoint

MODEL = dict(model_name="tokenformer_tiny", num_classes=3, img_size=16, lr=1e-2,
             model_kwargs=dict(patch_size=4, depth=1, embed_dim=32, num_heads=2, attn_tokens=8, ffn_tokens=16))


class PoisonedImages(L.LightningDataModule):
    """Random images; every image of the batches listed in ``poisoned`` has one NaN pixel."""

    num_classes = 3

    def __init__(self, poisoned: tuple[int, ...]) -> None:
        super().__init__()
        images = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(0))
        for b in poisoned:
            images[b * 8: (b + 1) * 8, 0, 0, 0] = float("nan")
        self.ds = TensorDataset(images, torch.arange(32) % 3)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(*(t[8:16] for t in self.ds.tensors)), batch_size=8)


def fit(tmp_path, module, callbacks=(), epochs=2, poisoned=(2,), ckpt_path=None):
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[LastAndBestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc1", mode="max",
                                                         save_last=True), *callbacks])
    trainer.fit(module, datamodule=PoisonedImages(poisoned=poisoned), ckpt_path=ckpt_path)
    return trainer


def finite(state) -> bool:
    return all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


def test_skip_policy_skips_the_poisoned_steps_and_keeps_the_model_finite(tmp_path):
    module = ImageClassifier(**MODEL, nonfinite="skip")
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = fit(tmp_path, module, callbacks=[GrowthCallback([{"epoch": 1, "attn_tokens": 12}])])
    assert trainer.global_step == 8  # 4 batches × 2 epochs: the skipped steps still count as steps
    assert module.model.token_counts["attn_tokens"] == 12  # grown: the model stayed finite
    assert finite(module.state_dict())
    assert any(not torch.equal(before[k], v) for k, v in module.model.state_dict().items() if k in before)
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        assert finite(torch.load(path, weights_only=True)["state_dict"]), path.name


def test_stop_policy_stops_with_an_error_and_saves_nothing_non_finite(tmp_path):
    module = ImageClassifier(**MODEL, nonfinite="stop")
    with pytest.raises(FloatingPointError, match="non-finite training loss at step 2"):
        fit(tmp_path, module)
    assert finite(module.state_dict())
    for path in (tmp_path / "ckpt").glob("*.ckpt"):
        assert finite(torch.load(path, weights_only=True)["state_dict"]), path.name


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path):
    module = ImageClassifier(**MODEL, nonfinite="skip", max_nonfinite_steps=1)
    with pytest.raises(FloatingPointError, match="1 in a row"):
        fit(tmp_path, module)


def test_skip_policy_stops_when_every_batch_is_non_finite(tmp_path):
    """A skipped step never reaches the optimizer with gradients; the streak must still grow, across epochs."""
    module = ImageClassifier(**MODEL, nonfinite="skip", max_nonfinite_steps=6)
    with pytest.raises(FloatingPointError, match=r"non-finite training loss at step 5 \(6 in a row\)"):
        fit(tmp_path, module, epochs=5, poisoned=(0, 1, 2, 3))  # 4 batches per epoch, all poisoned
    assert module.nonfinite_streak == 6


def test_cli_exits_non_zero_when_every_step_is_non_finite(tmp_path):
    """An absurd learning rate makes every step after the first non-finite: the run must fail, not finish."""
    args = ["fit", "--model.model_name", "tokenformer_tiny", "--model.img_size", "16", "--model.model_kwargs",
            '{"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}', "--model.lr", "1e30",
            "--model.max_nonfinite_steps", "3", "--data", "DigitsDataModule", "--data.img_size", "16",
            "--data.batch_size", "64", "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "4",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false", "--trainer.accelerator",
            "cpu", "--trainer.logger.init_args.save_dir", str(tmp_path), "--checkpoint.dirpath", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "tokenformer_vision.cli", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, done.stderr[-3000:]
    assert "3 in a row" in done.stderr and "max_epochs=3` reached" not in done.stderr


def test_the_streak_is_saved_and_resumed(tmp_path):
    """Batches 0, 2 and 3 poisoned: epoch 0 ends with 2 skipped steps in a row, and the third, epoch 1's batch 0,
    stops the run; resumed from epoch 0's checkpoint, the run stops there too."""
    with pytest.raises(FloatingPointError, match=r"at step 4 \(3 in a row\)"):
        fit(tmp_path, ImageClassifier(**MODEL, max_nonfinite_steps=3), poisoned=(0, 2, 3))
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 4 and saved["callbacks"]["NonFiniteGuard"] == {"streak": 2}
    with pytest.raises(FloatingPointError, match=r"at step 4 \(3 in a row\)"):
        fit(tmp_path, ImageClassifier(**MODEL, max_nonfinite_steps=3), poisoned=(0, 2, 3), ckpt_path=last)


def test_guard_arguments_are_checked():
    with pytest.raises(ValueError, match="policy 'skip' or 'stop' and max_steps ≥ 1"):
        NonFiniteGuard("maybe")
    with pytest.raises(ValueError, match="max_steps"):
        NonFiniteGuard("skip", 0)


def test_a_finite_step_ends_the_streak(tmp_path):
    module = ImageClassifier(**MODEL, nonfinite="skip", max_nonfinite_steps=3)
    fit(tmp_path, module, epochs=2, poisoned=(1, 2))  # 2 poisoned batches in a row per epoch, then a good one
    assert module.nonfinite_streak == 0


def test_non_finite_gradients_skip_the_update(tmp_path):
    module = ImageClassifier(**MODEL, nonfinite="skip")
    param = module.model.blocks[0].ffn.value_param
    param.register_hook(lambda g: torch.full_like(g, float("inf")))  # a loss that is finite, a gradient that is not
    before = {k: v.clone() for k, v in module.model.state_dict().items()}
    fit(tmp_path, module, epochs=1)
    assert all(torch.equal(before[k], v) for k, v in module.model.state_dict().items())  # every step skipped


def test_growth_refuses_a_non_finite_model(tmp_path):
    module = ImageClassifier(**MODEL, nonfinite="skip")
    growth = GrowthCallback([{"step": 1, "attn_tokens": 12}])
    with torch.no_grad():
        module.model.blocks[0].attn.q.value_param[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite parameters; refusing to grow"):
        fit(tmp_path, module, callbacks=[growth])
