"""Scale-bar reading on every set with bars: how often it reads, how often it is right, how fast.

    python benchmarks/scale_bars.py [--emps N] [--runs 3]

For each image it runs what ``emparticles calibrate`` runs (read the file, find the info bar,
read the bar) and prints, per set:

- JEOL silica (``../shared/data/sem-silica/images.csv`` gives each frame's bar and pixel size):
  readings of high confidence, and those within 1% and beyond 3% of the true pixel size;
- the vendor files whose metadata holds a pixel size: the same against the metadata;
- EMPS figure crops (no pixel size known): high / low / none, so that a change that reads more
  bars shows here; whether those readings are right is checked by eye (``--sheet DIR`` draws each
  high reading's bar and label);
- the median seconds per image of the reading alone, over ``--runs`` runs, and its ratio to
  reading the file and finding the info bar (the rest of ``calibrate``'s work), in the same process.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import time
from collections import Counter
from pathlib import Path

import numpy as np

from emparticles.io.images import read_micrograph
from emparticles.io.scalebar import read_scale_bar
from emparticles.pipeline import locate_infobar

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def prepared(path: Path):
    return locate_infobar(read_micrograph(path))


def judge(readings: list[tuple[str, object, float | None]]) -> str:
    """'high h of n, within 1%: a, beyond 3%: b' for (name, reading, true pixel size) triples."""
    high = [(r, truth) for _, r, truth in readings if r.confidence == "high"]
    errors = [abs(r.pixel_size_nm / truth - 1) for r, truth in high if truth]
    return (f"high {len(high)} of {len(readings)}, within 1%: {sum(e <= 0.01 for e in errors)}, "
            f"beyond 3%: {sum(e > 0.03 for e in errors)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--emps", type=int, default=190, help="EMPS images, in name order")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--sheet", type=Path, default=None, help="draw the EMPS high readings here")
    args = parser.parse_args()

    silica = []
    for row in csv.DictReader((DATA / "sem-silica" / "images.csv").open()):
        mg = prepared(DATA / "sem-silica" / "images" / f"{row['image']}.png")
        silica.append((row["image"], read_scale_bar(mg.pixels, mg.infobar_rows), float(row["pixel_size_nm"])))
    print(f"JEOL silica, {len(silica)} frames: {judge(silica)}")

    vendor = []
    for path in sorted((DATA / "vendor-metadata").iterdir()):
        if path.suffix.lower() not in (".tif", ".tiff", ".dm3", ".dm4"):
            continue
        try:
            mg = prepared(path)
        except Exception as exc:  # noqa: BLE001 - one unreadable file is reported, not fatal
            print(f"  {path.name}: not read ({exc})")
            continue
        if mg.pixel_size_nm:
            vendor.append((path.name, read_scale_bar(mg.pixels, mg.infobar_rows), mg.pixel_size_nm))
    print(f"vendor files with a pixel size in their metadata, {len(vendor)}: {judge(vendor)}")
    for name, r, truth in vendor:
        if r.confidence:
            agree = f"{100 * (r.pixel_size_nm / truth - 1):+.2f}%" if r.pixel_size_nm else r.reason
            print(f"  {name}: {r.confidence} '{r.text}' over {r.bar_px} px, {agree}")

    paths = sorted((DATA / "emps-train" / "images").iterdir())[: args.emps]
    emps = [prepared(p) for p in paths]
    counts = Counter(read_scale_bar(mg.pixels, mg.infobar_rows).confidence or "none" for mg in emps)
    print(f"EMPS figure crops, first {len(emps)}: high {counts['high']}, low {counts['low']}, none {counts['none']}")

    reading, preparing = [], []
    for _ in range(args.runs):
        t = time.perf_counter()
        for mg in emps:
            read_scale_bar(mg.pixels, mg.infobar_rows)
        reading.append((time.perf_counter() - t) / len(emps))
        t = time.perf_counter()
        for p in paths:
            prepared(p)
        preparing.append((time.perf_counter() - t) / len(paths))
    r, p = statistics.median(reading), statistics.median(preparing)
    print(f"seconds per EMPS image (median of {args.runs} runs): reading the bar {r:.3f}, reading the file and "
          f"finding the info bar {p:.3f} (ratio {r / p:.1f})")

    if args.sheet:
        from PIL import Image, ImageDraw

        args.sheet.mkdir(parents=True, exist_ok=True)
        for path, mg in zip(paths, emps):
            rd = read_scale_bar(mg.pixels, mg.infobar_rows)
            if rd.confidence != "high":
                continue
            a = np.asarray(mg.pixels, np.float32)
            a = ((a - a.min()) / max(float(a.max() - a.min()), 1e-9) * 255).astype(np.uint8)
            im = Image.fromarray(a).convert("RGB")
            d = ImageDraw.Draw(im)
            x0, _, x1, y1 = rd.box
            d.line([(x0, y1 + 2), (x1, y1 + 2)], fill=(255, 0, 0), width=2)
            d.rectangle(list(rd.label_box), outline=(0, 255, 0))
            d.text((4, 4), f"{rd.text} over {rd.bar_px} px", fill=(255, 0, 0))
            im.save(args.sheet / f"{path.stem}.png")


if __name__ == "__main__":
    main()
