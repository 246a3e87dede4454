"""Reading saved weights (``.ckpt``, ``.pth``, ``.safetensors``) for the whole package: safely, EMA or raw, without
wrapper prefixes, with token counts and head size, and one error naming the real difference of a mismatch."""

from __future__ import annotations

import pickle
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import clean_state_dict
from torch import nn

__all__ = ["read_checkpoint", "select_weights", "load_weights", "token_counts", "head_classes", "describe_mismatch",
           "load_strict", "adapt_state_dict", "architecture"]

# Prefix of the timm model inside ImageClassifier's state dict, and of its EMA copy (timm ModelEmaV3 at ``.ema``).
MODEL_PREFIX, EMA_PREFIX = "model.", "ema.module."


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint or weights file into a dict: ``.safetensors`` with safetensors, anything else with
    ``torch.load(weights_only=True)``. FileNotFoundError, or ValueError for an empty, truncated or corrupt file, a
    pickle that ``weights_only`` refuses (its global is named), or a file that holds no mapping."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"cannot read checkpoint {path}: the file is empty (0 bytes)")
    if path.suffix == ".safetensors":
        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError) as err:
            raise ValueError(f"cannot read {path}: truncated or not a safetensors file ({err})") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        refused = re.search(r"Unsupported global[^\n]*", str(err))
        if refused:  # never fall back to weights_only=False: that would run code from the file
            raise ValueError(f"refusing to load {path}: it holds objects that torch.load(weights_only=True) does not "
                             f"allow ({refused.group(0).strip()})") from err
        raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint "
                         f"({type(err).__name__}: {(str(err).splitlines() or [''])[0]})") from err
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint")
    return dict(obj)


def select_weights(checkpoint: Mapping[str, Any], ema: bool | None = None) -> dict[str, torch.Tensor]:
    """The plain model state dict of a checkpoint (an ImageClassifier ``.ckpt``, a timm training checkpoint or a
    plain state dict), wrapper prefixes stripped. ``ema``: True: the EMA weights (an error when there are none);
    False: the raw weights; None: the EMA weights when present (what the classifier validated with), else raw."""
    state = checkpoint.get("state_dict", checkpoint)
    if not isinstance(state, Mapping):
        raise ValueError(f"the checkpoint's state_dict is a {type(state).__name__}, not a mapping")
    ema_state = checkpoint.get("state_dict_ema")  # timm's train.py layout
    if not isinstance(ema_state, Mapping):
        ema_state = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    if ema or (ema is None and ema_state):
        if not ema_state:
            raise ValueError(f"the checkpoint has no EMA weights (no '{EMA_PREFIX}*' keys): load the raw weights, "
                             "or train with EMA enabled")
        state = ema_state
    elif any(k.startswith(MODEL_PREFIX) for k in state):
        state = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    # "_orig_mod.": torch.compile'd modules
    state = {k.replace("_orig_mod.", ""): v for k, v in clean_state_dict(dict(state)).items() if torch.is_tensor(v)}
    if not state:
        raise ValueError("the checkpoint holds no tensors")
    return state


def load_weights(path: str | Path, ema: bool | None = None) -> dict[str, torch.Tensor]:
    """:func:`read_checkpoint` then :func:`select_weights`."""
    return select_weights(read_checkpoint(path), ema=ema)


def token_counts(state: Mapping[str, torch.Tensor]) -> dict[str, int] | None:
    """``{"attn_tokens", "ffn_tokens"}`` of a TokenFormer state dict (the token axis of its blocks' Pattentions),
    or None when it holds no TokenFormer blocks. ValueError when the blocks disagree."""
    patterns = {"attn_tokens": r"attn\.(q|k|v|proj)", "ffn_tokens": r"(ffn|mlp)"}
    found = {name: {int(v.shape[0]) for k, v in state.items() if re.search(rf"(^|\.)blocks\.\d+\.{p}\.key_param$", k)}
             for name, p in patterns.items()}
    if not any(found.values()):
        return None
    for name, values in found.items():
        if len(values) != 1:
            raise ValueError(f"blocks in the state dict disagree on {name}: {sorted(values)}")
    return {name: values.pop() for name, values in found.items()}


def head_classes(state: Mapping[str, torch.Tensor]) -> int:
    """Classes of a saved head (linear ``head.weight`` or Pattention ``head.value_param``); 0 without a head."""
    for key, axis in (("head.weight", 0), ("head.value_param", 1)):
        if key in state:
            return int(state[key].shape[axis])
    return 0


def architecture(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """What a ViT state dict says about its model: embed_dim, depth, num_classes and the token counts."""
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    width = next((state[k].shape[-1] for k in ("cls_token", "pos_embed", "norm.weight") if k in state), None)
    return {"embed_dim": None if width is None else int(width), "depth": max(blocks) + 1 if blocks else 0,
            "num_classes": head_classes(state), **(token_counts(state) or {})}


def describe_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> str | None:
    """One sentence naming how ``state`` differs from ``model`` (architecture first, then keys), None if it fits."""
    own = model.state_dict()
    saved, have = architecture(state), architecture(own)
    diffs = [f"{k} {saved[k]} in the weights vs {have[k]} in the model" for k in
             ("embed_dim", "depth", "attn_tokens", "ffn_tokens", "num_classes")
             if saved.get(k) is not None and have.get(k) is not None and saved[k] != have[k]]
    if diffs:
        return "; ".join(diffs)
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    parts = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in
             (("missing keys", sorted(set(own) - set(state))), ("unexpected keys", sorted(set(state) - set(own))),
              ("shape mismatches", shapes)) if items]
    return "; ".join(parts) or None


def adapt_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pass ``state`` through the ``checkpoint_filter_fn`` of ``model``'s timm family when it has one (for a
    TokenFormer: grow to the saved token counts; for any ViT: resample the position embedding)."""
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if filter_fn is None:
        return dict(state)
    try:
        return filter_fn(dict(state), model)
    except (KeyError, RuntimeError) as err:  # timm's filters fail on foreign layouts with raw errors
        raise ValueError(f"cannot adapt the weights to {type(model).__name__}: {err}") from err


def load_strict(model: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """``model.load_state_dict(state, strict=True)``, or a ValueError naming what differs."""
    if problem := describe_mismatch(model, state):
        raise ValueError(f"{source} does not fit {type(model).__name__}: {problem}")
    model.load_state_dict(state, strict=True)
