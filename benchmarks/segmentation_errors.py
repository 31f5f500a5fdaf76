"""What a model's unmatched particles are: missed, merged, split; false, merging, fragments.

    python benchmarks/segmentation_errors.py MODEL [--images DIR --masks DIR] [--split runs/x/split.json]

Each image goes down the road of `emparticles segment` (info bar found and left out) and its
labels are compared with the truth by `emparticles.evaluate.error_kinds` (IoU 0.5); the counts
are summed over the set and printed, with the worst images by unmatched true particles.
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from bench_segment import annotated_set  # the benchmarks folder is the script's own

from emparticles.evaluate import error_kinds
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.pipeline import locate_infobar, segment_micrograph


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--split", type=Path, default=None, help="split.json of a training run (default: hash split)")
    parser.add_argument("--images", type=Path, default=None, help="annotated images instead of EMPS")
    parser.add_argument("--masks", type=Path, default=None)
    parser.add_argument("--limit", type=int, default=0, help="use only the first N images")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    total, per_image = Counter(), []
    for image_path, mask_path in annotated_set(args):
        truth, _ = read_labels(mask_path)
        _, pred = segment_micrograph(locate_infobar(read_micrograph(image_path)), model)
        k = error_kinds(truth, pred)
        total.update(k)
        per_image.append((k["true"] - k["matched"], image_path.name, k))
    t, p = total["true"], total["pred"]
    print(f"{args.model}: {t} true particles, {p} predicted, {total['matched']} matched (IoU >= 0.5)")
    for kind in ("missed", "merged", "split", "other"):
        print(f"  true {kind:9s} {total['true_' + kind]:6d}  ({total['true_' + kind] / max(t, 1):.1%} of true)")
    for kind in ("false", "merging", "fragment", "other"):
        print(f"  pred {kind:9s} {total['pred_' + kind]:6d}  ({total['pred_' + kind] / max(p, 1):.1%} of predicted)")
    print("worst images (unmatched true particles):")
    for n, name, k in sorted(per_image, key=lambda r: r[0], reverse=True)[:5]:
        print(f"  {name}: {n} of {k['true']} (merged {k['true_merged']}, split {k['true_split']}, missed {k['true_missed']})")


if __name__ == "__main__":
    main()
