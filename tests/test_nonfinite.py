"""The non-finite policy: a NaN in a batch skips the step (or stops the run); nothing non-finite is saved as best
or grown."""

from __future__ import annotations

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from tokenformer_vision import GrowthCallback, ImageClassifier
from tokenformer_vision.checkpointing import LastAndBestCheckpoint

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


def fit(tmp_path, module, callbacks=(), epochs=2):
    trainer = L.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=tmp_path,
                        callbacks=[LastAndBestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc1", mode="max",
                                                         save_last=True), *callbacks])
    trainer.fit(module, datamodule=PoisonedImages(poisoned=(2,)))
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
