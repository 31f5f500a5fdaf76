"""Grey-value normalisation shared by every segmentation model."""

from __future__ import annotations

import numpy as np


def normalise(pixels: np.ndarray, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """Robust per-image normalisation to float32 in [0, 1].

    The ``low``/``high`` percentiles map to 0 and 1 (values beyond are clipped), so hot pixels
    and saturated text do not squash the contrast. A uniform image maps to zeros.
    """
    a = np.asarray(pixels, dtype=np.float32)
    lo, hi = np.percentile(a, (low, high))
    if hi <= lo:
        lo, hi = float(a.min()), float(a.max())
    if hi <= lo:
        return np.zeros(a.shape, np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
