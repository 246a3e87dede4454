"""Nothing lost when a job is killed: SIGKILL a fit with growth before and after the growth step, resume from
``last.ckpt``, and get the uninterrupted run's weights and metrics bit for bit (CPU)."""

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
    from tokenformer_vision.checkpointing import AtomicCheckpointIO, LastAndBestCheckpoint

    out, kill_at, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"

    class KillAt(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)  # as a cluster's preemption would: no cleanup at all

    L.seed_everything(0)  # the same initial weights in the reference and the killed run
    torch.use_deterministic_algorithms(True)
    data = DigitsDataModule(img_size=16, batch_size=32, num_workers=0, seed=0)
    model = ImageClassifier("tokenformer_tiny", num_classes=10, img_size=16, lr=3e-3, warmup_steps=3,
                            ema_decay=0.9, model_kwargs=dict(patch_size=4, depth=2, embed_dim=32, num_heads=2,
                                                             attn_tokens=16, ffn_tokens=32))
    callbacks = [GrowthCallback([{"epoch": 2, "attn_tokens": 24, "ffn_tokens": 48}], rewarm_steps=2),
                 LastAndBestCheckpoint(dirpath=os.path.join(out, "ckpt"), monitor="val/acc1", mode="max",
                                       save_last=True)]
    if kill_at >= 0 and not resume:
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


def run(tmp: Path, kill_at: int, resume: bool) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(tmp.parent / "fit.py"), str(tmp), str(kill_at),
                           "resume" if resume else "fresh"], env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run (shared by both kill points)."""
    out = tmp_path_factory.mktemp("resume") / "reference"
    out.mkdir()
    (out.parent / "fit.py").write_text(SCRIPT)
    done = run(out, -1, resume=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [2, 3], ids=["before-growth", "after-growth"])
def test_killed_fit_resumes_bitwise(tmp_path, kill_at, reference):
    (tmp_path / "fit.py").write_text(SCRIPT)
    killed = tmp_path / "killed"
    killed.mkdir()
    dead = run(killed, kill_at, resume=False)
    assert dead.returncode == -signal.SIGKILL, dead.stderr[-3000:]
    saved = torch.load(killed / "ckpt" / "last.ckpt", weights_only=True)
    assert saved["epoch"] == kill_at - 1  # the last complete epoch before the kill
    assert saved["token_counts"]["attn_tokens"] == (24 if kill_at > 2 else 16)
    resumed = run(killed, kill_at, resume=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    want, got = torch.load(reference / "final.pt"), torch.load(killed / "final.pt")
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((reference / "metrics.json").read_text())
