"""analyze serial against a local dask.distributed cluster: images per second and overhead.

    python benchmarks/bench_cluster.py [IMAGES...] [--workers 2] [--runs 3] [--model MODEL]

Without IMAGES it renders 12 synthetic 1024x768 SEM frames with an info bar (``emparticles
synth``; a stand-in for a microscope series). Each run is a fresh ``emparticles analyze`` process
(start-up, cluster start and model loading included, as a user meets them), serial first, then
with ``--workers N``; prints the median wall time of each, images per second, their ratio, the
cluster's overhead per image, and whether the two particle tables agree.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd


def analyze(images: list[str], out: Path, extra: list[str], model: str | None) -> float:
    shutil.rmtree(out, ignore_errors=True)
    cmd = [sys.executable, "-m", "emparticles.cli", "analyze", *images, "-o", str(out), "--no-report", *extra]
    if model:
        cmd += ["--model", model]
    t = time.perf_counter()
    subprocess.run(cmd, check=False, capture_output=True)
    return time.perf_counter() - t


def table(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "particles.csv").sort_values(["image", "label"]).reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("images", nargs="*")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    images = args.images
    if not images:
        from emparticles.io.datasets import write_synth_set

        write_synth_set(tmp / "synth", 12, seed=7)
        images = sorted(str(p) for p in (tmp / "synth" / "images").iterdir())
    serial, cluster = [], []
    for _ in range(args.runs):  # alternated, so that a slower stretch of the machine hits both
        serial.append(analyze(images, tmp / "serial", [], args.model))
        cluster.append(analyze(images, tmp / "cluster", ["--workers", str(args.workers)], args.model))
    s, c = statistics.median(serial), statistics.median(cluster)
    n = len(images)
    a, b = table(tmp / "serial"), table(tmp / "cluster")
    differing = [col for col in a.columns if not a[col].equals(b[col])] if len(a) == len(b) else ["(row count)"]
    print(f"{n} images, {args.runs} runs each (median wall time of a fresh process)")
    print(f"  serial            {s:7.2f} s  {n / s:5.2f} images/s")
    print(f"  --workers {args.workers:<6d}  {c:7.2f} s  {n / c:5.2f} images/s  (ratio to serial {c / s:.2f})")
    print(f"  each run: serial {', '.join(f'{v:.1f}' for v in serial)} s; --workers {args.workers} "
          f"{', '.join(f'{v:.1f}' for v in cluster)} s")
    print(f"  cluster overhead  {(c - s / args.workers) / n:+.2f} s per image beyond an ideal {args.workers}-way split")
    print(f"  particles.csv: {len(a)} rows; columns differing: {', '.join(differing) or 'none'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
