"""Peak memory of ``emparticles analyze`` on one large frame.

    python benchmarks/bench_memory.py [--size 12000] [--model MODEL]

Builds a SIZE x SIZE 8-bit frame by tiling a synthetic SEM image (``emparticles synth``; particles
everywhere, as in a montage or a large-field scan), runs ``emparticles analyze`` on it in a fresh
process under ``/usr/bin/time -v`` and prints the peak resident memory, the wall time and the
particle count, with the same figures for a 1280 x 960 frame as the reference in the same run.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image


def run(image: Path, out: Path, model: str | None) -> tuple[float, float, int]:
    """(peak RSS in GB, wall seconds, particles) of one analyze run."""
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "emparticles.cli", "analyze", str(image), "-o", str(out),
           "--no-report", "--pixel-size", "2nm", "--scale-bar", "off"]
    if model:
        cmd += ["--model", model]
    t = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or not peak:
        raise SystemExit(f"analyze failed on {image}:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows = sum(1 for _ in (out / "particles.csv").open()) - 1
    return int(peak.group(1)) / 1024 ** 2, wall, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=12000)
    parser.add_argument("--model", default=None)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-memory-"))
    subprocess.run([sys.executable, "-m", "emparticles.cli", "synth", "-n", "1", "-o", str(tmp / "synth"),
                    "--seed", "5"], check=True, capture_output=True)
    src = next((tmp / "synth" / "images").iterdir())
    tile = np.asarray(Image.open(src).convert("L"))
    tile = tile[: int(tile.shape[0] * 0.85)]  # without its info bar, if it has one
    small = tmp / "small.png"
    Image.fromarray(np.tile(tile, (2, 2))[:960, :1280]).save(small)
    big = tmp / "big.png"
    reps = (-(-args.size // tile.shape[0]), -(-args.size // tile.shape[1]))
    Image.fromarray(np.tile(tile, reps)[: args.size, : args.size]).save(big)
    for name, image in (("1280 x 960", small), (f"{args.size} x {args.size}", big)):
        peak, wall, rows = run(image, tmp / f"out-{image.stem}", args.model)
        print(f"{name:>13}: peak {peak:5.2f} GB, {wall:6.1f} s, {rows} particles")


if __name__ == "__main__":
    main()
