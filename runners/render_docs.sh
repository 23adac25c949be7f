#!/usr/bin/env bash
# Regenerate the pictures of docs/gradient-flow.md: docs/img/graph-*.svg and
# docs/img/gradflow-*.svg, all drawn by `capsflow render` from graphs/capsnet.yaml.
#
#   bash runners/render_docs.sh [DATA_ROOT]
#
# DATA_ROOT holds mnist/ (default: $CAPSFLOW_DATA, else ../shared/data beside the repo).
# The gradient-norm pictures use the first 32 MNIST test images, once with fresh
# weights (seed 0) and once after a short training run (one epoch on 2,000 training
# images, batch 32: a few minutes on a CPU, made once into runs/render_docs/train and
# reused). Their numbers are also written as JSON under runs/render_docs/.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
DATA=${1:-${CAPSFLOW_DATA:-../shared/data}}
IMG=docs/img
RUNS=runs/render_docs
GRAPH=graphs/capsnet.yaml
SCALE=(--norm-range 1e-10 10)   # one colour scale for both gradient-norm pictures
mkdir -p "$IMG" "$RUNS"

capsflow() { "$PY" -m capsflow "$@"; }

# Forward: the whole network, then the seed's DigitCaps figure for 1, 3 and 5 iterations.
capsflow render "$GRAPH" -o "$IMG/graph-capsnet.svg"
for iters in 1 3 5; do
    capsflow render "$GRAPH" --focus DigitCaps --set routing_iters="$iters" \
        -o "$IMG/graph-digitcaps-r$iters.svg"
done

# Backward: the reverse plan, whole and around the routing.
capsflow render "$GRAPH" --backward -o "$IMG/gradflow-backward.svg"
capsflow render "$GRAPH" --backward --focus DigitCaps -o "$IMG/gradflow-backward-digitcaps.svg"

# Gradient norms of one real batch: fresh weights...
capsflow render "$GRAPH" --grad-norms --data-dir "$DATA" --bs 32 "${SCALE[@]}" \
    -o "$IMG/gradflow-norms.svg" --stats "$RUNS/gradflow-norms.json"
capsflow render "$GRAPH" --grad-norms --data-dir "$DATA" --bs 32 "${SCALE[@]}" \
    --focus DigitCaps -o "$IMG/gradflow-norms-digitcaps.svg"

# ...and after 63 training steps.
if [ ! -f "$RUNS/train/last.npz" ]; then
    capsflow train "$GRAPH" --data-dir "$DATA" --limit-train 2000 --limit-test 200 \
        --num_epochs 1 --bs 32 --save_dir "$RUNS/train" --no-progress
fi
capsflow render "$GRAPH" --grad-norms --data-dir "$DATA" --bs 32 "${SCALE[@]}" \
    --checkpoint "$RUNS/train/last.npz" --focus DigitCaps \
    -o "$IMG/gradflow-norms-digitcaps-trained.svg" --stats "$RUNS/gradflow-norms-trained.json"
