"""GrowthCallback inside Lightning: exactness, optimizer/scheduler/EMA after growth, resume, DDP, CLI, offline
growth of checkpoints (`tokenformer-vision grow`)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from reference import warmup_cosine_lr
from torch.utils.data import DataLoader, TensorDataset

from tokenformer_vision import GrowthCallback, ImageClassifier
from tokenformer_vision.cli import main as cli_main

ROOT = Path(__file__).resolve().parents[1]
# tiny TokenFormer: d 32, 2 blocks, 8 attention / 16 FFN tokens, 32x32 input in 16 patches
MODEL = dict(model_name="tokenformer_tiny", num_classes=3, img_size=32, lr=3e-3, warmup_steps=2,
             betas=(0.9, 0.95), ema_decay=0.9,
             model_kwargs=dict(patch_size=8, depth=2, embed_dim=32, num_heads=2, attn_tokens=8, ffn_tokens=16))


class RandomImages(pl.LightningDataModule):
    """Fixed random images, no shuffling: every run sees the same batches in the same order."""

    num_classes = 3

    def __init__(self, n: int = 16, batch_size: int = 8) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        labels = torch.arange(n) % 3
        images = torch.randn(n, 3, 32, 32, generator=gen) + labels.view(-1, 1, 1, 1).float()
        self.ds = TensorDataset(images, labels)
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.ds, batch_size=self.batch_size)


def trainer(tmp_path: Path, callbacks, max_steps: int, **kw) -> pl.Trainer:
    args = dict(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_checkpointing=False,
                enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                default_root_dir=tmp_path, deterministic=True)
    return pl.Trainer(**{**args, **kw}, callbacks=callbacks)


class Probe(Callback):
    """Snapshots around the growth: placed before GrowthCallback it records the state just before growth, after
    it the state just after; it also records the LR each optimizer step really used (after re-warm scaling)."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step
        self.snap: dict | None = None
        self.used_lr: dict[int, float] = {}
        self._hooked: set[int] = set()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        opt = trainer.optimizers[0]
        if trainer.global_step == self.at_step and self.snap is None:
            names = {id(p): n for n, p in pl_module.named_parameters()}
            self.snap = {
                "state": {names[id(p)]: {k: v.clone() for k, v in opt.state[p].items()}
                          for g in opt.param_groups for p in g["params"]},
                "lr": [g["lr"] for g in opt.param_groups],
                "last_epoch": trainer.lr_scheduler_configs[0].scheduler.last_epoch,
                "params": {n: p.detach().clone() for n, p in pl_module.named_parameters()},
            }
        if id(opt) not in self._hooked:  # registered after GrowthCallback's own hook: sees the scaled LR
            self._hooked.add(id(opt))
            opt.register_step_pre_hook(
                lambda o, a, k: self.used_lr.__setitem__(trainer.global_step, o.param_groups[0]["lr"]))


