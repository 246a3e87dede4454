"""Weights interchange: Lightning checkpoint → timm weights (safetensors + ``config.json``) → back; ONNX export.

``tokenformer-vision export --ckpt_path CKPT --out DIR [--ema] [--onnx]`` writes, into ``DIR``:

- ``model.safetensors``: the plain timm model state dict (no ``model.`` prefix), grown token counts included;
- ``config.json``: timm's Hugging Face layout (``architecture``, ``num_classes``, ``num_features``, ``label_names``,
  ``model_args``, ``pretrained_cfg``), written by :func:`timm.models.save_for_hf`. ``model_args`` holds
  ``attn_tokens``/``ffn_tokens``/``img_size``/... so ``timm.create_model('local-dir:DIR', pretrained=True)``
  builds the grown model directly; ``pretrained_cfg`` holds the data config (input size, mean/std, crop_pct,
  interpolation) that :func:`timm.data.resolve_data_config` reads back;
- ``model.onnx`` with ``--onnx``: the eval-mode classifier, checked against PyTorch with onnxruntime.

Loading: :func:`load_exported` (a directory or a ``.safetensors`` file), ``timm.create_model('local-dir:DIR',
pretrained=True)`` or ``timm.create_model('tokenformer_base', pretrained=True,
pretrained_cfg_overlay=dict(file=PATH, num_classes=N))``; the last two go through
:func:`tokenformer_vision.checkpoint_filter_fn`, which grows the model to the file's token counts.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import safetensors
import timm
import torch
from timm.models import get_model_input_config, save_for_hf
from torch import nn

from .model import TokenFormerViT, grow_to_token_counts, token_counts_from_state_dict

__all__ = [
    "WEIGHTS_NAME",
    "CONFIG_NAME",
    "ONNX_NAME",
    "load_lightning_checkpoint",
    "checkpoint_state_dict",
    "checkpoint_label_names",
    "datamodule_metadata",
    "model_from_checkpoint",
    "export_checkpoint",
    "save_timm_weights",
    "load_exported",
    "export_onnx",
    "check_onnx",
    "main",
]

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
ONNX_NAME = "model.onnx"

# Prefix of the timm model inside ImageClassifier's state dict, and of its EMA copy (timm ModelEmaV3 at ``.ema``).
_MODEL_PREFIX = "model."
_EMA_PREFIX = "ema.module."
# torch.compile wraps a module as ``_orig_mod``; a checkpoint of a compiled model carries that infix.
_COMPILED_INFIX = "_orig_mod."

# Keys of a data config (timm's names) that the export looks for in the checkpoint's hyper-parameters.
_DATA_KEYS = ("mean", "std", "crop_pct", "crop_mode", "interpolation")


# ------------------------------------------------------------------------------------------ reading a .ckpt
def load_lightning_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a Lightning checkpoint with ``torch.load(weights_only=True)`` (no arbitrary code runs).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: the file is truncated/corrupt, holds objects ``weights_only`` refuses, or is not a Lightning
            checkpoint (no ``state_dict``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        refused = re.search(r"Unsupported global: [^\n]*", str(e))
        if refused is None:  # garbage bytes fail in the weights-only unpickler: report its reason, not its essay
            reason = re.search(r"WeightsUnpickler error:\s*([^\n]+)", str(e))
            detail = reason.group(1) if reason else str(e).splitlines()[0]
            raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint ({detail})"
                             ) from e
        # never fall back to weights_only=False: that would run arbitrary code from the file
        raise ValueError(f"cannot read checkpoint {path} with torch.load(weights_only=True): {refused.group(0)}"
                         ) from e
    except (RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as e:
        # torch reports a truncated zip as RuntimeError ("failed finding central directory"), other garbage as
        # errors of its legacy unpickler
        raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint "
                         f"({type(e).__name__}: {e})") from e
    if not isinstance(checkpoint, Mapping) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise ValueError(f"{path} is not a Lightning checkpoint: it has no 'state_dict' mapping")
    return dict(checkpoint)


def _strip(key: str, prefix: str) -> str | None:
    if not key.startswith(prefix):
        return None
    key = key[len(prefix):]
    return key[len(_COMPILED_INFIX):] if key.startswith(_COMPILED_INFIX) else key


def checkpoint_state_dict(checkpoint: Mapping[str, Any], ema: bool = False) -> dict[str, torch.Tensor]:
    """The plain timm state dict of the model (``model.*``) or of its EMA copy (``ema.module.*``).

    Raises ValueError naming what is missing when the checkpoint has no such weights.
    """
    state_dict = checkpoint["state_dict"]
    prefix = _EMA_PREFIX if ema else _MODEL_PREFIX
    out = {}
    for key, value in state_dict.items():
        stripped = _strip(key, prefix)
        if stripped is not None:
            out[stripped] = value
    if not out:
        sample = ", ".join(list(state_dict)[:5]) or "none"
        if ema:
            raise ValueError(f"the checkpoint has no EMA weights (no '{_EMA_PREFIX}*' keys; first keys: {sample}); "
                             "export without --ema, or train with EMA enabled")
        raise ValueError(f"the checkpoint has no '{_MODEL_PREFIX}*' weights (first keys: {sample}): it is not an "
                         "ImageClassifier checkpoint")
    return out


def _hparams(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    hparams = checkpoint.get("hyper_parameters") or {}
    if not isinstance(hparams, Mapping):
        raise ValueError(f"the checkpoint's hyper_parameters are a {type(hparams).__name__}, expected a mapping")
    return dict(hparams)


def _datamodule_hparams(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    hparams = checkpoint.get("datamodule_hyper_parameters") or {}
    return dict(hparams) if isinstance(hparams, Mapping) else {}


def datamodule_metadata(datamodule: Any) -> dict[str, Any]:
    """What an export needs from the data a model was fit on: ``class_names`` and ``data_config`` (mean, std,
    crop_pct, interpolation). :class:`~tokenformer_vision.ImageClassifier` stores it in its checkpoints."""
    out: dict[str, Any] = {}
    names = getattr(datamodule, "class_names", None)
    if names:
        out["class_names"] = [str(n) for n in names]
    cfg = getattr(datamodule, "transform_config", None)
    if cfg is not None:
        out["data_config"] = {"mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std],
                              "crop_pct": float(cfg.crop_pct), "interpolation": str(cfg.interpolation)}
    return out


def checkpoint_label_names(checkpoint: Mapping[str, Any]) -> list[str] | None:
    """Class names saved with the checkpoint (``checkpoint['class_names']``, the classifier's or the data
    module's hparams), or None if it carries none."""
    for source in (checkpoint, _hparams(checkpoint), _datamodule_hparams(checkpoint)):
        for key in ("class_names", "label_names"):
            names = source.get(key)
            if names:
                return [str(n) for n in names]
    return None


def _data_config_overrides(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """mean/std/crop_pct/interpolation recorded at fit time. Precedence: ``checkpoint['data_config']`` (the data
    module's resolved settings), then explicit data module hparams, then classifier hparams; keys found nowhere
    keep the model's pretrained_cfg values."""
    out: dict[str, Any] = {}
    recorded = checkpoint.get("data_config")
    sources = (_hparams(checkpoint), _datamodule_hparams(checkpoint),
               recorded if isinstance(recorded, Mapping) else {})
    for source in sources:  # later sources win
        for key in _DATA_KEYS:
            if source.get(key) is not None:
                value = source[key]
                out[key] = tuple(float(v) for v in value) if key in ("mean", "std") else value
    return out


def _model_kwargs(hparams: Mapping[str, Any]) -> dict[str, Any]:
    kwargs = dict(hparams.get("model_kwargs") or {})
    for key in ("num_classes", "img_size", "in_chans"):
        if hparams.get(key) is not None:
            kwargs[key] = hparams[key]
    # weights come from the checkpoint; a 'pretrained' flag in the fit-time kwargs must not trigger a download
    kwargs.pop("pretrained", None)
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    return kwargs


def _shape_mismatches(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    own = model.state_dict()
    return [f"{k}: checkpoint {tuple(v.shape)}, model {tuple(own[k].shape)}"
            for k, v in state_dict.items() if k in own and own[k].shape != v.shape]


def _load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], what: str) -> None:
    """``load_state_dict(strict=True)`` with an error that names the mismatching keys and shapes."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    shapes = _shape_mismatches(model, state_dict)
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {shapes[:3]})")
        raise ValueError(f"the weights do not fit {what}: " + "; ".join(parts) +
                         ". Is the checkpoint of another model?")
    model.load_state_dict(state_dict, strict=True)


def model_from_checkpoint(checkpoint: Mapping[str, Any], ema: bool = False) -> nn.Module:
    """Rebuild the timm model of an ImageClassifier checkpoint: architecture and kwargs from its hparams, grown to
    the saved token counts, weights loaded strictly. Returned in eval mode on CPU.

    Raises ValueError when the hparams name no model, the token counts recorded at fit time disagree with the
    weights, or the weights do not fit the architecture.
    """
    hparams = _hparams(checkpoint)
    model_name = hparams.get("model_name")
    if not model_name:
        raise ValueError("the checkpoint's hyper_parameters have no 'model_name': it is not an ImageClassifier "
                         "checkpoint")
    state_dict = checkpoint_state_dict(checkpoint, ema=ema)
    kwargs = _model_kwargs(hparams)
    try:
        model = timm.create_model(model_name, pretrained=False, **kwargs)
    except RuntimeError as e:  # timm: "Unknown model (...)"
        raise ValueError(f"cannot build the checkpoint's model {model_name!r} with {kwargs}: {e}") from e
    if isinstance(model, TokenFormerViT) and len(model.blocks):
        saved = token_counts_from_state_dict(state_dict)
        recorded = checkpoint.get("token_counts")
        if isinstance(recorded, Mapping):
            wrong = {k: (int(recorded[k]), saved[k]) for k in saved if k in recorded and int(recorded[k]) != saved[k]}
            if wrong:
                detail = ", ".join(f"{k}: recorded {r}, weights {s}" for k, (r, s) in wrong.items())
                raise ValueError(f"the checkpoint's token_counts disagree with its weights ({detail})")
        # save_timm_weights then writes the grown counts into config.json's model_args
        grow_to_token_counts(model, saved, hint=f"the weights are of another model than {model_name} built from "
                                                "the checkpoint's hparams")
    _load_strict(model, state_dict, f"{model_name} (built from the checkpoint's hparams {kwargs})")
    return model.eval()


# ------------------------------------------------------------------------------------------ writing
def save_timm_weights(
    model: nn.Module,
    out_dir: str | Path,
    label_names: Sequence[str] | None = None,
    data_config: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` in timm's local-dir / Hugging Face layout.

    Args:
        model: a timm model built by ``timm.create_model`` (its construction kwargs become ``model_args``).
        out_dir: target directory (created).
        label_names: class names, one per output (stored as ``label_names``).
        data_config: mean/std/crop_pct/interpolation overrides of the model's pretrained_cfg.
    """
    if not hasattr(model, "pretrained_cfg"):
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg: build it with timm.create_model(...) so "
                         "its architecture and construction arguments can be written to config.json")
    num_classes = getattr(model, "num_classes", 0)
    if label_names is not None and num_classes and len(label_names) != num_classes:
        raise ValueError(f"{len(label_names)} label names for a model with num_classes={num_classes}")
    model_args: dict[str, Any] = {}
    if isinstance(model, TokenFormerViT) and len(model.blocks):
        model_args = {"attn_tokens": model.attn_tokens, "ffn_tokens": model.ffn_tokens}
    out_dir = Path(out_dir)
    # save_for_hf: state dict as safetensors, config built from the model's pretrained_cfg + construction args
    save_for_hf(model, out_dir, model_config={"label_names": list(label_names)} if label_names else None,
                model_args=model_args, safe_serialization=True, data_config=dict(data_config or {}))
    return out_dir


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    ema: bool = False,
    onnx: bool = False,
    verify: bool = True,
    opset: int | None = None,
) -> Path:
    """Export a Lightning checkpoint to timm weights (and optionally ONNX); returns ``out_dir``.

    With ``verify`` the written directory is loaded back through timm (``local-dir:``) and its logits on a random
    batch must equal those of the model rebuilt from the checkpoint exactly; with ``onnx`` the ONNX model is run
    with onnxruntime and compared with PyTorch (tolerance 1e-4).
    """
    checkpoint = load_lightning_checkpoint(ckpt_path)
    model = model_from_checkpoint(checkpoint, ema=ema)
    label_names = checkpoint_label_names(checkpoint)
    out_dir = Path(out_dir)
    save_timm_weights(model, out_dir, label_names=label_names, data_config=_data_config_overrides(checkpoint))
    if verify or onnx:
        x = _example_input(model)
        with torch.no_grad():
            expected = model(x)
    if verify:
        loaded = load_exported(out_dir)
        with torch.no_grad():
            got = loaded(x)
        if not torch.equal(got, expected):
            raise RuntimeError(f"exported weights in {out_dir} do not reproduce the checkpoint's logits "
                               f"(max abs diff {(got - expected).abs().max().item():.3g})")
    if onnx:
        onnx_path = export_onnx(model, out_dir / ONNX_NAME, opset=opset)
        check_onnx(onnx_path, model, x)
    return out_dir


