"""timm's own model test-suite (tests/test_models.py from the installed timm's sdist) against tokenformer_tiny/small.

It runs in a subprocess: timm's test module changes global torch state (JIT executor flags) at import, and its
model lists must be built after our plugin has registered the models (see tests/timm_plugin.py).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / ".third_party" / f"timm-{timm.__version__}" / "tests" / "test_models.py"
# The timm tests that apply to our models (see docs/timm_suite.md); TorchScript ones are marked xfail(strict).
EXPECTED_PASSING = {
    "test_model_forward", "test_model_backward", "test_model_default_cfgs_non_std",
    "test_model_forward_intermediates_features", "test_model_forward_intermediates",
    "test_prune_intermediate_layers_contract", "test_model_forward_fx", "test_model_backward_fx",
}


@pytest.mark.timeout(900)
def test_timm_model_suite_passes_for_tokenformer_models():
    if not SUITE.exists():
        pytest.fail(f"timm's test-suite is missing at {SUITE}; `make timm-tests` downloads it from the timm sdist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
           "TOKENFORMER_TIMM_MODELS": "tokenformer_tiny,tokenformer_small"}
    env.pop("GITHUB_ACTIONS", None)
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(SUITE), "-p", "timm_plugin", "-p", "no:cacheprovider", "-rA", "-q",
         "--rootdir", str(SUITE.parent), "-c", os.devnull, "-W", "ignore::pytest.PytestUnknownMarkWarning"],
        cwd=SUITE.parent, env=env, capture_output=True, text=True, timeout=880,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-6000:]
    passed = set(re.findall(r"^PASSED \S+::(\w+)\[", output, flags=re.M))
    assert passed == EXPECTED_PASSING, output[-4000:]
    for name in ("tokenformer_tiny", "tokenformer_small"):
        assert re.search(rf"^PASSED \S+::test_model_forward\[\d+-{name}\]", output, flags=re.M), output[-4000:]
    assert not re.search(r"^(FAILED|ERROR|XPASS)", output, flags=re.M), output[-4000:]