def test_fit_grows_exactly_and_optimizer_scheduler_ema_follow(tmp_path):
    pl.seed_everything(0)
    before, after = Probe(3), Probe(3)
    growth = GrowthCallback([{"step": 3, "attn_tokens": 12, "ffn_tokens": 24, "rewarm_steps": 2}])
    logger = CSVLogger(tmp_path, name="run")
    module = ImageClassifier(**MODEL)
    t = trainer(tmp_path, [before, growth, after], max_steps=6, logger=logger, log_every_n_steps=50)
    t.fit(module, datamodule=RandomImages())

    assert len(growth.events) == 1
    event = growth.events[0]
    assert event["step"] == 3 and event["attn_tokens_after"] == 12 and event["ffn_tokens_after"] == 24
    assert event["max_abs_logits"] > 0.01
    assert event["max_abs_dlogits"] <= 1e-5  # fp32, function preserved
    assert event["params_after"] - event["params_before"] == 2 * (4 * 4 * 64 + 8 * 64)  # 2 blocks, d_in + d_out
    assert module.model.attn_tokens == 12 and module.ema.module.ffn_tokens == 24

    # the optimizer holds exactly the model's parameters, with state of their shape
    opt = t.optimizers[0]
    opt_ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert sorted(opt_ids) == sorted(id(p) for p in module.model.parameters())
    names = {id(p): n for n, p in module.named_parameters()}
    for group in opt.param_groups:
        for p in group["params"]:
            assert opt.state[p]["exp_avg"].shape == p.shape == opt.state[p]["exp_avg_sq"].shape

    # just after growth: old rows and step carried over, new rows appended, LR and scheduler position kept
    old, new = before.snap, after.snap
    assert new["lr"] == old["lr"] and new["last_epoch"] == old["last_epoch"] == 3
    grown_names = [n for n in names.values() if n.startswith("model.blocks.") and n.endswith("_param")]
    assert len(grown_names) == 20
    for name, state in new["state"].items():
        prev = old["state"][name]
        assert torch.equal(state["step"], prev["step"])
        rows = prev["exp_avg"].shape[0]
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key][:rows], prev[key]), name
        if name in grown_names:
            assert state["exp_avg"].shape[0] > rows
            assert torch.count_nonzero(state["exp_avg"][rows:]) == 0
            assert torch.allclose(state["exp_avg_sq"][rows:], prev["exp_avg_sq"].mean(0, keepdim=True))
        assert torch.equal(new["params"][name][:rows], old["params"][name]), name

    # re-warm: steps 3 and 4 use 1/3 and 2/3 of the scheduled LR, step 5 the full LR; the scheduler never sees it
    def scheduled(step: int) -> float:
        return warmup_cosine_lr(step, MODEL["lr"], MODEL["warmup_steps"], total=6)

    expected = {3: scheduled(3) / 3, 4: scheduled(4) * 2 / 3, 5: scheduled(5)}
    for step, lr in expected.items():
        assert after.used_lr[step] == pytest.approx(lr, rel=1e-9), step
    assert opt.param_groups[0]["lr"] == pytest.approx(scheduled(6), rel=1e-9)

    # the new tokens learned
    key = module.model.blocks[0].ffn.key_param
    assert key[16:].abs().max() > 0

    metrics = (Path(logger.log_dir) / "metrics.csv").read_text()
    assert "growth/step" in metrics and "growth/max_abs_dlogits" in metrics


def run_with_checkpoints(tmp_path: Path, schedule, max_steps: int, ckpt_path: str | None = None):
    pl.seed_everything(0)
    growth = GrowthCallback(schedule)
    # saved after validation: Lightning 2.6 resumes a checkpoint written in on_train_epoch_end one batch early
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", filename="{step}", every_n_epochs=1, save_top_k=-1,
                           save_on_train_epoch_end=False)
    module = ImageClassifier(**MODEL)
    t = trainer(tmp_path, [growth, ckpt], max_steps=max_steps, enable_checkpointing=True, limit_val_batches=1)
    t.fit(module, datamodule=RandomImages(), ckpt_path=ckpt_path)
    return module, growth, t


