"""Accuracy and speed of a segmentation model on the EMPS validation split (or any annotated set).

    python benchmarks/bench_segment.py MODEL [--split runs/compact1/split.json] [--runs 3]

MODEL is a registered name (``emparticles models``) or a model folder. Prints every metric of
``emparticles evaluate`` on the validation images and the median seconds per image (model +
instance separation), with the classical baseline timed in the same process as reference.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from emparticles.evaluate import evaluate_dataset
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.train.data import find_pairs, split_validation

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--split", type=Path, default=None, help="split.json of a training run (default: hash split)")
    parser.add_argument("--runs", type=int, default=3, help="timing repetitions per image")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N validation images")
    args = parser.parse_args()
    pairs = find_pairs(EMPS / "images", EMPS / "segmaps")
    if args.split:
        names = set(json.loads(args.split.read_text())["validation"])
        val = [p for p in pairs if p[0].stem in names]
    else:
        val = split_validation(pairs)[1]
    if args.limit:
        val = val[: args.limit]
    model = load_model(args.model, "cpu")
    baseline = load_model("classical", "cpu")
    gts, preds, scores, times, ref_times = [], [], [], [], []
    for image_path, mask_path in val:
        pixels = read_micrograph(image_path).pixels
        truth, _ = read_labels(mask_path)
        model.segment(pixels)  # warm-up
        ts = []
        for _ in range(args.runs):
            t = time.perf_counter()
            inst, _ = model.segment(pixels)
            ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        baseline.segment(pixels)
        ref_times.append(time.perf_counter() - t)
        times.append(statistics.median(ts))
        gts.append(truth)
        preds.append(inst.labels)
        scores.append(inst.scores)
    metrics = evaluate_dataset(gts, preds, scores)
    print(f"model {args.model} on {len(val)} validation images")
    for k, v in metrics.items():
        print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
    print(f"  seconds per image (median)   {statistics.median(times):.3f}  "
          f"(classical {statistics.median(ref_times):.3f}, ratio {statistics.median(times) / statistics.median(ref_times):.2f})")
    print(f"  mean image size              {np.mean([g.size for g in gts]) / 1e6:.2f} MP")


if __name__ == "__main__":
    main()