# ------------------------------------------------------------------------------------------ loading
def _check_safetensors(path: Path) -> dict[str, tuple[int, ...]]:
    """Shapes by key from a safetensors header, with clear errors for a missing or truncated/corrupt file
    (safetensors checks that the header's offsets cover the file exactly)."""
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (safetensors.SafetensorError, OSError) as e:
        raise ValueError(f"{path} is truncated or not a safetensors file ({e})") from e


def _head_classes(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """Number of classes of a saved TokenFormer head (linear or Pattention); 0 if it has none."""
    if "head.weight" in shapes:
        return shapes["head.weight"][0]
    if "head.value_param" in shapes:
        return shapes["head.value_param"][1]
    return 0


def load_exported(
    path: str | Path,
    *,
    model_name: str | None = None,
    num_classes: int | None = None,
    reset_classifier: bool = False,
    **kwargs: Any,
) -> nn.Module:
    """Load exported weights into a timm model (eval mode).

    Args:
        path: an export directory (``config.json`` + ``model.safetensors``) or a ``.safetensors`` file. A file
            without a ``config.json`` next to it needs ``model_name`` (and the kwargs it was built with, e.g.
            ``img_size``); token counts and the number of classes are read from the file.
        model_name: architecture for a bare weights file; for a directory it must match ``config.json``.
        num_classes: classes of the returned model. Differing from the saved head needs ``reset_classifier=True``.
        reset_classifier: load the saved weights, then replace the head by a freshly initialised one with
            ``num_classes`` outputs (default: the saved count), e.g. for fine-tuning.
        **kwargs: passed to ``timm.create_model`` (e.g. ``dynamic_img_size=True``).

    Raises:
        FileNotFoundError: missing directory, config or weights file.
        ValueError: truncated file, weights of another architecture, token counts that disagree with
            ``config.json``, or a ``num_classes`` different from the saved head without ``reset_classifier``.
    """
    path = Path(path)
    if path.is_dir():
        config_path, weights_path = path / CONFIG_NAME, path / WEIGHTS_NAME
        if not config_path.is_file():
            raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a timm export directory")
    elif path.suffix == ".safetensors" or not path.exists():
        weights_path = path
        config_path = path.parent / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"exported weights not found: {path}")
    else:
        raise ValueError(f"{path} is neither an export directory nor a .safetensors file")
    shapes = _check_safetensors(weights_path)
    saved_classes = _head_classes(shapes)
    if num_classes is not None and num_classes != saved_classes and not reset_classifier:
        raise ValueError(f"num_classes={num_classes} but the saved head has {saved_classes} classes; pass "
                         f"reset_classifier=True to replace the head (fine-tuning), or num_classes={saved_classes}")

    if config_path.is_file() and (path.is_dir() or model_name is None):
        config = json.loads(config_path.read_text())
        architecture = config.get("architecture")
        if model_name is not None and model_name != architecture:
            raise ValueError(f"model_name={model_name!r} but {config_path} describes {architecture!r}")
        if path.is_dir() or weights_path.name == WEIGHTS_NAME:
            model = timm.create_model(f"local-dir:{weights_path.parent}", pretrained=True, **kwargs)
        else:  # a renamed weights file next to a config: take the architecture and args from the config
            args = {**config.get("model_args", {}), **kwargs}
            model = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=dict(
                file=str(weights_path), num_classes=saved_classes), **args)
    else:
        if model_name is None:
            raise ValueError(f"{weights_path} has no {CONFIG_NAME} next to it: pass model_name= (and its kwargs)")
        model = timm.create_model(model_name, pretrained=True, num_classes=saved_classes,
                                  pretrained_cfg_overlay=dict(file=str(weights_path), num_classes=saved_classes),
                                  **kwargs)
    if reset_classifier:
        model.reset_classifier(saved_classes if num_classes is None else num_classes)
    return model.eval()


