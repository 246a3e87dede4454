"""Lightning checkpoint → timm weights (``model.safetensors`` + Hugging Face ``config.json`` with the grown token
counts, class names and data config) and ONNX checked with onnxruntime (``tokenformer-vision export``). Load an
export with :func:`load_exported` or ``timm.create_model('local-dir:DIR', pretrained=True)``."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

import timm
import torch
from safetensors import SafetensorError, safe_open
from timm.models import get_model_input_config, save_for_hf
from torch import nn

from .weights import head_classes, load_weights, read_checkpoint

__all__ = ["export_checkpoint", "load_exported", "save_timm_weights", "export_onnx"]

WEIGHTS_NAME, CONFIG_NAME, ONNX_NAME = "model.safetensors", "config.json", "model.onnx"


def save_timm_weights(model: nn.Module, out_dir: str | Path, label_names: list[str] | None = None,
                      data_config: dict[str, Any] | None = None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (timm's local-dir / Hugging Face layout) of a model built by
    ``timm.create_model`` into ``out_dir``, with ``label_names`` (one per output) and ``data_config`` overrides."""
    if not hasattr(model, "pretrained_cfg"):
        raise ValueError(f"{type(model).__name__} has no pretrained_cfg: build it with timm.create_model(...) so "
                         "its architecture and construction arguments can be written to config.json")
    if label_names is not None and model.num_classes and len(label_names) != model.num_classes:
        raise ValueError(f"{len(label_names)} label names for a model with num_classes={model.num_classes}")
    out_dir = Path(out_dir)
    save_for_hf(model, out_dir, model_config={"label_names": list(label_names)} if label_names else None,
                model_args=dict(getattr(model, "token_counts", {})), safe_serialization=True,
                data_config=dict(data_config or {}))
    # safetensors writes through a private temporary file (0600): give the weights config.json's mode (0666 less
    # the umask), so whoever may read the config may read the weights
    os.chmod(out_dir / WEIGHTS_NAME, stat.S_IMODE((out_dir / CONFIG_NAME).stat().st_mode))
    return out_dir


def classifier_hparams(checkpoint: dict[str, Any], source: str) -> dict[str, Any]:
    """The ``hyper_parameters`` of an ImageClassifier checkpoint; a ValueError naming ``source`` for another file."""
    if not isinstance(checkpoint.get("state_dict"), dict):
        raise ValueError(f"{source} is not a Lightning checkpoint: it has no 'state_dict'")
    if not (hp := checkpoint.get("hyper_parameters") or {}).get("model_name"):
        raise ValueError(f"{source} is not an ImageClassifier checkpoint: its hyper_parameters have no 'model_name'")
    return hp


def export_checkpoint(ckpt_path: str | Path, out: str | Path, ema: bool = False, onnx: bool = False,
                      verify: bool = True, opset: int | None = None) -> Path:
    """Export a Lightning checkpoint of ImageClassifier to timm weights (and optionally ONNX).

    Args:
        ckpt_path: the checkpoint (.ckpt).
        out: output directory.
        ema: export the EMA weights instead of the raw ones.
        onnx: also write model.onnx, checked against PyTorch with onnxruntime.
        verify: load the export back through timm and require the checkpoint's logits exactly.
        opset: ONNX opset (default: the exporter's).
    """
    checkpoint = read_checkpoint(ckpt_path)  # read once: weights, class names and data config recorded at fit time
    hp = classifier_hparams(checkpoint, str(ckpt_path))
    kwargs = {**(hp.get("model_kwargs") or {}), **({"img_size": hp["img_size"]} if hp.get("img_size") else {})}
    model = timm.create_model(hp["model_name"], num_classes=int(hp.get("num_classes") or 0), **kwargs)
    load_weights(model, checkpoint, ema=ema, head="keep", grow=True, name=str(ckpt_path))
    model.eval()
    names = checkpoint.get("class_names") or hp.get("class_names")
    data_config = {k: tuple(v) if isinstance(v, list) else v for k, v in (checkpoint.get("data_config") or {}).items()}
    out = save_timm_weights(model, out, label_names=names, data_config=data_config)
    x = _example_input(model)
    if verify:
        with torch.no_grad():
            expected, got = model(x), load_exported(out)(x)
        if not torch.equal(got, expected):
            raise RuntimeError(f"exported weights in {out} do not reproduce the checkpoint's logits "
                               f"(max abs diff {(got - expected).abs().max().item():.3g})")
    if onnx:
        check_onnx(export_onnx(model, out / ONNX_NAME, opset=opset), model, x)
    return out


