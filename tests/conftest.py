"""Shared fixtures: small synthetic micrographs whose right answers are known."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from skimage.draw import disk

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
VENDOR = SHARED / "vendor-metadata"
EMPS = SHARED / "emps-train"


def disks_image(centres, radius=10, shape=(128, 160), dark=True, noise=4.0, seed=0):
    """Grey uint8 image of disks (dark on bright by default) and its true labels."""
    rng = np.random.default_rng(seed)
    labels = np.zeros(shape, np.int32)
    for i, (cy, cx) in enumerate(centres, start=1):
        rr, cc = disk((cy, cx), radius, shape=shape)
        labels[rr, cc] = i
    fg, bg = (60.0, 200.0) if dark else (200.0, 60.0)
    img = np.where(labels > 0, fg, bg) + rng.normal(0, noise, shape)
    return np.clip(img, 0, 255).astype(np.uint8), labels


GRID_CENTRES = [(24 + 40 * r, 24 + 40 * c) for r in range(3) for c in range(4)]


@pytest.fixture
def grid_image():
    """12 separated dark disks of radius 10 on a bright background, 128x176."""
    return disks_image(GRID_CENTRES, radius=10, shape=(128, 176))


def need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


def write_disk_set(folder: Path, count: int, disks: int, radius: int, margin: int, shape=(96, 96)) -> tuple[Path, Path]:
    """A small annotated training set of random disk images: (folder/img, folder/mask)."""
    from PIL import Image

    img_dir, mask_dir = folder / "img", folder / "mask"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for k in range(count):
        centres = [(rng.uniform(margin, shape[0] - margin), rng.uniform(margin, shape[1] - margin)) for _ in range(disks)]
        img, lab = disks_image(centres, radius=radius, shape=shape, seed=k)
        Image.fromarray(img).save(img_dir / f"s{k}.png")
        Image.fromarray(lab.astype(np.uint16)).save(mask_dir / f"s{k}.png")
    return img_dir, mask_dir
