"""Finding the microscope's data bar (text, scale bar, logo) at the bottom of SEM images.

Zeiss, FEI/Thermo, JEOL and Hitachi instruments append a band under the scanned frame. Its top is a
sharp, full-width horizontal edge, and the band itself is made of a few flat grey levels (background
plus text and lines), unlike the noisy micrograph above it. :func:`detect_infobar` looks for the
highest such edge in the bottom part of the image below which the rows are flat in that sense.
"""

from __future__ import annotations

import cv2
import numpy as np

from ..preprocess import percentiles

#: The bar is never taller than this fraction of the image.
MAX_BAR_FRACTION = 0.35
#: Fraction of columns that must change sharply across the bar's top edge.
EDGE_COLUMNS = 0.75
#: Fraction of the band's pixels that its two commonest grey levels must cover.
FLATNESS = 0.6


def _to_levels(pixels: np.ndarray) -> np.ndarray:
    """Quantise any dtype to 0..255 over its 0.1-99.9 percentile range (a band of rows at a
    time: a float32 copy of a 12,000 x 12,000 frame would be 576 MB)."""
    lo, hi = percentiles(pixels, (0.1, 99.9))
    if hi <= lo:
        lo, hi = float(pixels.min()), float(pixels.max())
    if hi <= lo:
        return np.zeros(pixels.shape, np.uint8)
    out = np.empty(pixels.shape, np.uint8)
    for y in range(0, pixels.shape[0], 1024):
        band = pixels[y:y + 1024].astype(np.float32)
        out[y:y + 1024] = np.clip((band - lo) * (255.0 / (hi - lo)), 0, 255)
    return out


def _within(levels: np.ndarray, level: int, tolerance: int) -> np.ndarray:
    """``|levels - level| <= tolerance`` of 8-bit levels, without a 16-bit copy."""
    return (levels >= max(0, level - tolerance)) & (levels <= min(255, level + tolerance))


def _flatness(levels: np.ndarray) -> float:
    """Fraction of pixels taken by the two commonest grey levels (+-2 levels each)."""
    hist = np.bincount(levels.ravel(), minlength=256).astype(np.int64)
    smooth = np.convolve(hist, np.ones(5, np.int64), mode="same")
    first = int(np.argmax(smooth))
    rest = smooth.copy()
    rest[max(0, first - 4) : first + 5] = 0
    second = int(np.argmax(rest))
    return float(smooth[first] + rest[second]) / max(levels.size, 1)


def detect_infobar(pixels: np.ndarray) -> int:
    """Number of rows at the bottom of ``pixels`` (H, W) that belong to a data bar (0 if none)."""
    h, w = pixels.shape
    if h < 64 or w < 64:
        return 0
    levels = _to_levels(pixels)
    start = int(h * (1.0 - MAX_BAR_FRACTION))
    # Fraction of columns whose grey level jumps by more than a quarter of the range between rows
    # (|a - b| of 8-bit levels, without widening a third of the frame to 16 bits).
    jumps = cv2.absdiff(levels[start:], levels[start - 1 : -1]) > 64
    edge_fraction = jumps.mean(axis=1)
    candidates = np.nonzero(edge_fraction >= EDGE_COLUMNS)[0] + start
    min_rows = max(6, int(0.02 * h))
    for y in candidates:  # highest first
        if h - y < min_rows:
            break
        band = levels[y:]
        if _flatness(band) < FLATNESS:
            continue
        # The band must differ from the image: the image just above is not equally flat.
        above = levels[max(0, y - (h - y)) : y]
        if above.size and _flatness(above) >= 0.95 and _flatness(band) < 0.95:
            continue
        return int(h - y)
    return (_uniform_band(levels, start, min_rows) or _straight_edge_band(levels, jumps, start, min_rows)
            or _two_level_rows(levels, start, min_rows))


