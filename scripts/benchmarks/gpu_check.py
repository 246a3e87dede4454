#!/usr/bin/env python
"""One-command GPU check (``scripts/gpu_check.sh OUT_DIR [--dry-run]``): tests, benchmarks and a training run on
one CUDA GPU, written as JSON files and a markdown summary (``summary.md``) into OUT_DIR.

Steps, in this order (each in its own process, with a time cap, inside an overall budget of ``--budget-s``; a step
that fails or runs out of time is recorded and the next one runs; the summary is rewritten after every step):

1. ``cuda_tests``: ``pytest -m cuda tests/test_cuda.py`` (``cuda_tests.xml`` JUnit, ``cuda_tests.json``).
2. ``pattention``: one Pattention fwd+bwd vs its two bare GEMMs, bf16 autocast, T = 128·197 tokens, d 768,
   n 576 and 2304 (``pattention_bf16.json``).
3. ``fit``: ``tokenformer-vision fit`` (the Lightning CLI) on generated ImageNet-shaped data (1000 classes,
   photo-like JPEGs of ImageNet sizes, 224² crops with the ImageNet recipe's augmentation, Mixup/CutMix),
   ``tokenformer_base`` at 768/3072 tokens, ``--trainer.precision bf16-mixed``, batch 128, 240 steps, with a
   GrowthCallback stage to ViT-L widths (1024/4096) at step 120. Records max |Δlogits| at the growth (the CSV
   log's ``growth/max_abs_dlogits``) and the step time before and after it (``fit.json``, ``fit_steps.json``,
   ``fit/config.yaml``, ``fit/metrics.csv``).
4. ``data``: decode + train augmentation images/s of one CPU core (one DataLoader worker) on generated JPEGs at
   ImageNet sizes with the project's train transforms (``data_pipeline.json``); the summary divides the measured
   training throughputs by it: the CPU cores one GPU needs.
5. ``model``: parameter-matched TokenFormer-B vs timm ViT-B, bf16 autocast, batch 128 and 256, eager then under
   ``torch.compile`` (compile time reported apart): inference and training throughput, peak training memory
   (``model_bf16.json``, rewritten after every row, so the rows done before a cut survive).
6. ``fashion_mnist``: on the four Fashion-MNIST IDX files (``--fashion-mnist-root``; a GPU machine without package
   access gets them copied into ``.fmnist/`` of the working tree), at once: ``bench_fashion_mnist.py`` (ViT vs
   TokenFormer parity at d 64 and 128, the CPU-recipe candidates, the GPU recipe of
   ``configs/fashion_mnist/tokenformer_gpu.yaml``; ``fashion_mnist.json``) and ``growth_experiment.py``
   (``growth_fashion_mnist.json``), each running several trainings in parallel processes on the one GPU.

``--dry-run`` runs the same steps on the CPU at tiny sizes (tokenformer_tiny-sized models, small images, batch
2-4, a few steps, ``torch.compile`` with the graph-capture-only ``eager`` backend) to check the script itself.
Generated data goes to a temporary folder (``--work-dir``), never into OUT_DIR, and is deleted at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import json
import math
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS = ("cuda_tests", "pattention", "fit", "data", "model", "fashion_mnist")
FASHION_MNIST_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
                       "t10k-labels-idx1-ubyte.gz")


# ------------------------------------------------------------------------------------------------ settings
def settings(dry: bool) -> dict[str, Any]:
    """Sizes of every step: the real check (one GPU) or the dry run (CPU, tiny)."""
    if not dry:
        return dict(
            device="cuda", budget_s=470, env={},
            caps=dict(cuda_tests=180, pattention=90, fit=240, data=90, model=420, fashion_mnist=520),
            pattention=["--batch", "128", "--tokens", "576", "2304", "--reps", "30", "--warmup", "5"],
            model=["--size", "base", "--batches", "128", "256", "--compile-batches", "128", "256", "--reps", "10",
                   "--warmup", "2"],
            fit=dict(model="tokenformer_base", img_size=224, kwargs={"attn_tokens": 768, "ffn_tokens": 3072},
                     grow={"attn_tokens": 1024, "ffn_tokens": 4096}, classes=1000, per_class=40, unique=512,
                     batch=128, steps=240, grow_step=120, settle=10, accelerator="gpu",
                     workers=max(1, min(14, (os.cpu_count() or 2) - 2)), log_every=10),
            data=["--images", "64", "--rounds", "3"],
            # parity (ViT vs TokenFormer, d 64 and 128, 3 seeds), the CPU-recipe candidates and the GPU recipe,
            # side by side with the growth study; a run is not started after deadline-s
            fashion_mnist=dict(
                bench=["--suites", "parity", "recipe", "gpu_recipe", "--seeds", "0", "1", "2", "--widths", "64",
                       "128", "--epochs", "12", "--jobs", "5", "--workers", "1", "--deadline-s", "330"],
                growth=["--seeds", "0", "1", "2", "--epochs", "16", "--patch-size", "4", "--jobs", "4",
                        "--workers", "1", "--deadline-s", "330"]),
        )
    return dict(
        # one thread per process: on a small shared CPU, OpenMP spin-waiting across busy cores costs up to 20x
        device="cpu", budget_s=600, env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"},
        caps=dict(cuda_tests=120, pattention=60, fit=120, data=60, model=150, fashion_mnist=300),
        pattention=["--batch", "1", "--seq", "64", "--dim", "64", "--tokens", "48", "192", "--reps", "3",
                    "--warmup", "1"],
        model=["--size", "tiny", "--depth", "2", "--img-size", "32", "--batches", "2", "--compile-batches", "2",
               "--compile-backend", "eager", "--reps", "2", "--warmup", "1"],
        fit=dict(model="tokenformer_tiny", img_size=32,
                 kwargs={"patch_size": 8, "depth": 2, "attn_tokens": 24, "ffn_tokens": 96},
                 grow={"attn_tokens": 48, "ffn_tokens": 192}, classes=4, per_class=8, unique=8, batch=4, steps=8,
                 grow_step=4, settle=1, accelerator="cpu", workers=1, log_every=1),
        data=["--images", "8", "--rounds", "1"],
        fashion_mnist=dict(
            bench=["--suites", "parity", "--seeds", "0", "--widths", "16", "--depth", "1", "--epochs", "1",
                   "--jobs", "1", "--workers", "0", "--limit-train-batches", "2", "--val-size", "100",
                   "--batch-size", "16", "--reps", "2"],
            growth=["--seeds", "0", "--arms", "large", "grow_1/4_rewarm", "--width", "16", "--depth", "1",
                    "--small", "2", "4", "--large", "8", "16", "--epochs", "4", "--jobs", "1", "--workers", "0",
                    "--limit-train-batches", "2", "--val-size", "100", "--batch-size", "16"]),
    )


# ------------------------------------------------------------------------------------------------- running
class Runner:
    """Runs the steps as subprocesses (own process group, killed at its cap) and records their status."""

    def __init__(self, out: Path, budget_s: float, caps: dict[str, float], env: dict[str, str]) -> None:
        self.out = out
        self.caps = caps
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.start = time.monotonic()
        self.deadline = self.start + budget_s
        self.status: dict[str, dict[str, Any]] = {}
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", **env,
                        PYTHONPATH=os.pathsep.join([str(HERE.parent), *filter(None, [os.environ.get("PYTHONPATH")])]))

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, cmd: list[str], cap: float) -> bool:
        timeout = min(cap, self.left() - 5)
        if timeout < 20:
            self.status[name] = dict(status="skipped: time budget spent", seconds=0.0, rc=None)
            print(f"[gpu_check] {name}: skipped (time budget spent)", flush=True)
            return False
        log = self.logs / f"{name}.log"
        print(f"[gpu_check] {name}: {' '.join(cmd)}  (cap {timeout:.0f} s, log {log})", flush=True)
        t0 = time.monotonic()
        with open(log, "w") as f:
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=timeout)
                status = "ok" if rc == 0 else f"failed (exit {rc})"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rc, status = None, f"timed out after {timeout:.0f} s"
        seconds = round(time.monotonic() - t0, 1)
        self.status[name] = dict(status=status, seconds=seconds, rc=rc, log=str(log.relative_to(self.out)))
        print(f"[gpu_check] {name}: {status} in {seconds} s", flush=True)
        return status == "ok"

    def run_together(self, name: str, cmds: dict[str, list[str]], cap: float) -> bool:
        """Run several commands at once (they share the machine), each logged apart; ok if all exit 0."""
        timeout = min(cap, self.left() - 5)
        if timeout < 20:
            self.status[name] = dict(status="skipped: time budget spent", seconds=0.0, rc=None)
            return False
        t0, procs, files = time.monotonic(), {}, []
        for part, cmd in cmds.items():
            f = open(self.logs / f"{name}_{part}.log", "w")  # noqa: SIM115  (closed below)
            f.write("$ " + " ".join(cmd) + "\n")
            f.flush()
            files.append(f)
            print(f"[gpu_check] {name}/{part}: {' '.join(cmd)}", flush=True)
            procs[part] = subprocess.Popen(cmd, cwd=ROOT, env=self.env, stdout=f, stderr=subprocess.STDOUT,
                                           start_new_session=True)
        rcs: dict[str, int | None] = {}
        for part, proc in procs.items():
            try:
                rcs[part] = proc.wait(timeout=max(1.0, t0 + timeout - time.monotonic()))
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                rcs[part] = None
        for f in files:
            f.close()
        bad = {p: rc for p, rc in rcs.items() if rc != 0}
        status = "ok" if not bad else "failed: " + ", ".join(f"{p} {'timed out' if rc is None else f'exit {rc}'}"
                                                             for p, rc in bad.items())
        seconds = round(time.monotonic() - t0, 1)
        self.status[name] = dict(status=status, seconds=seconds, rc=None if bad else 0)
        print(f"[gpu_check] {name}: {status} in {seconds} s", flush=True)
        return not bad

    def note(self, name: str, status: str, seconds: float = 0.0) -> None:
        self.status[name] = dict(status=status, seconds=seconds, rc=None)


def _kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def cli_command() -> list[str]:
    exe = Path(sys.executable).parent / "tokenformer-vision"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "tokenformer_vision.cli"]


# ----------------------------------------------------------------------------------------------- the steps
def junit_to_json(xml_path: Path, json_path: Path) -> dict[str, Any]:
    """pytest's JUnit XML -> counts and one entry per test."""
    root = ET.parse(xml_path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tests = []
    for suite in suites:
        for case in suite.iter("testcase"):
            outcome, message = "passed", ""
            for tag in ("failure", "error", "skipped"):
                child = case.find(tag)
                if child is not None:
                    outcome = {"failure": "failed", "error": "error", "skipped": "skipped"}[tag]
                    message = (child.get("message") or "")[:500]
                    break
            tests.append(dict(name=f"{case.get('classname')}::{case.get('name')}", outcome=outcome,
                              seconds=float(case.get("time") or 0.0), message=message))
    counts = {k: sum(t["outcome"] == k for t in tests) for k in ("passed", "failed", "error", "skipped")}
    result = dict(total=len(tests), **counts, seconds=round(sum(t["seconds"] for t in tests), 2), tests=tests)
    json_path.write_text(json.dumps(result, indent=1))
    return result


def _jpeg_job(job: tuple[str, int, int, int]) -> None:
    sys.path.insert(0, str(HERE.parent))
    from benchlib.common import make_jpeg

    path, w, h, seed = job
    make_jpeg(Path(path), w, h, seed)


def make_imagefolder(root: Path, classes: int, per_class: int, unique: int) -> dict[str, Any]:
    """ImageNet layout ``root/train/<class>/*.JPEG``: ``unique`` generated photo-like JPEGs at ImageNet sizes,
    hard-linked (else copied) ``per_class`` times into each of ``classes`` class folders."""
    from benchlib.common import IMAGENET_SIZES

    t0 = time.perf_counter()
    pool_dir = root / "pool"
    pool_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(pool_dir / f"img_{i:05d}.JPEG"), *IMAGENET_SIZES[i % len(IMAGENET_SIZES)], i) for i in range(unique)]
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    with multiprocessing.get_context("fork").Pool(workers, initializer=signal.signal,
                                                  initargs=(signal.SIGTERM, signal.SIG_DFL)) as pool:
        pool.map(_jpeg_job, jobs)
    files = [Path(j[0]) for j in jobs]
    link = os.link
    k = 0
    for c in range(classes):
        folder = root / "train" / f"n{c:08d}"
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            src, dst = files[k % len(files)], folder / f"n{c:08d}_{i}.JPEG"
            k += 1
            try:
                link(src, dst)
            except OSError:
                link = shutil.copyfile  # no hard links on this file system
                link(src, dst)
    mean_kb = sum(f.stat().st_size for f in files) / len(files) / 1024
    return dict(classes=classes, train_images=classes * per_class, unique_jpegs=unique,
                mean_jpeg_kb=round(mean_kb, 1), seconds=round(time.perf_counter() - t0, 1))


