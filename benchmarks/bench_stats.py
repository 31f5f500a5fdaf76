"""Calibration of the statistics on simulations with known truth.

- Coverage of the 95% bootstrap interval of D50 over repeated log-normal draws (should be ~95%).
- Spatial classification rates on simulated fields: Poisson -> random, hard-core (random sequential
  inhibition) -> self-avoiding, Thomas cluster -> clustered.
- Clark-Evans (Donnelly) rejection rate on Poisson fields at alpha 0.05 (should be ~5%).

    python benchmarks/bench_stats.py [--draws 400] [--fields 200]
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np

from emparticles.stats import describe_sizes
from emparticles.stats.spatial import (
    clark_evans,
    nnd_test,
    simulate_hardcore,
    simulate_poisson,
    simulate_thomas,
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=400)
    parser.add_argument("--fields", type=int, default=200)
    args = parser.parse_args()

    t = time.perf_counter()
    for n in (50, 200, 1000):
        covered = 0
        for seed in range(args.draws):
            x = np.random.default_rng(10_000 + seed).lognormal(math.log(20.0), math.log(1.5), n)
            d = describe_sizes(x, n_boot=1000, seed=seed)
            covered += d.d50.low <= 20.0 <= d.d50.high
        print(f"D50 95% bootstrap CI coverage, n={n:5d}: {100 * covered / args.draws:.1f}% of {args.draws} draws")
    print(f"  ({time.perf_counter() - t:.0f} s)")

    w = h = 1000.0
    rates = {"Poisson -> random": 0, "hard-core -> self-avoiding": 0, "Thomas -> clustered": 0}
    ce_reject = 0
    for seed in range(args.fields):
        rng = np.random.default_rng(50_000 + seed)
        pois = simulate_poisson(150, w, h, rng)
        rates["Poisson -> random"] += nnd_test(pois, w, h, seed=seed).classification == "random"
        rates["hard-core -> self-avoiding"] += nnd_test(simulate_hardcore(150, w, h, 45.0, rng), w, h, seed=seed).classification == "self-avoiding"
        rates["Thomas -> clustered"] += nnd_test(simulate_thomas(15, 10, 25, w, h, rng), w, h, seed=seed).classification == "clustered"
        ce_reject += clark_evans(pois, w, h).p < 0.05
    for name, right in rates.items():
        print(f"spatial classification {name}: {100 * right / args.fields:.1f}% of {args.fields} fields")
    print(f"Clark-Evans (Donnelly) rejections on Poisson fields at alpha 0.05: {100 * ce_reject / args.fields:.1f}%")


if __name__ == "__main__":
    main()
