"""``tokenformer-vision``: the LightningCLI of :class:`ImageClassifier`, plus ``export`` and ``grow`` (usage: README,
"Training and evaluation"); ``--ckpt_path last|best`` picks from the earlier runs of the same experiment.

Defaults added to Lightning's: a CSVLogger under ``runs/<model>-<data>/``, durable checkpoints (best by
``val/acc1`` plus ``last.ckpt``, ``--checkpoint.*``), LearningRateMonitor (``--lr_monitor.*``). ``data.num_classes``
feeds ``model.num_classes``; ``model.img_size`` and ``model.model_name`` feed the data module's preprocessing.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from jsonargparse import ArgumentParser, Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from . import __version__
from .checkpoint import read_checkpoint
from .checkpointing import LastAndBestCheckpoint, resolve_checkpoint, with_atomic_checkpoint_io
from .classifier import ImageClassifier

# Importing the data modules registers them as subclasses, so ``--data ImageFolderDataModule`` resolves by name.
from .data import DigitsDataModule, ImageFolderDataModule, ImageNetDataModule  # noqa: F401
from .export import _example_input, export_checkpoint, load_classifier
from .growth import grow_training_state
from .prediction import PredictionWriter

__all__ = ["TokenFormerCLI", "main", "grow_checkpoint"]

DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
_STARTED: list[TokenFormerCLI] = []


class UsageError(Exception):
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


def _resolve(which: str, cfg: Any) -> str:
    """``last``/``best`` among the runs of ``cfg``'s checkpoint folder or CSVLogger folder (named by the run)."""
    logger, log_dir = _get(cfg, "trainer.logger"), None
    if isinstance(logger, (Namespace, dict)) and "CSVLogger" in str(_get(logger, "class_path", "")):
        name = _get(logger, "init_args.name")
        log_dir = os.path.join(_get(logger, "init_args.save_dir", "runs"), _run_name(cfg) if name is None else name)
    path = resolve_checkpoint(which, _get(cfg, "checkpoint.dirpath"), log_dir)
    if path is None:
        raise UsageError(f"ckpt_path={which}: no earlier run with a loadable last.ckpt under "
                         f"{_get(cfg, 'checkpoint.dirpath') or log_dir} (pass the training config, or a .ckpt path)")
    return path


class TokenFormerCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the optimizer is ImageClassifier's (--model.optimizer): LightningCLI's automatic --optimizer would replace
        # its no-decay groups, warmup and cosine without a word, and miss parameters grown mid-training
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
        super().parse_arguments(parser, args)
        sub = self.config.get("subcommand")
        if not sub:
            return
        cfg = self.config[sub]
        logger = _get(cfg, "trainer.logger")
        if isinstance(logger, Namespace) and "CSVLogger" in str(logger.get("class_path")) \
                and _get(logger, "init_args.name", "lightning_logs") == "lightning_logs":
            logger.init_args.name = _run_name(cfg)
        which = cfg.get("ckpt_path")
        if which not in ("last", "best"):
            return
        path = _resolve(which, cfg)
        print(f"tokenformer-vision: ckpt_path={which} -> {path}", file=sys.stderr)
        cfg["ckpt_path"] = path
        if sub == "fit" and not _get(cfg, "checkpoint.dirpath"):
            # keep checkpointing into the resumed run's folder: ModelCheckpoint restores its best score and top-k
            # only for the same dirpath, so a new folder would let a worse epoch become "best"
            cfg["checkpoint"]["dirpath"] = os.path.dirname(path)

    def _parse_ckpt_path(self) -> None:
        """LightningCLI rebuilds the model from the checkpoint's hyperparameters, replacing ``--model.*``: refuse
        arguments that differ from the checkpoint instead of dropping them."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt and Path(ckpt).is_file():
            saved = torch.load(ckpt, weights_only=True, map_location="cpu").get("hyper_parameters", {})
            given, defaults = self.config[sub].get("model"), self._subcommand_parsers[sub].get_defaults().get("model")
            same = lambda a, b: json.dumps(a, default=str, sort_keys=True) == json.dumps(b, default=str, sort_keys=True)
            differ = [f"--model.{k} {given[k]!r} (checkpoint: {saved[k]!r})" for k in saved
                      if k in given and given[k] is not None and not same(given[k], _get(defaults, k))
                      and not same(given[k], saved[k])]
            if differ:
                raise UsageError(f"ckpt_path {ckpt}: the model is rebuilt from the checkpoint, but "
                                 f"{', '.join(differ)} differ; drop them, or train a new model")
        super()._parse_ckpt_path()

    def instantiate_trainer(self, **kwargs: Any) -> Any:
        # durable checkpoint writes (temporary file, fsync, rename), unless the user chose a CheckpointIO
        plugins = kwargs.get("plugins", self._get(self.config_init, "trainer", default={}).get("plugins"))
        return super().instantiate_trainer(**{**kwargs, "plugins": with_atomic_checkpoint_io(plugins)})

    def after_instantiate_classes(self) -> None:
        _STARTED.append(self)  # main() cleans up after a failed start

    def before_predict(self) -> None:
        path = self.config["predict"].get("predict_out") or os.path.join(self.trainer.log_dir or ".", "predictions.csv")
        self.trainer.callbacks.append(PredictionWriter(path))
        print(f"tokenformer-vision: writing predictions to {path}", file=sys.stderr)


def grow_checkpoint(ckpt_path: str, out: str, attn_tokens: int | None = None, ffn_tokens: int | None = None,
                    seed: int = 0) -> dict[str, int]:
    """Grow a Lightning checkpoint offline: the model, its EMA copy and the optimizer state (e.g. for FSDP).
    Returns the new token counts, having checked that the float64 logits are unchanged.

    Args:
        ckpt_path: the checkpoint of ImageClassifier (.ckpt).
        out: where to write the grown checkpoint.
        attn_tokens: new token count of every attention projection (None: unchanged).
        ffn_tokens: new token count of every FFN (None: unchanged).
        seed: seed of the new value tokens.
    """
    checkpoint = read_checkpoint(ckpt_path)
    module = load_classifier(ckpt_path)
    net = module.model
    probe = _example_input(net).double()
    logits = torch.no_grad()(lambda: copy.deepcopy(net).double()(probe))
    before = logits()
    optimizers = [torch.optim.AdamW(module.param_groups()) for _ in checkpoint.get("optimizer_states", [])]
    for optimizer, state in zip(optimizers, checkpoint.get("optimizer_states", []), strict=True):
        optimizer.load_state_dict(state)  # parameters in ImageClassifier.param_groups() order
    grow_training_state(net, attn_tokens, ffn_tokens, optimizer=optimizers, ema=module.ema, seed=seed)
    change = float((logits() - before).abs().max())
    if change > 1e-8:
        raise RuntimeError(f"growth changed the float64 logits by {change:.3g}; not writing {out}")
    checkpoint["state_dict"] = module.state_dict()
    checkpoint["optimizer_states"] = [opt.state_dict() for opt in optimizers]
    checkpoint["token_counts"] = dict(net.token_counts)
    torch.save(checkpoint, f"{out}.tmp")
    os.replace(f"{out}.tmp", out)
    return dict(net.token_counts)


def _tool(name: str, argv: list[str]) -> None:
    """``export`` and ``grow``: jsonargparse over the function's signature; ``--ckpt_path last|best`` as in fit."""
    fn = export_checkpoint if name == "export" else grow_checkpoint
    parser = ArgumentParser(prog=f"tokenformer-vision {name}", description=fn.__doc__.splitlines()[0])
    parser.add_argument("--config", type=str | None, default=None,
                        help="the training config, to resolve --ckpt_path last|best among its runs")
    parser.add_function_arguments(fn)
    flags = {f"--{n}" for n, p in inspect.signature(fn).parameters.items() if isinstance(p.default, bool)}
    # boolean options work as flags too (`--onnx` as well as `--onnx true`)
    argv = [t for a, nxt in zip(argv, [*argv[1:], "--"], strict=True)
            for t in ([a, "true"] if a in flags and nxt.startswith("--") else [a])]
    args = parser.parse_args(argv).as_dict()
    config_path = args.pop("config")
    if args["ckpt_path"] in ("last", "best"):
        cfg = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
        cfg.setdefault("trainer", {}).setdefault("logger", DEFAULT_LOGGER)
        args["ckpt_path"] = _resolve(args["ckpt_path"], cfg)
    result = fn(**args)
    print(f"tokenformer-vision {name}: {args['ckpt_path']} -> {args['out']}"
          + (f" ({result})" if isinstance(result, dict) else ""))


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``tokenformer-vision``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        print(f"tokenformer-vision {__version__}")
        return
    if any(a.split("=")[0] == "--model.num_classes" for a in args):
        sys.exit("tokenformer-vision: error: --model.num_classes is set from the data (data.num_classes); "
                 "choose the classes through the data module, not the model")
    _STARTED.clear()
    try:
        if args[:1] in (["export"], ["grow"]):
            return _tool(args[0], args[1:])
        TokenFormerCLI(
            ImageClassifier, LightningDataModule, subclass_mode_data=True, args=argv,
            trainer_defaults={"logger": DEFAULT_LOGGER}, save_config_kwargs={"overwrite": True},
            parser_kwargs={"epilog": "More subcommands: export (timm weights, ONNX) and grow (grow a checkpoint "
                                     "offline); see `tokenformer-vision export --help`."},
        )
    except UsageError as err:
        sys.exit(f"tokenformer-vision: error: {err}")
    except Exception as err:
        # after a failed start, drop the version folder it created if nothing of value was written into it
        log_dir = getattr(getattr(_STARTED[0], "trainer", None), "log_dir", None) if _STARTED else None
        if log_dir and os.path.isdir(log_dir) and not any(
                p.is_file() and p.name not in ("config.yaml", "hparams.yaml") for p in Path(log_dir).rglob("*")):
            shutil.rmtree(log_dir, ignore_errors=True)
        cause = err  # the outermost ValueError/TypeError/FileNotFoundError: jsonargparse wraps those it meets
        while cause is not None and not isinstance(cause, (ValueError, FileNotFoundError, TypeError)):
            cause = cause.__cause__ or cause.__context__
        if not _STARTED and cause is not None:
            # a bad argument found while building the model or the data: the message is the useful part (from
            # jsonargparse's "Does not validate against any of the Union subtypes" essay, the errors it lists)
            lines = [ln.strip()[2:] for ln in str(cause).splitlines() if ln.strip().startswith("- ")
                     and "NoneType" not in ln] or [str(cause)]
            sys.exit(f"tokenformer-vision: error: {type(cause).__name__}: " + "; ".join(lines))
        raise


if __name__ == "__main__":
    main()
