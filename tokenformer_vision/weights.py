"""Loading saved weights into a model, for the whole package (:func:`load_weights`). Files are read with
``torch.load(weights_only=True)`` or safetensors only; a pickle that asks for anything else is refused by name."""

from __future__ import annotations

import argparse
import contextlib
import os
import pickle
import pickletools
import re
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.models import clean_state_dict
from torch import nn

__all__ = ["load_weights", "read_checkpoint", "select_weights", "token_counts", "architecture"]

# Prefix of the timm model inside ImageClassifier's state dict, and of its EMA copy (timm ModelEmaV3 at ``.ema``).
MODEL_PREFIX, EMA_PREFIX = "model.", "ema.module."
WEIGHTS_FILE = "model.safetensors"  # the weights of an export folder (timm's local-dir / Hugging Face layout)
# what torch.save itself writes into a pickle: not worth naming when a file is refused
_TENSOR_GLOBALS = re.compile(r"^(torch\._utils\._rebuild_\w+|torch\.\w*Storage|collections\.OrderedDict|"
                             r"torch\.(Size|device|\w*float\w*|\w*int\d*|bool|half|double|long))$")

Source = str | os.PathLike | Mapping[str, Any]
HeadMode = Literal["keep", "reset", "drop", "auto"]


def _imported_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a pickle (plain or inside torch's zip format) imports, read without running it."""
    with contextlib.suppress(Exception):  # not torch's zip format: scan the raw pickle's opcodes below
        return torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    # STACK_GLOBAL takes module and name from the stack; pickle pushes a repeated string from its memo (BINGET), so
    # follow the memo too, else the second global of a module would be named after the wrong strings.
    found, strings, memo, top = [], [], {}, None  # top: the string the last opcode pushed, else None
    with contextlib.suppress(Exception), open(path, "rb") as f:  # truncated or not a pickle: what was found so far
        for op, arg, _ in pickletools.genops(f):
            if op.name in ("MEMOIZE", "PUT", "BINPUT", "LONG_BINPUT"):  # the stack is unchanged
                memo[len(memo) if op.name == "MEMOIZE" else arg] = top
                continue
            pushed = None
            if op.name == "GLOBAL":
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(".".join(strings[-2:]))
            elif op.name in ("GET", "BINGET", "LONG_BINGET"):
                pushed = memo.get(arg)
            elif isinstance(arg, str):
                pushed = arg
            if pushed is not None:
                strings.append(pushed)
            top = pushed
    return [g for g in dict.fromkeys(found) if not _TENSOR_GLOBALS.match(g)]


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint or weights file (``.safetensors``, or anything ``torch.load(weights_only=True)`` reads)
    into a dict. FileNotFoundError, or ValueError for an empty, truncated or corrupt file, a pickle that asks to import
    something (named; it is never loaded), or a file that holds no mapping."""
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
        # argparse.Namespace: the ``args`` of timm's training checkpoints (timm allows it too)
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, KeyError, ValueError, zipfile.BadZipFile) as err:
        if imports := _imported_globals(path):  # never retried with weights_only=False: it could run code
            names = ", ".join(f"`{g}`" for g in imports[:5])
            raise ValueError(f"refused to load {path}: the file asks to import {names}; weights need no imports "
                             "beyond tensors, so it is not loaded (it may be trying to run code)") from None
        lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]  # torch's message, without its advice
        useful = [ln for ln in lines if not ln.startswith(("Weights only load failed", "Check the documentation"))]
        raise ValueError(f"cannot read checkpoint {path}: truncated or not a PyTorch checkpoint "
                         f"({type(err).__name__}: {(useful or lines or [''])[0][:300]})") from None
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or a checkpoint")
    return dict(obj)


def select_weights(checkpoint: Mapping[str, Any], ema: bool | None = None) -> dict[str, torch.Tensor]:
    """The plain model state dict of a checkpoint (an ImageClassifier ``.ckpt``, a timm training checkpoint or a
    state dict), wrapper prefixes stripped. ``ema``: True: the EMA weights (an error without them); False: the raw
    weights; None: the EMA weights when present, else raw."""
    state = next((checkpoint[k] for k in ("state_dict", "model") if isinstance(checkpoint.get(k), Mapping)), checkpoint)
    ema_state = next((checkpoint[k] for k in ("state_dict_ema", "model_ema")  # timm's train.py layouts
                      if isinstance(checkpoint.get(k), Mapping)),
                     {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)})
    if ema or (ema is None and ema_state):
        if not ema_state:
            raise ValueError(f"the checkpoint has no EMA weights (no '{EMA_PREFIX}*' keys): load the raw weights "
                             "(ema=False, or export without --ema), or train with ema_decay")
        state = ema_state
    elif any(k.startswith(MODEL_PREFIX) for k in state):
        state = {k[len(MODEL_PREFIX):]: v for k, v in state.items() if k.startswith(MODEL_PREFIX)}
    if not (state := {k: v for k, v in clean_state_dict(dict(state)).items() if torch.is_tensor(v)}):
        raise ValueError("the checkpoint holds no tensors")
    return state


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
    if diffs := [f"{k} {saved[k]} in the weights vs {have[k]} in the model" for k in
                 ("embed_dim", "depth", "attn_tokens", "ffn_tokens", "num_classes")
                 if saved.get(k) is not None and have.get(k) is not None and saved[k] != have[k]]:
        new, old = have["num_classes"], saved["num_classes"]
        hint = (f" (use data with {old} classes, or start a model for {new} classes from these weights with "
                "--model.pretrained, which gives it a new head)" if old and new and old != new else "")
        return "; ".join(diffs) + hint
    shapes = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
              if k in own and v.shape != own[k].shape]
    parts = [f"{len(items)} {label} (e.g. {', '.join(items[:3])})" for label, items in
             (("missing keys", sorted(set(own) - set(state))), ("unexpected keys", sorted(set(state) - set(own))),
              ("shape mismatches", shapes)) if items]
    return "; ".join(parts) or None


def grow_to_weights(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Grow a TokenFormer (anything with ``grow`` and ``token_counts``) to the token counts of ``state``; weights
    with fewer tokens than the model are a ValueError naming both counts (that would need shrinking)."""
    saved, have = token_counts(state), getattr(model, "token_counts", None)
    if not saved or not have or not callable(getattr(model, "grow", None)) or saved == have:
        return
    if fewer := [f"{k}: model {have[k]}, weights {v}" for k, v in saved.items() if v < have[k]]:
        raise ValueError(f"the weights have fewer parameter tokens than the model ({', '.join(fewer)}): build the "
                         "model with the weights' attn_tokens/ffn_tokens")
    model.grow(**saved)


def load_weights(model: nn.Module, source: Source, *, ema: bool | None = None, head: HeadMode = "keep",
                 grow: bool = False, name: str | None = None) -> dict[str, Any]:
    """Load ``source`` into ``model`` in place: the one way the package loads weights.

    Args:
        model: a timm ViT or TokenFormer; its family's ``checkpoint_filter_fn`` adapts the weights (e.g. resamples
            the position embedding to the model's input size).
        source: a ``.ckpt`` (ImageClassifier), ``.pth``/``.pt`` (a state dict or a timm training checkpoint),
            ``.safetensors``, an export folder, or a checkpoint / state dict already in memory.
        ema: True: the EMA weights (an error without them); False: the raw weights; None: EMA if any.
        head: ``"keep"``: the saved classifier (its classes must match); ``"reset"``: the model's own head, as built
            (fine-tuning to other classes); ``"drop"``: no head (``reset_classifier(0)``, e.g. for a backbone);
            ``"auto"``: keep when the classes match, else reset.
        grow: grow a TokenFormer to the saved token counts; without it, other counts are a mismatch.
        name: what the messages call the source (default: its path, or "the given weights").

    Returns ``{"source": name, "head": "loaded" | "reset" | "dropped" | "none", "token_counts": ... | None}``.
    Raises ValueError naming what differs, FileNotFoundError, or the errors of :func:`read_checkpoint`.
    """
    if head not in ("keep", "reset", "drop", "auto"):
        raise ValueError(f"head must be 'keep', 'reset', 'drop' or 'auto', got {head!r}")
    if isinstance(source, Mapping):
        checkpoint, name = source, name or "the given weights"
    else:
        if (path := Path(source)).is_dir() and not (path := path / WEIGHTS_FILE).is_file():
            raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path.parent}: not an export folder")
        checkpoint, name = read_checkpoint(path), name or str(path)
    state = select_weights(checkpoint, ema=ema)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    model_name = cfg.get("architecture") or type(model).__name__
    if not any(k.startswith("blocks.") for k in state):
        raise ValueError(f"{name} holds no transformer blocks ('blocks.N.*' keys): not weights of a ViT")
    real = token_counts(state)
    if isinstance(counts := checkpoint.get("token_counts"), Mapping) and real and dict(counts) != real:
        raise ValueError(f"{name} is inconsistent: its token_counts say {dict(counts)}, its weights have {real}")
    classifier = cfg.get("classifier", "head")
    heads = tuple(f"{h}." for h in ((classifier,) if isinstance(classifier, str) else classifier))
    saved_head = {k for k in state if k.startswith(heads)}
    classes, want = head_classes(state), getattr(model, "num_classes", None)
    if head == "auto":
        head = "keep" if not saved_head or classes == want else "reset"
    saved, have = architecture(state), architecture(model.state_dict())
    if other := [f"{k}: weights {saved[k]}, model {have[k]}" for k in ("embed_dim", "depth")
                 if saved[k] and have[k] and saved[k] != have[k]]:
        raise ValueError(f"{name} does not fit {model_name}: the weights are of another model ({', '.join(other)})")
    diffs = []
    if not grow and real and (model_tokens := getattr(model, "token_counts", None)):
        diffs = [f"{k} {v} in the weights vs {model_tokens[k]} in the model" for k, v in real.items()
                 if v != model_tokens[k]]
    hints = ["grow=True grows the model to the weights' tokens"] if diffs else []
    if head == "keep" and classes != (want or 0) and (saved_head or want):
        diffs.append(f"num_classes {classes} in the weights vs {want} in the model")
        hints.insert(0, "head='reset' fine-tunes to the model's classes")
    if diffs:
        raise ValueError(f"{name} does not fit {model_name}: {'; '.join(diffs)} ({'; '.join(hints)})")
    if head == "drop" and want:
        model.reset_classifier(0)
    filter_fn = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", lambda sd, _: sd)
    loaded = state if head == "keep" else {k: v for k, v in state.items() if k not in saved_head}
    try:
        if grow:
            grow_to_weights(model, state)
        loaded = filter_fn(loaded, model)
    except (KeyError, RuntimeError, ValueError) as err:  # timm's filters fail on foreign layouts with raw errors
        raise ValueError(f"{name} does not fit {model_name}: {err}") from err
    if head != "keep":  # the model's own head (or none, dropped) stands in for the saved one
        loaded = {**loaded, **{k: v for k, v in model.state_dict().items() if k.startswith(heads)}}
    if problem := describe_mismatch(model, loaded):
        raise ValueError(f"{name} does not fit {model_name}: {problem}")
    model.load_state_dict(loaded, strict=True)
    return {"source": name, "token_counts": dict(getattr(model, "token_counts", {})) or None,
            "head": "none" if not saved_head and head == "keep" else
            {"keep": "loaded", "reset": "reset", "drop": "dropped"}[head]}
