"""``tokenformer-vision``: the LightningCLI of :class:`ImageClassifier`, plus ``export`` and ``grow``.

    tokenformer-vision fit --config configs/demo/digits.yaml
    tokenformer-vision fit --data ImageFolderDataModule --data.root DIR --model.model_name tokenformer_tiny \\
        --model.img_size 32 --trainer.max_epochs 5
    tokenformer-vision fit --config CFG --ckpt_path last                  # resume the newest run of this experiment
    tokenformer-vision validate|test --config CFG --ckpt_path best        # or a .ckpt path
    tokenformer-vision predict --config CFG --ckpt_path best --predict_out preds.csv
    tokenformer-vision export --config CFG --ckpt_path best --out DIR     # timm weights (+ --onnx)
    tokenformer-vision grow --ckpt_path CKPT --out grown.ckpt --attn_tokens 1024 --ffn_tokens 4096

Defaults added to Lightning's: a CSVLogger under ``runs/<model>-<data>/`` (the config's name when it has one),
durable checkpoints (:mod:`tokenformer_vision.checkpointing`: best by ``val/acc1`` plus ``last.ckpt``,
``--checkpoint.*``), LearningRateMonitor (``--lr_monitor.*``). ``data.num_classes`` feeds ``model.num_classes``;
``model.img_size`` and ``model.model_name`` feed the data module, so the preprocessing matches the model.
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
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
from .checkpointing import LastAndBestCheckpoint, resolve_checkpoint, with_atomic_checkpoint_io
from .classifier import ImageClassifier

# Importing the data modules registers them as subclasses, so ``--data ImageFolderDataModule`` resolves by name.
from .data import DigitsDataModule, ImageFolderDataModule, ImageNetDataModule  # noqa: F401
from .prediction import PredictionWriter

__all__ = ["TokenFormerCLI", "main", "grow_checkpoint"]

log = logging.getLogger(__name__)
DEFAULT_LOGGER = {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}}
TOOLS = ("export", "grow")
_STARTED: list[TokenFormerCLI] = []


class UsageError(Exception):
    """A mistake in what the user asked for: printed as one line, exit status 2."""


def _get(ns: Any, dotted: str, default: Any = None) -> Any:
    """``ns['a.b.c']`` for nested Namespaces/dicts, ``default`` when a level is missing."""
    for key in dotted.split("."):
        if isinstance(ns, (Namespace, dict)) and key in ns:
            ns = ns[key]
        else:
            return default
    return default if ns is None else ns


def _run_name(cfg: Any) -> str:
    """Runs are named by model and data, so ``last``/``best`` never pick a run of another experiment."""
    data = _get(cfg, "data.class_path", "data").rsplit(".", 1)[-1].removesuffix("DataModule").lower()
    root = _get(cfg, "data.init_args.root")
    return "-".join([str(_get(cfg, "model.model_name", "model")), data] + ([Path(str(root)).name] if root else []))


def _logger_dir(cfg: Any) -> str | None:
    logger = _get(cfg, "trainer.logger")
    if isinstance(logger, (Namespace, dict)) and "CSVLogger" in str(_get(logger, "class_path", "")):
        return os.path.join(_get(logger, "init_args.save_dir", "runs"), _get(logger, "init_args.name", ""))
    return None


class TokenFormerCLI(LightningCLI):
    """LightningCLI with the project's defaults (see the module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # the optimizer is ImageClassifier's (--model.optimizer): LightningCLI's automatic --optimizer would replace
        # its no-decay groups, warmup and cosine without a word, and miss parameters grown mid-training
        super().__init__(*args, auto_configure_optimizers=False, **kwargs)

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
        logger = _get(cfg, "trainer.logger")
        if isinstance(logger, Namespace) and "CSVLogger" in str(logger.get("class_path")) \
                and _get(logger, "init_args.name", "lightning_logs") == "lightning_logs":
            logger.init_args.name = _run_name(cfg)
        which = cfg.get("ckpt_path")
        if which not in ("last", "best"):
            return
        path = resolve_checkpoint(which, _get(cfg, "checkpoint.dirpath"), _logger_dir(cfg))
        if path is None:
            raise UsageError(f"ckpt_path={which}: no earlier run with a loadable last.ckpt under "
                             f"{_get(cfg, 'checkpoint.dirpath') or _logger_dir(cfg)}")
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
        path = self.config["predict"].get("predict_out")
        if path is None:
            path = os.path.join(self.trainer.log_dir or ".", "predictions.csv")
        self.trainer.callbacks.append(PredictionWriter(path))
        print(f"tokenformer-vision: writing predictions to {path}", file=sys.stderr)


