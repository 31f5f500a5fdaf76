"""Accuracy and speed of segmentation models on the EMPS validation split or any annotated set.

    python benchmarks/bench_segment.py MODEL [MODEL ...] [--split runs/x/split.json] [--runs 3]
    python benchmarks/bench_segment.py MODEL ... --images DIR --masks DIR [--markdown table.md]

MODEL is a registered name (``emparticles models``) or a model folder; ``MODEL+keep-text`` keeps
what it finds on text drawn over the field (``--keep-figure-text``). Every image goes the road
of ``emparticles segment`` (info bar found and left out, labels at full size); the classical
reference is timed without the text check, as before it existed. Prints every metric
of ``emparticles evaluate`` and the median seconds per image (segmentation and instance
separation), with the classical baseline timed in the same process as reference; with several
models, also a Markdown table (F1, PQ, COCO AP, IoU, count ratio, s/image).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from emparticles.evaluate import evaluate_dataset
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.pipeline import locate_infobar, segment_micrograph
from emparticles.train.data import find_pairs, split_validation

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"


def annotated_set(args) -> list[tuple[Path, Path]]:
    if args.images:
        pairs = find_pairs(args.images, args.masks)
    else:
        pairs = find_pairs(EMPS / "images", EMPS / "segmaps")
        if args.split:
            names = set(json.loads(args.split.read_text())["validation"])
            pairs = [p for p in pairs if p[0].stem in names]
        else:
            pairs = split_validation(pairs)[1]
    return pairs[: args.limit] if args.limit else pairs


def bench(model_name: str, pairs, runs: int) -> tuple[dict, float, float]:
    """(metrics, median s/image, median s/image of the classical model in the same process)."""
    base_name, *options = model_name.split("+")
    model = load_model(base_name, "cpu")
    baseline = load_model("classical", "cpu")
    text = "keep-text" not in options
    gc.freeze()  # as the CLI does once the model is loaded (no full collections over torch's objects)
    gts, preds, scores, times, ref_times = [], [], [], [], []
    for image_path, mask_path in pairs:
        mg = locate_infobar(read_micrograph(image_path))
        truth, _ = read_labels(mask_path)
        segment_micrograph(mg, model, figure_text=text)  # warm-up
        ts = []
        for _ in range(runs):
            t = time.perf_counter()
            inst, full = segment_micrograph(mg, model, figure_text=text)
            ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        segment_micrograph(mg, baseline, figure_text=False)
        ref_times.append(time.perf_counter() - t)
        times.append(statistics.median(ts))
        gts.append(truth)
        preds.append(full)
        scores.append(inst.scores)
    return evaluate_dataset(gts, preds, scores), statistics.median(times), statistics.median(ref_times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--split", type=Path, default=None, help="split.json of a training run (default: hash split)")
    parser.add_argument("--images", type=Path, default=None, help="annotated images instead of EMPS")
    parser.add_argument("--masks", type=Path, default=None)
    parser.add_argument("--runs", type=int, default=3, help="timing repetitions per image")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--markdown", type=Path, default=None, help="append the table to this file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pairs = annotated_set(args)
    where = f"{args.images}" if args.images else "EMPS validation"
    rows = []
    for name in args.models:
        metrics, sec, ref = bench(name, pairs, args.runs)
        print(f"model {name} on {len(pairs)} images ({where})")
        for k, v in metrics.items():
            print(f"  {k:28s} {v:.4f}" if isinstance(v, float) else f"  {k:28s} {v}")
        print(f"  seconds per image (median)   {sec:.3f}  (classical {ref:.3f}, ratio {sec / ref:.2f})")
        rows.append(f"| {Path(name).name} | {metrics['f1_iou50']:.3f} | {metrics['panoptic_quality_iou50']:.3f} | {metrics['coco_ap']:.3f} | "
                    f"{metrics['coco_ap50']:.3f} | {metrics['foreground_iou']:.3f} | {metrics['count_ratio']:.2f} | {sec:.2f} |")
    mp = np.mean([read_labels(m)[0].size for _, m in pairs]) / 1e6
    table = "\n".join([f"{len(pairs)} images ({where}), mean {mp:.2f} MP, 2 CPU threads", "",
                       "| model | F1@0.5 | PQ | COCO AP | AP50 | fg IoU | count ratio | s/image |",
                       "|---|---|---|---|---|---|---|---|", *rows, ""])
    print(table)
    if args.markdown:
        with args.markdown.open("a") as fh:
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
