"""What one training crop costs by its source (EMPS, extra, pasted agglomerates), and what
batch-building workers cost before their first batch, with the training images handed to them
as plain arrays or in shared memory (``emparticles.train.data.SharedPairs``), and with workers
kept for the whole run (``BatchWorkers``).

    python benchmarks/bench_batches.py [--extra-images DIR --extra-masks DIR] [--workers 2] [--runs 3]

Prints the median milliseconds of drawing and of augmenting one 320-px crop from each source,
the pickled size of the batch function (what each spawned worker receives at every
epoch), the seconds to pickle it, and the median seconds from the start of an epoch to its first
batch and to its last (``--steps`` batches of 16 crops of 320 px, as a GPU run draws them), with
the ratio of shared to plain in the same process.
"""

from __future__ import annotations

import argparse
import io
import statistics
import time
from functools import partial
from multiprocessing.reduction import ForkingPickler
from pathlib import Path

import numpy as np
import torch.multiprocessing  # noqa: F401  (registers the shared-memory reductions of tensors)

from emparticles.train.data import (
    BatchWorkers,
    PasteSource,
    SharedPairs,
    augmented_sample,
    augmenter,
    epoch_batches,
    find_pairs,
    load_pair,
    split_validation,
)
from emparticles.train.loop import TrainConfig, training_batch

EMPS = Path(__file__).resolve().parents[2] / "shared" / "data" / "emps-train"


def pickled(obj) -> tuple[int, float]:
    """(bytes, seconds) of pickling ``obj`` as a spawned worker receives it."""
    t = time.perf_counter()
    buf = io.BytesIO()
    ForkingPickler(buf, -1).dump(obj)
    return buf.tell(), time.perf_counter() - t


def crop_costs(sources: dict, aug, n: int = 40) -> None:
    """Print the median milliseconds of drawing one (image, labels) pair from each source and of
    augmenting it into a crop with its 3-class target."""
    for name, draw in sources.items():
        picks, augs = [], []
        for _ in range(n):
            t = time.perf_counter()
            img, lab = draw()
            t1 = time.perf_counter()
            augmented_sample(aug, img, lab, 2)
            picks.append(t1 - t)
            augs.append(time.perf_counter() - t1)
        print(f"crop from {name:8s}: draw {1e3 * statistics.median(picks):6.1f} ms, "
              f"augment {1e3 * statistics.median(augs):5.1f} ms")


def epoch_times(make, steps: int, workers: int, runs: int, pool: BatchWorkers | None = None) -> tuple[float, float]:
    """Median (seconds to the first batch, seconds to the last) of ``runs`` epochs, from workers
    started for each epoch or, with ``pool``, from the run's persistent workers (its first epoch,
    which starts them, left out)."""
    first, total = [], []
    if pool is not None:
        for _ in pool.epoch(0):
            pass
    for run in range(1, runs + 1) if pool is not None else range(runs):
        t = time.perf_counter()
        source = pool.epoch(run) if pool is not None else epoch_batches(make, steps, np.random.default_rng(run), 0,
                                                                          run, workers)
        for k, _ in enumerate(source):
            if k == 0:
                first.append(time.perf_counter() - t)
        total.append(time.perf_counter() - t)
    return statistics.median(first), statistics.median(total)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra-images", type=Path, default=None, help="e.g. a folder from 'emparticles synth'")
    parser.add_argument("--extra-masks", type=Path, default=None)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    train = [load_pair(i, m) for i, m in split_validation(find_pairs(EMPS / "images", EMPS / "segmaps"))[0]]
    extra = [load_pair(i, m) for i, m in find_pairs(args.extra_images, args.extra_masks)] if args.extra_images else []
    cfg = TrainConfig(batch_size=16, crop=320, scale_min=0.6, scale_max=1.8, extra_fraction=0.25, paste_fraction=0.1)
    aug, paste = augmenter(cfg.crop, (cfg.scale_min, cfg.scale_max)), PasteSource(train)
    rng = np.random.default_rng(0)
    sources = {"EMPS": lambda: train[rng.integers(len(train))],
               "pasted": lambda: paste.sample(rng, int(cfg.crop * cfg.scale_max))}
    if extra:
        sources["extra"] = lambda: extra[rng.integers(len(extra))]
    crop_costs(sources, aug)
    print(f"{len(train)} EMPS training images, {len(extra)} extra; {args.workers} workers, "
          f"{args.steps} batches of {cfg.batch_size} crops per epoch")
    results = {}
    for name, (t, e) in {"plain arrays": (train, extra),
                         "shared memory": (SharedPairs(train), SharedPairs(extra) if extra else [])}.items():
        make = partial(training_batch, aug=aug, cfg=cfg, train_data=t, extra_data=e, paste=paste, device="cpu")
        size, seconds = pickled(make)
        first, total = epoch_times(make, args.steps, args.workers, args.runs)
        results[name] = (first, total)
        print(f"{name:14s} pickled {size / 1e6:8.1f} MB in {seconds:5.2f} s; epoch: first batch {first:6.2f} s, "
              f"all {total:6.2f} s")
    first, total = epoch_times(make, args.steps, args.workers, args.runs, BatchWorkers(make, args.steps, 0, 0, args.workers))
    results["persistent"] = (first, total)
    print(f"{'persistent':14s} (shared memory, workers kept): epoch: first batch {first:6.2f} s, all {total:6.2f} s")
    (pf, pt), (sf, st), (kf, kt) = results["plain arrays"], results["shared memory"], results["persistent"]
    print(f"shared / plain: first batch {sf / pf:.2f}, epoch {st / pt:.2f}; "
          f"persistent / plain: first batch {kf / pf:.2f}, epoch {kt / pt:.2f}")


if __name__ == "__main__":
    main()
