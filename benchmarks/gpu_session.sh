#!/usr/bin/env bash
# One call on a lent GPU machine (docs/gpu-training.md): draw the synthetic frames,
# train the grouped recipe for MINUTES, copy the run (checkpoint, best model, metrics, split)
# into $OUT. Resume it there or on a CPU with the same command plus --resume.
#   bash benchmarks/gpu_session.sh [MINUTES]
set -euo pipefail
cd "$(dirname "$0")/.."
MINUTES="${1:-7}"
OUT="${OUT:-/tmp/gpu-out}"
# the device machine reaches no package registry: run from the source tree, no install
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
[ -d runs/synth-gpu/images ] || python -m emparticles.cli synth -n 48 -o runs/synth-gpu --seed 1 >/dev/null
python benchmarks/train_default.py runs/grouped-gpu --arch strided-unet-slim --epochs 12 --steps 1000 \
    --batch-size 16 --crop 320 --scale 0.6 1.8 --lr 3e-3 --real-sets-shipped \
    --extra-images runs/synth-gpu/images --extra-masks runs/synth-gpu/masks --extra-fraction 0.1 \
    --paste-fraction 0.1 --distance-head --device cuda --workers 14 --no-tune --stop-after-minutes "$MINUTES" \
    $( [ -f runs/grouped-gpu/checkpoint.pt ] && echo --resume )
mkdir -p "$OUT/grouped-gpu"
cp -r runs/grouped-gpu/best runs/grouped-gpu/checkpoint.pt runs/grouped-gpu/metrics.csv runs/grouped-gpu/split.json \
    "$OUT/grouped-gpu/"
