"""How much a model's post-processing and its choice of resampling matter on an annotated set.

    python benchmarks/threshold_sensitivity.py MODEL --images DIR --masks DIR [--scales 0.5 0.7 1 1.4]

Prints pooled F1 at IoU 0.5 and the count ratio with the model's thresholds and with one setting
changed at a time (seed threshold, minimum size, minimum relative area, foreground threshold);
where the folder above the images has a ``synth.json`` (``emparticles synth``), also the mean
F1 of its dense and sparse fields. Then, per image, the scale the resampling search chose and F1
with the number of particles at each fixed scale of ``--scales``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from emparticles.evaluate import matching
from emparticles.io import read_labels, read_micrograph
from emparticles.models import load_model
from emparticles.models.cnn import _instances_to_shape
from emparticles.pipeline import locate_infobar, segment_micrograph
from emparticles.preprocess import normalise
from emparticles.train.data import find_pairs

VARIANTS = {"model's own": {}, "seed 0.1": {"seed_threshold": 0.1}, "seed 0.35": {"seed_threshold": 0.35},
            "seed 0.5": {"seed_threshold": 0.5}, "min size 20 px": {"min_size_px": 20},
            "min relative area 0.05": {"min_relative_area": 0.05}, "foreground 0.3": {"foreground_threshold": 0.3}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--images", type=Path, required=True)
    parser.add_argument("--masks", type=Path, required=True)
    parser.add_argument("--scales", type=float, nargs="*", default=[0.5, 0.7, 1.0, 1.4])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    meta_path = args.images.parent / "synth.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    data = [(ip.stem, locate_infobar(read_micrograph(ip)), read_labels(mp)[0]) for ip, mp in find_pairs(args.images, args.masks)]
    model = load_model(args.model, "cpu")
    own = dict(model.thresholds)
    for name, change in VARIANTS.items():
        model.thresholds = {**own, **change}
        tp = n_true = n_pred = 0
        kinds: dict[bool, list[float]] = {True: [], False: []}
        for stem, mg, truth in data:
            m = matching(truth, segment_micrograph(mg, model)[1], 0.5)
            tp, n_true, n_pred = tp + m.tp, n_true + m.n_true, n_pred + m.n_pred
            if stem in meta:
                kinds[bool(meta[stem].get("dense"))].append(2 * m.tp / max(1, m.n_true + m.n_pred))
        by_kind = (f"; dense fields {np.mean(kinds[True]):.3f}, sparse {np.mean(kinds[False]):.3f}"
                   if kinds[True] and kinds[False] else "")
        print(f"{name:24s} F1 {2 * tp / max(1, n_true + n_pred):.3f}  count {n_pred / max(1, n_true):.2f}{by_kind}")
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