def fit_config(cfg: dict[str, Any], data_root: Path, fit_dir: Path, steps_json: Path) -> dict[str, Any]:
    return {
        "seed_everything": 0,
        "trainer": {
            "accelerator": cfg["accelerator"], "devices": 1, "max_steps": cfg["steps"], "limit_val_batches": 0,
            "num_sanity_val_steps": 0, "log_every_n_steps": cfg["log_every"], "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger",
                       "init_args": {"save_dir": str(fit_dir), "name": "csv", "version": 0}},
            "callbacks": [
                {"class_path": "tokenformer_vision.GrowthCallback",
                 "init_args": {"schedule": [{"step": cfg["grow_step"], **cfg["grow"]}], "rewarm_steps": 20}},
                {"class_path": "benchlib.fit_timing.StepTimer",
                 "init_args": {"out": str(steps_json), "settle": cfg["settle"]}},
            ],
        },
        "model": {
            "model_name": cfg["model"], "img_size": cfg["img_size"], "model_kwargs": cfg["kwargs"],
            "lr": 5.0e-4, "weight_decay": 0.3, "betas": [0.9, 0.95], "warmup_steps": 50, "min_lr": 1.0e-5,
            "label_smoothing": 0.1, "mixup": 0.8, "cutmix": 1.0, "drop_path_rate": 0.1,
        },
        "data": {
            "class_path": "tokenformer_vision.data.ImageFolderDataModule",
            "init_args": {"root": str(data_root), "batch_size": cfg["batch"], "num_workers": cfg["workers"],
                          "rand_augment": True, "ra_magnitude": 9.0, "random_erasing": 0.25, "hflip": 0.5},
        },
        "checkpoint": {"save_top_k": 0, "save_last": False},  # timing run: no checkpoint files
    }


