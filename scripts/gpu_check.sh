#!/usr/bin/env bash
# One-command check on one CUDA GPU: the CUDA tests, Pattention vs its bare GEMMs (bf16), parameter-matched
# TokenFormer-B vs ViT-B (bf16, eager and torch.compile, batch 128/256: throughput and peak memory), a bf16-mixed
# fit through the Lightning CLI on generated ImageNet-shaped data with a growth stage to ViT-L widths, and the
# data pipeline's images/s per CPU core. Writes JSON files and summary.md into OUT_DIR; about 8 minutes on one
# H200-class GPU. --dry-run runs the same steps on the CPU at tiny sizes (about 2 minutes on 2 cores).
#
#   bash scripts/gpu_check.sh OUT_DIR [--dry-run] [--only STEP ...] [--budget-s SECONDS]
#
# Python: $PY, else .venv/bin/python, else python3. Details: scripts/benchmarks/gpu_check.py.
set -euo pipefail
if [ $# -lt 1 ] || [ "${1#-}" != "$1" ]; then
    echo "usage: $0 OUT_DIR [--dry-run] [--only STEP ...] [--budget-s SECONDS]" >&2
    exit 2
fi
out=$(mkdir -p "$1" && cd "$1" && pwd)  # absolute, before leaving the caller's directory
shift
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
exec "$PY" scripts/benchmarks/gpu_check.py "$out" "$@"
