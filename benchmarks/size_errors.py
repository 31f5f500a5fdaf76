"""Where a model's size error comes from: outlines, or particles it does not find.

    python benchmarks/size_errors.py [MODEL] [--split RUN/split.json] [--part validation test]
        [--outline 0.5 0.6 0.7 0.8]

For EMPS (by article) and the JEOL silica frames (by group), each image goes the road of
``emparticles segment`` (info bar found and left out) with the model's outlines left uncut;
they are then cut at each ``--outline`` threshold (the model's own is marked), without running
the network again. Per part and threshold it prints F1 at IoU 0.5, the count ratio, the D10,
D50 and D90 errors of the ECD, and the median ratio of predicted to true ECD over matched
particles (above 1: outlines too wide). Then the unmatched true particles at the model's own
threshold: with no foreground (the network does not see them), with foreground but no particle
(the post-processing dropped them), or merged into a neighbour; each with its median area
relative to its image's median, and how many touch the image border.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np
import torch
from all_sets import SETS, set_pairs  # the benchmarks folder is the script's own
from scipy import ndimage as ndi

from emparticles.evaluate import label_size_agreement, matching, overlaps
from emparticles.instances import trim_outlines
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.pipeline import locate_infobar


def matched_ecd_ratios(truth: np.ndarray, pred: np.ndarray) -> list[float]:
    """Predicted / true ECD of every pair matched at IoU > 0.5."""
    ov = overlaps(truth, pred)
    at = np.bincount(truth.ravel(), minlength=ov.shape[0])
    ap = np.bincount(pred.ravel(), minlength=ov.shape[1])
    inter = ov[1:, 1:]
    if not inter.size:
        return []
    iou = inter / np.maximum(at[1:, None] + ap[None, 1:] - inter, 1)
    i, j = np.nonzero(iou > 0.5)
    return list(np.sqrt(ap[1:][j] / at[1:][i]))


def unmatched_kinds(truth: np.ndarray, pred: np.ndarray, foreground: np.ndarray) -> list[tuple[str, float, bool]]:
    """(kind, area / the image's median true area, touches the border) of every true particle
    without a match: ``no foreground`` (mean probability under 0.5), ``dropped`` (foreground, but
    not covered by predicted particles) or ``merged`` (covered, but by a particle that is not its match)."""
    ov = overlaps(truth, pred)
    at = np.bincount(truth.ravel(), minlength=ov.shape[0])
    ap = np.bincount(pred.ravel(), minlength=ov.shape[1])
    present = np.flatnonzero(at[1:]) + 1
    if not present.size:
        return []
    inter = ov[1:, 1:]
    best = (inter / np.maximum(at[1:, None] + ap[None, 1:] - inter, 1)).max(1) if inter.size else np.zeros(len(at) - 1)
    covered = inter.sum(1) / np.maximum(at[1:], 1) if inter.size else np.zeros(len(at) - 1)
    with np.errstate(invalid="ignore", divide="ignore"):  # labels missing from 1..N
        mean_fg = ndi.mean(foreground, truth, index=np.arange(1, len(at)))
    border = set(np.unique(np.concatenate([truth[0], truth[-1], truth[:, 0], truth[:, -1]])).tolist())
    median = float(np.median(at[present]))
    out = []
    for lab in present:
        k = lab - 1
        if best[k] > 0.5:
            continue
        kind = "merged" if covered[k] > 0.5 else ("dropped" if mean_fg[k] > 0.5 else "no foreground")
        out.append((kind, float(at[lab]) / median, lab in border))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="default: the default model")
    parser.add_argument("--split", type=Path, default=None, help="split.json of a training run")
    parser.add_argument("--part", nargs="+", default=["validation", "test"])
    parser.add_argument("--outline", type=float, nargs="+", default=[0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, "cpu")
    own = model.thresholds.pop("outline_threshold", None)  # outlines cut below, at each threshold
    thresholds = sorted(set(args.outline) | ({float(own)} if own is not None else set()))
    for name, folder, masks, kind in SETS:
        if kind != "instances":
            continue
        for part in args.part:
            saved = []
            for image_path, mask_path in set_pairs(folder, masks, part, args.split):
                field = locate_infobar(read_micrograph(image_path)).analysed_pixels
                inst, prob = model.segment(field)
                saved.append((inst, prob.foreground, read_labels(mask_path)[0][: field.shape[0]]))
            print(f"{name}, {part} part: {len(saved)} images")
            for t in thresholds:
                truths, preds, ratios = [], [], []
                for inst, fg, truth in saved:
                    labels = trim_outlines(inst, fg, t).labels
                    truths.append(truth)
                    preds.append(labels)
                    ratios += matched_ecd_ratios(truth, labels)
                m = [matching(a, b) for a, b in zip(truths, preds)]
                tp, fp, fn = sum(x.tp for x in m), sum(x.fp for x in m), sum(x.fn for x in m)
                sa = label_size_agreement(truths, preds)
                mark = " (the model's)" if own is not None and t == float(own) else ""
                print(f"  outline {t:.2f}{mark}: F1 {2 * tp / max(2 * tp + fp + fn, 1):.3f}, count {sa['count_ratio']:.2f}, "
                      f"D10 {sa['d10_rel_error']:+.1%}, D50 {sa['d50_rel_error']:+.1%}, D90 {sa['d90_rel_error']:+.1%}, "
                      f"matched ECD predicted/true {statistics.median(ratios) if ratios else float('nan'):.3f}")
            t = float(own) if own is not None else thresholds[0]
            kinds: dict[str, list[tuple[float, bool]]] = {}
            for inst, fg, truth in saved:
                for k, rel, edge in unmatched_kinds(truth, trim_outlines(inst, fg, t).labels, fg):
                    kinds.setdefault(k, []).append((rel, edge))
            for k in ("no foreground", "dropped", "merged"):
                v = kinds.get(k, [])
                if v:
                    print(f"  unmatched, {k}: {len(v)}, median area {statistics.median(r for r, _ in v):.2f} of the "
                          f"image's median, {sum(e for _, e in v)} at the border")


if __name__ == "__main__":
    main()
