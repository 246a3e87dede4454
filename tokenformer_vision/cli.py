"""``tokenformer-vision``: ``fit|validate|test|predict`` (the LightningCLI of :class:`ImageClassifier`, in
:mod:`tokenformer_vision.lightning_cli`), ``export`` and ``grow`` (usage: README, "Training and evaluation");
``--ckpt_path last|best`` picks from the earlier runs of the same experiment.

Each subcommand imports only what it runs (``export`` needs no Lightning), and errors end in one short message
that names the fix rather than a traceback (``TOKENFORMER_VISION_TRACEBACK=1`` shows the traceback).
"""

from __future__ import annotations

import argparse
import errno
import importlib
import inspect
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any

from docstring_parser import parse as parse_docstring
from jsonargparse import ActionYesNo, ArgumentParser

__all__ = ["main"]

TOOLS = ("export", "grow")
TRAINER_SUBCOMMANDS = ("fit", "validate", "test", "predict")
# loaded on first use, so that ``export`` and the argument checks do not import Lightning
LAZY = {"TokenFormerCLI": "lightning_cli", "LastAndBestCheckpoint": "lightning_cli",
        "grow_checkpoint": "offline_growth"}


def __getattr__(name: str) -> Any:
    if name not in LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{LAZY[name]}", __package__), name)


def _tool(name: str, argv: list[str]) -> None:
    """``export`` and ``grow``: jsonargparse over the function's signature; ``--ckpt_path last|best`` as in fit."""
    if name == "export":
        from .export import export_checkpoint as fn
    else:
        from .offline_growth import grow_checkpoint as fn
    parser = ArgumentParser(prog=f"tokenformer-vision {name}", description=fn.__doc__.splitlines()[0],
                            exit_on_error=False)
    parser.add_argument("--config", type=str | None, default=None,
                        help="the training config, to resolve --ckpt_path last|best among its runs")
    flags = {n: p.default for n, p in inspect.signature(fn).parameters.items() if isinstance(p.default, bool)}
    parser.add_function_arguments(fn, skip=set(flags))
    docs = {p.arg_name: p.description for p in parse_docstring(fn.__doc__).params}
    for flag, default in flags.items():  # `--onnx` and `--no_onnx` as well as `--onnx true`
        parser.add_argument(f"--{flag}", action=ActionYesNo, nargs="?", default=default, help=docs.get(flag))
    args = parser.parse_args(argv).as_dict()
    config_path = args.pop("config")
    if args["ckpt_path"] in ("last", "best"):
        import yaml

        from .lightning_cli import DEFAULT_LOGGER, resolve_run_checkpoint

        cfg = yaml.safe_load(Path(config_path).read_text()) if config_path else {}
        cfg.setdefault("trainer", {}).setdefault("logger", DEFAULT_LOGGER)
        args["ckpt_path"] = resolve_run_checkpoint(args["ckpt_path"], cfg)
    result = fn(**args)
    print(f"tokenformer-vision {name}: {args['ckpt_path']} -> {args['out']}"
          + (f" ({result})" if isinstance(result, dict) else ""))


def _run_trainer_cli(argv: list[str] | None) -> None:
    from lightning.pytorch import LightningDataModule

    from .classifier import ImageClassifier
    from .lightning_cli import DEFAULT_LOGGER, TokenFormerCLI

    TokenFormerCLI(
        ImageClassifier, LightningDataModule, subclass_mode_data=True, args=argv,
        trainer_defaults={"logger": DEFAULT_LOGGER}, save_config_kwargs={"overwrite": True},
        parser_kwargs={"exit_on_error": False,  # main() prints the one line that matters, not the whole usage
                       "epilog": "More subcommands: export (timm weights, ONNX) and grow (grow a checkpoint "
                                 "offline); see `tokenformer-vision export --help`."},
    )


def _shorten(lines: list[str], limit: int) -> str:
    """At most ``limit`` lines: the message, not an essay (the traceback variable shows all of it)."""
    more = len(lines) - limit + 1
    return "\n".join(lines if more <= 1 else [*lines[:limit - 1], f"... ({more} more lines)"])


