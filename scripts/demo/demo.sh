#!/usr/bin/env bash
# The main job on the embedded default data (`make demo`): train a small TokenFormer on scikit-learn's digits,
# grow it mid-run (GrowthCallback, exact), validate the best checkpoint and plot the log with the growth marked.
# No dataset or download needed; CPU, a few minutes. Extra arguments go to `fit` (e.g. --trainer.max_epochs 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CONFIGS=(--config configs/demo/digits.yaml)

start=$(date +%s)
"$PY" -m tokenformer_vision.cli fit "${CONFIGS[@]}" --trainer.enable_progress_bar false "$@"
# the newest run of this experiment (the fit above logged to a new version_N folder)
run=$(ls -td runs/digits/version_* | head -n 1)
"$PY" -m tokenformer_vision.cli validate "${CONFIGS[@]}" --ckpt_path best --trainer.enable_progress_bar false
"$PY" scripts/demo/plot_metrics.py "$run/metrics.csv" --out "$run/metrics.png"
echo "demo: $(( $(date +%s) - start )) s; log, checkpoints and plot in $run"
