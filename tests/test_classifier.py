"""ImageClassifier through Python: optimizer groups, schedule, Mixup/CutMix, EMA, checkpoints (incl. growth),
predictions, error messages. Tiny models (d 32, 1 block, 32x32 input, patch 8) keep each test to seconds."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback, Trainer
from reference import warmup_cosine_lr
from safetensors.torch import save_file

from tokenformer_vision import ImageClassifier
from tokenformer_vision.data import ImageFolderDataModule
from tokenformer_vision.prediction import PredictionWriter

TINY = {"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}


def read_predictions(path: Path) -> list[dict]:
    """A file written by PredictionWriter (CSV or JSON) as records ``{name, target, topk: [(class, p)]}``."""
    with open(path, newline="") as f:
        if path.suffix == ".json":
            return [{"name": r["name"], "target": r["target"],
                     "topk": [(e["class"], float(e["prob"])) for e in r["topk"]]} for r in json.load(f)]
        return [{"name": row["name"], "target": row["target"] or None,
                 "topk": [(row[f"top{j}"], float(row[f"prob{j}"])) for j in range(1, len(row)) if f"top{j}" in row]}
                for row in csv.DictReader(f)]


def make_module(num_classes: int | None = 3, **kw) -> ImageClassifier:
    kw.setdefault("model_kwargs", dict(TINY))
    return ImageClassifier(model_name="tokenformer_tiny", num_classes=num_classes, img_size=32, **kw)


def make_data(root: Path, **kw) -> ImageFolderDataModule:
    # model_name as in the module: Lightning refuses to log hparams that the two modules disagree on
    kw = {"img_size": 32, "batch_size": 4, "num_workers": 0, "rand_augment": False, "seed": 0,
          "model_name": "tokenformer_tiny", **kw}
    return ImageFolderDataModule(str(root), **kw)


def make_trainer(tmp_path: Path, **kw) -> Trainer:
    kw = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
          "enable_progress_bar": False, "enable_model_summary": False, "default_root_dir": str(tmp_path),
          "num_sanity_val_steps": 0, **kw}
    return Trainer(**kw)


# ----------------------------------------------------------------------------------------------- schedule
def test_bad_arguments_name_the_problem():
    with pytest.raises(ValueError, match="warmup_steps or warmup_epochs"):
        make_module(warmup_steps=3, warmup_epochs=1.0)
    with pytest.raises(ValueError, match="min_lr"):
        make_module(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="model_kwargs"):
        make_module(model_kwargs={"num_classes": 4})
    with pytest.raises(ValueError, match="unknown timm model 'nope'"):
        ImageClassifier(model_name="nope", num_classes=3)


def test_img_size_off_the_patch_grid_is_an_error():
    with pytest.raises(ValueError, match=r"img_size 30 is not a multiple of patch_size 16: the 1×1 patch grid would "
                                         r"leave out the last 14 rows and 14 columns.*dynamic_img_pad=True"):
        ImageClassifier("tokenformer_tiny", num_classes=3, img_size=30, model_kwargs={"depth": 1})
    padded = ImageClassifier("tokenformer_tiny", num_classes=3, img_size=30,
                             model_kwargs={"depth": 1, "dynamic_img_pad": True, "dynamic_img_size": True})
    assert padded(torch.zeros(1, 3, 30, 30)).shape == (1, 3)  # padded to 32: every pixel is in a patch


# --------------------------------------------------------------------------------------------- optimizer
def test_no_weight_decay_group_is_exactly_norms_biases_cls_pos(tmp_path, imagefolder):
    module = make_module(weight_decay=0.3, model_kwargs={**TINY, "depth": 2})
    names = {id(p): n for n, p in module.model.named_parameters()}
    expected_no_decay = {"cls_token", "pos_embed", "patch_embed.proj.bias", "norm.weight", "norm.bias", "head.bias"}
    groups = {g["name"]: g for g in module.param_groups()}
    assert {names[id(p)] for p in groups["no_decay"]["params"]} == expected_no_decay
    decayed = {names[id(p)] for p in groups["decay"]["params"]}
    assert decayed == set(dict(module.model.named_parameters())) - expected_no_decay
    assert all(n.endswith(("key_param", "value_param")) for n in decayed - {"patch_embed.proj.weight", "head.weight"})

    # through the trainer: AdamW with 0.3 / 0.0, betas and lr from the arguments, EMA excluded
    module = make_module(weight_decay=0.3, betas=(0.9, 0.95), lr=2e-3, ema_decay=0.9)
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data(imagefolder))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert sorted(g["weight_decay"] for g in opt.param_groups) == [0.0, 0.3]
    assert all(g["betas"] == (0.9, 0.95) and g["initial_lr"] == 2e-3 for g in opt.param_groups)
    in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
    assert in_opt == {id(p) for p in module.model.parameters()}
    assert not any(p.requires_grad for p in module.ema.parameters())


def test_optimizer_factory_keeps_its_own_weight_decay(tmp_path, imagefolder):
    module = make_module(optimizer=lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=0.01))
    trainer = make_trainer(tmp_path, max_steps=1, limit_val_batches=0)
    trainer.fit(module, datamodule=make_data(imagefolder))
    opt = trainer.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.01, "no_decay": 0.0}


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


def test_schedule_warmup_epochs_then_cosine(tmp_path, imagefolder):
    # 24 train files (one corrupt, skipped by the collate), batch 4: 6 batches; accumulate 2 -> 3 steps per epoch
    module = make_module(lr=1e-2, min_lr=1e-3, warmup_epochs=1.0)
    rec = RecordLR()
    trainer = make_trainer(tmp_path, max_epochs=3, accumulate_grad_batches=2, limit_val_batches=0, callbacks=[rec])
    dm = make_data(imagefolder)
    trainer.fit(module, datamodule=dm)
    assert trainer.lr_scheduler_configs[0].interval == "step"
    total, per_epoch = trainer.global_step, math.ceil(trainer.num_training_batches / 2)
    assert total == trainer.estimated_stepping_batches == 3 * per_epoch
    # lr seen before each batch: the scheduler steps once per optimizer step (every 2nd batch)
    steps = [b // 2 for b in range(len(rec.lrs))]
    assert rec.lrs == pytest.approx([warmup_cosine_lr(s, 1e-2, per_epoch, total, 1e-3) for s in steps], rel=1e-9)
    assert trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-3)  # min_lr after the last step


# -------------------------------------------------------------------------------------- fit and evaluate
class RecordWeights(Callback):
    def __init__(self) -> None:
        self.model_states: list[dict[str, torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.model_states.append({k: v.clone() for k, v in pl_module.model.state_dict().items()})


def test_small_data_logs_train_loss_and_ema_is_not_in_eval_mode(tmp_path, imagefolder):
    """Lightning's default log_every_n_steps (50) exceeds this whole fit; the EMA copy, in eval mode, made Lightning
    warn of modules in eval mode at the start of training."""
    import csv
    import warnings

    from lightning.pytorch.loggers import CSVLogger

    trainer = make_trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), limit_val_batches=1)
    assert trainer.log_every_n_steps == 50
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(make_module(ema_decay=0.9), datamodule=make_data(imagefolder))
    assert not [str(w.message) for w in caught if "eval mode" in str(w.message)]
    batches = trainer.num_training_batches
    assert 1 < batches < 50 and trainer.log_every_n_steps == batches
    with open(Path(trainer.log_dir) / "metrics.csv", newline="") as f:
        logged = [int(row["step"]) for row in csv.DictReader(f) if row["train/loss"]]
    assert logged == [batches - 1, 2 * batches - 1]  # once per epoch


def test_ema_follows_the_reference_average(tmp_path, imagefolder):
    decay = 0.75
    module = make_module(ema_decay=decay, mixup=0.8, cutmix=1.0, drop_path_rate=0.1, label_smoothing=0.1)
    rec = RecordWeights()
    trainer = make_trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[rec])
    trainer.fit(module, datamodule=make_data(imagefolder))
    # step 1 copies the model, later steps average: e_t = d * e_{t-1} + (1 - d) * m_t
    ref = dict(rec.model_states[0])
    for state in rec.model_states[1:]:
        ref = {k: decay * ref[k] + (1 - decay) * state[k] if ref[k].is_floating_point() else state[k] for k in ref}
    ema = module.ema.module.state_dict()
    for key, value in ref.items():
        torch.testing.assert_close(ema[key], value, rtol=1e-5, atol=1e-6)
    assert not torch.equal(ema["head.weight"], module.model.state_dict()["head.weight"])


def test_validation_uses_ema_weights(tmp_path, imagefolder):
    module = make_module(ema_decay=0.9)
    dm = make_data(imagefolder)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    with torch.no_grad():  # make the two networks disagree: the EMA head predicts class 2 for everything
        module.ema.module.head.weight.zero_()
        module.ema.module.head.bias.copy_(torch.tensor([0.0, 0.0, 5.0]))
    metrics = make_trainer(tmp_path).validate(module, datamodule=dm, verbose=False)[0]
    targets = torch.cat([t for _, t in dm.val_dataloader()])
    assert metrics["val/acc1"] == pytest.approx((targets == 2).float().mean().item())
    assert metrics["val/acc5"] == pytest.approx(1.0)  # top_k capped at 3 classes
    assert metrics["val/loss"] == pytest.approx(
        torch.nn.functional.cross_entropy(torch.tensor([[0.0, 0.0, 5.0]]).expand(len(targets), 3), targets).item(),
        rel=1e-5)


def test_mixup_odd_batch_keeps_every_sample():
    module = make_module(mixup=0.8, cutmix=0.0, label_smoothing=0.1)
    images, targets = torch.randn(5, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1])
    mixed, soft = module._mix(images, targets)
    assert mixed.shape == images.shape and soft.shape == (5, 3)
    torch.testing.assert_close(soft.sum(1), torch.ones(5))
    torch.testing.assert_close(mixed[4], images[4])  # the odd one out is not mixed
    torch.testing.assert_close(soft[4], torch.tensor([0.1 / 3, 0.1 / 3 + 0.9, 0.1 / 3]))
    mixed1, soft1 = module._mix(images[:1], targets[:1])
    torch.testing.assert_close(mixed1, images[:1])


def test_class_count_mismatch_names_both_numbers(tmp_path, imagefolder):
    trainer = make_trainer(tmp_path, max_steps=1)
    with pytest.raises(ValueError, match=r"3 classes.*num_classes=5"):
        trainer.fit(make_module(num_classes=5), datamodule=make_data(imagefolder))


def test_num_classes_from_datamodule_or_error(tmp_path, imagefolder):
    dm = make_data(imagefolder)
    module = make_module(num_classes=None)
    assert module.model is None
    make_trainer(tmp_path, max_steps=1, limit_val_batches=0).fit(module, datamodule=dm)
    assert module.model.num_classes == 3 and module.hparams.num_classes == 3
    dm.setup("fit")
    with pytest.raises(ValueError, match="num_classes is None"):
        make_trainer(tmp_path, max_steps=1).fit(make_module(num_classes=None),
                                                train_dataloaders=dm.train_dataloader())


def test_fit_checkpoint_resume_validate_test_predict(tmp_path, imagefolder):
    from lightning.pytorch.loggers import CSVLogger

    from tokenformer_vision.cli import LastAndBestCheckpoint

    dm = make_data(imagefolder)
    ckpt_cb = LastAndBestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc1", mode="max", save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=2, logger=CSVLogger(tmp_path), callbacks=[ckpt_cb],
                           enable_checkpointing=True, log_every_n_steps=1)
    module = make_module(ema_decay=0.9, mixup=0.8, cutmix=1.0)
    trainer.fit(module, datamodule=dm)
    steps = trainer.global_step
    assert steps == 2 * trainer.num_training_batches
    header = (Path(trainer.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/acc1", "val/acc5", "val/loss", "train/loss"} <= set(header)

    last = tmp_path / "ckpt" / "last.ckpt"
    ckpt = torch.load(last, weights_only=True)
    assert ckpt["global_step"] == steps  # the final state, even when val/acc1 did not improve in the last epoch
    assert ckpt["token_counts"] == {"attn_tokens": 32, "ffn_tokens": 128}
    assert any(k.startswith("ema.module.") for k in ckpt["state_dict"])

    # resume: a fresh module and trainer continue from the saved step
    trainer2 = make_trainer(tmp_path, max_epochs=3)
    module2 = make_module(ema_decay=0.9, mixup=0.8, cutmix=1.0)
    trainer2.fit(module2, datamodule=dm, ckpt_path=str(last))
    assert trainer2.global_step == steps + trainer.num_training_batches

    # validate/test/predict from the checkpoint: same numbers as the trained module
    expected = trainer.validate(module, datamodule=dm, verbose=False)[0]
    got = make_trainer(tmp_path).validate(make_module(ema_decay=0.9), datamodule=dm, ckpt_path=str(last),
                                          verbose=False)[0]
    assert got["val/acc1"] == pytest.approx(expected["val/acc1"])
    assert got["val/loss"] == pytest.approx(expected["val/loss"], rel=1e-5)
    test = make_trainer(tmp_path).test(make_module(ema_decay=0.9), datamodule=dm, ckpt_path=str(last),
                                       verbose=False)[0]
    assert test["test/acc1"] == pytest.approx(expected["val/acc1"])  # test split defaults to val

    out = tmp_path / "preds.csv"
    preds = make_trainer(tmp_path, callbacks=[PredictionWriter(out)]).predict(
        make_module(ema_decay=0.9, top_k=5), datamodule=dm, ckpt_path=str(last))
    rows = read_predictions(out)
    names = dm.predict_names()
    assert [r["name"] for r in rows] == names and len(rows) == 12
    top = torch.cat([p["topk_indices"] for p in preds])
    probs = torch.cat([p["topk_probs"] for p in preds])
    assert top.shape == (12, 3)  # top_k capped at the 3 classes
    torch.testing.assert_close(probs.sum(1), torch.ones(12))
    for row, idx, p in zip(rows, top.tolist(), probs.tolist(), strict=True):
        assert [c for c, _ in row["topk"]] == [dm.class_names[i] for i in idx]
        assert [q for _, q in row["topk"]] == pytest.approx(p, abs=1e-6)
        assert row["target"] in dm.class_names
    # the EMA network produced them
    images = torch.cat([b[0] for b in dm.predict_dataloader()])
    with torch.no_grad():
        ref = module.ema.module.eval()(images).softmax(-1)
    torch.testing.assert_close(probs, ref.topk(3).values, rtol=1e-4, atol=1e-5)

    json_out = tmp_path / "preds.json"
    make_trainer(tmp_path, callbacks=[PredictionWriter(json_out)]).predict(
        make_module(ema_decay=0.9), datamodule=dm, ckpt_path=str(last), return_predictions=False)
    js = read_predictions(json_out)
    assert [(r["name"], r["target"]) for r in js] == [(r["name"], r["target"]) for r in rows]
    assert [[c for c, _ in r["topk"]] for r in js] == [[c for c, _ in r["topk"]] for r in rows]


def test_grown_checkpoint_loads_into_fresh_model(tmp_path, imagefolder):
    dm = make_data(imagefolder)
    module = make_module(ema_decay=0.5)
    trainer = make_trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    module.model.grow(attn_tokens=40, ffn_tokens=160)
    module.ema.module.grow(attn_tokens=40, ffn_tokens=160)
    path = tmp_path / "grown.ckpt"
    trainer.save_checkpoint(path)
    assert torch.load(path, weights_only=True)["token_counts"] == {"attn_tokens": 40, "ffn_tokens": 160}

    images = torch.cat([b[0] for b in dm.val_dataloader()])
    with torch.no_grad():
        ref = module.ema.module.eval()(images)
    loaded = ImageClassifier.load_from_checkpoint(path)
    assert (loaded.model.attn_tokens, loaded.ema.module.ffn_tokens) == (40, 160)
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval_model.eval()(images), ref)
    # through the trainer, and without the token_counts key (read from the weights instead)
    ckpt = torch.load(path, weights_only=True)
    del ckpt["token_counts"]
    torch.save(ckpt, tmp_path / "grown_nokey.ckpt")
    fresh = make_module(ema_decay=0.5)
    make_trainer(tmp_path).validate(fresh, datamodule=dm, ckpt_path=str(tmp_path / "grown_nokey.ckpt"),
                                    verbose=False)
    assert fresh.model.attn_tokens == 40 and fresh.model.ffn_tokens == 160
    # an EMA-less module drops the checkpoint's EMA weights; an EMA module fills them from a plain checkpoint
    plain = make_module()
    make_trainer(tmp_path).validate(plain, datamodule=dm, ckpt_path=str(path), verbose=False)
    assert plain.ema is None
    ckpt["state_dict"] = {k: v for k, v in ckpt["state_dict"].items() if not k.startswith("ema.")}
    torch.save(ckpt, tmp_path / "no_ema.ckpt")
    with_ema = make_module(ema_decay=0.5)
    make_trainer(tmp_path).validate(with_ema, datamodule=dm, ckpt_path=str(tmp_path / "no_ema.ckpt"), verbose=False)
    torch.testing.assert_close(with_ema.ema.module.head.weight, with_ema.model.head.weight)


def test_pretrained_weights_file(tmp_path):
    source = make_module(num_classes=10)
    save_file(source.model.state_dict(), str(tmp_path / "w.safetensors"))
    target = make_module(num_classes=3, pretrained=str(tmp_path / "w.safetensors"))
    src, dst = source.model.state_dict(), target.model.state_dict()
    assert dst["head.weight"].shape == (3, 32)  # new head for the new classes
    for key in src:
        if not key.startswith("head."):
            torch.testing.assert_close(dst[key], src[key])
    same = make_module(num_classes=10, pretrained=str(tmp_path / "w.safetensors"))
    torch.testing.assert_close(same.model.state_dict()["head.weight"], src["head.weight"])
    with pytest.raises(FileNotFoundError, match="missing.safetensors"):
        make_module(pretrained=str(tmp_path / "missing.safetensors"))
    with pytest.raises(ValueError, match="depth: weights 1, model 2"):
        make_module(num_classes=10, pretrained=str(tmp_path / "w.safetensors"),
                    model_kwargs={**TINY, "depth": 2})


def test_last_checkpoint_is_the_final_state_without_improvement(tmp_path, imagefolder):
    # lr ~ 0: val/acc1 ties every epoch, so no top-k save after epoch 0 (Lightning 2.6 then keeps an old last.ckpt)
    from tokenformer_vision.cli import LastAndBestCheckpoint

    cb = LastAndBestCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc1", mode="max", save_last=True)
    trainer = make_trainer(tmp_path, max_epochs=3, limit_train_batches=2, callbacks=[cb], enable_checkpointing=True)
    trainer.fit(make_module(lr=1e-12), datamodule=make_data(imagefolder))
    assert torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert Path(cb.best_model_path).name.startswith("epoch=0")


def test_every_classifier_argument_has_its_own_cli_help():
    """jsonargparse reads one `name: text` line per argument; a line naming several gives none of them help."""
    import inspect

    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_class_arguments(ImageClassifier, "model")
    helps = {a.dest: a.help for a in parser._actions if a.dest.startswith("model.")}
    for name in inspect.signature(ImageClassifier.__init__).parameters:
        if name != "self":
            assert helps.get(f"model.{name}"), name


def test_resumed_fit_with_more_epochs_stretches_the_cosine(tmp_path, imagefolder):
    """`fit --ckpt_path last --trainer.max_epochs N+k` used to run the extra epochs at min_lr."""
    data = make_data(imagefolder)
    module = make_module(lr=1e-2, min_lr=1e-4)
    make_trainer(tmp_path, max_epochs=2, enable_checkpointing=True).fit(module, datamodule=data)
    ckpt = next((tmp_path).rglob("*.ckpt"))
    steps = torch.load(ckpt, weights_only=True)["global_step"]
    longer = make_trainer(tmp_path, max_epochs=4)
    resumed = make_module(lr=1e-2, min_lr=1e-4)
    lrs = []

    class RecordLR(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    longer.callbacks.append(RecordLR())
    longer.fit(resumed, datamodule=data, ckpt_path=str(ckpt), weights_only=True)
    assert longer.global_step == 2 * steps
    # the extra epochs follow the cosine of the new length (not min_lr), which ends at the new last step
    assert lrs == pytest.approx([warmup_cosine_lr(s, 1e-2, 0, 2 * steps, 1e-4) for s in range(steps, 2 * steps)],
                                rel=1e-9)
    assert longer.optimizers[0].param_groups[0]["lr"] == pytest.approx(1e-4)


def test_resuming_a_lambdalr_checkpoint_is_a_clear_error(tmp_path, imagefolder):
    data = make_data(imagefolder)
    make_trainer(tmp_path, max_steps=1, enable_checkpointing=True).fit(make_module(), datamodule=data)
    ckpt = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    ckpt["lr_schedulers"] = [{"base_lrs": [1e-3], "last_epoch": 1, "lr_lambdas": [{"warmup_steps": 0}]}]
    torch.save(ckpt, old := tmp_path / "old.ckpt")
    with pytest.raises(ValueError, match="LambdaLR.*--model.pretrained"):
        make_trainer(tmp_path, max_steps=2).fit(make_module(), datamodule=data, ckpt_path=str(old))
    make_trainer(tmp_path).validate(make_module(), datamodule=data, ckpt_path=str(old), verbose=False)  # loads


def test_batches_of_unreadable_images_are_skipped():
    module = make_module()
    assert module.training_step(None, 0) is None
    assert module.validation_step(None, 0) is None and module.test_step(None, 0) is None
    assert module.predict_step(None, 0) is None


def test_checkpoint_of_another_class_count_names_both_numbers(tmp_path):
    ten = make_module(num_classes=10)
    ckpt = {"state_dict": ten.state_dict(), "token_counts": dict(ten.model.token_counts)}
    with pytest.raises(ValueError, match="num_classes 10 in the weights vs 3 in the model"):
        make_module(num_classes=3).on_load_checkpoint(ckpt)
    (tmp_path / "empty.ckpt").write_bytes(b"")
    from tokenformer_vision.weights import read_checkpoint

    with pytest.raises(ValueError, match="empty"):
        read_checkpoint(tmp_path / "empty.ckpt")