def _uniform_band(levels: np.ndarray, start: int, min_rows: int) -> int:
    """Second test, for bars that are not much darker or brighter than the image (a black bar
    under a dark SEM substrate): the bottom rows are mostly one exact grey level (the bar's
    background, text aside), and the rows just above the run are not."""
    h = levels.shape[0]
    bottom = levels[-min_rows:]
    level = int(np.argmax(np.bincount(bottom.ravel(), minlength=256)))
    near = _within(levels[start:], level, 2).mean(axis=1)
    bar_like = near >= 0.5
    if not bar_like[-1]:
        return 0
    run = int(np.argmin(bar_like[::-1])) if not bar_like.all() else bar_like.size
    top = h - run
    if run < min_rows or top <= start:
        return 0
    above = near[top - start - min(5, top - start) : top - start]
    if above.size == 0 or above.max() >= 0.3 or _flatness(levels[top:]) < FLATNESS:
        return 0
    return run


def fei_infobar_rows(metadata: dict, height: int) -> int | None:
    """FEI/Thermo files state the scanned frame height ([Image] ResolutionY); the rest is the bar."""
    image = metadata.get("Image") if isinstance(metadata, dict) else None
    try:
        frame = int(image["ResolutionY"])  # type: ignore[index]
    except (TypeError, KeyError, ValueError):
        return None
    if 0 < frame < height and height - frame <= MAX_BAR_FRACTION * height:
        return height - frame
    return None


def _straight_edge_band(levels: np.ndarray, jumps: np.ndarray, start: int, min_rows: int) -> int:
    """Third test, for a black bar with white text under a frame with a dark substrate (Zeiss
    SmartSEM's data bar under particles on carbon tape): where the frame is dark, nothing jumps
    at the bar's top, so fewer columns than :data:`EDGE_COLUMNS` do, and the dark substrate
    above (clipped to black, often) shares the bar's level. But every column that does jump,
    jumps on the same row, many times more of them than on the rows around it; below that row,
    most pixels of every row take one exact grey level (the bar's background) and the band has
    two levels (text and background), where the frame above has particles in many greys."""
    h = levels.shape[0]
    fraction = jumps.mean(axis=1)
    for k in np.nonzero(fraction >= 0.1)[0]:
        y = int(k) + start
        if h - y < min_rows:
            break
        around = np.r_[fraction[max(0, k - 4):k], fraction[k + 1:k + 3]]
        if around.size and fraction[k] < 8 * max(float(around.max()), 0.005):
            continue
        band = levels[y:]
        level = int(np.argmax(np.bincount(band.ravel(), minlength=256)))
        near = _within(band, level, 1)
        if near.mean() < 0.6 or near.mean(axis=1).min() < 0.3 or _flatness(band) < 0.85:
            continue
        # the frame above is not two-level: particles come in many greys, even on a substrate
        # clipped to black
        above = levels[max(0, y - (h - y)):y]
        if above.size and _flatness(above) > _flatness(band) - 0.1:
            continue
        return int(h - y)
    return 0


def _two_level_rows(levels: np.ndarray, start: int, min_rows: int) -> int:
    """Fourth test, for a black-and-white bar whose top no edge reveals (a black bar under a
    frame whose substrate is black along the bar): the bar's rows hold nothing but its two levels
    (background and text, exactly), while a micrograph's rows, even on a black substrate, hold
    particles in other greys or noise. The run of such rows from the bottom is the bar."""
    h = levels.shape[0]
    bottom = levels[-min_rows:]
    hist = np.bincount(bottom.ravel(), minlength=256)
    first = int(np.argmax(hist))
    rest = hist.copy()
    rest[max(0, first - 2):first + 3] = 0
    second = int(np.argmax(rest))
    lv = levels[start:]
    two = (_within(lv, first, 1) | _within(lv, second, 1)).mean(axis=1) >= 0.97
    if not two[-1]:
        return 0
    run = int(np.argmin(two[::-1])) if not two.all() else two.size
    top = h - run
    if run < min_rows or top <= start or abs(first - second) < 64:
        return 0
    return run