def test_resume_before_and_after_a_stage_matches_an_uninterrupted_run(tmp_path):
    # 2 batches per epoch, checkpoints at epoch ends (steps 2, 4, 6); stages at steps 4 and 6
    schedule = [{"step": 4, "attn_tokens": 12, "rewarm_steps": 1}, {"step": 6, "ffn_tokens": 24}]
    ref, ref_growth, _ = run_with_checkpoints(tmp_path / "full", schedule, max_steps=8)
    assert [e["step"] for e in ref_growth.events] == [4, 6]
    assert (ref.model.attn_tokens, ref.model.ffn_tokens) == (12, 24)
    ckpts = tmp_path / "full" / "ckpt"
    saved = torch.load(ckpts / "step=6.ckpt", weights_only=True)
    assert saved["token_counts"] == {"attn_tokens": 12, "ffn_tokens": 16}

    for name, new_events in (("step=2.ckpt", [4, 6]), ("step=6.ckpt", [6])):
        resumed, growth, t = run_with_checkpoints(tmp_path / name, schedule, max_steps=8,
                                                  ckpt_path=str(ckpts / name))
        assert [e["step"] for e in growth.events][-len(new_events):] == new_events
        assert len(growth.events) == 2  # restored events + new ones: stage 0 never ran twice
        ref_state, state = ref.state_dict(), resumed.state_dict()
        assert ref_state.keys() == state.keys()
        for key in ref_state:
            torch.testing.assert_close(state[key], ref_state[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")
        opt = t.optimizers[0]
        assert all(opt.state[p]["exp_avg"].shape == p.shape for g in opt.param_groups for p in g["params"])


def test_grown_checkpoint_loads_into_fresh_model_and_validates(tmp_path):
    module, growth, t = run_with_checkpoints(tmp_path, [{"step": 2, "attn_tokens": 10, "ffn_tokens": 20}],
                                             max_steps=4)
    path = tmp_path / "ckpt" / "step=4.ckpt"
    fresh = ImageClassifier.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    assert fresh.model.attn_tokens == 10 and fresh.ema.module.ffn_tokens == 20
    x = RandomImages().ds.tensors[0][:4]
    module.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval_model(x), module.eval_model(x), rtol=0, atol=0)
    result = trainer(tmp_path, [], max_steps=1, limit_val_batches=1).validate(
        ImageClassifier(**MODEL), datamodule=RandomImages(), ckpt_path=str(path), weights_only=True)
    assert 0.0 <= result[0]["val/acc1"] <= 1.0


def test_shrinking_stage_is_a_clear_error_at_fit_start(tmp_path):
    module = ImageClassifier(**MODEL)
    growth = GrowthCallback([{"step": 1, "attn_tokens": 4}])
    with pytest.raises(ValueError, match="shrink attn_tokens from the model's 8 to 4"):
        trainer(tmp_path, [growth], max_steps=2).fit(module, datamodule=RandomImages())


def test_stages_the_fit_ends_before_are_reported(tmp_path):
    """RandomImages: 2 batches per epoch. A stage at epoch 2 of a 2-epoch fit, or at step 6 of a 6-step fit, never
    runs: a warning names it; stages inside the fit raise none."""
    module = ImageClassifier(**MODEL)
    late = GrowthCallback([{"epoch": 1, "attn_tokens": 10}, {"epoch": 2, "attn_tokens": 12}])
    with pytest.warns(UserWarning, match=r"stage 1 \(\{'epoch': 2, 'attn_tokens': 12\}\) will not run.*"
                                         r"max_epochs=2"):
        trainer(tmp_path, [late], max_steps=-1, max_epochs=2).fit(module, datamodule=RandomImages())
    assert late.done == [True, False] and module.model.attn_tokens == 10
    module = ImageClassifier(**MODEL)
    by_steps = GrowthCallback([{"step": 5, "attn_tokens": 10}, {"step": 6, "attn_tokens": 12}])
    with pytest.warns(UserWarning, match=r"stage 1 \(\{'step': 6, 'attn_tokens': 12\}\) will not run: this fit "
                                         r"ends after 6 optimizer steps") as record:
        trainer(tmp_path, [by_steps], max_steps=6).fit(module, datamodule=RandomImages())
    assert not [w for w in record if "stage 0" in str(w.message)] and by_steps.done == [True, False]


def test_growth_is_announced_through_lightnings_console_logger(tmp_path):
    """The console shows Lightning's ``lightning.pytorch`` log records by default (it gives that logger a handler
    unless the root logger has one); the growth message must go there, not to a logger without a handler."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    console = logging.getLogger("lightning.pytorch")
    console.addHandler(handler)
    try:
        growth = GrowthCallback([{"step": 1, "attn_tokens": 12}])
        trainer(tmp_path, [growth], max_steps=2).fit(ImageClassifier(**MODEL), datamodule=RandomImages())
    finally:
        console.removeHandler(handler)
    messages = [r.getMessage() for r in records if r.levelno >= logging.INFO]
    assert any(m.startswith("GrowthCallback: stage 0 at step 1 (epoch 0): tokens") for m in messages), messages
    assert console.handlers or logging.getLogger().handlers  # somewhere to print it


DDP_SCRIPT = textwrap.dedent("""
    import sys
    import lightning.pytorch as pl
    import torch
    sys.path.insert(0, {tests!r})
    from test_growth_lightning import MODEL, RandomImages
    from tokenformer_vision import GrowthCallback, ImageClassifier

    if __name__ == "__main__":
        out = sys.argv[1]
        pl.seed_everything(0)
        growth = GrowthCallback([{{"step": 2, "attn_tokens": 12, "ffn_tokens": 24}}])
        module = ImageClassifier(**MODEL)
        t = pl.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=5, logger=False,
                       enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                       limit_val_batches=0, callbacks=[growth])
        # 4 batches of 4 per rank and epoch; each rank sees different images
        t.fit(module, datamodule=RandomImages(n=32, batch_size=4))
        opt = t.optimizers[0]
        torch.save({{"state": module.state_dict(), "events": growth.events,
                    "opt_matches": sorted(id(p) for g in opt.param_groups for p in g["params"])
                    == sorted(id(p) for p in module.model.parameters())}}, f"{{out}}/rank{{t.global_rank}}.pt")
