"""``scripts/gpu_check.sh OUT_DIR --dry-run``: every step of the GPU check runs on the CPU at tiny sizes and writes
its JSON files and the markdown summary, with finite numbers (so the real check is ready to run on a GPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILES = ("summary.md", "summary.json", "cuda_tests.xml", "cuda_tests.json", "pattention_bf16.json", "fit.json",
         "fit_steps.json", "fit/config.yaml", "fit/metrics.csv", "data_pipeline.json", "model_bf16.json",
         "fashion_mnist.json", "growth_fashion_mnist.json")


def _numbers(tree, path="") -> list[tuple[str, float]]:
    """Every int/float leaf of a JSON tree, with its path."""
    if isinstance(tree, bool):
        return []
    if isinstance(tree, int | float):
        return [(path, float(tree))]
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(tree, list):
        return [n for i, v in enumerate(tree) for n in _numbers(v, f"{path}[{i}]")]
    return []


def _positive_finite(value) -> bool:
    return isinstance(value, int | float) and math.isfinite(value) and value > 0


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_gpu_check_dry_run(tmp_path):
    out = tmp_path / "gpu_check"
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), str(out), "--dry-run"],
                          env=dict(os.environ, PY=sys.executable), capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name in FILES:
        assert (out / name).is_file(), f"{name} missing; written: {sorted(p.name for p in out.rglob('*'))}"

    summary = json.loads((out / "summary.json").read_text())
    assert {n: s["status"] for n, s in summary["steps"].items()} == {
        n: "ok" for n in ("cuda_tests", "pattention", "fit", "data", "model", "fashion_mnist")}
    numbers = _numbers(summary)
    assert numbers and all(math.isfinite(v) for _, v in numbers), [p for p, v in numbers if not math.isfinite(v)]

    tests = summary["cuda_tests"]
    assert tests["total"] >= 5 and tests["failed"] == tests["error"] == 0
    assert tests["passed"] + tests["skipped"] == tests["total"]

    assert len(summary["pattention"]) == 2
    assert all(_positive_finite(r["fwd_bwd_ratio"]) and _positive_finite(r["fwd_ratio"])
               for r in summary["pattention"])

    rows = summary["model"]
    assert [r["compiled"] for r in rows] == [False, True]
    for r in rows:
        for key in ("infer_ratio", "train_ratio", "memory_ratio"):
            assert _positive_finite(r[key]), (key, r)

    fit = summary["fit"]
    assert fit["growth_step"] is not None
    assert 0.0 <= fit["max_abs_dlogits"] <= 1e-5  # growth is exact (the check runs in fp32, eval mode)
    for key in ("step_s_before", "step_s_after", "img_per_s_before", "img_per_s_after", "ratio_after_over_before"):
        assert _positive_finite(fit[key]), (key, fit)

    data = summary["data"]
    assert _positive_finite(data["train_img_per_s_per_core"])
    assert data["cores_needed"] and all(isinstance(v, int) and v >= 1 for v in data["cores_needed"].values())

    fit_json = json.loads((out / "fit.json").read_text())
    assert fit_json["growth_rows"], "the CSV log has no growth/max_abs_dlogits row"
    parity = {r["name"]: r for r in summary["fashion_mnist"]}
    assert set(parity) == {"vit_d16", "tokenformer_d16", "tokenformer_d16_n=d"}
    assert parity["vit_d16"]["params"] > 0 and 0.0 <= parity["tokenformer_d16"]["test_acc1_mean"] <= 1.0
    assert all(_positive_finite(r["train_flops"]) and _positive_finite(r["inference_images_per_s"])
               for r in parity.values())
    growth = summary["growth_fashion_mnist"]
    assert {r["arm"] for r in growth} == {"large", "grow_1/4_rewarm"}
    grown = next(r for r in growth if r["arm"] == "grow_1/4_rewarm")
    assert grown["growth"] and grown["growth"][0]["max_abs_dlogits"] <= 1e-5  # exact growth, fp32
    assert grown["total_flops_x"] < 1.0  # the small start costs less than large from scratch

    md = (out / "summary.md").read_text()
    for text in ("CUDA tests", "Pattention vs its two bare GEMMs", "max |Δlogits|", "Data pipeline", "compiled"):
        assert text in md, text
