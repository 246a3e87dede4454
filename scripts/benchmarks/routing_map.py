"""Render how many blocks each patch of an image went through under token routing (a PNG, matplotlib).

    # a digit from scikit-learn's digits, weights saved by scripts/benchmarks/bench_routing.py
    python scripts/benchmarks/routing_map.py --weights /tmp/routing_bench/digits_routed_l0.05.safetensors \\
        --model-kwargs '{"img_size": 16, "patch_size": 2, "embed_dim": 64, "depth": 6, "num_heads": 2}' \\
        --num-classes 10 --digit 7 --out routing_map.png
    # any image, a Lightning checkpoint of ImageClassifier (model name and kwargs are read from it)
    python scripts/benchmarks/routing_map.py --image cat.jpg --weights last.ckpt --out cat_routing.png

Without ``--weights`` the gates are untrained and keep nearly every token; the map is then only a smoke test.
``--device cpu|cuda`` and ``--dtype float32|bfloat16|float16`` (autocast) choose where the forward runs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchlib.common import add_device_args, autocast, dtype_of, resolve_device  # noqa: E402

import tokenformer_vision  # noqa: E402, F401  (registers the models)
from tokenformer_vision import TokenFormerViT
from tokenformer_vision.weights import head_classes, load_weights, read_checkpoint, select_weights


def build_model(args: argparse.Namespace) -> TokenFormerViT:
    kwargs: dict[str, Any] = json.loads(args.model_kwargs) if args.model_kwargs else {}
    model_name = args.model
    # weights_only=True: never runs code from a weights file; read once, EMA weights preferred
    checkpoint = read_checkpoint(args.weights) if args.weights else {}
    hparams = dict(checkpoint.get("hyper_parameters") or {})
    if hparams:  # ImageClassifier checkpoint: rebuild the same architecture
        model_name = hparams.get("model_name", model_name)
        kwargs = {**(hparams.get("model_kwargs") or {}), **kwargs}
        if hparams.get("img_size"):
            kwargs.setdefault("img_size", hparams["img_size"])
    num_classes = args.num_classes
    if num_classes is None:
        num_classes = head_classes(select_weights(checkpoint)) if checkpoint else 10
    kwargs.update(token_routing=True, num_classes=num_classes)
    model = timm.create_model(model_name, **kwargs)
    if not isinstance(model, TokenFormerViT):
        raise ValueError(f"{model_name} is not a TokenFormer model")
    if checkpoint:  # a model trained without token_routing has no routers: a clear error names the missing keys
        load_weights(model, checkpoint, grow=True, name=args.weights)
    model.routing_threshold = args.threshold
    return model.eval()


def load_image(args: argparse.Namespace, size: tuple[int, int]) -> tuple[np.ndarray, torch.Tensor, str]:
    """The display image (H, W, 3 floats in [0, 1]) and the normalised model input [1, 3, H, W]."""
    if args.image:
        from PIL import Image

        rgb = np.asarray(Image.open(args.image).convert("RGB"), dtype=np.float32) / 255.0
        label = Path(args.image).name
        mean = np.array(args.mean or (0.485, 0.456, 0.406), dtype=np.float32)
        std = np.array(args.std or (0.229, 0.224, 0.225), dtype=np.float32)
    else:  # the digit as DigitsDataModule gives it to the model (upscaled once, its normalisation statistics)
        from tokenformer_vision import DigitsDataModule

        dm = DigitsDataModule(img_size=size, num_workers=0)
        rgb = dm.images[args.digit].astype(np.float32) / 255.0
        label = f"sklearn digit #{args.digit} (class {int(dm.targets[args.digit])})"
        mean = np.array(args.mean or dm.transform_config.mean, dtype=np.float32)
        std = np.array(args.std or dm.transform_config.std, dtype=np.float32)
    t = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    t = F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True).clamp(0, 1)
    display = t[0].permute(1, 2, 0).numpy()
    x = (t - torch.from_numpy(mean)[:, None, None]) / torch.from_numpy(std)[:, None, None]
    return display, x, label


def render(display: np.ndarray, depth: np.ndarray, total: int, title: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    H, W = display.shape[:2]
    gh, gw = depth.shape
    fig, axes = plt.subplots(1, 2, figsize=(9, 4.6))
    axes[0].imshow(display, interpolation="nearest")
    axes[0].set_title("input")
    axes[1].imshow(display, interpolation="nearest")
    overlay = axes[1].imshow(depth, cmap="viridis", alpha=0.55, vmin=1, vmax=total,
                             extent=(-0.5, W - 0.5, H - 0.5, -0.5),  # imshow's pixel-centre coordinates
                             interpolation="nearest")
    if gh * gw <= 400:  # numbers stay legible up to a 20×20 grid
        for i in range(gh):
            for j in range(gw):
                axes[1].text((j + 0.5) * W / gw - 0.5, (i + 0.5) * H / gh - 0.5, str(int(depth[i, j])), ha="center",
                             va="center", fontsize=max(5, min(11, 160 // max(gh, gw))), color="white")
    axes[1].set_title("blocks run per patch")
    fig.colorbar(overlay, ax=axes[1], fraction=0.046, label=f"blocks (of {total})")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--image", default=None, help="image file; default: a digit from scikit-learn's digits")
    parser.add_argument("--digit", type=int, default=0, help="index into sklearn's load_digits (0..1796)")
    parser.add_argument("--model", default="tokenformer_tiny")
    parser.add_argument("--model-kwargs", default=None, help="JSON dict of timm.create_model arguments")
    parser.add_argument("--num-classes", type=int, default=None, help="default: from the weights' head, else 10")
    parser.add_argument("--weights", default=None, help="safetensors / .pth / Lightning .ckpt of a routed model")
    parser.add_argument("--threshold", type=float, default=0.5, help="halting-probability threshold")
    parser.add_argument("--mean", type=float, nargs=3, default=None)
    parser.add_argument("--std", type=float, nargs=3, default=None)
    parser.add_argument("--out", default="routing_map.png")
    add_device_args(parser)
    args = parser.parse_args()
    if not args.image and not 0 <= args.digit < 1797:
        parser.error(f"--digit must be in 0..1796, got {args.digit}")

    torch.manual_seed(0)  # untrained gates: a reproducible map
    device, dtype = resolve_device(args), dtype_of(args)
    model = build_model(args).to(device)
    display, x, label = load_image(args, tuple(model.patch_embed.img_size))
    with torch.no_grad(), autocast(device, dtype):
        logits = model(x.to(device))
    stats = model.routing_stats()
    depth = model.routing_depth_map()[0, model.num_prefix_tokens:].reshape(model.patch_embed.grid_size).cpu().numpy()
    rule = (f"capacity {model.routing.capacity:g}" if model.routing.capacity is not None
            else f"threshold {args.threshold:g}")
    title = (f"{label}: predicted {int(logits.argmax())}, {rule}, "
             f"TLOps {100 * stats.tlops:.1f}% of the unrouted model"
             + ("" if args.weights else " (untrained gates)"))
    render(display, depth, len(model.blocks), title, args.out)
    print(f"wrote {args.out}: {title}; blocks per patch min {depth.min()} mean {depth.mean():.2f} max {depth.max()}")


if __name__ == "__main__":
    main()
