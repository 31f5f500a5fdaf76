"""Tune the post-processing of a trained run's best model again on its validation images.

    python benchmarks/retune.py RUN_DIR [--images DIR --masks DIR]

Reads RUN_DIR/split.json (written by training) and RUN_DIR/best, takes the validation images of
the main set and of every other instance set the run trained on (as training does), searches the
settings of
``emparticles.train.loop.TUNING_GRID`` for the best F1 at IoU 0.5 pooled over their particles
(``--balanced``: the mean of the sets' F1) (at scale 1, then at
the scale each image chooses), then the outline threshold (``OUTLINE_GRID``, for panoptic
quality plus foreground IoU), and rewrites RUN_DIR/best/thresholds.json and the validation
figures in RUN_DIR/best/config.json. A model trained without a resampling search gets the
standard one (``SCALE_SEARCH``) unless ``--no-scale-search``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from emparticles.inference import pick_device
from emparticles.train.data import find_pairs, load_pair
from emparticles.train.loop import SCALE_SEARCH, TrainConfig, finalise

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path)
    parser.add_argument("--images", type=Path, default=EMPS / "images")
    parser.add_argument("--masks", type=Path, default=EMPS / "segmaps")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--no-scale-search", action="store_true", help="tune for segmentation at scale 1 only")
    parser.add_argument("--balanced", action="store_true",
                        help="weigh every set the same (the mean of their F1) instead of pooling their particles "
                             "(a set of dense frames then outweighs the rest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    split = json.loads((args.run / "split.json").read_text())
    names = set(split["validation"])
    val = [load_pair(i, m) for i, m in find_pairs(args.images, args.masks) if i.stem in names]
    groups = [args.images.parent.name] * len(val)
    config = json.loads((args.run / "best" / "config.json").read_text())
    # the validation images of the other instance sets the run trained on, as training tunes on them
    for real in config["train_config"].get("real_sets", []):
        part = split.get(Path(real["images"]).parent.name, {})
        if real.get("kind") == "instances" and part.get("validation"):
            wanted = set(part["validation"])
            more = [load_pair(i, m) for i, m in find_pairs(Path(real["images"]), Path(real["masks"])) if i.stem in wanted]
            val += more
            groups += [Path(real["images"]).parent.name] * len(more)
    if args.no_scale_search:
        config.pop("scale_search", None)
    else:
        config.setdefault("scale_search", SCALE_SEARCH)
    (args.run / "best" / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    cfg = TrainConfig(**{k: v for k, v in config["train_config"].items() if k in TrainConfig.__dataclass_fields__})
    finalise(args.run, cfg, val, pick_device("cpu"), log=print, groups=groups if args.balanced else None)
    print((args.run / "best" / "thresholds.json").read_text())


if __name__ == "__main__":
    main()
