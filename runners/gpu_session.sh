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
#   session.log          each step's exit status and time, and the recipes' output
# `recipes MINUTES RECIPE...` runs the recipes alone, all MINUTES long (once the checks are done).
# MINUTES must fit the call: at most the call's timeout less a minute for the install and the
# copies, and within the session's device time (the device tool's status, budget_left_s,
# less about two minutes to start a machine).
# A step that overruns its share is stopped (SIGTERM, then SIGKILL 15 s later) and the next
# one runs. Recipe names and the carried data are checked before anything runs.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

IDX_FILES=(train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz
           t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz)
usage="usage: bash runners/gpu_session.sh prepare | run [MINUTES] [RECIPE...] | recipes [MINUTES] [RECIPE...]"
case "${1:-}" in
prepare)
    # copy_idx NAME FROM: the four IDX files of a dataset, or one line and exit status 2
    copy_idx() {
        local name=$1 from=$2 file
        mkdir -p "gpu-data/$name"
        for file in "${IDX_FILES[@]}"; do
            if [ ! -f "$from/$file" ]; then
                echo "gpu_session prepare: $from/$file not found; $3" >&2; exit 2
            fi
            cp "$from/$file" "gpu-data/$name/" || exit 2
        done
    }
    copy_idx mnist ../shared/data/mnist "run this in a checkout beside ../shared"
    copy_idx fashion-mnist /usr/share/datasets/fashion-mnist \
        "apt-get install dataset-fashion-mnist"
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
if ! [[ "$minutes" =~ ^[0-9]+$ ]] || (( 10#$minutes < 2 )); then
    echo "MINUTES must be a whole number >= 2, got '$minutes'" >&2; exit 2
fi
minutes=$(( 10#$minutes ))  # 09 is nine, not an octal error
# Everything a step needs is checked now, not minutes into the call.
if (( ${#recipes[@]} > 2 )); then
    echo "at most two recipes fit a call, got ${#recipes[@]}: ${recipes[*]}" >&2; exit 2
fi
for recipe in "${recipes[@]}"; do
    if [ ! -f "graphs/recipes/$recipe.yaml" ] && [ ! -f "$recipe" ]; then
        echo "no recipe '$recipe' (graphs/recipes/$recipe.yaml)" >&2; exit 2
    fi
done
DATA=gpu-data
for file in "${IDX_FILES[@]}"; do
    if [ ! -f "$DATA/mnist/$file" ]; then
        echo "$DATA/mnist/$file not found: run 'bash runners/gpu_session.sh prepare' here and carry [\"$DATA\"]" >&2
        exit 2
    fi
done
OUT=${OUT:-runs/gpu-session}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
"$PY" -m pip install -q --no-deps --no-build-isolation -e . >/dev/null \
    || { echo "gpu_session: pip install -e . failed; nothing can run" >&2; exit 1; }
export PYTHONUNBUFFERED=1
deadline=$(( SECONDS + 60 * minutes ))

# say LINE: a status line, shown and kept in $OUT/session.log (the call's reply keeps only
# the last 12,000 characters of the output)
say() { echo "$*" | tee -a "$OUT/session.log"; }

# step NAME SECONDS CMD...: CMD under a time limit, its output shown and kept in $OUT/NAME.log.
# SIGTERM at the limit less 15 s (the programs stop and save), SIGKILL at the limit (a
# process stuck in a CUDA or NCCL wait never returns to Python to see the SIGTERM).
step() {
    local name=$1 limit=$2; shift 2
    local left=$(( deadline - SECONDS ))
    (( limit > left )) && limit=$left
    if (( limit < 30 )); then say "== $name: skipped, no time left"; return; fi
    say "== $name (at most ${limit} s): $*"
    timeout -k 15 $(( limit - 15 )) "$@" 2>&1 | tee "$OUT/$name.log"
    say "== $name: exit ${PIPESTATUS[0]} after $SECONDS s in all"
}

if (( checks )); then
    step gpu_check 150 "$PY" -m capsflow.runners.gpu_check --repeats 30
    # two runs (one process, a world of one), each ended at --timeout: both fit the share
    step dist_check 110 "$PY" -m capsflow.runners.dist_check --backend cupy --data-dir "$DATA" \
        --ranks 1 --timeout 42
    step epoch 90 "$PY" -m capsflow bench graphs/capsnet.yaml --epoch --epochs 2 --backend cupy --data-dir "$DATA"
fi
for recipe in "${recipes[@]}"; do
    # In order: each recipe may take all the time left (the first runs to its end, the
    # next gets what remains). --max-minutes stops after the epoch that ends past it:
    # leave that epoch and the row time.
    budget=$(( deadline - SECONDS - 5 ))
    if (( budget < 90 )); then say "== $recipe: skipped, no time left"; continue; fi
    run_minutes=$(awk -v s="$budget" 'BEGIN { printf "%.2f", (s - 60) / 60 }')
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
    # the recipes' output in session.log (8 files come back: 3 logs, this one, 2 per recipe)
    { echo "== $recipe output"; cat "$OUT/$recipe.log"; } >> "$OUT/session.log" 2>/dev/null
    rm -f "$OUT/$recipe.log"
done
say "== gpu_session: done in $SECONDS s; files in $OUT"
