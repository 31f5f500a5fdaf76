"""How well tuned post-processing carries over to unseen images: two-fold cross-validation of
the threshold tuning on a run's validation images.

    python benchmarks/tuning_cv.py RUN_DIR [--model FOLDER]

Each half of RUN_DIR's validation images (split.json) is segmented with thresholds tuned on the
other half only (as training does: at scale 1, then at the scale each image chooses), and the
F1 at IoU 0.5 pooled over both halves is printed next to that of the model's own thresholds
(tuned on all of them) and of scale 1 without a search.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from emparticles.inference import predict_tiled
from emparticles.instances import DEFAULT_THRESHOLDS
from emparticles.models.cnn import CNNSegmenter
from emparticles.train.data import find_pairs, load_pair
from emparticles.train.loop import COUNT_RANGE, tune_thresholds, validate_segmenter

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"


def pooled(results: list[dict]) -> str:
    tp = sum(r["matched"] for r in results)
    nt = sum(r["true"] for r in results)
    npred = sum(r["predicted"] for r in results)
    return f"F1 {2 * tp / (nt + npred):.3f}  count ratio {npred / nt:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--model", type=Path, default=None, help="model folder (default RUN_DIR/best)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    folder = args.model or args.run / "best"
    names = sorted(json.loads((args.run / "split.json").read_text())["validation"])
    pairs = {i.stem: (i, m) for i, m in find_pairs(EMPS / "images", EMPS / "segmaps")}
    val = [load_pair(*pairs[n]) for n in names]
    seg = CNNSegmenter(folder, "cpu")
    own = dict(seg.thresholds)
    search = seg.config.get("scale_search")
    scale1 = [predict_tiled(seg.net, img, tile=int(seg.config.get("tile", 1024)), device=seg.device) for img, _ in val]
    crossed, shipped, single, searched1 = [], [], [], []
    for fold in (0, 1):
        tune_idx = [i for i in range(len(val)) if i % 2 != fold]
        test = [val[i] for i in range(len(val)) if i % 2 == fold]
        tune_set = [val[i] for i in tune_idx]
        t1, _ = tune_thresholds([scale1[i] for i in tune_idx], tune_set)
        seg.thresholds = {**DEFAULT_THRESHOLDS, **t1}
        seg.config["scale_search"] = None
        single.append(validate_segmenter(seg, test))
        seg.config["scale_search"] = search
        searched1.append(validate_segmenter(seg, test))
        t2, _ = tune_thresholds([seg.searched(img)[2].probabilities for img, _ in tune_set], tune_set, start=t1,
                                count_range=COUNT_RANGE)
        seg.thresholds = {**DEFAULT_THRESHOLDS, **t2}
        crossed.append(validate_segmenter(seg, test))
        seg.thresholds = own
        shipped.append(validate_segmenter(seg, test))
        print(f"fold {fold}: tuned on {len(tune_set)} images: {t2}", flush=True)
    print(f"{len(val)} validation images of {args.run}, model {folder}")
    print(f"  scale 1, thresholds tuned on the other half: {pooled(single)}")
    print(f"  scale search, thresholds tuned at scale 1 on the other half: {pooled(searched1)}")
    print(f"  scale search, thresholds tuned on the other half at the chosen scales: {pooled(crossed)}")
    print(f"  scale search, the model's own thresholds (tuned on all of them): {pooled(shipped)}")


if __name__ == "__main__":
    main()