""")


@pytest.mark.slow
def test_ddp_growth_keeps_ranks_identical(tmp_path):
    script = tmp_path / "ddp_growth.py"
    script.write_text(DDP_SCRIPT.format(tests=str(ROOT / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, str(script), str(tmp_path)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1))
    for r in (r0, r1):
        assert r["opt_matches"]
        assert [e["step"] for e in r["events"]] == [2]
        assert r["events"][0]["max_abs_dlogits"] <= 1e-5
        assert r["state"]["model.blocks.1.ffn.key_param"].shape == (24, 32)
        assert r["state"]["model.blocks.1.ffn.key_param"][16:].abs().max() > 0  # trained after growth
    assert r0["state"].keys() == r1["state"].keys()
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), key


def cli(*args: str) -> None:
    from tokenformer_vision.cli import main

    main(list(args))


@pytest.mark.slow
def test_cli_fit_resume_validate_predict_with_growth(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_epochs": 2, "limit_train_batches": 2,
            "limit_val_batches": 1, "enable_progress_bar": False, "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(tmp_path / "runs"), "name": "g"}},
            "callbacks": [{"class_path": "tokenformer_vision.GrowthCallback",
                           "init_args": {"schedule": [{"epoch": 1, "attn_tokens": 12, "ffn_tokens": 24}],
                                         "rewarm_steps": 1}}],
        },
        "model": {k: v for k, v in MODEL.items() if k != "num_classes"},
        "data": {"class_path": "tokenformer_vision.data.DigitsDataModule",
                 "init_args": {"batch_size": 16, "num_workers": 0}},
        "checkpoint": {"dirpath": str(tmp_path / "ckpt"), "save_top_k": -1, "every_n_epochs": 1,
                       "filename": "e{epoch}"},
    }
    config["model"]["betas"] = list(MODEL["betas"])
    cfg = tmp_path / "grow.yaml"
    cfg.write_text(json.dumps(config))  # JSON is YAML
    cli("fit", "--config", str(cfg))
    last = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    assert last["token_counts"] == {"attn_tokens": 12, "ffn_tokens": 24}
    states = [v for k, v in last["callbacks"].items() if k.startswith("GrowthCallback")]
    assert len(states) == 1 and states[0]["events"][0]["step"] == 2

    # resume from the pre-growth checkpoint of epoch 0: the stage runs at the start of epoch 1, then epoch 2
    cli("fit", "--config", str(cfg), "--trainer.max_epochs", "3", "--checkpoint.dirpath",
        str(tmp_path / "ckpt2"), "--ckpt_path", str(tmp_path / "ckpt" / "e0.ckpt"))
    resumed = torch.load(tmp_path / "ckpt2" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["token_counts"] == {"attn_tokens": 12, "ffn_tokens": 24}

    for sub in ("validate", "test"):
        cli(sub, "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"))
    out = tmp_path / "preds.csv"
    cli("predict", "--config", str(cfg), "--ckpt_path", str(tmp_path / "ckpt" / "last.ckpt"),
        "--predict_out", str(out))
    assert out.is_file() and len(out.read_text().splitlines()) > 10


def test_grow_subcommand_on_a_checkpoint(tmp_path, capsys):
    module, _, _ = run_with_checkpoints(tmp_path, [{"step": 100, "attn_tokens": 12}], max_steps=4)
    src = tmp_path / "ckpt" / "step=4.ckpt"
    dst = tmp_path / "grown.ckpt"
    capsys.readouterr()
    cli_main(["grow", "--ckpt_path", str(src), "--out", str(dst), "--attn_tokens", "12", "--ffn_tokens", "20"])
    assert "'attn_tokens': 12, 'ffn_tokens': 20" in capsys.readouterr().out

    grown = torch.load(dst, weights_only=True)
    old = torch.load(src, weights_only=True)
    assert grown["token_counts"] == {"attn_tokens": 12, "ffn_tokens": 20}
    assert torch.equal(grown["state_dict"]["model.blocks.0.ffn.value_param"][16:],
                       grown["state_dict"]["ema.module.blocks.0.ffn.value_param"][16:])
    # optimizer: the state of the same parameter, found by shape, has its old rows and new seeded rows
    old_states = old["optimizer_states"][0]["state"]
    new_states = grown["optimizer_states"][0]["state"]
    changed = [i for i in old_states if new_states[i]["exp_avg"].shape != old_states[i]["exp_avg"].shape]
    assert len(changed) == 20
    for i in changed:
        rows = old_states[i]["exp_avg"].shape[0]
        assert torch.equal(new_states[i]["exp_avg_sq"][:rows], old_states[i]["exp_avg_sq"])
        assert new_states[i]["exp_avg_sq"].dtype == old_states[i]["exp_avg_sq"].dtype

    # loads into a model built at the old size and computes the same function; training resumes from it
    fresh = ImageClassifier.load_from_checkpoint(dst, map_location="cpu", weights_only=True)
    x = RandomImages().ds.tensors[0][:4]
    module.eval()
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(x), module.model(x), rtol=0, atol=1e-5)
    t = trainer(tmp_path, [], max_steps=5)
    t.fit(ImageClassifier(**MODEL), datamodule=RandomImages(), ckpt_path=str(dst), weights_only=True)
    assert t.global_step == 5

    with pytest.raises(SystemExit, match="error: .*shrink"):
        cli_main(["grow", "--ckpt_path", str(src), "--out", str(tmp_path / "x.ckpt"), "--ffn_tokens", "8"])


def test_bf16_mixed_fit_grows_and_trains(tmp_path):
    """bf16-mixed autocast on CPU through Lightning: the fast Pattention path under autocast, growth mid-fit (the
    Δlogits check runs under the same autocast), finite losses and a validated model in fp32 parameters."""
    torch.manual_seed(0)
    module = ImageClassifier(**MODEL)
    growth = GrowthCallback([{"step": 2, "attn_tokens": 16, "ffn_tokens": 32}])
    losses: list[float] = []

    class Losses(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    fit = trainer(tmp_path, [growth, Losses()], max_steps=4, precision="bf16-mixed", limit_val_batches=1,
                  deterministic=False)
    fit.fit(module, RandomImages())
    assert (module.model.attn_tokens, module.model.ffn_tokens) == (16, 32)
    assert len(growth.events) == 1 and growth.events[0]["max_abs_dlogits"] < 0.1  # bf16 logits: ~1e-2 resolution
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(losses)))
    assert all(p.dtype == torch.float32 for p in module.parameters())
    assert 0.0 <= float(fit.callback_metrics["val/acc1"]) <= 1.0


def test_new_token_lr_scale_multiplies_the_new_rows_updates_only(tmp_path):
    """One optimizer step after growth, from the same state: the appended rows move `scale` times as far, the old
    rows exactly as far, as with the default scale of 1."""
    runs = {}
    for scale in (1.0, 3.0):
        pl.seed_everything(0)
        growth = GrowthCallback([{"step": 2, "attn_tokens": 12, "ffn_tokens": 24}], new_token_lr_scale=scale)
        module = ImageClassifier(**MODEL)
        probe = Probe(2)  # after GrowthCallback: the parameters just after growth
        trainer(tmp_path / str(scale), [growth, probe], max_steps=3).fit(module, datamodule=RandomImages())
        runs[scale] = (probe.snap["params"], dict(module.named_parameters()), growth)
    (before, after1, _), (before3, after3, growth3) = runs[1.0], runs[3.0]
    key = "model.blocks.0.ffn.key_param"
    assert growth3.new_rows[key.removeprefix("model.")] == 16 and growth3.state_dict()["new_rows"] == growth3.new_rows
    torch.testing.assert_close(before3[key], before[key], rtol=0, atol=0)  # the same state at the growth
    step1, step3 = after1[key].detach() - before[key], after3[key].detach() - before3[key]
    assert step1[16:].abs().max() > 0
    torch.testing.assert_close(step3[:16], step1[:16], rtol=0, atol=0)
    torch.testing.assert_close(step3[16:], 3.0 * step1[16:], rtol=1e-4, atol=1e-8)
    with pytest.raises(ValueError, match="new_token_lr_scale"):
        GrowthCallback([{"step": 1, "attn_tokens": 12}], new_token_lr_scale=0)
