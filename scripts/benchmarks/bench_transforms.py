#!/usr/bin/env python
"""Images/s of one DataLoader worker: our albumentations pipelines vs timm's torchvision-based transforms.

Generates JPEGs of ImageNet-like sizes in a temp dir, then times decode + transform of the same files, single
process and single thread (what one DataLoader worker does), alternating the pipelines in several rounds so that
machine load affects both alike. Reports the median of the rounds and the ratio. One worker is one CPU core, so the
"train: ours" rate is the images/s per core that a training run's DataLoader gets.

``--dtype`` casts each transformed tensor (what a loader would hand over); the transforms are CPU work, so
``--device`` is only recorded. ``--only-ours`` skips timm's pipelines.

    python scripts/benchmarks/bench_transforms.py --images 64 --rounds 5 --out bench_transforms.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import cv2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # scripts/: the benchlib package
from benchlib.common import add_device_args, dtype_of, load, machine_info, make_jpegs
from PIL import Image

import tokenformer_vision  # noqa: F401  (registers the models with timm)
from tokenformer_vision.data import build_transforms, load_rgb


def pil_rgb(path: Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")


def patch_timm_posterize() -> None:
    """timm 1.0.31's RandAugment asks PIL for 0-bit posterize when the sampled magnitude reaches 10 (mstd noise
    around m9 gets there ~2% of the time); Pillow >= 13 raises ``ValueError: bits must be between or equal to 1
    and 8`` where older Pillow returned a black image. Restore the old result so the timm pipeline can run."""
    from timm.data import auto_augment

    def posterize(img, bits_to_keep, **__):
        if bits_to_keep <= 0:
            return Image.new(img.mode, img.size)
        return auto_augment.posterize(img, bits_to_keep)

    for name, fn in list(auto_augment.NAME_TO_OP.items()):
        if fn is auto_augment.posterize:
            auto_augment.NAME_TO_OP[name] = posterize


def time_pipeline(paths: list[Path], fn) -> float:
    start = time.perf_counter()
    for p in paths:
        fn(p)
    return len(paths) / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64, help="number of generated JPEGs")
    parser.add_argument("--rounds", type=int, default=5, help="alternating timing rounds (median reported)")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--only-ours", action="store_true", help="time only the project's pipelines")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    add_device_args(parser)
    args = parser.parse_args(argv)
    dtype = dtype_of(args)

    # one worker = one thread: keep OpenCV and torch from fanning out over the cores
    cv2.setNumThreads(1)
    torch.set_num_threads(1)
    from timm.data import create_transform

    patch_timm_posterize()

    size = args.img_size
    ours_train = build_transforms(True, size, interpolation="bilinear", rand_augment=True, random_erasing=0.25)
    timm_train = create_transform(size, is_training=True, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25)
    ours_eval = build_transforms(False, size, crop_pct=0.875, interpolation="bicubic")
    timm_eval = create_transform(size, is_training=False, crop_pct=0.875, interpolation="bicubic")
    pipelines = {
        "decode only: PIL -> numpy (ours)": lambda p: load_rgb(p),
        "decode only: PIL RGB (timm)": lambda p: pil_rgb(p).load(),
        "train: ours (albumentations)": lambda p: ours_train(image=load_rgb(p))["image"].to(dtype),
        "train: timm rand-m9-mstd0.5-inc1, re 0.25": lambda p: timm_train(pil_rgb(p)).to(dtype),
        "eval: ours (albumentations)": lambda p: ours_eval(image=load_rgb(p))["image"].to(dtype),
        "eval: timm": lambda p: timm_eval(pil_rgb(p)).to(dtype),
    }
    if args.only_ours:
        pipelines = {k: v for k, v in pipelines.items() if "ours" in k}
    with tempfile.TemporaryDirectory() as tmp:
        paths = make_jpegs(Path(tmp), args.images)
        mean_kb = sum(p.stat().st_size for p in paths) / len(paths) / 1024
        for fn in pipelines.values():  # warm-up (imports, caches, first-call allocations)
            for p in paths[:4]:
                fn(p)
        load_before = load()
        rates: dict[str, list[float]] = {name: [] for name in pipelines}
        for _ in range(args.rounds):
            for name, fn in pipelines.items():
                rates[name].append(time_pipeline(paths, fn))

    median = {name: statistics.median(r) for name, r in rates.items()}
    ratio = lambda a, b: round(median[a] / median[b], 2) if a in median and b in median else None
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "images": args.images,
        "mean_jpeg_kb": round(mean_kb, 1),
        "img_size": size,
        "rounds": args.rounds,
        "machine": machine_info(),
        "dtype": args.dtype,
        "device": args.device or "cpu",
        "load_avg_before": load_before,
        "load_avg_after": load(),
        "versions": {"torch": torch.__version__, "albumentations": __import__("albumentations").__version__,
                     "timm": __import__("timm").__version__, "opencv": cv2.__version__,
                     "pillow": Image.__version__},
        "img_per_s_median": {k: round(v, 1) for k, v in median.items()},
        "img_per_s_rounds": {k: [round(x, 1) for x in v] for k, v in rates.items()},
        "train_img_per_s_per_core": round(median["train: ours (albumentations)"], 1),
        "ratio_train_ours_over_timm": ratio("train: ours (albumentations)",
                                            "train: timm rand-m9-mstd0.5-inc1, re 0.25"),
        "ratio_eval_ours_over_timm": ratio("eval: ours (albumentations)", "eval: timm"),
    }
    width = max(len(k) for k in median)
    print(f"{args.images} JPEGs (mean {mean_kb:.0f} KB), {size}px, 1 process / 1 thread, median of "
          f"{args.rounds} rounds; load avg {load_before[0]:.2f} before, {load()[0]:.2f} after")
    print(f"{'pipeline':<{width}}  img/s   rounds")
    for name, value in median.items():
        print(f"{name:<{width}}  {value:6.1f}  {' '.join(f'{x:.0f}' for x in rates[name])}")
    if not args.only_ours:
        print(f"train ours/timm: {result['ratio_train_ours_over_timm']:.2f}x   "
              f"eval ours/timm: {result['ratio_eval_ours_over_timm']:.2f}x")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
