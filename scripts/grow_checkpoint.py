#!/usr/bin/env python
"""Grow a saved TokenFormer checkpoint offline to more parameter tokens, preserving its outputs.

    python scripts/grow_checkpoint.py last.ckpt grown.ckpt --attn-tokens 1024 --ffn-tokens 4096
    python scripts/grow_checkpoint.py weights.safetensors grown.safetensors --ffn-tokens 4096 \\
        --model tokenformer_base --model-kwargs '{"num_heads": 12}'

Inputs: a Lightning checkpoint of :class:`~tokenformer_vision.ImageClassifier` (``.ckpt``, read with
``weights_only=True``) or exported weights (``.safetensors``, ``.pth``/``.pt``/``.bin``). Every TokenFormer inside
(``model.*`` and the EMA copy ``ema.module.*`` of a ``.ckpt``) grows exactly as
:class:`~tokenformer_vision.GrowthCallback` grows it mid-training (zero keys, seeded random values, τ unchanged;
the EMA's new rows equal the model's). A ``.ckpt`` also gets its AdamW state rows appended (second moment seeded
from the old rows) and its ``token_counts`` updated, so ``fit --ckpt_path grown.ckpt`` with the original config
resumes at the larger size (the classifier grows the fresh model while loading). This is also the way to grow
under FSDP, which cannot grow in place: save, grow here, restart.

The grown weights are verified: the model before and after growth is run on random input in float32 and
float64 and the largest logit change printed; the script fails (exit 1) if the float64 change exceeds 1e-8.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from tokenformer_vision import TokenFormerViT, token_counts_from_state_dict
from tokenformer_vision.growth import grow_model, grow_param_state
from tokenformer_vision.model import PRESETS

ANCHOR = "blocks.0.attn.q.key_param"
EMA_PREFIX = "ema.module."
FLOAT64_TOLERANCE = 1e-8


def load(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """Return (container, state dict inside it, format)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
        return {"state_dict": state}, state, "safetensors"
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, dict):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(obj.get(key), dict) and any(torch.is_tensor(v) for v in obj[key].values()):
            return obj, obj[key], "ckpt" if suffix == ".ckpt" else f"torch:{key}"
    if not any(torch.is_tensor(v) for v in obj.values()):
        raise ValueError(f"{path}: no tensors found (keys: {sorted(obj)[:10]})")
    return obj, obj, "torch"


def save(path: Path, container: dict[str, Any], state: dict[str, torch.Tensor], fmt: str) -> None:
    if fmt == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    elif fmt == "torch":
        torch.save(state, path)
    else:
        torch.save(container, path)


def model_prefixes(state: dict[str, torch.Tensor]) -> list[str]:
    """Key prefixes under which a TokenFormer lives ('' for a bare model, 'model.', 'ema.module.', ...);
    the EMA copy last so that it can copy the model's new rows."""
    found = sorted({k[: -len(ANCHOR)] for k in state if k.endswith(ANCHOR)})
    if not found:
        raise ValueError(f"no TokenFormer weights found (no key ending in '{ANCHOR}')")
    return sorted(found, key=lambda p: (p == EMA_PREFIX, p))


