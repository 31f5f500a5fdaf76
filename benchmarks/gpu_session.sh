#!/usr/bin/env bash
# One call on a lent GPU machine (docs/gpu-training.md): draw the synthetic frames,
# train the grouped recipe for MINUTES, copy the run (checkpoint, best model, metrics, split)
# into $OUT. Resume it there or on a CPU with the same command plus --resume.
#   bash benchmarks/gpu_session.sh [MINUTES] [ARCH] [more train_default.py options]
# ARCH (default strided-unet-slim) trains into runs/grouped-gpu, any other into
# runs/grouped-gpu-ARCH; RUN=FOLDER names another (a variant: RUN=runs/grouped-gpu-lcn
# bash benchmarks/gpu_session.sh 7 strided-unet-slim --local-contrast 32).
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-7}"
ARCH="${2:-strided-unet-slim}"
shift $(( $# < 2 ? $# : 2 ))
RUN="${RUN:-runs/grouped-gpu$( [ "$ARCH" = strided-unet-slim ] || echo "-$ARCH" )}"
NAME="$(basename "$RUN")"
OUT="${OUT:-/tmp/gpu-out}"
# the device machine reaches no package registry: run from the source tree, no install
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d runs/synth-gpu/images ] || python -m emparticles.cli synth -n 48 -o runs/synth-gpu --seed 1 >/dev/null
python benchmarks/train_default.py "$RUN" --arch "$ARCH" --epochs 12 --steps 1000 \
    --batch-size 16 --crop 320 --scale 0.6 1.8 --lr 3e-3 --real-sets-shipped \
    --extra-images runs/synth-gpu/images --extra-masks runs/synth-gpu/masks --extra-fraction 0.1 \
    --paste-fraction 0.1 --distance-head --device cuda --workers 14 --no-tune --stop-after-minutes "$MINUTES" \
    "$@" $( [ -f "$RUN/checkpoint.pt" ] && echo --resume )
mkdir -p "$OUT/$NAME"
cp -r "$RUN/best" "$RUN/checkpoint.pt" "$RUN/metrics.csv" "$RUN/split.json" "$OUT/$NAME/"
