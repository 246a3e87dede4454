"""``tokenformer-vision`` end to end in subprocesses (fit, resume, validate, test, predict) plus in-process checks
of config parsing and the ``export`` dispatch. Tiny model (d 32, 1 block, 32x32, patch 8), a few steps each."""

from __future__ import annotations

import csv
import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tokenformer_vision
from tokenformer_vision import cli

REPO = Path(__file__).resolve().parents[1]
MODEL_ARGS = ["--model.model_name", "tokenformer_tiny", "--model.img_size", "32",
              "--model.model_kwargs", '{"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}']


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", "tokenformer_vision.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise AssertionError(f"tokenformer-vision {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n"
                             f"{proc.stderr[-5000:]}")
    return proc


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_fit_resume_validate_test_predict(tmp_path, imagefolder):
    data = ["--data", "ImageFolderDataModule", "--data.root", str(imagefolder), "--data.batch_size", "4",
            "--data.num_workers", "0", "--data.rand_augment", "false"]
    common = [*MODEL_ARGS, *data, "--trainer.logger.init_args.save_dir", "runs",
              "--trainer.enable_progress_bar", "false", "--trainer.accelerator", "cpu"]
    fit = ["fit", *common, "--trainer.limit_train_batches", "3", "--trainer.log_every_n_steps", "1",
           "--model.ema_decay", "0.9", "--model.mixup", "0.8", "--model.cutmix", "1.0", "--model.warmup_steps", "2"]
    run_cli([*fit, "--trainer.max_epochs", "2"], tmp_path)

    run_dir = tmp_path / "runs" / f"tokenformer_tiny-imagefolder-{imagefolder.name}"  # named by model and data
    run0 = run_dir / "version_0"
    rows = read_csv(run0 / "metrics.csv")
    assert {"val/acc1", "val/acc5", "val/loss", "train/loss", "lr/decay"} <= set(rows[0])
    assert sum(1 for r in rows if r["val/acc1"]) == 2
    last0 = torch.load(run0 / "checkpoints" / "last.ckpt", weights_only=True)
    assert last0["global_step"] == 6
    assert last0["hyper_parameters"]["num_classes"] == 3  # linked from the data module
    assert last0["token_counts"] == {"attn_tokens": 32, "ffn_tokens": 128}
    best = [p for p in (run0 / "checkpoints").iterdir() if p.name.startswith("best-")]
    assert len(best) == 1

    # resume: `--ckpt_path last` finds version_0's last.ckpt although this run logs to version_1
    resumed = run_cli([*fit, "--trainer.max_epochs", "3", "--ckpt_path", "last"], tmp_path)
    assert "ckpt_path=last" in resumed.stderr
    run1 = run_dir / "version_1"
    steps = [int(r["step"]) for r in read_csv(run1 / "metrics.csv")]
    assert min(steps) >= 6 and max(steps) == 8
    # checkpoints stay with the resumed run, so its best score carries over (a worse epoch cannot become best)
    assert not (run1 / "checkpoints").exists()
    last1 = torch.load(run0 / "checkpoints" / "last.ckpt", weights_only=True)
    assert last1["global_step"] == 9
    best_state = next(s for s in last1["callbacks"].values() if "best_model_score" in s)
    assert float(best_state["best_model_score"]) == max(float(r["val/acc1"]) for r in
                                                        read_csv(run0 / "metrics.csv") + read_csv(run1 / "metrics.csv")
                                                        if r["val/acc1"])

    # evaluate the best checkpoint of the newest run ("best" resolved from its last.ckpt)
    val = run_cli(["validate", *common, "--ckpt_path", "best"], tmp_path)
    assert "val/acc1" in val.stdout
    test = run_cli(["test", *common, "--ckpt_path", str(run0 / "checkpoints" / "last.ckpt")], tmp_path)
    assert "test/acc1" in test.stdout and "test/acc5" in test.stdout

    out = tmp_path / "preds.csv"
    run_cli(["predict", *common, "--ckpt_path", "last", "--predict_out", str(out)], tmp_path)
    preds = read_csv(out)
    assert len(preds) == 12  # the val split
    assert list(preds[0]) == ["name", "target", "top1", "prob1", "top2", "prob2", "top3", "prob3"]
    for row in preds:
        assert Path(row["name"]).parent.name == row["target"]  # val/<class>/<file>
        assert sorted(row[f"top{j}"] for j in (1, 2, 3)) == ["cat", "dog", "fox"]
        probs = [float(row[f"prob{j}"]) for j in (1, 2, 3)]
        assert probs == sorted(probs, reverse=True) and sum(probs) == pytest.approx(1.0, abs=1e-5)


