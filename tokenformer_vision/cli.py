"""``tokenformer-vision``: LightningCLI for training, evaluating and predicting with :class:`ImageClassifier`.

    tokenformer-vision fit --config configs/demo/digits.yaml
    tokenformer-vision fit --data ImageFolderDataModule --data.root DIR --model.model_name tokenformer_tiny \\
        --model.img_size 32 --trainer.max_epochs 5
    tokenformer-vision fit --config CFG --ckpt_path last          # resume the newest run of this experiment
    tokenformer-vision validate|test --config CFG --ckpt_path best   # or a .ckpt path
    tokenformer-vision predict --config CFG --ckpt_path best --predict_out preds.csv
    tokenformer-vision export ...                                  # tokenformer_vision.export

Defaults added to Lightning's: a CSVLogger under ``runs/``, ModelCheckpoint (best by ``val/acc1`` plus
``last.ckpt``; ``--checkpoint.*``), LearningRateMonitor (``--lr_monitor.*``), the TQDM progress bar.
``data.num_classes`` feeds ``model.num_classes``; ``model.img_size`` and ``model.model_name`` feed the data module
so the preprocessing matches the model.
"""

from __future__ import annotations

import glob
import importlib
import os
import sys
from typing import Any

import torch
from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

# Importing the data modules registers them as subclasses, so ``--data ImageFolderDataModule`` resolves by name.
from .classifier import ImageClassifier
from .data import DigitsDataModule, ImageFolderDataModule, ImageNetDataModule  # noqa: F401
from .prediction import PredictionWriter

__all__ = ["LastAndBestCheckpoint", "TokenFormerCLI", "main", "resolve_checkpoint"]

DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}


def _get(ns: Any, dotted: str, default: Any = None) -> Any:
    """``ns['a.b.c']`` for nested Namespaces/dicts, ``default`` when a level is missing."""
    for key in dotted.split("."):
        if isinstance(ns, Namespace):
            ns = ns.get(key, default) if key in ns else default
        elif isinstance(ns, dict):
            ns = ns.get(key, default)
        else:
            return default
    return ns


def resolve_checkpoint(which: str, checkpoint_dir: str | None, logger_dir: str | None) -> str | None:
    """Resolve ``"last"``/``"best"`` to a file from an earlier run (a new process has no in-memory best path).

    Every CLI run logs to a new ``version_N`` folder, so Lightning itself only looks for ``last.ckpt`` in the
    folder of the run being started. (``fit`` resumed this way keeps writing checkpoints next to the resumed one.)
    Here the newest ``last*.ckpt`` under ``checkpoint_dir`` (an explicit
    ``--checkpoint.dirpath``) or ``logger_dir/*/checkpoints`` is taken; for ``"best"`` the ModelCheckpoint
    state inside it names the best file. Returns None when there is no earlier run.
    """
    if checkpoint_dir:
        patterns = [os.path.join(checkpoint_dir, "last*.ckpt")]
    elif logger_dir:
        patterns = [os.path.join(logger_dir, "*", "checkpoints", "last*.ckpt")]
    else:
        return None
    found = [p for pattern in patterns for p in glob.glob(pattern)]
    if not found:
        return None
    last = max(found, key=os.path.getmtime)
    if which == "last":
        return last
    ckpt = torch.load(last, map_location="cpu", weights_only=True)
    for state in ckpt.get("callbacks", {}).values():  # keyed by class name + settings (subclasses included)
        if isinstance(state, dict) and state.get("best_model_path"):
            best = state["best_model_path"]
            if os.path.isfile(best):
                return best
            # the run folder may have moved: look next to last.ckpt
            moved = os.path.join(os.path.dirname(last), os.path.basename(best))
            if os.path.isfile(moved):
                return moved
    raise FileNotFoundError(f"ckpt_path='best': {last} records no existing best checkpoint")


class LastAndBestCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` really is the latest state.

    Lightning 2.6 rewrites ``last.ckpt`` only in a step where a top-k checkpoint was saved too, so with
    ``save_top_k=1`` it silently becomes a copy of the best checkpoint and ``fit --ckpt_path last`` would resume
    from an older epoch. This subclass also saves it after every validation (or train epoch without one).
    """

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_train_epoch_end(trainer, pl_module)
        if self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        if not self._should_save_on_train_epoch_end(trainer):
            self._save_last_now(trainer)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores best score and top-k only when the saved dirpath equals this one, comparing strings:
        # a logger-derived relative path and the same folder given as --checkpoint.dirpath (made absolute by
        # Lightning) count as different. Compare real paths, and make the saved file paths absolute too, so that
        # the resumed run keeps its best checkpoint and overwrites last.ckpt instead of writing last-v1.ckpt.
        saved_dir = state_dict.get("dirpath")
        if saved_dir and self.dirpath and os.path.realpath(saved_dir) == os.path.realpath(self.dirpath):
            state_dict = dict(state_dict, dirpath=self.dirpath)
            for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
                if state_dict.get(key):
                    state_dict[key] = os.path.realpath(state_dict[key])
            if "best_k_models" in state_dict:
                state_dict["best_k_models"] = {os.path.realpath(k): v for k, v in state_dict["best_k_models"].items()}
        super().load_state_dict(state_dict)

    def _save_last_now(self, trainer: Trainer) -> None:
        # skipped when the parent already saved in this step (then last.ckpt is current)
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))


class TokenFormerCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LastAndBestCheckpoint, "checkpoint")
        parser.set_defaults({
            "checkpoint.monitor": "val/acc1",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            # no metric name in the file name: "val/acc1" would create a sub-folder
            "checkpoint.filename": "best-epoch{epoch:03d}-acc1_{val/acc1:.4f}",
            "checkpoint.auto_insert_metric_name": False,
        })
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_argument("--predict_out", type=str | None, default=None,
                            help="predict: write top-k predictions here (.csv or .json); default "
                                 "<log_dir>/predictions.csv")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("model.img_size", "data.init_args.img_size")
        parser.link_arguments("model.model_name", "data.init_args.model_name")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        which = cfg.get("ckpt_path")
        if which not in ("last", "best"):
            return
        logger_dir = None
        logger = _get(cfg, "trainer.logger")
        if isinstance(logger, Namespace | dict) and "CSVLogger" in str(_get(logger, "class_path", "")):
            save_dir = _get(logger, "init_args.save_dir") or "runs"
            logger_dir = os.path.join(save_dir, _get(logger, "init_args.name") or "lightning_logs")
        path = resolve_checkpoint(which, _get(cfg, "checkpoint.dirpath"), logger_dir)
        if path is not None:
            print(f"tokenformer-vision: ckpt_path={which} -> {path}", file=sys.stderr)
            cfg["ckpt_path"] = path
            if sub == "fit" and not _get(cfg, "checkpoint.dirpath"):
                # keep checkpointing into the resumed run's folder: ModelCheckpoint restores its best score and
                # top-k only for the same dirpath, so a new folder would let a worse epoch become "best"
                cfg["checkpoint"]["dirpath"] = os.path.dirname(path)
        elif which == "best":
            raise FileNotFoundError(f"ckpt_path='best': no earlier run with a last.ckpt under "
                                    f"{_get(cfg, 'checkpoint.dirpath') or logger_dir}")

    def before_predict(self) -> None:
        path = self.config["predict"].get("predict_out")
        if path is None:
            path = os.path.join(self.trainer.log_dir or ".", "predictions.csv")
        self.trainer.callbacks.append(PredictionWriter(path))
        print(f"tokenformer-vision: writing predictions to {path}", file=sys.stderr)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: ``export`` goes to :mod:`tokenformer_vision.export`, the rest to LightningCLI."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "export":
        try:
            export = importlib.import_module("tokenformer_vision.export")
        except ModuleNotFoundError as err:
            if err.name != "tokenformer_vision.export":
                raise
            sys.exit("tokenformer-vision export: tokenformer_vision.export is not available in this installation")
        code = export.main(args[1:])
        if code:  # a non-zero status (bad input) must reach the shell
            sys.exit(code)
        return
    TokenFormerCLI(
        ImageClassifier,
        LightningDataModule,
        subclass_mode_data=True,
        args=argv,  # None: LightningCLI reads sys.argv itself
        trainer_defaults={"logger": DEFAULT_LOGGER},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