def load_exported(path: str | Path, *, model_name: str | None = None, num_classes: int | None = None,
                  reset_classifier: bool = False, **kwargs: Any) -> nn.Module:
    """Load exported weights into a timm model (eval mode).

    Args:
        path: an export directory or a ``.safetensors`` file; without ``config.json`` next to it, the file needs
            ``model_name`` and its build kwargs (e.g. ``img_size``; token counts and classes come from the file).
        model_name: architecture for a bare weights file; for a directory it must match ``config.json``.
        num_classes: classes of the returned model; differing from the saved head needs ``reset_classifier=True``.
        reset_classifier: replace the head by a freshly initialised one with ``num_classes`` outputs.
        **kwargs: passed to ``timm.create_model`` (e.g. ``dynamic_img_size=True``).
    """
    path = Path(path)
    weights = path / WEIGHTS_NAME if path.is_dir() else path
    config_path = weights.parent / CONFIG_NAME
    if path.is_dir() and not config_path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {path}: not a timm export directory")
    if path.exists() and not path.is_dir() and path.suffix != ".safetensors":
        raise ValueError(f"{path} is neither an export directory nor a .safetensors file")
    if not weights.is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    try:  # the saved head's classes from the safetensors header alone (timm reads the tensors)
        with safe_open(str(weights), "pt") as f:
            saved = head_classes({k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()
                                  if k in ("head.weight", "head.value_param")})
    except (SafetensorError, OSError) as err:
        raise ValueError(f"cannot read {weights}: truncated or not a safetensors file ({err})") from err
    if num_classes is not None and num_classes != saved and not reset_classifier:
        raise ValueError(f"num_classes={num_classes} but the saved head has {saved} classes; pass "
                         f"reset_classifier=True to replace the head (fine-tuning), or num_classes={saved}")
    overlay = dict(file=str(weights), num_classes=saved)
    if config_path.is_file() and (path.is_dir() or model_name is None):
        config = json.loads(config_path.read_text())
        if model_name is not None and model_name != config.get("architecture"):
            raise ValueError(f"model_name={model_name!r} but {config_path} describes {config.get('architecture')!r}")
        if weights.name == WEIGHTS_NAME:
            model = timm.create_model(f"local-dir:{weights.parent}", pretrained=True, **kwargs)
        else:  # a renamed weights file next to a config: the architecture and args come from the config
            model = timm.create_model(config["architecture"], pretrained=True, pretrained_cfg_overlay=overlay,
                                      **{**config.get("model_args", {}), **kwargs})
    elif model_name is None:
        raise ValueError(f"{weights} has no {CONFIG_NAME} next to it: pass model_name= (and its kwargs)")
    else:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    if reset_classifier:
        model.reset_classifier(saved if num_classes is None else num_classes)
    return model.eval()


def _example_input(model: nn.Module, batch_size: int = 2) -> torch.Tensor:
    p, input_size = next(model.parameters()), get_model_input_config(model)["input_size"]  # as built, not cfg's 224²
    return torch.randn(batch_size, *input_size, generator=torch.Generator().manual_seed(0)).to(p.device, p.dtype)


def export_onnx(model: nn.Module, path: str | Path, *, example: torch.Tensor | None = None,
                dynamic_batch: bool = True, opset: int | None = None) -> Path:
    """Export the eval-mode model to ONNX with torch.export (dynamic batch axis by default)."""
    (path := Path(path)).parent.mkdir(parents=True, exist_ok=True)
    was_training, x = model.training, (_example_input(model) if example is None else example)
    model.eval()
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1, max=4096)},) if dynamic_batch else None
    try:
        torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=dynamic_shapes, opset_version=opset,
                          input_names=["pixel_values"], output_names=["logits"], verbose=False).save(str(path))
    except Exception as e:
        if getattr(model, "routing", None) is None or model.routing.capacity is not None:
            raise
        raise ValueError(f"ONNX export of a threshold-routed model failed ({type(e).__name__}): its token selection "
                         "is data-dependent, which torch.export cannot trace. Export a model without "
                         "token_routing, or with routing_capacity (static shapes)") from e
    finally:
        model.train(was_training)
    return path


def check_onnx(path: str | Path, model: nn.Module, example: torch.Tensor, atol: float = 1e-4) -> float:
    """The max abs difference between onnxruntime's and PyTorch's outputs (RuntimeError if it exceeds ``atol``)."""
    import onnxruntime as ort  # optional dependency (dev extra), imported only when ONNX is asked for

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy()})
    with torch.no_grad():
        expected = model.eval()(example).float().cpu()
    diff = float((torch.from_numpy(got) - expected).abs().max())
    if not diff <= atol:  # NaN too
        raise RuntimeError(f"ONNX model {path} differs from PyTorch by {diff:.3g} (> {atol})")
    return diff
