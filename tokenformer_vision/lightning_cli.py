"""The LightningCLI of :class:`ImageClassifier` behind ``tokenformer-vision fit|validate|test|predict``, on
LightningCLI's documented hooks only.

Defaults added to Lightning's: a CSVLogger under ``runs/<model>-<data>/``, durable checkpoints (best by
``val/acc1`` plus ``last.ckpt``, ``--checkpoint.*``), LearningRateMonitor (``--lr_monitor.*``). ``data.num_classes``
feeds ``model.num_classes``; ``model.img_size`` and ``model.model_name`` feed the data module's preprocessing.
"""

from __future__ import annotations

import inspect
import json
import os
import sys
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import CSVLogger

from .classifier import ImageClassifier

# Importing the data modules registers them as subclasses, so ``--data ImageFolderDataModule`` resolves by name.
from .data import DigitsDataModule, ImageFolderDataModule, ImageNetDataModule  # noqa: F401
from .durable_checkpoints import LastAndBestCheckpoint, resolve_checkpoint, with_atomic_checkpoint_io
from .prediction import PredictionWriter

__all__ = ["TokenFormerCLI"]

DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
_CSV_DEFAULT_NAME = inspect.signature(CSVLogger).parameters["name"].default  # "lightning_logs"
STARTED: list[TokenFormerCLI] = []  # the CLIs whose classes were built: main() cleans up after a failed start


class UsageError(ValueError):
    """A mistake in what the user asked for: printed as one line, exit status 1."""


def _get(ns: Any, dotted: str, default: Any = None) -> Any:
    """``ns['a.b.c']`` for nested Namespaces/dicts, ``default`` when a level is missing."""
    for key in dotted.split("."):
        ns = ns[key] if isinstance(ns, (Namespace, dict)) and key in ns else None
    return default if ns is None else ns


def _run_name(cfg: Any) -> str:
    """Runs are named by model and data, so ``last``/``best`` never pick a run of another experiment."""
    data = _get(cfg, "data.class_path", "data").rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    root = _get(cfg, "data.init_args.root")
    return "-".join([str(_get(cfg, "model.model_name", "model")), data] + ([Path(str(root)).name] if root else []))


def resolve_run_checkpoint(which: str, cfg: Any) -> str:
    """``last``/``best`` among the runs of ``cfg``'s checkpoint folder or CSVLogger folder (named by the run)."""
    logger, log_dir = _get(cfg, "trainer.logger"), None
    if isinstance(logger, (Namespace, dict)) and "CSVLogger" in str(_get(logger, "class_path", "")):
        name = _get(logger, "init_args.name")
        # CSVLogger's default name is replaced by the run's name in fit (parse_arguments), so here as well
        log_dir = os.path.join(_get(logger, "init_args.save_dir", "runs"),
                               _run_name(cfg) if name in (None, _CSV_DEFAULT_NAME) else name)
    if (path := resolve_checkpoint(which, _get(cfg, "checkpoint.dirpath"), log_dir)) is None:
        raise UsageError(f"ckpt_path={which}: no earlier run with a loadable last.ckpt under "
                         f"{_get(cfg, 'checkpoint.dirpath') or log_dir} (pass the training config, or a .ckpt path)")
    return path


def _plain(value: Any) -> Any:
    return value.as_dict() if isinstance(value, Namespace) else value


class TokenFormerCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the optimizer is ImageClassifier's (--model.optimizer): LightningCLI's automatic --optimizer would replace
        # its no-decay groups, warmup and cosine without a word, and miss parameters grown mid-training
        self.given_model: dict[str, Any] = {}
        super().__init__(*args, auto_configure_optimizers=False, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(LastAndBestCheckpoint, "checkpoint")
        # no metric name in the file name: "val/acc1" would create a sub-folder
        parser.set_defaults({"checkpoint.monitor": "val/acc1", "checkpoint.mode": "max", "checkpoint.save_last": True,
                             "checkpoint.filename": "best-epoch{epoch:03d}-acc1_{val/acc1:.4f}",
                             "checkpoint.auto_insert_metric_name": False})
        parser.add_lightning_class_args(LearningRateMonitor, "lr_monitor")
        parser.set_defaults({"lr_monitor.logging_interval": "step"})
        parser.add_argument("--predict_out", type=str | None, default=None,
                            help="predict: top-k predictions to .csv or .json; default <log_dir>/predictions.csv")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.link_arguments("model.img_size", "data.init_args.img_size")
        parser.link_arguments("model.model_name", "data.init_args.model_name")

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Name the run, and resolve ``--ckpt_path last|best`` to a file before LightningCLI reads the
        checkpoint's hyperparameters."""
        super().parse_arguments(parser, args)
        if not (sub := self.config.get("subcommand")):
            return
        cfg = self.config[sub]
        self.given_model = {k: _plain(v) for k, v in (_plain(cfg.get("model")) or {}).items()}
        logger = _get(cfg, "trainer.logger")
        if isinstance(logger, Namespace) and "CSVLogger" in str(logger.get("class_path")) \
                and _get(logger, "init_args.name", _CSV_DEFAULT_NAME) == _CSV_DEFAULT_NAME:
            logger.init_args.name = _run_name(cfg)
        if (which := cfg.get("ckpt_path")) not in ("last", "best"):
            return
        path = resolve_run_checkpoint(which, cfg)
        print(f"tokenformer-vision: ckpt_path={which} -> {path}", file=sys.stderr)
        cfg["ckpt_path"] = path
        if sub == "fit" and not _get(cfg, "checkpoint.dirpath"):
            # keep checkpointing into the resumed run's folder: ModelCheckpoint restores its best score and top-k
            # only for the same dirpath, so a new folder would let a worse epoch become "best"
            cfg["checkpoint"]["dirpath"] = os.path.dirname(path)

    def before_instantiate_classes(self) -> None:
        """With ``--ckpt_path``, LightningCLI rebuilds the model from the checkpoint's hyperparameters, replacing
        ``--model.*``: refuse arguments that differ from the checkpoint instead of dropping them."""
        sub = self.config.get("subcommand")
        if not sub or not self.config[sub].get("ckpt_path"):
            return
        rebuilt = {k: _plain(v) for k, v in (_plain(self.config[sub].get("model")) or {}).items()}
        defaults = {k: p.default for k, p in inspect.signature(ImageClassifier).parameters.items()}
        same = lambda a, b: json.dumps(a, default=str, sort_keys=True) == json.dumps(b, default=str, sort_keys=True)
        differ = [f"--model.{k} {v!r} (checkpoint: {rebuilt.get(k)!r})" for k, v in self.given_model.items()
                  if v is not None and k in defaults and not same(v, defaults[k]) and not same(v, rebuilt.get(k))]
        if differ:
            raise UsageError(f"ckpt_path {self.config[sub]['ckpt_path']}: the model is rebuilt from the checkpoint, "
                             f"but {', '.join(differ)} differ; drop them, or train a new model")

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # durable checkpoint writes (temporary file, fsync, rename), unless the user chose a CheckpointIO
        plugins = kwargs.get("plugins", _get(self.config_init, f"{self.subcommand or ''}.trainer.plugins".lstrip(".")))
        return super().instantiate_trainer(**{**kwargs, "plugins": with_atomic_checkpoint_io(plugins)})

    def after_instantiate_classes(self) -> None:
        STARTED.append(self)

    def before_predict(self) -> None:
        path = self.config["predict"].get("predict_out") or os.path.join(self.trainer.log_dir or ".", "predictions.csv")
        self.trainer.callbacks.append(PredictionWriter(path))
        print(f"tokenformer-vision: writing predictions to {path}", file=sys.stderr)