def test_configs_parse(capsys):
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert {"demo/digits.yaml", "imagenet/tokenformer_base.yaml", "imagenet/tokenformer_small.yaml",
            "imagenet/tokenformer_tiny.yaml"} <= {str(p.relative_to(REPO / "configs")) for p in configs}
    for path in configs:
        with pytest.raises(SystemExit) as exit_info:
            cli.main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code in (0, None), path
        printed = capsys.readouterr().out
        assert "model_name: tokenformer_" in printed, path
    base = REPO / "configs" / "imagenet" / "tokenformer_base.yaml"
    with pytest.raises(SystemExit):
        cli.main(["fit", "--config", str(base), "--print_config"])
    printed = capsys.readouterr().out
    for needle in ("lr: 0.0016", "weight_decay: 0.3", "- 0.95", "max_epochs: 300", "drop_path_rate: 0.1",
                   "label_smoothing: 0.1", "mixup: 0.8", "cutmix: 1.0", "ema_decay: 0.9999", "precision: bf16-mixed",
                   "random_erasing: 0.25", "min_lr: 1.0e-05", "warmup_epochs: 20"):
        assert needle in printed, needle


def test_version_help_and_tool_subcommands(capsys):
    cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"tokenformer-vision {tokenformer_vision.__version__}"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    assert "export" in capsys.readouterr().out
    for tool in ("export", "grow"):
        with pytest.raises(SystemExit):
            cli.main([tool, "--help"])
        assert "--ckpt_path" in capsys.readouterr().out


def test_user_mistakes_get_one_line_errors(tmp_path, monkeypatch, imagefolder):
    monkeypatch.chdir(tmp_path)
    data = ["--data", "ImageFolderDataModule", "--data.root", str(imagefolder)]
    with pytest.raises(SystemExit, match="model.num_classes is set from the data"):
        cli.main(["fit", *MODEL_ARGS, *data, "--model.num_classes", "5"])
    with pytest.raises(SystemExit, match="error: .*'tokenformer_tinyy'"):
        cli.main(["fit", *MODEL_ARGS, *data, "--model.model_name", "tokenformer_tinyy"])
    with pytest.raises(SystemExit, match="error: .*nowhere does not exist"):
        cli.main(["fit", *MODEL_ARGS, "--data", "ImageFolderDataModule", "--data.root", str(tmp_path / "nowhere")])
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").rglob("version_*"))
    with pytest.raises(SystemExit):  # LightningCLI's automatic optimizer is not offered: it drops the recipe
        cli.main(["fit", *MODEL_ARGS, *data, "--optimizer", "SGD"])


