"""Growing a training checkpoint offline (``tokenformer-vision grow``): the model, its EMA copy and the optimizer state
grow as :mod:`tokenformer_vision.growth` grows them during training, for when growth cannot happen in the
training process (e.g. a sharded FSDP run that is restarted anyway)."""

from __future__ import annotations

import copy
import inspect
from typing import Any

import torch

from .durable_checkpoints import AtomicCheckpointIO
from .export import _example_input, classifier_hparams
from .growth import grow_training_state
from .weights import read_checkpoint

__all__ = ["grow_checkpoint"]


def classifier_from_checkpoint(checkpoint: dict[str, Any], source: str = "the checkpoint") -> Any:
    """The ImageClassifier of a checkpoint already read, on the CPU: ``ImageClassifier.load_from_checkpoint`` without
    reading the file again (built from its hyperparameters, grown to its token counts, its weights loaded)."""
    from .classifier import ImageClassifier  # Lightning and the training stack: only for this command

    accepted = inspect.signature(ImageClassifier).parameters
    module = ImageClassifier(**{k: v for k, v in classifier_hparams(checkpoint, source).items() if k in accepted})
    module.on_load_checkpoint(checkpoint)  # grows the model to the checkpoint's counts, reconciles EMA weights
    module.load_state_dict(checkpoint["state_dict"])
    return module


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
    checkpoint = read_checkpoint(ckpt_path)  # the only read of the file
    module = classifier_from_checkpoint(checkpoint, str(ckpt_path))
    net, have = module.model, module.model.token_counts
    for name, new in (("attn_tokens", attn_tokens), ("ffn_tokens", ffn_tokens)):
        if new is not None and new < have[name]:
            raise ValueError(f"growth cannot shrink: {ckpt_path} has {name}={have[name]}, asked for {new}; "
                             f"pass --{name} {have[name]} or more")
    probe = _example_input(net).double()
    logits = torch.no_grad()(lambda: copy.deepcopy(net).double()(probe))
    before = logits()
    states = checkpoint.get("optimizer_states", [])
    optimizers = [torch.optim.AdamW(module.param_groups()) for _ in states]
    for optimizer, state in zip(optimizers, states, strict=True):
        optimizer.load_state_dict(state)  # parameters in ImageClassifier.param_groups() order
    grow_training_state(net, attn_tokens, ffn_tokens, optimizer=optimizers, ema=getattr(module, "ema", None),
                        seed=seed)
    if (change := float((logits() - before).abs().max())) > 1e-8:
        raise RuntimeError(f"growth changed the float64 logits by {change:.3g}; not writing {out}")
    checkpoint["state_dict"] = module.state_dict()
    checkpoint["optimizer_states"] = [opt.state_dict() for opt in optimizers]
    checkpoint["token_counts"] = dict(net.token_counts)
    AtomicCheckpointIO().save_checkpoint(checkpoint, out)  # fsynced, renamed: never a partial file
    return dict(net.token_counts)
