#!/usr/bin/env bash
# The GPU check (see runners/gpu_check.py), for a bare GPU machine that has CuPy, PyTorch,
# NumPy, networkx and PyYAML but no internet: installs capsflow without dependencies and
# without build isolation (nothing to download), then runs every check in one go.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null
PYTHONUNBUFFERED=1 "$PY" -m capsflow.runners.gpu_check "$@"
