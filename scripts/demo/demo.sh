#!/usr/bin/env bash
# The main job on the embedded default data (`make demo`): train a small TokenFormer on scikit-learn's digits,
# grow it mid-run (GrowthCallback, exact), validate the best checkpoint and plot the log with the growth marked.
# No dataset or download needed; CPU, about 2 minutes of CPU time (one thread). SEED=N picks another model seed and
# train/val split (default: the config's, 0); extra arguments go to `fit` (e.g. --trainer.max_epochs 5).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
# One torch thread unless OMP_NUM_THREADS says otherwise: the model's matrices are small, and two threads on two
# cores shared with other work stall each other (6 epochs took 20-22 s with one thread, 51-133 s with two, at a
# 1-minute load average of 3-5).
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
ARGS=(--config configs/demo/digits.yaml --trainer.enable_progress_bar false)
if [ -n "${SEED:-}" ]; then
    ARGS+=(--seed_everything "$SEED" --data.init_args.seed "$SEED")
fi

start=$(date +%s)
"$PY" -m tokenformer_vision.cli fit "${ARGS[@]}" "$@"
# the newest run of this experiment (the fit above logged to a new version_N folder)
run=$(ls -td runs/digits/version_* | head -n 1)
"$PY" -m tokenformer_vision.cli validate "${ARGS[@]}" --ckpt_path best
"$PY" scripts/demo/plot_metrics.py "$run/metrics.csv" --out "$run/metrics.png"
echo "demo: $(( $(date +%s) - start )) s; log, checkpoints and plot in $run"