def read_growth_csv(metrics: Path) -> dict[str, Any]:
    """Growth rows of the CSV log: step, max |Δlogits|, token counts, parameters."""
    rows = []
    if metrics.is_file():
        with open(metrics, newline="") as f:
            for row in csv.DictReader(f):
                if row.get("growth/max_abs_dlogits") not in (None, ""):
                    rows.append({k: float(v) for k, v in row.items() if k.startswith("growth/") and v != ""})
    losses = []
    if metrics.is_file():
        with open(metrics, newline="") as f:
            losses = [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss") not in (None, "")]
    return dict(growth_rows=rows, train_loss_first=losses[0] if losses else None,
                train_loss_last=losses[-1] if losses else None, train_loss_rows=len(losses))


def step_fit(runner: Runner, cfg: dict[str, Any], work: Path) -> None:
    import yaml

    fit_dir = runner.out / "fit"
    fit_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    try:
        data = make_imagefolder(work / "imagenet", cfg["classes"], cfg["per_class"], cfg["unique"])
    except Exception as err:  # noqa: BLE001  (recorded; the next steps still run)
        runner.note("fit", f"failed generating data: {err!r}", round(time.monotonic() - t0, 1))
        return
    steps_json = runner.out / "fit_steps.json"
    config = fit_dir / "config.yaml"
    config.write_text(yaml.safe_dump(fit_config(cfg, work / "imagenet", fit_dir, steps_json), sort_keys=False))
    cmd = [*cli_command(), "fit", "--config", str(config), "--trainer.precision", "bf16-mixed"]
    ok = runner.run("fit", cmd, runner.caps["fit"])
    metrics = fit_dir / "csv" / "version_0" / "metrics.csv"
    result: dict[str, Any] = dict(command=" ".join(cmd), data=data, config=str(config.relative_to(runner.out)),
                                  ok=ok, **read_growth_csv(metrics))
    if metrics.is_file():
        shutil.copyfile(metrics, fit_dir / "metrics.csv")
    if steps_json.is_file():
        timing = json.loads(steps_json.read_text())
        timing.pop("steps", None)
        result["timing"] = timing
    rows = result["growth_rows"]
    result["max_abs_dlogits"] = rows[0]["growth/max_abs_dlogits"] if rows else None
    result["settings"] = {k: v for k, v in cfg.items() if k != "workers"} | {"workers": cfg["workers"]}
    (runner.out / "fit.json").write_text(json.dumps(result, indent=1))


def write_random_idx(root: Path, train: int = 600, test: int = 100, seed: int = 0) -> Path:
    """Four small gzipped IDX files of random 28x28 images and labels 0..9 (the dry run's stand-in data)."""
    import gzip

    import numpy as np

    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, size=n, dtype=np.uint8)
        header = b"".join(v.to_bytes(4, "big") for v in (0x803, n, 28, 28))
        with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(header + images.tobytes())
        with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write((0x801).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes())
    return root


