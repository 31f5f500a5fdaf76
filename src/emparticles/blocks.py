"""Segmenting a large frame block by block, so that memory follows the block, not the frame.

A 12,000 x 12,000 montage segmented in one piece held its probability maps, the watershed's
work arrays and the outline cut for all 144 MP at once (9.4 GB at its peak). Here the frame is
cut into square blocks; each block is segmented with a halo of real context around it, and keeps
the particles whose centroid lies in the block itself. A particle that straddles two blocks is
thus taken whole from the window of the block that holds its centroid, and only once. The
network sees each pixel with at least ``halo_px`` of real neighbours, so only particles wider than
the halo can come out cut at a window's edge (their count is returned, for a warning).

The grey levels are normalised with the whole frame's limits, and a network's resampling scale
is chosen once (:meth:`~emparticles.models.cnn.CNNSegmenter.scale_for`), so that every block is seen
as the frame would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .instances import Instances
from .preprocess import normalisation_limits, normalise_between

#: Frames over this many pixels are segmented in blocks (a 4096 x 4096 frame still in one piece).
BLOCKS_ABOVE_PX = 4096 * 4096
#: Side of a block (pixels of the frame).
BLOCK_PX = 2048
#: Real context segmented around each block (pixels of the frame, at the network's scale 1).
HALO_PX = 192


@dataclass
class BlockResult:
    """The instances of a frame segmented in blocks, and how many particles touched the edge of
    their block's window (wider than the halo: their outline may be cut there)."""

    instances: Instances
    cut_particles: int


def map_large_arrays_apart(threshold_bytes: int = 1 << 20) -> bool:
    """Have glibc give every allocation over ``threshold_bytes`` its own mapping, returned to the
    system when freed. By default glibc raises that threshold to the size of the largest block
    freed so far (up to 32 MB), after which each window's 5-25 MB arrays come from the heap,
    which fragments and keeps them: a 12,000 x 12,000 frame peaked at 3.69 GB in ``analyze``,
    2.95 GB with the threshold fixed at 1 MB. Called for large frames only (small images keep
    glibc's faster default). Returns whether it took effect (glibc only)."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(-3, int(threshold_bytes)))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def block_starts(length: int, block: int) -> list[int]:
    """Starts of the blocks covering ``length`` pixels, all of ``block`` pixels but the last."""
    return list(range(0, max(length, 1), block))


def segment_in_blocks(model, pixels: np.ndarray, particle_size_px: float | None = None,
                      block_px: int = BLOCK_PX, halo_px: int = HALO_PX,
                      out: np.ndarray | None = None) -> BlockResult:
    """Instances of an (H, W) frame segmented block by block (see the module's docstring).

    ``model``: a segmenter; one with ``segment_normalised`` and ``scale_for`` (the trained
    networks) gets the frame normalised once and one scale for all blocks, any other one each
    block's grey values. ``out``: an (H, W) int32 array to write the labels into (else one is
    made). Labels are numbered 1..N in the order the blocks are done, scores alike.
    """
    map_large_arrays_apart()
    h, w = pixels.shape
    labels = np.zeros((h, w), np.int32) if out is None else out
    labels[:] = 0
    networked = hasattr(model, "segment_normalised") and hasattr(model, "scale_for")
    if networked:
        limits = normalisation_limits(pixels)
        scale = model.scale_for(pixels, particle_size_px, limits)
        # the halo is in frame pixels; shrinking the frame makes the network's particles larger
        halo = int(np.ceil(halo_px / min(scale, 1.0)))
    else:
        scale, halo = None, halo_px
    scores: list[np.ndarray] = []
    present = [np.zeros(1, bool)]  # per kept particle: did it get any pixel (claimed ones stay)
    next_id = 1
    cut = 0
    for y0 in block_starts(h, block_px):
        for x0 in block_starts(w, block_px):
            y1, x1 = min(h, y0 + block_px), min(w, x0 + block_px)
            wy0, wx0 = max(0, y0 - halo), max(0, x0 - halo)
            wy1, wx1 = min(h, y1 + halo), min(w, x1 + halo)
            window = pixels[wy0:wy1, wx0:wx1]
            if networked:
                inst, _ = model.segment_normalised(normalise_between(window, *limits), scale=scale)
            else:
                inst, _ = model.segment(window, particle_size_px)
            win = inst.labels
            n = int(win.max()) if win.size else 0
            if n == 0:
                continue
            area = np.bincount(win.ravel(), minlength=n + 1).astype(np.float64)
            rows = np.bincount(win.ravel(), weights=np.repeat(np.arange(win.shape[0], dtype=np.float64), win.shape[1]),
                               minlength=n + 1)
            cols = np.bincount(win.ravel(), weights=np.tile(np.arange(win.shape[1], dtype=np.float64), win.shape[0]),
                               minlength=n + 1)
            with np.errstate(invalid="ignore", divide="ignore"):
                cy = wy0 + rows / area
                cx = wx0 + cols / area
            own = (area > 0) & (cy >= y0) & (cy < y1) & (cx >= x0) & (cx < x1)
            own[0] = False
            # sides of the window inside the frame: a particle on them was cut by the window
            edges = [win[0] if wy0 > 0 else None, win[-1] if wy1 < h else None,
                     win[:, 0] if wx0 > 0 else None, win[:, -1] if wx1 < w else None]
            on_edge = np.zeros(n + 1, bool)
            for edge in edges:
                if edge is not None:
                    on_edge[edge] = True
            cut += int((own & on_edge).sum())
            kept = np.nonzero(own)[0]
            new_id = np.zeros(n + 1, np.int32)
            new_id[kept] = np.arange(next_id, next_id + kept.size, dtype=np.int32)
            next_id += kept.size
            scores.append(inst.scores[kept - 1])
            mapped = new_id[win]
            target = labels[wy0:wy1, wx0:wx1]
            free = (mapped > 0) & (target == 0)  # a pixel claimed by an earlier block stays its
            target[free] = mapped[free]
            got = np.zeros(next_id, bool)
            got[mapped[free]] = True
            present.append(got[next_id - kept.size:])
    present = np.concatenate(present)
    present[0] = True
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    if not present[1:].all():  # a particle whose every pixel an earlier block had claimed
        new_id = np.zeros(next_id, np.int32)
        new_id[present] = np.arange(int(present.sum()), dtype=np.int32)
        labels[:] = new_id[labels]
        all_scores = all_scores[present[1:]]
    return BlockResult(Instances(labels, all_scores.astype(np.float32)), cut)