def inferred_kwargs(sub: dict[str, torch.Tensor]) -> dict[str, Any]:
    """TokenFormerViT arguments read off a bare state dict (num_heads from the preset of that width)."""
    dim = sub["cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[1]) for k in sub if k.startswith("blocks."))
    weight = sub.get("patch_embed.proj.weight")
    if weight is None or weight.ndim != 4:
        raise ValueError("cannot infer the patch embedding from the weights; pass --model and --model-kwargs")
    patch = int(weight.shape[-1])
    grid = math.isqrt(sub["pos_embed"].shape[1] - 1)
    heads = {p["embed_dim"]: p["num_heads"] for p in PRESETS.values()}.get(dim)
    head = sub.get("head.weight")
    return dict(embed_dim=dim, depth=depth, num_heads=heads, patch_size=patch, img_size=grid * patch,
                in_chans=int(weight.shape[1]), num_classes=int(head.shape[0]) if head is not None else 0)


def build_model(sub: dict[str, torch.Tensor], hparams: dict[str, Any] | None, args: argparse.Namespace) -> nn.Module:
    """A model at the saved token counts that the saved weights load into strictly."""
    counts = token_counts_from_state_dict(sub)
    extra = json.loads(args.model_kwargs) if args.model_kwargs else {}
    name = args.model or (hparams or {}).get("model_name")
    if name:
        kwargs = dict((hparams or {}).get("model_kwargs") or {})
        if hparams and hparams.get("img_size"):
            kwargs["img_size"] = hparams["img_size"]
        head = sub.get("head.weight")
        kwargs["num_classes"] = int(head.shape[0]) if head is not None else 0
        model = timm.create_model(name, **{**kwargs, **extra, **counts})
    else:
        kwargs = {**inferred_kwargs(sub), **extra, **counts}
        if kwargs["num_heads"] is None:
            raise ValueError(f"embed_dim {kwargs['embed_dim']} matches no preset: pass --model-kwargs "
                             "'{\"num_heads\": H}' (or --model)")
        model = TokenFormerViT(**kwargs)
    model.load_state_dict(sub, strict=True)
    return model.eval()


@torch.no_grad()
def max_logit_change(before: nn.Module, after: nn.Module, dtype: torch.dtype, seed: int) -> tuple[float, float]:
    """(max |Δlogits|, max |logits|) of ``before`` vs ``after`` on random images, both run in ``dtype``."""
    size = before.patch_embed.img_size
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, before.in_chans, *size, generator=gen, dtype=dtype)
    a = copy.deepcopy(before).to(dtype)(x)
    b = copy.deepcopy(after).to(dtype)(x)
    return float((a - b).abs().max()), float(a.abs().max())


def classifier_param_names(hparams: dict[str, Any], counts: dict[str, int]) -> list[list[str]]:
    """Parameter names of each optimizer param group, in the order ImageClassifier.configure_optimizers uses."""
    from tokenformer_vision import ImageClassifier

    # the CLI also records LightningCLI internals (e.g. "_instantiator") that are no constructor arguments
    hp = {k: v for k, v in hparams.items() if k != "pretrained" and not k.startswith("_")}
    module = ImageClassifier(**hp)
    module.model.grow(**counts)
    names = {id(p): n for n, p in module.named_parameters()}
    return [[names[id(p)] for p in group["params"]] for group in module.param_groups()]


