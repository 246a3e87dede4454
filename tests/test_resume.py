"""Nothing lost when a job is killed: SIGKILL a fit with growth, EMA, Mixup/CutMix and drop path before and after
the growth step, or after a mid-epoch save, resume from ``last.ckpt``, and get the uninterrupted run's weights and
metrics bit for bit (CPU), with the data read in the main process or by worker processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

SCRIPT = textwrap.dedent("""
    import json, os, signal, sys
    import lightning as L
    import torch
    from tokenformer_vision import DigitsDataModule, GrowthCallback, ImageClassifier
    from tokenformer_vision.durable_checkpoints import AtomicCheckpointIO, LastAndBestCheckpoint

    out, args = sys.argv[1], json.loads(sys.argv[2])
    kill_epoch, kill_step, resume = args.get("kill_epoch", -1), args.get("kill_step", -1), args["resume"]

    class KillAt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == kill_epoch:
                os.kill(os.getpid(), signal.SIGKILL)  # as a cluster's preemption would: no cleanup at all

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step == kill_step:
                os.kill(os.getpid(), signal.SIGKILL)

    class BatchTrace(L.Callback):  # which images each step saw: (global step, sum of the batch)
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            with open(os.path.join(out, "batches.jsonl"), "a") as f:
                f.write(json.dumps([trainer.global_step, float(batch[0].double().sum())]) + "\\n")

    L.seed_everything(0)  # the same initial weights in the reference and the killed run
    torch.use_deterministic_algorithms(True)
    data = DigitsDataModule(img_size=16, batch_size=32, num_workers=args["workers"], seed=0)
    # Mixup/CutMix and drop path draw from the global random generators of the main process
    model = ImageClassifier("tokenformer_tiny", num_classes=10, img_size=16, lr=3e-3, warmup_steps=3,
                            ema_decay=0.9, mixup=0.8, cutmix=1.0, drop_path_rate=0.1,
                            model_kwargs=dict(patch_size=4, depth=2, embed_dim=32, num_heads=2, attn_tokens=16,
                                              ffn_tokens=32))
    every = {"every_n_train_steps": args["every_n_train_steps"]} if args.get("every_n_train_steps") else {}
    callbacks = [GrowthCallback([{"epoch": 2, "attn_tokens": 24, "ffn_tokens": 48}], rewarm_steps=2),
                 LastAndBestCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val/acc1", mode="max",
                                       save_last=True, **every), BatchTrace()]
    if not resume:
        callbacks.append(KillAt())
    trainer = L.Trainer(accelerator="cpu", max_epochs=4, limit_train_batches=4, limit_val_batches=2, logger=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        callbacks=callbacks, plugins=[AtomicCheckpointIO()], deterministic=True)
    trainer.fit(model, datamodule=data, ckpt_path=os.path.join(out, "ckpt", "last.ckpt") if resume else None,
                weights_only=True)
    torch.save(model.state_dict(), os.path.join(out, "final.pt"))
    with open(os.path.join(out, "metrics.json"), "w") as f:
        json.dump({k: float(v) for k, v in trainer.callback_metrics.items()}, f)
""")


def run(out: Path, **args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    args = {"workers": 0, "resume": False, **args}
    return subprocess.run([sys.executable, str(out.parent / "fit.py"), str(out), json.dumps(args)], env=env,
                          capture_output=True, text=True, timeout=300)


def trace(out: Path) -> dict[int, float]:
    """Global step → sum of the batch that step trained on (the last entry wins after a resume)."""
    return {step: total for step, total in map(json.loads, (out / "batches.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (shared by every kill point; workers read the same batches as the main process)."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    out.mkdir()
    (out.parent / "fit.py").write_text(SCRIPT)
    done = run(out)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "GrowthCallback: stage 0 at step 8 (epoch 2)" in done.stderr  # on the console by default
    return out


def kill(tmp_path: Path, **args) -> Path:
    """Run until a SIGKILL (``kill_epoch``/``kill_step``) ends the fit; its output folder."""
    (tmp_path / "fit.py").write_text(SCRIPT)
    killed = tmp_path / "killed"
    killed.mkdir()
    dead = run(killed, **args)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-3000:]
    return killed


def resume_and_compare(killed: Path, reference: Path, **args) -> None:
    """Resume a killed fit from ``last.ckpt``; it must end bit for bit where the reference ends, each step having
    trained on the reference's batch."""
    resumed = run(killed, resume=True, **args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "not resumable" not in resumed.stderr
    assert trace(killed) == trace(reference)
    want, got = torch.load(reference / "final.pt"), torch.load(killed / "final.pt")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(("kill_at", "workers"), [(2, 0), (3, 0), (2, 2)],
                         ids=["before-growth", "after-growth", "before-growth-2-workers"])
def test_killed_fit_resumes_bitwise(tmp_path, kill_at, workers, reference):
    killed = kill(tmp_path, kill_epoch=kill_at, workers=workers)
    saved = torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == kill_at - 1  # the last complete epoch before the kill
    assert saved["token_counts"]["attn_tokens"] == (24 if kill_at > 2 else 16)
    resume_and_compare(killed, reference, workers=workers)


@pytest.mark.slow
def test_fit_killed_after_a_mid_epoch_save_resumes_at_the_next_batch(tmp_path, reference):
    """Saves every 3 steps (4 per epoch); killed at step 11, so the last save is step 9: after batch 0 of epoch 2
    and the growth at its start. The resumed run trains steps 9.. on the reference's batches, with 2 workers."""
    args = dict(every_n_train_steps=3, workers=2)
    killed = kill(tmp_path, kill_step=11, **args)
    saved = torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["global_step"] == 9 and saved["epoch"] == 2
    assert saved["loops"]["fit_loop"]["state_dict"]["combined_loader"] == [{"epoch": 2, "batches": 1}]
    assert saved["token_counts"]["attn_tokens"] == 24
    resume_and_compare(killed, reference, **args)
    steps = [json.loads(line)[0] for line in (killed / "batches.jsonl").read_text().splitlines()]
    assert steps == list(range(12)) + list(range(9, 16))  # 11 began before the kill; 9 follows the save
