#!/usr/bin/env bash
# Set up everything capsflow needs on a fresh Debian machine, into ./.venv:
# the graphviz `dot` binary and Fashion-MNIST (apt-get), then torch/torchvision and
# capsflow itself with its dev extras (pip). Safe to run again: it skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v dot >/dev/null 2>&1 || [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
        echo "setup: installing graphviz and dataset-fashion-mnist with apt-get"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz dataset-fashion-mnist >/dev/null
    else
        echo "setup: please install graphviz (the 'dot' binary) with your package manager" >&2
    fi
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# These exact versions install from local disk on the project's machines; the
# project itself only asks for torch>=2.4 / torchvision>=0.19 (pyproject.toml).
if ! .venv/bin/python -c "import torch, torchvision" >/dev/null 2>&1; then
    echo "setup: installing torch and torchvision"
    .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "setup: installing capsflow (editable, with dev extras)"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup: done; activate with: source .venv/bin/activate"