def grow_optimizer_states(ckpt: dict[str, Any], old_rows: dict[str, int], new_shapes: dict[str, torch.Size],
                          counts: dict[str, int]) -> int:
    """Append rows to the saved optimizer state of every grown parameter; returns how many states grew."""
    grown = 0
    for opt_state in ckpt.get("optimizer_states", []):
        groups = opt_state["param_groups"]
        if all("param_names" in g for g in groups):
            names = [list(g["param_names"]) for g in groups]
        elif isinstance(ckpt.get("hyper_parameters"), dict) and "model_name" in ckpt["hyper_parameters"]:
            names = classifier_param_names(ckpt["hyper_parameters"], counts)
        else:
            raise ValueError("cannot tell which saved optimizer state belongs to which parameter (no param_names, "
                             "not an ImageClassifier checkpoint); rerun with --drop-optimizer-state")
        if [len(n) for n in names] != [len(g["params"]) for g in groups]:
            raise ValueError("the saved optimizer's param groups do not match ImageClassifier.param_groups(); "
                             "rerun with --drop-optimizer-state")
        for group, group_names in zip(groups, names, strict=True):
            for index, name in zip(group["params"], group_names, strict=True):
                state = opt_state["state"].get(index)
                if state and name in old_rows:
                    opt_state["state"][index] = grow_param_state(state, old_rows[name], new_shapes[name])
                    grown += 1
    return grown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", type=Path, help=".ckpt, .safetensors, .pth/.pt/.bin")
    parser.add_argument("output", type=Path, help="where to write the grown file (same format as the input)")
    parser.add_argument("--attn-tokens", type=int, default=None, help="new attention token count")
    parser.add_argument("--ffn-tokens", type=int, default=None, help="new FFN token count")
    parser.add_argument("--model", default=None, help="timm model name (default: the checkpoint's model_name, "
                        "else inferred from the weights)")
    parser.add_argument("--model-kwargs", default=None, help="JSON of extra model arguments, e.g. num_heads")
    parser.add_argument("--seed", type=int, default=0, help="seed of the new value tokens")
    parser.add_argument("--drop-optimizer-state", action="store_true",
                        help=".ckpt: remove optimizer/scheduler state instead of growing it (weights-only result)")
    args = parser.parse_args(argv)
    if args.attn_tokens is None and args.ffn_tokens is None:
        parser.error("give --attn-tokens and/or --ffn-tokens")
    if args.input.resolve() == args.output.resolve():
        parser.error("output must differ from input")

    container, state, fmt = load(args.input)
    hparams = container.get("hyper_parameters") if fmt == "ckpt" else None
    main_rows: dict[str, Any] = {}
    old_rows: dict[str, int] = {}
    new_shapes: dict[str, torch.Size] = {}
    counts: dict[str, int] = {}
    worst = 0.0
    for prefix in model_prefixes(state):
        sub = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        model = build_model(sub, hparams, args)
        before = copy.deepcopy(model)
        have = token_counts_from_state_dict(sub)
        grown = grow_model(model, args.attn_tokens, args.ffn_tokens, seed=args.seed)
        counts = {"attn_tokens": int(model.attn_tokens), "ffn_tokens": int(model.ffn_tokens)}
        if prefix == EMA_PREFIX and main_rows:
            with torch.no_grad():  # as GrowthCallback: the EMA's new tokens start equal to the model's
                for g in grown:
                    g.new[g.old_rows:].copy_(main_rows[g.name])
        elif not main_rows:
            main_rows = {g.name: g.new[g.old_rows:].detach().clone() for g in grown}
        for g in grown:
            old_rows[prefix + g.name] = g.old_rows
            new_shapes[prefix + g.name] = g.new.shape
        for key, value in model.state_dict().items():
            state[prefix + key] = value.to(sub[key].dtype)
        d32, scale = max_logit_change(before, model, torch.float32, args.seed)
        d64, _ = max_logit_change(before, model, torch.float64, args.seed)
        worst = max(worst, d64)
        print(f"{prefix or '<model>'}: attn tokens {have['attn_tokens']}→{counts['attn_tokens']}, ffn tokens "
              f"{have['ffn_tokens']}→{counts['ffn_tokens']}, params {sum(p.numel() for p in before.parameters()):,}"
              f"→{sum(p.numel() for p in model.parameters()):,}; max |Δlogits| on random input: "
              f"{d32:.3g} (float32), {d64:.3g} (float64), max |logits| {scale:.3g}")

    if fmt == "ckpt":
        container["token_counts"] = dict(counts)
        if args.drop_optimizer_state:
            for key in ("optimizer_states", "lr_schedulers"):
                container.pop(key, None)
            print("optimizer and scheduler state removed (weights-only checkpoint)")
        elif container.get("optimizer_states"):
            n = grow_optimizer_states(container, old_rows, new_shapes, counts)
            print(f"optimizer state grown for {n} parameters")
    save(args.output, container, state, fmt)
    print(f"wrote {args.output}")
    if worst > FLOAT64_TOLERANCE:
        print(f"ERROR: growth changed the float64 logits by {worst:.3g} > {FLOAT64_TOLERANCE}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
