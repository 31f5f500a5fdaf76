"""Speed of the per-particle measurements against scikit-image's regionprops_table.

Draws ~15,000 separated particles (ellipses and polygons, 2-8 px across) on a 1280x960 label image,
measures all features with emparticles (median of several runs after one warm-up that compiles the
kernels) and with ``skimage.measure.regionprops_table`` asked for the comparable properties, and
prints both timings and their ratio.

    python benchmarks/bench_measure.py [--runs 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from skimage.draw import ellipse
from skimage.measure import regionprops_table

from emparticles.measure import measure_labels


def make_labels(height: int = 960, width: int = 1280, cell: int = 9, seed: int = 0) -> np.ndarray:
    """One random ellipse per cell of a grid: (H, W) int32 with ~H*W/cell^2 particles."""
    rng = np.random.default_rng(seed)
    labels = np.zeros((height, width), np.int32)
    n = 0
    for cy in range(cell // 2, height - cell // 2, cell):
        for cx in range(cell // 2, width - cell // 2, cell):
            r1, r2 = rng.uniform(1.0, cell / 2 - 0.6, 2)
            rr, cc = ellipse(cy, cx, r1, r2, shape=labels.shape, rotation=rng.uniform(0, np.pi))
            if rr.size:
                n += 1
                labels[rr, cc] = n
    return labels


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--skimage-runs", type=int, default=3)
    args = parser.parse_args()
    labels = make_labels()
    grey = np.random.default_rng(1).integers(0, 255, labels.shape).astype(np.uint8)
    n = int(labels.max())
    measure_labels(labels, grey, 2.0)  # warm-up: compiles (or loads cached) kernels
    ours = []
    for _ in range(args.runs):
        t = time.perf_counter()
        table = measure_labels(labels, grey, 2.0)
        ours.append(time.perf_counter() - t)
    assert len(table) == n
    props = ("label", "area", "perimeter", "feret_diameter_max", "solidity", "axis_major_length",
             "axis_minor_length", "orientation", "centroid", "bbox", "intensity_mean")
    ref = []
    for _ in range(args.skimage_runs):
        t = time.perf_counter()
        regionprops_table(labels, intensity_image=grey, properties=props)
        ref.append(time.perf_counter() - t)
    med, med_ref = statistics.median(ours), statistics.median(ref)
    print(f"particles: {n} on {labels.shape[1]}x{labels.shape[0]}")
    print(f"emparticles.measure_labels: median {med * 1000:.1f} ms over {args.runs} runs (min {min(ours) * 1000:.1f} ms)")
    print(f"skimage regionprops_table : median {med_ref * 1000:.0f} ms over {args.skimage_runs} runs")
    print(f"speed-up: {med_ref / med:.1f}x")


if __name__ == "__main__":
    main()
