#!/usr/bin/env bash
# The main job: set up, then a short real CapsNet training run on MNIST (first 4,000
# training images, one epoch, evaluated on the first 2,000 test images), its pictures
# and the rendered graphs. Everything lands in runs/main/. Works offline: MNIST is read
# from the IDX files in $CAPSFLOW_DATA (default: ../shared/data beside this repo).
set -euo pipefail
cd "$(dirname "$0")/.."
bash runners/setup.sh
export CAPSFLOW_DATA="${CAPSFLOW_DATA:-$(cd .. && pwd)/shared/data}"
OUT=runs/main
CAPSFLOW=.venv/bin/capsflow
mkdir -p "$OUT"

echo "== check: the compiled graph"
$CAPSFLOW check graphs/capsnet.yaml --quiet

echo "== train: one epoch on 4,000 MNIST images ($CAPSFLOW_DATA)"
$CAPSFLOW train graphs/capsnet.yaml --limit-train 4000 --limit-test 2000 --bs 50 --num_epochs 1 \
    --save_dir "$OUT/train" --overwrite   # a second main job replaces the first one's run

echo "== eval: the decoder uses the predicted class"
$CAPSFLOW eval graphs/capsnet.yaml --checkpoint "$OUT/train/best.npz" --limit-test 2000

echo "== visualize: reconstructions, capsule-dimension perturbations, curves"
$CAPSFLOW visualize graphs/capsnet.yaml --checkpoint "$OUT/train/best.npz" --limit-test 2000 \
    --out "$OUT/img"

echo "== render: the graph, its routing and its gradient flow"
$CAPSFLOW render graphs/capsnet.yaml -o "$OUT/capsnet.svg"
$CAPSFLOW render graphs/capsnet.yaml --focus routing -o "$OUT/routing.svg"
$CAPSFLOW render graphs/capsnet.yaml --backward -o "$OUT/backward.svg"
$CAPSFLOW render graphs/capsnet.yaml --grad-norms --checkpoint "$OUT/train/best.npz" \
    --focus DigitCaps -o "$OUT/grad-norms.svg" --stats "$OUT/grad-norms.json"
echo "== done: see $OUT/ (img/*.png, *.svg)"