def _argument_error(err: BaseException, args: list[str]) -> str:
    """A jsonargparse error in a few lines: the failing key, what it expected and what it got."""
    text = re.sub(r"<class '([\w.]+)'>", r"\1", str(err))  # "Expected a dict", not "Expected a <class 'dict'>"
    # jsonargparse lists every Union subtype it tried; the NoneType alternative is never the useful one
    lines = [ln.rstrip() for ln in text.splitlines() if ln.strip() and "NoneType" not in ln]
    sub = next((f"{a} " for a in args if a in (*TRAINER_SUBCOMMANDS, *TOOLS)), "")
    return f"{_shorten(lines, 10)}\n(see `tokenformer-vision {sub}--help` for what each option takes)"


def _runtime_error(err: BaseException) -> str | None:
    """The message of a user-facing error (bad data, a checkpoint that does not fit, a full disk, ...), or None
    for a bug, whose traceback is worth showing."""
    chain: list[BaseException] = []
    while err is not None and err not in chain:
        chain.append(err)
        err = err.__cause__ or err.__context__
    os_error = next((e for e in chain if isinstance(e, OSError) and e.errno is not None), None)
    if os_error is not None:  # a full disk or a read-only folder, however deep it was wrapped
        text = (os_error.args[1] if len(os_error.args) > 1 else os_error.strerror) or str(os_error)
        text += f": {os_error.filename}" if os_error.filename else ""
        if os_error.errno == errno.ENOSPC and "free space" not in text:
            text += " (free space on that disk, or write elsewhere: --checkpoint.dirpath, --trainer.logger.save_dir)"
        return f"{type(os_error).__name__}: {text}"
    found = next((e for e in chain if isinstance(e, (ValueError, TypeError, FileNotFoundError))), None)
    if found is None:
        return None
    # jsonargparse's "Does not validate against any of the Union subtypes" essay: keep the errors it lists
    lines = [ln.strip()[2:] for ln in str(found).splitlines() if ln.strip().startswith("- ") and "NoneType" not in ln]
    text = "; ".join(lines) if lines else str(found)
    return text if type(found).__name__ == "UsageError" else f"{type(found).__name__}: {text}"


def _started() -> list[Any]:
    """The CLIs of this process that built their classes (none before ``lightning_cli`` is imported)."""
    module = sys.modules.get(f"{__package__}.lightning_cli")
    return module.STARTED if module is not None else []


def main(argv: list[str] | None = None) -> None:
    """Console entry point (``tokenformer-vision``)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["--version"]:
        from . import __version__

        print(f"tokenformer-vision {__version__}")
        return
    if any(a.split("=")[0] == "--model.num_classes" for a in args):
        sys.exit("tokenformer-vision: error: --model.num_classes is set from the data (data.num_classes); "
                 "choose the classes through the data module, not the model")
    _started().clear()
    try:
        if args[:1] and args[0] in TOOLS:
            return _tool(args[0], args[1:])
        _run_trainer_cli(argv)
    except argparse.ArgumentError as err:
        sys.exit(f"tokenformer-vision: error: {_argument_error(err, args)}")
    except Exception as err:
        started = _started()
        log_dir = getattr(getattr(started[0], "trainer", None), "log_dir", None) if started else None
        if log_dir and os.path.isdir(log_dir) and not any(  # drop a version folder that holds nothing of value
                p.is_file() and p.name not in ("config.yaml", "hparams.yaml") for p in Path(log_dir).rglob("*")):
            shutil.rmtree(log_dir, ignore_errors=True)
        message = _runtime_error(err)
        if message is None or os.environ.get("TOKENFORMER_VISION_TRACEBACK"):
            raise
        where = " (while running; TOKENFORMER_VISION_TRACEBACK=1 shows where)" if started else ""
        sys.exit(f"tokenformer-vision: error: {_shorten(message.splitlines(), 12)}{where}")


if __name__ == "__main__":
    main()
