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
