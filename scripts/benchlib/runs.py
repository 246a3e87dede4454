"""Fashion-MNIST runs for the benchmarks: model specs, the shared recipe, and parallel execution of
:func:`benchlib.harness.train_eval` in worker processes (one run per process, results streamed to a JSON file).

A run spec is a plain dict (so it crosses process boundaries): ``name``, ``model_name``, ``model_kwargs``,
``seed``, optionally ``growth`` (GrowthCallback stages), ``rewarm_steps``, ``depth_growth``,
``progressive_resolution`` and ``new_rows_warmup`` (:mod:`benchlib.growth_levers` and
``tokenformer_vision.callbacks.ProgressiveResolution`` arguments), ``test_every_epoch`` and
``overrides`` (values that replace the script's arguments for this run, e.g. ``epochs``, ``batch_size``,
``precision``); the recipe (:func:`recipe`) and the data settings come from the arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

FASHION_MNIST_DEFAULT = "/usr/share/datasets/fashion-mnist"


def add_recipe_args(parser: argparse.ArgumentParser, epochs: int) -> None:
    """The training recipe and execution options every Fashion-MNIST benchmark shares."""
    parser.add_argument("--root", default=FASHION_MNIST_DEFAULT, help="folder with the four Fashion-MNIST IDX files")
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--val-size", type=int, default=5000, help="train images held out for validation")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW peak learning rate")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--drop-path", type=float, default=0.1)
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--random-erasing", type=float, default=0.25)
    parser.add_argument("--crop-padding", type=int, default=2)
    parser.add_argument("--patch-size", type=int, default=4)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    parser.add_argument("--precision", default="32-true", help="Lightning precision, e.g. 32-true, bf16-mixed")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel, one process each")
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers per run")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: cores/jobs)")
    parser.add_argument("--limit-train-batches", type=float, default=None, help="smoke runs: batches per epoch")
    parser.add_argument("--deadline-s", type=float, default=None,
                        help="start no run after this many seconds (runs left out are listed in the JSON)")


def tokenformer_spec(name: str, d: int, attn: int, ffn: int, seed: int, args: argparse.Namespace,
                     depth: int | None = None, patch_size: int | None = None, **extra: Any) -> dict[str, Any]:
    """A TokenFormer run: ``d`` wide, ``attn``/``ffn`` parameter tokens, head dim 32, grayscale input."""
    return {"name": name, "family": "tokenformer", "model_name": "tokenformer_tiny", "seed": seed, "width": d,
            "model_kwargs": dict(embed_dim=d, depth=depth or args.depth, num_heads=max(1, d // 32), attn_tokens=attn,
                                 ffn_tokens=ffn, patch_size=patch_size or args.patch_size, in_chans=1), **extra}


def vit_spec(name: str, d: int, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    """timm's own VisionTransformer at the same shell (patch, depth, width, heads, MLP ratio 4, class token)."""
    return {"name": name, "family": "vit", "model_name": "vit_tiny_patch16_224", "seed": seed, "width": d,
            "model_kwargs": dict(embed_dim=d, depth=args.depth, num_heads=max(1, d // 32), mlp_ratio=4.0,
                                 patch_size=args.patch_size, in_chans=1)}


def config_spec(path: str | Path, name: str, seed: int, suite: str) -> dict[str, Any]:
    """A run of a ``tokenformer-vision fit`` YAML config (model, data and trainer settings as the CLI would use
    them), so that a benchmark measures exactly the recipe that users copy."""
    import yaml

    cfg = yaml.safe_load(Path(path).read_text())
    model, data, trainer = dict(cfg["model"]), dict(cfg["data"]["init_args"]), cfg["trainer"]
    kwargs = dict(model.pop("model_kwargs"))
    overrides = {"epochs": trainer["max_epochs"], "precision": trainer.get("precision", "32-true"),
                 "batch_size": data.pop("batch_size"), "workers": data.pop("num_workers")}
    data.pop("root", None)
    growth = next((c["init_args"] for c in trainer.get("callbacks") or []
                   if c["class_path"].endswith("GrowthCallback")), None)
    return {"name": name, "family": "tokenformer", "model_name": model.pop("model_name"), "seed": seed,
            "width": kwargs["embed_dim"], "model_kwargs": kwargs, "suite": suite, "config": str(path),
            "classifier": {k: tuple(v) if isinstance(v, list) else v for k, v in model.items() if k != "img_size"},
            "data": data, "overrides": overrides, "gradient_clip_val": trainer.get("gradient_clip_val"),
            **({"growth": growth["schedule"], "rewarm_steps": growth.get("rewarm_steps", 0)} if growth else {})}


def recipe(args: argparse.Namespace) -> dict[str, Any]:
    """ImageClassifier arguments of the shared recipe (AdamW, warm-up + cosine, label smoothing, drop-path)."""
    return dict(lr=args.lr, weight_decay=args.weight_decay, betas=(0.9, 0.999), warmup_epochs=args.warmup_epochs,
                min_lr=1e-5, label_smoothing=args.label_smoothing, drop_path_rate=args.drop_path)


def run_spec(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """One run in this process: build data + classifier (+ growth), :func:`train_eval`, and return the summary
    (weights saved to ``args.save_weights/<name>_s<seed>.pt`` when that is set)."""
    import logging
    import warnings

    import torch

    from tokenformer_vision import GrowthCallback, ImageClassifier
    from tokenformer_vision.callbacks import ProgressiveResolution
    from tokenformer_vision.data import FASHION_MNIST_CLASSES, IDXDataModule

    from .growth_levers import DepthGrowth, NewRowsWarmup
    from .harness import inference_images_per_s, train_eval

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    args = argparse.Namespace(**{**vars(args), **spec.get("overrides", {})})
    if args.threads:
        torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    data_kwargs = {"class_names": FASHION_MNIST_CLASSES, "crop_padding": args.crop_padding,
                   "random_erasing": args.random_erasing, "val_size": args.val_size, **spec.get("data", {})}
    data = IDXDataModule(args.root, img_size=28, batch_size=args.batch_size, num_workers=args.workers, seed=0,
                         persistent_workers=args.workers > 0, **data_kwargs)

    def build() -> ImageClassifier:
        return ImageClassifier(spec["model_name"], num_classes=10, img_size=28, model_kwargs=spec["model_kwargs"],
                               **{**recipe(args), **spec.get("classifier", {})})

    callbacks: list = []
    if spec.get("depth_growth"):  # before GrowthCallback: blocks switched on first, then all widened together
        callbacks.append(DepthGrowth(**spec["depth_growth"]))
    if spec.get("progressive_resolution"):
        callbacks.append(ProgressiveResolution(**spec["progressive_resolution"]))
    if spec.get("growth"):
        callbacks.append(GrowthCallback(spec["growth"], rewarm_steps=spec.get("rewarm_steps", 0),
                                        seed=spec["seed"], second_moment=spec.get("second_moment", "mean"),
                                        new_token_lr_scale=spec.get("new_token_lr_scale", 1.0)))
        if spec.get("new_rows_warmup"):
            callbacks.append(NewRowsWarmup(callbacks[-1], spec["new_rows_warmup"]))
    limits = {"limit_train_batches": args.limit_train_batches} if args.limit_train_batches else {}
    if args.limit_train_batches:
        limits.update(limit_val_batches=2, limit_test_batches=2)
    result = train_eval(build, data, max_epochs=args.epochs, seed=spec["seed"], callbacks=callbacks,
                        accelerator=device, precision=args.precision,
                        gradient_clip_val=spec.get("gradient_clip_val", 1.0),
                        test_every_epoch=spec.get("test_every_epoch", False), keep_module=True, **limits)
    out = {"spec": spec, **result.summary(), "device": device}
    if events := [e for c in callbacks for e in getattr(c, "events", [])]:
        out["growth_events"] = [{k: v for k, v in e.items() if isinstance(v, (int, float, str))} for e in events]
    net = result.module.eval_model
    out["inference_images_per_s_in_run"] = inference_images_per_s(net, (1, 28, 28), device)
    if getattr(args, "save_weights", None):
        Path(args.save_weights).mkdir(parents=True, exist_ok=True)
        torch.save({k: v for k, v in result.state_dict.items() if k.startswith("model.")},
                   Path(args.save_weights) / f"{spec['name']}_s{spec['seed']}.pt")
    return out


def _worker(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads or 1))
    start = time.perf_counter()
    try:
        out = run_spec(spec, args)
    except Exception as exc:  # one failed run must not lose the others: it is recorded with its error
        out = {"spec": spec, "error": f"{type(exc).__name__}: {exc}"}
    out["process_wall_s"] = time.perf_counter() - start
    return out


def run_all(specs: list[dict[str, Any]], args: argparse.Namespace, out_path: str | None,
            header: dict[str, Any]) -> dict[str, Any]:
    """Run every spec, ``args.jobs`` at a time in spawned processes; after each finished run the JSON at
    ``out_path`` is rewritten, so an interrupted benchmark keeps what it measured."""
    results: dict[str, Any] = {**header, "runs": [], "not_started": []}
    start = time.perf_counter()
    pending = list(specs)

    def save() -> None:
        if out_path:
            Path(out_path).parent.mkdir(parents=True, exist_ok=True)
            Path(out_path).write_text(json.dumps(results, indent=1))

    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=get_context("spawn")) as pool:
        running = set()
        while pending or running:
            while pending and len(running) < max(1, args.jobs):
                if args.deadline_s is not None and time.perf_counter() - start > args.deadline_s:
                    results["not_started"] = [f"{s['name']}_s{s['seed']}" for s in pending]
                    pending = []
                    break
                running.add(pool.submit(_worker, pending.pop(0), args))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                run = future.result()
                results["runs"].append(run)
                test = run.get("test", {}).get("test/acc1")
                print(f"[{time.perf_counter() - start:6.0f} s] {run['spec']['name']} seed {run['spec']['seed']}: "
                      + (f"test acc1 {test:.4f}, {run['train_images_per_s']:.0f} train img/s, "
                         f"{run['process_wall_s']:.0f} s" if test is not None else run.get("error", "?")),
                      flush=True)
                save()
    results["wall_s"] = time.perf_counter() - start
    save()
    return results


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)
