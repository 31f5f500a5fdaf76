"""Compiled seeded watershed, raster relabelling and per-label sums for the instance separation.

Written with numba rather than calling scikit-image's ``watershed`` because its priority queue is a
binary heap over float values (O(n log n)): on a 0.37 MP probability map it takes ~75 ms, most of
the instance separation and a fifth of ``emparticles segment`` with the scale search. The flood
here is the same algorithm (seed pixels queued at their own value in raster order, pixels labelled
when pushed, popped lowest value first and, among equal values, first in first out) over a bucket
queue of ``levels`` quantised values, which is O(n): ~10 ms for the same map. On values that lie
on the quantisation grid the labels are identical to scikit-image's (tested, ties included); on
float probability maps the quantisation to 1024 levels relabels under 0.1% of the pixels
(measured on EMPS maps; F1 and PQ on the EMPS validation images unchanged to three decimals).
"""

from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def _flood(levels, markers, mask, n_levels):
    h, w = markers.shape
    out = markers.copy()
    n = h * w
    nxt = np.full(n, -1, np.int64)
    head = np.full(n_levels, -1, np.int64)
    tail = np.full(n_levels, -1, np.int64)
    # Seed pixels enter the queue at their own level, in raster order (as scikit-image pushes them).
    cur = n_levels
    for p in range(n):
        if out.flat[p] != 0:
            lv = levels.flat[p]
            if tail[lv] == -1:
                head[lv] = p
            else:
                nxt[tail[lv]] = p
            tail[lv] = p
            if lv < cur:
                cur = lv
    while cur < n_levels:
        p = head[cur]
        if p == -1:
            cur += 1
            continue
        head[cur] = nxt[p]
        if head[cur] == -1:
            tail[cur] = -1
        y = p // w
        x = p - y * w
        lab = out[y, x]
        for k in range(4):  # the order of scikit-image's raveled offsets: up, left, right, down
            if k == 0:
                yy, xx = y - 1, x
            elif k == 1:
                yy, xx = y, x - 1
            elif k == 2:
                yy, xx = y, x + 1
            else:
                yy, xx = y + 1, x
            if yy < 0 or yy >= h or xx < 0 or xx >= w:
                continue
            if not mask[yy, xx] or out[yy, xx] != 0:
                continue
            out[yy, xx] = lab
            lv = levels[yy, xx]
            if lv < cur:  # a pixel's cost is at least that of the pixel it was reached from
                lv = cur
            q = yy * w + xx
            if tail[lv] == -1:
                head[lv] = q
            else:
                nxt[tail[lv]] = q
            tail[lv] = q
    return out


def seeded_watershed(image: np.ndarray, markers: np.ndarray, mask: np.ndarray, levels: int = 1024) -> np.ndarray:
    """Flood ``image`` (H, W) float, lowest first, from ``markers`` (H, W) int labels (0 = none)
    within ``mask`` (H, W) bool, 4-connected; returns (H, W) int32 labels (0 outside the flooded
    area). As ``skimage.segmentation.watershed(image, markers, mask=mask)`` with the image
    quantised to ``levels`` steps between its minimum and maximum inside the mask."""
    image = np.asarray(image, np.float32)
    mask = np.asarray(mask, bool)
    markers = np.where(mask, np.asarray(markers), 0).astype(np.int32)
    if not markers.any():
        return np.zeros(markers.shape, np.int32)
    inside = image[mask]
    lo, hi = float(inside.min()), float(inside.max())
    step = (hi - lo) / (levels - 1) if hi > lo else 1.0
    quantised = np.clip(np.rint((image - lo) / step), 0, levels - 1).astype(np.int32)
    return _flood(quantised, markers, mask, levels)


@nb.njit(cache=True, nogil=True)
def _relabel_raster(flat, keep):
    lut = np.zeros(keep.shape[0], np.int32)
    out = np.zeros(flat.shape[0], np.int32)
    n = 0
    for i in range(flat.shape[0]):
        v = flat[i]
        if v == 0 or not keep[v]:
            continue
        if lut[v] == 0:
            n += 1
            lut[v] = n
        out[i] = lut[v]
    return out, lut


@nb.njit(cache=True, nogil=True)
def _label_sums(flat, values, n):
    sums = np.zeros(n + 1, np.float64)
    counts = np.zeros(n + 1, np.int64)
    for i in range(flat.shape[0]):
        v = flat[i]
        sums[v] += values[i]
        counts[v] += 1
    return sums, counts


def label_sums(labels: np.ndarray, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per label 0..max of (H, W) non-negative integer ``labels``: the float64 sum of ``values``
    (H, W) over its pixels and its pixel count, in one pass (two ``np.bincount`` calls and a
    float64 copy of ``values`` took 16 ms at 1.1 MP, this 3 ms; the same sums, added in the same
    order)."""
    flat = np.ascontiguousarray(np.asarray(labels).ravel())
    if flat.size == 0:
        return np.zeros(1, np.float64), np.zeros(1, np.int64)
    return _label_sums(flat, np.ascontiguousarray(np.asarray(values).ravel()), int(flat.max()))


def relabel_raster(labels: np.ndarray) -> np.ndarray:
    """(H, W) non-negative integer labels renumbered 1..N in raster order of each particle's first
    pixel, as int32 (one pass, O(pixels + max label); ``relabel_consecutive`` sorts)."""
    return relabel_raster_lut(labels)[0]


def relabel_raster_lut(labels: np.ndarray, keep: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """:func:`relabel_raster` and its table: ``lut[old]`` is the new label of ``old`` (0 for
    labels absent from the image), (max label + 1,) int32. ``keep``: (N + 1,) bool, the labels
    to keep (the others become background in the same pass; labels over N are kept)."""
    labels = np.asarray(labels)
    if labels.size == 0:
        return np.zeros(labels.shape, np.int32), np.zeros(1, np.int32)
    flat = np.ascontiguousarray(labels.ravel()).astype(np.int64, copy=False)
    flags = np.ones(max(int(flat.max()), 0) + 1, bool)
    if keep is not None:
        n = min(len(keep), flags.size)
        flags[:n] = np.asarray(keep, bool)[:n]
    out, lut = _relabel_raster(flat, flags)
    return out.reshape(labels.shape), lut