# ------------------------------------------------------------------------------------ export and grow
def grow_checkpoint(ckpt_path: str, out: str, attn_tokens: int | None = None, ffn_tokens: int | None = None,
                    seed: int = 0) -> dict[str, int]:
    """Grow a Lightning checkpoint offline: the model, its EMA copy and the optimizer state (e.g. for FSDP).

    Args:
        ckpt_path: the checkpoint of ImageClassifier (.ckpt).
        out: where to write the grown checkpoint.
        attn_tokens: new parameter tokens of every attention projection (None: unchanged).
        ffn_tokens: new parameter tokens of every FFN (None: unchanged).
        seed: seed of the new value tokens.

    Returns:
        The new token counts. The function is preserved: the logits are checked in float64.
    """
    from .checkpoint import read_checkpoint
    from .export import _example_input, load_classifier
    from .growth import grow_training_state

    checkpoint = read_checkpoint(ckpt_path)
    module = load_classifier(ckpt_path)
    net = module.model
    probe = _example_input(net).double()
    with torch.no_grad():
        before = copy.deepcopy(net).double()(probe)
    optimizers = []
    for state in checkpoint.get("optimizer_states", []):  # parameters in ImageClassifier.param_groups() order
        optimizer = torch.optim.AdamW(module.param_groups())
        optimizer.load_state_dict(state)
        optimizers.append(optimizer)
    grow_training_state(net, attn_tokens, ffn_tokens, optimizer=optimizers, ema=module.ema, seed=seed)
    with torch.no_grad():
        change = float((copy.deepcopy(net).double()(probe) - before).abs().max())
    if change > 1e-8:
        raise RuntimeError(f"growth changed the float64 logits by {change:.3g}; not writing {out}")
    checkpoint["state_dict"] = module.state_dict()
    checkpoint["optimizer_states"] = [opt.state_dict() for opt in optimizers]
    checkpoint["token_counts"] = dict(net.token_counts)
    tmp = f"{out}.tmp"
    torch.save(checkpoint, tmp)
    os.replace(tmp, out)
    return dict(net.token_counts)


def _tool(name: str, argv: list[str]) -> None:
    """``export`` and ``grow``: jsonargparse over the function's signature, ``--ckpt_path last|best`` resolved in
    the runs of ``--config`` (the training config) like the other subcommands."""
    from .export import export_checkpoint

    fn = export_checkpoint if name == "export" else grow_checkpoint
    parser = ArgumentParser(prog=f"tokenformer-vision {name}", description=fn.__doc__.splitlines()[0])
    parser.add_argument("--config", type=str | None, default=None,
                        help="the training config, to resolve --ckpt_path last|best among its runs")
    parser.add_function_arguments(fn)
    flags = {f"--{n}" for n, p in inspect.signature(fn).parameters.items() if isinstance(p.default, bool)}
    # boolean options work as flags too (`--onnx` as well as `--onnx true`)
    argv = [t for i, a in enumerate(argv) for t in ([a, "true"] if a in flags and (i + 1 == len(argv) or argv[
        i + 1].startswith("--")) else [a])]
    args = parser.parse_args(argv).as_dict()
    config_path = args.pop("config")
    if args["ckpt_path"] in ("last", "best"):
        cfg = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
        cfg.setdefault("trainer", {}).setdefault("logger", DEFAULT_LOGGER)
        logger_dir = _logger_dir(cfg)
        if logger_dir is not None and _get(cfg, "trainer.logger.init_args.name") is None:
            logger_dir = os.path.join(logger_dir, _run_name(cfg))
        path = resolve_checkpoint(args["ckpt_path"], _get(cfg, "checkpoint.dirpath"), logger_dir)
        if path is None:
            raise UsageError(f"ckpt_path={args['ckpt_path']}: no earlier run with a loadable last.ckpt under "
                             f"{logger_dir} (pass --config with the training config, or a .ckpt path)")
        args["ckpt_path"] = path
    result = fn(**args)
    print(f"tokenformer-vision {name}: {args['ckpt_path']} -> {args['out']}"
          + (f" ({result})" if isinstance(result, dict) else ""))


def _remove_empty_run(cli: TokenFormerCLI | None) -> None:
    """After a failed start, drop the version folder it created if nothing of value was written into it."""
    log_dir = getattr(getattr(cli, "trainer", None), "log_dir", None)
    if log_dir and os.path.isdir(log_dir):
        kept = [p for p in Path(log_dir).rglob("*") if p.is_file() and p.name not in ("config.yaml", "hparams.yaml")]
        if not kept:
            shutil.rmtree(log_dir, ignore_errors=True)


def _user_error(err: BaseException | None) -> BaseException | None:
    """The outermost ValueError/FileNotFoundError/TypeError in the chain (jsonargparse wraps the ones raised
    while it builds the model or the data), or None."""
    while err is not None and not isinstance(err, (ValueError, FileNotFoundError, TypeError)):
        err = err.__cause__ or err.__context__
    return err


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
        if args[:1] and args[0] in TOOLS:
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
        if _STARTED:
            _remove_empty_run(_STARTED[0])
        cause = _user_error(err)
        if not _STARTED and cause is not None:
            # a bad argument found while building the model or the data: the message is the useful part (from
            # jsonargparse's "Does not validate against any of the Union subtypes" essay, the errors it lists)
            lines = [ln.strip()[2:] for ln in str(cause).splitlines() if ln.strip().startswith("- ")
                     and "NoneType" not in ln] or [str(cause)]
            sys.exit(f"tokenformer-vision: error: {type(cause).__name__}: " + "; ".join(lines))
        raise


if __name__ == "__main__":
    main()
