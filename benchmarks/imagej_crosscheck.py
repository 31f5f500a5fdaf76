"""Cross-check emparticles' measurements against ImageJ's Analyze Particles on random shapes.

Needs ImageJ 1.53 (Debian: ``apt-get install imagej xvfb``). Draws ~2000 separated particles
(ellipses, rotated rectangles, polygons, disks with holes, rough blobs, 1.5-40 px), runs ImageJ
headless on the binary mask, matches particles by centroid and prints the largest relative error of
every feature and the acceptance counts (Feret/MinFeret 1%, perimeter/circularity/solidity 3%,
FeretAngle 2 degrees for aspect ratio > 1.5).

    python benchmarks/imagej_crosscheck.py [--ij /usr/share/java/ij.jar] [--keep DIR]
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import tifffile
from scipy import ndimage as ndi
from skimage.draw import disk, ellipse, polygon

from emparticles.measure import measure_labels

MACRO = """open("{binary}");
setThreshold(255, 255);
run("Set Measurements...", "area mean centroid perimeter bounding fit shape feret's redirect=None decimal=9");
run("Analyze Particles...", "size=0-Infinity display clear");
saveAs("Results", "{csv}");
"""


def random_shapes(height=960, width=1280, tries=6000, seed=7) -> np.ndarray:
    """(H, W) int32 labels of separated, single-component particles of many shapes."""
    rng = np.random.default_rng(seed)
    lab = np.zeros((height, width), np.int32)
    occupied = np.zeros((height, width), bool)
    n = 0
    for _ in range(tries):
        kind = rng.integers(0, 5)
        size = float(np.exp(rng.uniform(np.log(1.5), np.log(40))))
        cy, cx = rng.uniform(size + 3, height - size - 3), rng.uniform(size + 3, width - size - 3)
        m = np.zeros((height, width), bool)
        if kind == 0:
            rr, cc = ellipse(cy, cx, size, size * rng.uniform(0.2, 1), shape=m.shape, rotation=rng.uniform(0, np.pi))
            m[rr, cc] = True
        elif kind == 1:
            a, w_, h_ = rng.uniform(0, np.pi), size, size * rng.uniform(0.15, 1)
            pts = np.array([[-w_, -h_], [w_, -h_], [w_, h_], [-w_, h_]]) @ np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]])
            rr, cc = polygon(cy + pts[:, 1], cx + pts[:, 0], shape=m.shape)
            m[rr, cc] = True
        elif kind == 2:
            k = rng.integers(5, 12)
            ang, r = np.sort(rng.uniform(0, 2 * np.pi, k)), size * rng.uniform(0.4, 1, k)
            rr, cc = polygon(cy + r * np.sin(ang), cx + r * np.cos(ang), shape=m.shape)
            m[rr, cc] = True
        elif kind == 3:
            rr, cc = disk((cy, cx), size, shape=m.shape)
            m[rr, cc] = True
            if size > 6:
                rr, cc = disk((cy + rng.uniform(-2, 2), cx + rng.uniform(-2, 2)), size * 0.4, shape=m.shape)
                m[rr, cc] = False
        else:
            rr, cc = disk((cy, cx), size, shape=m.shape)
            m[rr, cc] = True
            noise = ndi.gaussian_filter(rng.normal(size=(int(2 * size) + 7, int(2 * size) + 7)), 1.5)
            y0, x0 = int(cy - size) - 3, int(cx - size) - 3
            sub = m[y0 : y0 + noise.shape[0], x0 : x0 + noise.shape[1]]
            sub &= noise[: sub.shape[0], : sub.shape[1]] > -0.15
        comp, nc = ndi.label(m, structure=np.ones((3, 3)))
        if nc == 0:
            continue
        if nc > 1:
            m = comp == 1 + int(np.argmax(ndi.sum(m, comp, range(1, nc + 1))))
        if (ndi.binary_dilation(m, np.ones((5, 5), bool)) & occupied).any():
            continue
        n += 1
        lab[m] = n
        occupied |= m
    return lab


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ij", default="/usr/share/java/ij.jar")
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the images and ImageJ's table in")
    args = parser.parse_args()
    work = Path(args.keep or tempfile.mkdtemp())
    work.mkdir(parents=True, exist_ok=True)
    labels = random_shapes()
    tifffile.imwrite(work / "binary.tif", ((labels > 0) * 255).astype(np.uint8))
    (work / "measure.ijm").write_text(MACRO.format(binary=work / "binary.tif", csv=work / "imagej.csv"))
    cmd = ["java", "-jar", args.ij, "-batch", str(work / "measure.ijm")]
    if shutil.which("xvfb-run"):
        cmd = ["xvfb-run", "-a", *cmd]
    subprocess.run(cmd, check=True, capture_output=True)
    ij = pd.read_csv(work / "imagej.csv")
    ours = measure_labels(labels)
    ij["key"] = np.round(ij["X"], 6) * 1e4 + np.round(ij["Y"], 6)
    ours["key"] = np.round(ours["centroid_x_px"], 6) * 1e4 + np.round(ours["centroid_y_px"], 6)
    m = ij.merge(ours, on="key", how="inner")
    print(f"particles: ImageJ {len(ij)}, emparticles {len(ours)}, matched {len(m)}")
    print(f"area identical: {bool((m['Area'] == m['area_px']).all())}")
    for ij_col, col, tol in [("Perim.", "perimeter_px", 0.03), ("Feret", "feret_max_px", 0.01),
                             ("MinFeret", "feret_min_px", 0.01), ("Circ.", "circularity", 0.03),
                             ("Solidity", "solidity", 0.03), ("Major", "major_px", 0.01),
                             ("Minor", "minor_px", 0.01), ("AR", "aspect_ratio", 0.01), ("Round", "roundness", 0.01)]:
        rel = np.abs(m[col] - m[ij_col]) / np.abs(m[ij_col])
        print(f"{ij_col:9s} max relative error {rel.max():.1e}; beyond {tol:.0%}: {int((rel > tol).sum())}")
    d = np.abs(m["feret_angle_deg"] - m["FeretAngle"])
    d = np.minimum(d, 180 - d)
    elongated = m["AR"] > 1.5
    print(f"FeretAngle max difference (AR > 1.5): {d[elongated].max():.1e} deg; beyond 2 deg: {int((d[elongated] > 2).sum())}")


if __name__ == "__main__":
    main()