def step_fashion_mnist(runner: Runner, cfg: dict[str, Any], out: Path, work: Path, dry: bool,
                       root: Path | None) -> None:
    """bench_fashion_mnist.py (parity, recipes) and growth_experiment.py, at once, on the Fashion-MNIST files."""
    if dry:
        root = write_random_idx(work / "fashion_mnist")
    elif root is None:
        local = ROOT / ".fmnist"
        root = local if all((local / f).is_file() for f in FASHION_MNIST_FILES) else \
            Path("/usr/share/datasets/fashion-mnist")
    py, fm = sys.executable, cfg["fashion_mnist"]
    common = ["--device", cfg["device"], "--root", str(root)]
    runner.run_together("fashion_mnist", {
        "bench": [py, str(HERE / "bench_fashion_mnist.py"), *fm["bench"], *common,
                  "--out", str(out / "fashion_mnist.json")],
        "growth": [py, str(HERE / "growth_experiment.py"), *fm["growth"], *common,
                   "--out", str(out / "growth_fashion_mnist.json")],
    }, cfg["caps"]["fashion_mnist"])


# ------------------------------------------------------------------------------------------------- summary
def _load(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return format(value, spec)


def summarise(out: Path, runner: Runner, dry: bool, info: dict[str, Any]) -> dict[str, Any]:
    """Collect the key figures of every step's JSON into ``summary.json`` and ``summary.md``."""
    if not info:  # any step's description of the machine (with the GPU's, on CUDA)
        for name in ("pattention_bf16.json", "model_bf16.json", "data_pipeline.json"):
            info = (_load(out / name) or {}).get("machine") or {}
            if info:
                break
    s: dict[str, Any] = dict(mode="dry-run (CPU, tiny sizes)" if dry else "GPU", machine=info,
                             wall_s=round(time.monotonic() - runner.start, 1), steps=runner.status)
    md = [f"# GPU check: {s['mode']}", ""]
    where = (f"{info['gpu']} ({info.get('gpu_memory_gib')} GiB, CUDA {info.get('cuda')}, driver "
             f"{info.get('driver')})" if info.get("gpu") else info.get("cpu", "?"))
    md += [f"Machine: {where}, {info.get('cores')} CPU cores, torch {info.get('torch')}, timm {info.get('timm')}, "
           f"Lightning {info.get('lightning')}. Total wall time {s['wall_s']} s.", ""]
    if dry:
        md += ["**Dry run:** tiny models and images on the CPU; the numbers only show that every step runs and "
               "writes its files. They say nothing about performance.", ""]
    md += ["| step | status | seconds |", "|---|---|---|"]
    md += [f"| {name} | {st['status']} | {st['seconds']} |" for name, st in runner.status.items()]

    tests = _load(out / "cuda_tests.json")
    if tests:
        s["cuda_tests"] = {k: tests[k] for k in ("total", "passed", "failed", "error", "skipped", "seconds")}
        md += ["", "## CUDA tests (`pytest -m cuda`)", "",
               f"{tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, {tests['skipped']} "
               f"skipped of {tests['total']} ({tests['seconds']} s)."]
        md += [f"- {t['outcome']}: `{t['name']}` {t['message'][:200]}" for t in tests["tests"]
               if t["outcome"] in ("failed", "error")]

    pat = _load(out / "pattention_bf16.json")
    if pat:
        rows = pat["layer"]
        s["pattention"] = [{k: r[k] for k in ("tokens", "dim", "n", "fwd_bwd_ratio", "fwd_ratio",
                                               "bare_fwd_bwd_tflops")} for r in rows]
        md += ["", f"## Pattention vs its two bare GEMMs ({pat['args']['dtype']}, {pat['args']['device']})", "",
               "| T | d | n | bare fwd+bwd ms | Pattention / bare, fwd+bwd (goal ≤ 1.10) | fwd | "
               "bare fwd+bwd TFLOP/s |", "|---|---|---|---|---|---|---|"]
        md += [f"| {r['tokens']} | {r['dim']} | {r['n']} | {1e3 * r['fwd_bwd_s']['bare_gemms']:.3f} | "
               f"{r['fwd_bwd_ratio']:.3f} | {r['fwd_ratio']:.3f} | {_fmt(r['bare_fwd_bwd_tflops'])} |" for r in rows]

    m = _load(out / "model_bf16.json")
    model_rows = m["rows"] if m else []
    if m:
        s["model_memory_method"] = m.get("memory_method")
    if model_rows:
        r0 = model_rows[0]
        s["model"] = [{k: r.get(k) for k in ("batch", "compiled", "infer_ratio", "train_ratio", "memory_ratio",
                                             "infer_img_per_s", "train_img_per_s", "compile_s")} for r in model_rows]
        md += ["", f"## {r0['models']['tokenformer']} (parameter-matched, {r0['params']['tokenformer']:,} params) vs "
               f"{r0['models']['vit']} ({r0['params']['vit']:,} params), bf16 autocast", "",
               "Ratios TokenFormer / ViT: throughput (> 1: TokenFormer faster; goals infer ≥ 0.95, train ≥ 0.90), "
               f"peak training memory (< 1: TokenFormer smaller; goal ≤ 1.15; {s.get('model_memory_method')}).", "",
               "| mode | batch | TF infer img/s | ViT infer img/s | infer ratio | TF train img/s | ViT train img/s | "
               "train ratio | TF peak GiB | ViT peak GiB | memory ratio | compile s (TF, ViT) |",
               "|" + "---|" * 12]
        for r in model_rows:
            mem = r.get("train_peak_bytes") or {}
            tf_mem = mem.get("tokenformer", {}).get("total")
            vit_mem = mem.get("vit", {}).get("total")
            comp = r.get("compile_s")
            comp_cell = f"{comp.get('tokenformer')}, {comp.get('vit')}" if comp else "-"
            md.append(f"| {'compiled' if r['compiled'] else 'eager'} | {r['batch']} | "
                      f"{r['infer_img_per_s']['tokenformer']:.1f} | {r['infer_img_per_s']['vit']:.1f} | "
                      f"{r['infer_ratio']:.3f} | {r['train_img_per_s']['tokenformer']:.1f} | "
                      f"{r['train_img_per_s']['vit']:.1f} | {r['train_ratio']:.3f} | "
                      f"{_fmt(tf_mem and tf_mem / 2**30)} | {_fmt(vit_mem and vit_mem / 2**30)} | "
                      f"{_fmt(r.get('memory_ratio'), '.3f')} | "
                      f"{comp_cell} |")

    fit = _load(out / "fit.json")
    if fit:
        timing = fit.get("timing") or {}
        before, after = timing.get("before_growth") or {}, timing.get("after_growth") or {}
        st = fit["settings"]
        s["fit"] = dict(max_abs_dlogits=fit.get("max_abs_dlogits"), growth_step=timing.get("growth_step"),
                        step_s_before=before.get("compute_s_median"), step_s_after=after.get("compute_s_median"),
                        img_per_s_before=before.get("compute_img_per_s"),
                        img_per_s_after=after.get("compute_img_per_s"),
                        wall_img_per_s_before=before.get("wall_img_per_s"),
                        wall_img_per_s_after=after.get("wall_img_per_s"),
                        ratio_after_over_before=timing.get("compute_time_ratio_after_over_before"),
                        peak_bytes_before=timing.get("peak_bytes_before_growth"),
                        peak_bytes_after=timing.get("peak_bytes_after_growth"),
                        train_loss_first=fit.get("train_loss_first"), train_loss_last=fit.get("train_loss_last"))
        f = s["fit"]
        ms = lambda v: _fmt(v and 1e3 * v, ".1f")
        gib = lambda v: _fmt(v and v / 2**30)
        md += ["", "## Training through the Lightning CLI, with growth", "",
               f"`tokenformer-vision fit` ({fit['command'].split(' fit ', 1)[-1]}): {st['model']} "
               f"{st['kwargs']}, {st['img_size']}², {st['classes']} classes of generated JPEGs "
               f"({fit['data']['train_images']} files, {fit['data']['unique_jpegs']} distinct, mean "
               f"{fit['data']['mean_jpeg_kb']} KB), batch {st['batch']}, {st['steps']} steps, bf16-mixed, "
               f"{st['workers']} DataLoader workers; GrowthCallback to {st['grow']} at step {st['grow_step']}.", "",
               f"- growth at step {_fmt(f['growth_step'])}: **max |Δlogits| = {_fmt(f['max_abs_dlogits'])}** "
               "(CSV `growth/max_abs_dlogits`)",
               f"- step time (compute, median; {timing.get('settle')} steps after the start and after the growth "
               f"left out): before {ms(f['step_s_before'])} ms ({_fmt(f['img_per_s_before'], '.1f')} img/s), "
               f"after {ms(f['step_s_after'])} ms ({_fmt(f['img_per_s_after'], '.1f')} img/s): "
               f"after / before = {_fmt(f['ratio_after_over_before'], '.3f')}",
               f"- including the wait for data: {_fmt(f['wall_img_per_s_before'], '.1f')} img/s before, "
               f"{_fmt(f['wall_img_per_s_after'], '.1f')} img/s after (data-bound if clearly below the compute rate)",
               f"- peak memory before / after growth: {gib(f['peak_bytes_before'])} / {gib(f['peak_bytes_after'])} "
               f"GiB; train loss {_fmt(f['train_loss_first'], '.3f')} → {_fmt(f['train_loss_last'], '.3f')}"]

    data = _load(out / "data_pipeline.json")
    if data:
        per_core = data.get("train_img_per_s_per_core")
        s["data"] = dict(train_img_per_s_per_core=per_core, mean_jpeg_kb=data.get("mean_jpeg_kb"),
                         eval_img_per_s_per_core=data["img_per_s_median"].get("eval: ours (albumentations)"))
        need = {}
        if fit and s["fit"].get("img_per_s_before"):
            st = fit["settings"]
            need[f"fit, {st['model']} {st['kwargs']}, eager"] = s["fit"]["img_per_s_before"]
            if s["fit"].get("img_per_s_after"):
                need[f"fit after growth to {st['grow']}, eager"] = s["fit"]["img_per_s_after"]
        for r in model_rows:
            mode = "compiled" if r["compiled"] else "eager"
            need[f"bench_model {r['models']['tokenformer']} (param-matched), {mode}, batch {r['batch']}"] = \
                r["train_img_per_s"]["tokenformer"]
        s["data"]["cores_needed"] = {k: math.ceil(v / per_core) for k, v in need.items()} if per_core else {}
        md += ["", "## Data pipeline", "",
               f"Decode + train augmentation (RandomResizedCrop 224, flip, RandAugment m9, random erasing 0.25): "
               f"**{_fmt(per_core, '.1f')} img/s per CPU core** (one worker, one thread, {data['images']} generated "
               f"JPEGs at ImageNet sizes, mean {data['mean_jpeg_kb']} KB, median of {data['rounds']} rounds).", "",
               "| training throughput | img/s | CPU cores needed |", "|---|---|---|"]
        md += [f"| {k} | {v:.1f} | {s['data']['cores_needed'].get(k, '-')} |" for k, v in need.items()]
    md += ["", "Files: " + ", ".join(sorted(p.name for p in out.iterdir() if p.is_file() and p.suffix == ".json"))]
    for name, title in (("fashion_mnist", "Fashion-MNIST: TokenFormer vs ViT, CPU-recipe candidates, GPU recipe"),
                        ("growth_fashion_mnist", "Fashion-MNIST: growth vs training from scratch")):
        if (result := _load(out / f"{name}.json")) and result.get("markdown"):
            s[name] = result.get("summary")
            md += ["", f"## {title}", "", result["markdown"]]
            if result.get("not_started"):
                md += ["", f"Not started (time budget): {', '.join(result['not_started'])}"]
    (out / "summary.json").write_text(json.dumps(s, indent=1))
    (out / "summary.md").write_text("\n".join(md) + "\n")
    return s


# ---------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path, help="where the JSON files and summary.md go")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU at tiny sizes")
    parser.add_argument("--only", nargs="+", choices=STEPS, default=None, help="run only these steps")
    parser.add_argument("--budget-s", type=float, default=None, help="overall time budget (default 470 s; dry 600)")
    parser.add_argument("--work-dir", type=Path, default=None, help="for generated data (default: a temp folder)")
    parser.add_argument("--fashion-mnist-root", type=Path, default=None,
                        help="folder with the four Fashion-MNIST IDX files (default: ./.fmnist if present, else "
                             "/usr/share/datasets/fashion-mnist); the dry run writes small random ones instead")
    args = parser.parse_args(argv)
    dry = args.dry_run
    cfg = settings(dry)
    out = args.out_dir.resolve()
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    sys.path.insert(0, str(HERE.parent))
    info: dict[str, Any] = {}  # filled from the steps' JSON files (this process never initialises CUDA)
    if not dry:
        import torch

        if not torch.cuda.is_available():
            print("gpu_check: no CUDA device is available (use --dry-run to check the script on the CPU)",
                  file=sys.stderr)
            return 2
    runner = Runner(out, args.budget_s or cfg["budget_s"], cfg["caps"], cfg["env"])
    work = Path(tempfile.mkdtemp(prefix="gpu_check_", dir=args.work_dir))
    steps = args.only or STEPS

    main_pid = os.getpid()

    def on_term(signum, frame):  # killed from outside: leave a summary of what is done
        if os.getpid() != main_pid:  # a forked helper inherited the handler
            os._exit(128 + signum)
        summarise(out, runner, dry, info)
        shutil.rmtree(work, ignore_errors=True)
        sys.exit(128 + signum)

    signal.signal(signal.SIGTERM, on_term)
    dev = ["--device", cfg["device"], "--dtype", "bfloat16"]
    try:
        for step in steps:
            if step == "cuda_tests":
                xml = out / "cuda_tests.xml"
                runner.run(step, [py, "-m", "pytest", "tests/test_cuda.py", "-m", "cuda", "-q", "-rs",
                                  "-p", "no:cacheprovider", f"--junitxml={xml}"], cfg["caps"][step])
                if xml.is_file():
                    junit_to_json(xml, out / "cuda_tests.json")
            elif step == "pattention":
                runner.run(step, [py, str(HERE / "bench_pattention.py"), *dev, *cfg["pattention"],
                                  "--out", str(out / "pattention_bf16.json")], cfg["caps"][step])
            elif step == "fit":
                step_fit(runner, cfg["fit"], work)
            elif step == "data":
                runner.run(step, [py, str(HERE / "bench_transforms.py"), "--only-ours", "--device", "cpu",
                                  "--dtype", "float32", *cfg["data"], "--out", str(out / "data_pipeline.json")],
                           cfg["caps"][step])
            elif step == "fashion_mnist":
                step_fashion_mnist(runner, cfg, out, work, dry, args.fashion_mnist_root)
            elif step == "model":
                runner.run(step, [py, str(HERE / "bench_model.py"), *dev, *cfg["model"],
                                  "--out", str(out / "model_bf16.json")], cfg["caps"][step])
            summarise(out, runner, dry, info)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    s = summarise(out, runner, dry, info)
    print((out / "summary.md").read_text())
    failed = [n for n, st in runner.status.items() if st["status"] != "ok"]
    print(f"[gpu_check] {'all steps ok' if not failed else 'not ok: ' + ', '.join(failed)}; {s['wall_s']} s; "
          f"files in {out}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
