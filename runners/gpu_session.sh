#!/usr/bin/env bash
# Everything the open GPU items need, in ONE call on a lent GPU machine (docs/gpu.md, "A GPU
# session"). First, here: `bash runners/gpu_session.sh prepare` copies MNIST and Fashion-MNIST
# into gpu-data/ (ignored by git, about 43 MB), for the call to carry; then the device call:
#     command: bash runners/gpu_session.sh run 9      carry: ["gpu-data"]     timeout_s: 600
# `run MINUTES [RECIPE...]` stays within MINUTES of wall time (default 9) and writes to
# $OUT (default runs/gpu-session), one file per item, at most 8 files (what comes back):
#   gpu_check.log   #13  every GPU correctness check and the step-time table against PyTorch
#   dist_check.log  #16  NCCL, a world of one rank, against one process (runners/dist_check.py)
#   epoch.log       #18  two MNIST epochs (the second warm) with test evaluation, split host/device
#   RECIPE/metrics.jsonl and RECIPE/row.json   #18  the recipes in order, two at most,
#                        each for all the time left (capsflow reproduce --max-minutes); by
#                        default MNIST's 50-epoch row (x0.9 per epoch), then Fashion-MNIST's
#   recipes.log          the recipes' output
# `recipes MINUTES RECIPE...` runs the recipes alone, all MINUTES long (once the checks are done).
# MINUTES must fit the call: at most the call's timeout less a minute for the install and the
# copies, and within the session's device time (the device tool's status, budget_left_s,
# less about two minutes to start a machine).
# A step that overruns its share is stopped and the next one runs.
set -uo pipefail
cd "$(dirname "$0")/.."

usage="usage: bash runners/gpu_session.sh prepare | run [MINUTES] [RECIPE...] | recipes [MINUTES] [RECIPE...]"
case "${1:-}" in
prepare)
    mkdir -p gpu-data/mnist gpu-data/fashion-mnist
    cp ../shared/data/mnist/*-ubyte.gz gpu-data/mnist/
    if ls /usr/share/datasets/fashion-mnist/*-ubyte.gz >/dev/null 2>&1; then
        cp /usr/share/datasets/fashion-mnist/*-ubyte.gz gpu-data/fashion-mnist/
    else
        echo "note: no Fashion-MNIST in /usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist)"
    fi
    du -sh gpu-data
    exit 0;;
run) checks=1;;
recipes) checks=0;;
*) echo "$usage" >&2; exit 2;;
esac
minutes=${2:-9}
shift $(( $# < 2 ? $# : 2 ))
default_recipes=(mnist-capsnet-per-epoch fashion-mnist-capsnet-per-epoch)
if (( $# )); then recipes=("$@"); else recipes=("${default_recipes[@]}"); fi
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || (( minutes < 2 )); then
    echo "MINUTES must be a whole number >= 2, got '$minutes'" >&2; exit 2
fi
OUT=${OUT:-runs/gpu-session}
PY=${PYTHON:-python3}
DATA=gpu-data
mkdir -p "$OUT"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null \
    || { echo "gpu_session: pip install -e . failed; nothing can run" >&2; exit 1; }
export PYTHONUNBUFFERED=1
deadline=$(( SECONDS + 60 * minutes ))

# step NAME SECONDS CMD...: CMD under a time limit, its output shown and kept in $OUT/NAME.log
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( deadline - SECONDS ))
    (( limit > left )) && limit=$left
    if (( limit < 20 )); then echo "== $name: skipped, no time left"; return; fi
    echo "== $name (at most ${limit} s): $*"
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "== $name: exit ${PIPESTATUS[0]} after $SECONDS s in all"
}

if (( checks )); then
    step gpu_check 150 "$PY" -m capsflow.runners.gpu_check --repeats 30
    step dist_check 100 "$PY" -m capsflow.runners.dist_check --backend cupy --data-dir "$DATA" \
        --ranks 1 --timeout 48
    step epoch 90 "$PY" -m capsflow bench graphs/capsnet.yaml --epoch --epochs 2 --backend cupy --data-dir "$DATA"
fi
recipes=("${recipes[@]:0:2}")
for recipe in "${recipes[@]}"; do
    # In order: each recipe may take all the time left (the first runs to its end, the
    # next gets what remains). --max-minutes stops after the epoch that ends past it:
    # leave that epoch and the row time.
    budget=$(( deadline - SECONDS - 5 ))
    if (( budget < 90 )); then echo "== $recipe: skipped, no time left"; continue; fi
    run_minutes=$(awk -v s="$budget" 'BEGIN { printf "%.2f", (s - 45) / 60 }')
    folder="runs/reproduce-gpu/$recipe"
    mkdir -p "$OUT/$recipe"
    # metrics.jsonl into $OUT every 15 s: if the call itself is cut short, the epochs
    # run so far still come back
    ( while sleep 15; do cp "$folder/metrics.jsonl" "$OUT/$recipe/" 2>/dev/null; done ) &
    copier=$!
    step "$recipe" "$budget" "$PY" -m capsflow reproduce "$recipe" --backend cupy \
        --data-dir "$DATA" --out "$folder" --max-minutes "$run_minutes" --no-progress
    kill "$copier" 2>/dev/null; wait "$copier" 2>/dev/null
    cp "$folder/metrics.jsonl" "$folder/row.json" "$OUT/$recipe/" 2>/dev/null
    # one log for the recipes (8 files come back: 3 logs, this one, 2 per recipe)
    { echo "== $recipe"; cat "$OUT/$recipe.log"; } >> "$OUT/recipes.log" 2>/dev/null
    rm -f "$OUT/$recipe.log"
done
echo "== gpu_session: done in $SECONDS s; files in $OUT"