def test_model_arguments_that_differ_from_the_checkpoint_are_refused(tmp_path, monkeypatch, imagefolder):
    from tokenformer_vision import ImageClassifier

    monkeypatch.chdir(tmp_path)
    module = ImageClassifier("tokenformer_tiny", num_classes=3, img_size=32,
                             model_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    ckpt = tmp_path / "tiny.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    data = ["--data", "ImageFolderDataModule", "--data.root", str(imagefolder)]
    for arg, value in (("model_name", "tokenformer_small"), ("img_size", "96")):
        with pytest.raises(SystemExit, match=f"--model.{arg} .*differ"):
            cli.main(["validate", *MODEL_ARGS, *data, f"--model.{arg}", value, "--ckpt_path", str(ckpt)])


def test_best_without_earlier_run_is_an_error(tmp_path, monkeypatch, imagefolder):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no earlier run"):
        cli.main(["validate", *MODEL_ARGS, "--data", "ImageFolderDataModule", "--data.root", str(imagefolder),
                  "--ckpt_path", "best"])


# ------------------------------------------------------------------------------------------ errors that name the fix
def _error(args: list[str], capsys) -> str:
    """The message of a failing command: at most 15 lines, and no usage dump."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    message = str(info.value.code)
    assert message.startswith("tokenformer-vision: error: "), message
    assert len(message.splitlines()) <= 15, message
    assert "usage:" not in message + capsys.readouterr().err
    return message


@pytest.mark.parametrize(("extra", "needles"), [
    (["--model.nonfinite", "maybe"], ['"model.nonfinite"', "'skip', 'stop'", "maybe"]),
    (["--model.model_kwargs", "{patch_size:8,depth:1"], ['"model.model_kwargs"', "Expected a dict"]),
    (["--model.lr", "fast"], ['"model.lr"', "Expected a float", "fast"]),
])
def test_argument_type_errors_name_the_key_and_the_type(capsys, extra, needles):
    message = _error(["fit", "--data", "DigitsDataModule", *extra], capsys)
    assert all(n in message for n in needles), message
    assert "tokenformer-vision fit --help" in message


def test_checkpoint_of_other_classes_is_one_short_error(tmp_path, monkeypatch, imagefolder, capsys):
    from tokenformer_vision import ImageClassifier

    monkeypatch.chdir(tmp_path)
    module = ImageClassifier("tokenformer_tiny", num_classes=5, img_size=32,
                             model_kwargs={"patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2})
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                "pytorch-lightning_version": "2.6.6"}, tmp_path / "five.ckpt")
    message = _error(["validate", *MODEL_ARGS, "--data", "ImageFolderDataModule", "--data.root", str(imagefolder),
                      "--data.num_workers", "0", "--ckpt_path", str(tmp_path / "five.ckpt")], capsys)
    assert "5" in message and "3" in message and "classes" in message, message


def test_shrinking_growth_schedule_is_one_short_error(tmp_path, monkeypatch, imagefolder, capsys):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "grow.yaml"
    config.write_text("trainer:\n  callbacks:\n    - class_path: tokenformer_vision.GrowthCallback\n      init_args:\n"
                      "        schedule: [{step: 1, attn_tokens: 16}]\n")
    message = _error(["fit", "--config", str(config), *MODEL_ARGS, "--data", "ImageFolderDataModule",
                      "--data.root", str(imagefolder), "--data.num_workers", "0", "--trainer.max_steps", "2",
                      "--trainer.accelerator", "cpu", "--trainer.enable_progress_bar", "false"], capsys)
    assert "shrink" in message and "attn_tokens" in message and "32" in message and "16" in message, message


def test_full_disk_is_reported_as_enospc(tmp_path, monkeypatch, imagefolder, capsys):
    monkeypatch.chdir(tmp_path)
    real_fdopen = os.fdopen

    def full_fdopen(fd, mode="r", *args, **kwargs):  # checkpoint files take 600 bytes, then the disk is full
        f = real_fdopen(fd, mode, *args, **kwargs)
        write, written = f.write, [0]

        def limited(data):
            written[0] += len(data)
            if written[0] > 600:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(data)

        if "w" in mode:
            f.write = limited
        return f

    monkeypatch.setattr(os, "fdopen", full_fdopen)
    message = _error(["fit", *MODEL_ARGS, "--data", "ImageFolderDataModule", "--data.root", str(imagefolder),
                      "--data.num_workers", "0", "--trainer.max_epochs", "1", "--trainer.limit_train_batches", "1",
                      "--trainer.limit_val_batches", "1", "--trainer.accelerator", "cpu",
                      "--trainer.enable_progress_bar", "false"], capsys)
    assert "No space left on device" in message and "free space" in message, message
    assert "unexpected pos" not in message


def test_version_and_help_of_the_command_import_nothing_heavy():
    code = ("import sys, tokenformer_vision_cli as c\n"
            "c.main(['--version'])\n"
            "try:\n    c.main(['--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
            "print(sorted(m for m in ('torch', 'timm', 'lightning', 'tokenformer_vision') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == f"tokenformer-vision {tokenformer_vision.__version__}"
    assert any(line.startswith("usage: tokenformer-vision") for line in lines)
    assert all(sub in out.stdout for sub in ("fit", "validate", "test", "predict", "export", "grow"))
    assert lines[-1] == "[]"  # neither torch nor the package was imported


def test_export_does_not_import_lightning():
    code = ("import sys\nfrom tokenformer_vision import cli\ntry:\n    cli.main(['export', '--help'])\n"
            "except SystemExit as e:\n    assert e.code in (0, None)\n"
            "print(sorted(m for m in ('lightning', 'tokenformer_vision.classifier') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "--ckpt_path" in out.stdout and out.stdout.splitlines()[-1] == "[]"