# ------------------------------------------------------------------------------------------ ONNX
def _example_input(model: nn.Module, batch_size: int = 2) -> torch.Tensor:
    input_size = get_model_input_config(model)["input_size"]  # the built size, not the pretrained cfg's 224²
    generator = torch.Generator().manual_seed(0)
    param = next(model.parameters())
    return torch.randn(batch_size, *input_size, generator=generator).to(param.device, param.dtype)


def export_onnx(model: nn.Module, path: str | Path, *, example: torch.Tensor | None = None,
                dynamic_batch: bool = True, opset: int | None = None) -> Path:
    """Export the eval-mode model to ONNX with torch.export (``torch.onnx.export(dynamo=True)``).

    The batch axis is dynamic by default; the spatial size is the model's input size.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    was_training = model.training
    model.eval()
    x = _example_input(model) if example is None else example
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
                                    input_names=["pixel_values"], output_names=["logits"], verbose=False)
        program.save(str(path))
    except Exception as e:
        if not any(getattr(m, "token_routing", False) for m in model.modules()):
            raise
        # eval-mode token skipping picks tokens by value: torch.export cannot trace that data-dependent branch
        raise ValueError(f"ONNX export of a token-routing model failed ({type(e).__name__}): its eval-mode token "
                         "skipping is data-dependent, which torch.export cannot trace. Export a model built "
                         "with token_routing=False, or use torch.compile (with graph breaks) instead") from e
    finally:
        model.train(was_training)
    return path


def check_onnx(path: str | Path, model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> float:
    """Run the ONNX model with onnxruntime and compare with PyTorch; returns the max abs difference.

    Raises RuntimeError if it exceeds ``atol``.
    """
    import onnxruntime as ort  # optional dependency (dev extra), imported only when ONNX is asked for

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy()})
    with torch.no_grad():
        expected = model.eval()(example).float().cpu()
    diff = float((torch.from_numpy(got) - expected).abs().max())
    if not math.isfinite(diff) or diff > atol:
        raise RuntimeError(f"ONNX model {path} differs from PyTorch by {diff:.3g} (> {atol})")
    return diff


# ------------------------------------------------------------------------------------------ CLI
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tokenformer-vision export",
        description="Export a Lightning checkpoint to timm weights (model.safetensors + config.json), "
                    "optionally ONNX.",
    )
    p.add_argument("--ckpt_path", required=True, help="Lightning checkpoint (.ckpt) of an ImageClassifier")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--ema", action="store_true", help="export the EMA weights instead of the raw ones")
    p.add_argument("--onnx", action="store_true", help=f"also write {ONNX_NAME} (checked with onnxruntime)")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--no_verify", action="store_true",
                   help="skip reloading the export through timm and comparing logits")
    return p


def main(argv: list[str] | None = None) -> int:
    """``tokenformer-vision export``: returns 0 on success, 1 with a message on stderr on bad input."""
    args = _parser().parse_args(argv)
    try:
        out = export_checkpoint(args.ckpt_path, args.out, ema=args.ema, onnx=args.onnx,
                                verify=not args.no_verify, opset=args.opset)
    except (FileNotFoundError, ValueError) as e:
        print(f"tokenformer-vision export: error: {e}", file=sys.stderr)
        return 1
    config = json.loads((out / CONFIG_NAME).read_text())
    args_ = config.get("model_args", {})
    counts = {k: args_[k] for k in ("attn_tokens", "ffn_tokens") if k in args_}
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    print(f"exported {config['architecture']} ({config['num_classes']} classes"
          f"{', ' + str(counts) if counts else ''}) to {out}: {files}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
