"""Agglomerate counts against agglomerate-level annotations (../shared/data/sem-agglomerates).

    python benchmarks/agglomerate_counts.py MODEL [MODEL ...] [--min-area 100] [--part all|test|validation]
        [--split RUN/split.json] [--particles any|bright] [--leave-out STEM,STEM]

Each frame goes the road of ``emparticles analyze`` (info bar found and left out, segmentation,
agglomerates as 8-connected groups of touching particles); agglomerates of ``--min-area`` pixels
or more are counted and compared with the annotated ones (each 8-connected component of the
annotation of that size). Prints per frame the two counts and their ratio, the pooled ratio,
foreground IoU and the share of the predicted foreground on bare substrate. ``--part`` as in
``benchmarks/all_sets.py`` (a model trained with the set's training part must be scored on
``test``). ``--particles bright`` leaves out what is darker than its surroundings, as
``analyze --particles bright`` does. ``--leave-out`` scores without the named frames (those a
fine-tuning trained on or was judged on, for instance).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from emparticles.agglomerates import agglomerate_labels
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.pipeline import drop_wrong_contrast, locate_infobar, segment_micrograph

SET = Path(__file__).resolve().parents[2] / "shared" / "data" / "sem-agglomerates"


def count_large(labels: np.ndarray, min_area: int) -> int:
    """Agglomerates (8-connected groups of foreground) of at least ``min_area`` pixels."""
    merged, _ = agglomerate_labels(labels)
    areas = np.bincount(merged.ravel())[1:]
    return int((areas >= min_area).sum())


def main() -> None:
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from all_sets import set_pairs

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--min-area", type=int, default=100)
    parser.add_argument("--part", default="all", choices=["test", "validation", "all"])
    parser.add_argument("--split", type=Path, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--particles", default="any", choices=["any", "bright", "dark"])
    parser.add_argument("--leave-out", default="", help="frames not to score, by stem, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    left_out = {s for s in args.leave_out.split(",") if s}
    pairs = [(i, m) for i, m in set_pairs(SET, "masks", args.part, args.split) if i.stem not in left_out]
    for name in args.models:
        model = load_model(name, "cpu")
        n_true = n_pred = inter = union = pred_fg = 0
        ratios = []
        print(f"model {name}, {len(pairs)} frames, agglomerates of {args.min_area} px or more")
        for image_path, mask_path in pairs:
            mg = locate_infobar(read_micrograph(image_path))
            inst, full = segment_micrograph(mg, model)
            _, full, _ = drop_wrong_contrast(inst, full, mg, args.particles)
            truth = read_labels(mask_path)[0]
            t = count_large(ndi.label(truth > 0, structure=np.ones((3, 3)))[0], args.min_area)
            p = count_large(full, args.min_area)
            ratios.append(p / t if t else np.nan)
            n_true, n_pred = n_true + t, n_pred + p
            fg_t, fg_p = truth > 0, full > 0
            inter += int((fg_t & fg_p).sum())
            union += int((fg_t | fg_p).sum())
            pred_fg += int(fg_p.sum())
            iou = (fg_t & fg_p).sum() / max(1, (fg_t | fg_p).sum())
            print(f"  {image_path.stem:14s} annotated {t:4d}  found {p:4d}  ratio {ratios[-1]:.2f}  foreground IoU {iou:.3f}")
        r = np.array(ratios, float)
        within = np.mean((r >= 0.75) & (r <= 1.33))
        print(f"  pooled ratio {n_pred / max(n_true, 1):.2f}; frames within 0.75-1.33: {within:.0%}; "
              f"foreground IoU {inter / max(union, 1):.3f}; on bare substrate {(pred_fg - inter) / max(pred_fg, 1):.0%}")


if __name__ == "__main__":
    main()
