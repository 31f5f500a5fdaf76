"""How much a model's post-processing and its choice of resampling matter on an annotated set.

    python benchmarks/threshold_sensitivity.py MODEL [--images DIR --masks DIR] [--scales 0.5 0.7 1 1.4]

Without ``--images`` it uses the EMPS validation split (as ``bench_segment.py``).

Prints pooled F1 at IoU 0.5 and the count ratio with the model's thresholds and with one setting
changed at a time (seed threshold, minimum size, minimum relative area, foreground threshold),
with test-time flips (the mean of the four flipped predictions), with the image smoothed by a
1-px Gaussian first, and with neighbouring particles merged where the border probability along
the line between them averages below 0.75 or 0.85, or below 0.95 where the merged particle stays
convex (solidity >= 0.9) (remedies for particles cut along their texture, not part of the
pipeline); where the folder above the images has a ``synth.json`` (``emparticles synth``), also
the mean F1 of its dense fields, of its sparse fields, and of the fields with flat-faceted
crystals. Then, per image, the scale the resampling search chose and F1 with the number of
particles at each fixed scale of ``--scales``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage as ndi

from emparticles.evaluate import matching
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.models.cnn import _instances_to_shape
from emparticles.pipeline import locate_infobar, segment_micrograph
from emparticles.preprocess import normalise
from emparticles.train.data import find_pairs, split_validation

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"

VARIANTS = {"model's own": {}, "seed 0.1": {"seed_threshold": 0.1}, "seed 0.35": {"seed_threshold": 0.35},
            "seed 0.5": {"seed_threshold": 0.5}, "min size 20 px": {"min_size_px": 20},
            "min relative area 0.05": {"min_relative_area": 0.05}, "foreground 0.3": {"foreground_threshold": 0.3},
            "test-time flips": {}, "smoothed (Gaussian 1 px)": {}, "merge below 0.75": {}, "merge below 0.85": {},
            "merge below 0.95 if convex": {}}


def hull(points: np.ndarray) -> tuple[np.ndarray, float]:
    """Vertices (K, 2) and area (px²) of the convex hull of (N, 2) points."""
    from scipy.spatial import ConvexHull, QhullError

    try:
        h = ConvexHull(points)
    except QhullError:  # collinear points: a line of pixels has no area of its own
        return points, 1.0
    return points[h.vertices], float(h.volume)


def merge_weak_borders(labels: np.ndarray, border: np.ndarray, threshold: float, min_length: int = 3,
                       min_solidity: float | None = None) -> np.ndarray:
    """Merge touching particles of an (H, W) label image where the border probability (H, W),
    the larger of the two pixels on either side, averages below ``threshold`` along their shared
    line of at least ``min_length`` pixel pairs (4-neighbours); weakest lines first. With
    ``min_solidity``, only where the merged particle's area over its convex hull's (hull of the
    pixel squares) stays at least that: fragments of one convex particle, not two particles
    joined by a neck."""
    n = int(labels.max())
    sums: dict[tuple[int, int], list[float]] = {}
    for a, b, pa, pb in ((labels[:, :-1], labels[:, 1:], border[:, :-1], border[:, 1:]),
                         (labels[:-1], labels[1:], border[:-1], border[1:])):
        sel = (a != b) & (a > 0) & (b > 0)
        key = np.minimum(a[sel], b[sel]).astype(np.int64) * (n + 1) + np.maximum(a[sel], b[sel])
        keys, inverse = np.unique(key, return_inverse=True)
        total, count = np.bincount(inverse, np.maximum(pa[sel], pb[sel])), np.bincount(inverse)
        for k, t, c in zip(keys.tolist(), total, count):
            acc = sums.setdefault(divmod(k, n + 1), [0.0, 0])
            acc[0] += t
            acc[1] += int(c)
    parent = np.arange(n + 1)

    def root(x: int) -> int:
        while parent[x] != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    area = np.bincount(labels.ravel(), minlength=n + 1).astype(float)
    vertices: dict[int, np.ndarray] = {}
    if min_solidity is not None:
        corners = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])
        for i, box in enumerate(ndi.find_objects(labels), 1):
            if box is not None:
                yx = np.argwhere(labels[box] == i) + [box[0].start, box[1].start]
                vertices[i] = hull((yx[:, None, :] + corners).reshape(-1, 2))[0]
    for (a, b), (total, count) in sorted(sums.items(), key=lambda kv: kv[1][0] / kv[1][1]):
        if count >= min_length and total / count < threshold:
            ra, rb = root(a), root(b)
            if ra == rb:
                continue
            if min_solidity is not None:
                joined, hull_area = hull(np.concatenate([vertices[ra], vertices[rb]]))
                if (area[ra] + area[rb]) / hull_area < min_solidity:
                    continue
                vertices[min(ra, rb)] = joined
            area[min(ra, rb)] = area[ra] + area[rb]
            parent[max(ra, rb)] = min(ra, rb)
    return np.array([root(i) for i in range(n + 1)])[labels]


def segmented(model, mg, name: str) -> np.ndarray:
    """(H, W) labels of a micrograph (info bar rows 0) under one of the non-threshold variants."""
    if name.startswith("smoothed"):
        labels = model.segment_normalised(normalise(ndi.gaussian_filter(normalise(mg.analysed_pixels), 1.0)))[0].labels
    elif name.startswith("merge"):
        words = name.split()
        inst, prob = model.segment_normalised(normalise(mg.analysed_pixels))
        labels = merge_weak_borders(inst.labels, prob.channel("boundary"), float(words[2]),
                                    min_solidity=0.9 if words[-1] == "convex" else None)
    else:
        model.flips = name == "test-time flips"
        labels = segment_micrograph(mg, model)[1]
        model.flips = False
        return labels
    full = np.zeros(mg.shape, np.int32)
    full[: labels.shape[0]] = labels
    return full


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=Path, default=None, help="annotated images (default: EMPS validation)")
    parser.add_argument("--masks", type=Path, default=None)
    parser.add_argument("--scales", type=float, nargs="*", default=[0.5, 0.7, 1.0, 1.4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta = {}
    if args.images:
        pairs = find_pairs(args.images, args.masks)
        meta_path = args.images.parent / "synth.json"
        meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    else:
        pairs = split_validation(find_pairs(EMPS / "images", EMPS / "segmaps"))[1]
    data = [(ip.stem, locate_infobar(read_micrograph(ip)), read_labels(mp)[0]) for ip, mp in pairs]
    model = load_model(args.model, "cpu")
    own = dict(model.thresholds)
    for name, change in VARIANTS.items():
        model.thresholds = {**own, **change}
        tp = n_true = n_pred = 0
        kinds: dict[str, list[float]] = {"dense": [], "sparse": [], "flat-faceted": []}
        for stem, mg, truth in data:
            m = matching(truth, segmented(model, mg, name), 0.5)
            tp, n_true, n_pred = tp + m.tp, n_true + m.n_true, n_pred + m.n_pred
            if stem in meta:
                f1 = 2 * m.tp / max(1, m.n_true + m.n_pred)
                kinds["dense" if meta[stem].get("dense") else "sparse"].append(f1)
                if meta[stem].get("flat_facets"):
                    kinds["flat-faceted"].append(f1)
        by_kind = "".join(f"; {kind} {np.mean(v):.3f}" for kind, v in kinds.items() if v)
        print(f"{name:26s} F1 {2 * tp / max(1, n_true + n_pred):.3f}  count {n_pred / max(1, n_true):.2f}{by_kind}")
    model.thresholds = own
    for stem, mg, truth in data:
        img = normalise(mg.analysed_pixels)
        truth = truth[: img.shape[0]]
        chosen, _ = model.choose_scale(img)
        cells = []
        for scale in args.scales:
            inst = _instances_to_shape(model.at_scale(img, scale)[0], img.shape)
            m = matching(truth, inst.labels, 0.5)
            cells.append(f"{scale:g}: {2 * m.tp / max(1, m.n_true + m.n_pred):.2f} ({m.n_pred})")
        print(f"{stem} ({np.count_nonzero(np.unique(truth))} particles) chose {chosen:g}; " + ", ".join(cells))


if __name__ == "__main__":
    main()
