"""Training targets from instance masks: background / particle / particle border."""

from __future__ import annotations

import numpy as np
from scipy import ndimage as ndi

BACKGROUND, PARTICLE, BORDER = 0, 1, 2
#: Target of pixels known to be particle or border but not which (agglomerate-level masks, labels < 0)
FOREGROUND_ONLY = 3


def three_class_target(labels: np.ndarray, border_width: int = 2) -> np.ndarray:
    """(H, W) uint8 target from (H, W) instance labels.

    Border pixels are particle pixels within ``border_width`` pixels (chessboard distance) of a
    pixel that is not the same particle: the outline against background and, above all, the seam
    between touching particles, which is what lets the network separate them.

    Negative labels mark foreground whose particles are not separated (agglomerate masks): they
    become :data:`FOREGROUND_ONLY`.
    """
    lab = np.asarray(labels)
    target = np.where(lab > 0, PARTICLE, BACKGROUND).astype(np.uint8)
    target[lab < 0] = FOREGROUND_ONLY
    if border_width <= 0 or not (lab > 0).any():
        return target
    size = 2 * border_width + 1
    lo = ndi.minimum_filter(lab, size=size, mode="nearest")
    hi = ndi.maximum_filter(lab, size=size, mode="nearest")
    border = (lab > 0) & ((lo != lab) | (hi != lab))
    target[border] = BORDER
    return target


def distance_target(target: np.ndarray) -> np.ndarray:
    """(H, W) float32 in [0, 1]: each particle body's Euclidean distance to its own outline,
    divided by the largest in that body; 0 on background and border pixels.

    Made from a :func:`three_class_target`, whose border band already cuts touching particles
    apart, so each connected body is one particle. Normalised per particle, the map peaks at 1 in
    the middle of every particle whatever its size, and dips between touching ones where they
    meet: one threshold gives one seed per particle (the distance maps of StarDist and of
    Naylor et al. 2019 work the same way; HoVer-Net's horizontal and vertical maps likewise).
    """
    body = np.asarray(target) == PARTICLE
    out = np.zeros(body.shape, np.float32)
    comps, n = ndi.label(body)
    if n == 0:
        return out
    dist = ndi.distance_transform_edt(body)
    peak = np.zeros(n + 1)
    np.maximum.at(peak, comps.ravel(), dist.ravel())
    inside = comps > 0
    out[inside] = dist[inside] / peak[comps[inside]]
    return out


def class_weights(targets: list[np.ndarray], classes: int = 3, scheme: str = "border") -> np.ndarray:
    """(classes,) float32 cross-entropy weights against class imbalance, normalised to mean 1.

    ``"tempered"``: square root of the inverse frequency of every class. Background, the most
    frequent class, then weighs least, which pushes the network to over-predict particles.
    ``"border"``: background and particle weigh the same; only the rare border class is up-weighted
    by the tempered ratio of its frequency to theirs.
    """
    counts = np.zeros(classes)
    for t in targets:
        counts += np.bincount(t.ravel(), minlength=classes)[:classes]
    freq = np.maximum(counts / counts.sum(), 1e-6)
    if scheme == "tempered":
        w = np.sqrt(1.0 / freq)  # tempered: full inverse frequency over-predicts borders
    elif scheme == "border":
        w = np.ones(classes)
        # targets without a border (agglomerate-level masks alone) leave its weight at 1
        w[BORDER] = np.sqrt(freq[:BORDER].mean() / freq[BORDER]) if counts[BORDER] > 0 else 1.0
    else:
        raise ValueError(f"unknown class weighting {scheme!r}; use 'border' or 'tempered'")
    return (w / w.mean()).astype(np.float32)
