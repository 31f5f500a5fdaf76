"""Agglomerates: groups of touching particles, measured as a second level beside the particles.

ISO/TS 80004-2 calls a collection of weakly bound particles an agglomerate (an aggregate when
strongly bound; a projection image cannot tell the two apart, so both are "agglomerates" here).
The contact rule: two particles belong to the same agglomerate when a pixel of one touches a
pixel of the other, sideways or diagonally (8-connectivity), in the segmentation. An agglomerate
is therefore a connected component of the particle foreground; a free particle is an agglomerate
of one. A particle that the segmentation left in two pieces joins both pieces' groups into one.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import ndimage as ndi

from ._geometry import component_span
from .measure import measure_labels

#: Column schema of an agglomerate table: name -> (unit, meaning).
AGGLOMERATE_COLUMNS: dict[str, tuple[str, str]] = {
    "image": ("", "image file stem"),
    "agglomerate_id": ("", "agglomerate id (1..N per image)"),
    "particles": ("", "particles in it (1 = a free particle)"),
    "area_px": ("px^2", "pixel count of its particles"),
    "perimeter_px": ("px", "traced outer outline length (ImageJ)"),
    "ecd_px": ("px", "equivalent circular diameter of its area"),
    "feret_max_px": ("px", "maximum Feret diameter"),
    "feret_min_px": ("px", "minimum Feret diameter (caliper width)"),
    "circularity": ("", "4 pi area / perimeter^2, capped at 1"),
    "solidity": ("", "area / convex area"),
    "centroid_x_px": ("px", "centroid column"),
    "centroid_y_px": ("px", "centroid row"),
    "touches_edge": ("", "reaches the border of the analysed field (its size and count are cut)"),
    "area_nm2": ("nm^2", "area"),
    "perimeter_nm": ("nm", "outline length"),
    "ecd_nm": ("nm", "equivalent circular diameter"),
    "feret_max_nm": ("nm", "maximum Feret diameter"),
    "feret_min_nm": ("nm", "minimum Feret diameter"),
}

_EIGHT = np.ones((3, 3), bool)


def agglomerate_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Group the particles of a label image into agglomerates.

    Parameters
    ----------
    labels : (H, W) integer particle labels, 0 = background.

    Returns
    -------
    (H, W) int32 agglomerate labels (1..N, 0 = background), and an int64 array ``of_particle``
    with ``of_particle[label]`` = the agglomerate of particle ``label`` (0 for absent labels).
    """
    lab = np.asarray(labels)
    components = np.zeros(lab.shape, np.int32)
    n = ndi.label(lab > 0, structure=_EIGHT, output=components)
    of_particle = np.zeros(int(lab.max()) + 1 if lab.size else 1, np.int64)
    if n == 0:
        return components, of_particle
    # A particle lies in one component unless the segmentation left it in pieces: the smallest
    # and largest component under each particle (one pass, no full-size temporaries) say which.
    span = component_span(np.ascontiguousarray(lab, dtype=np.int32), components, of_particle.size - 1)
    span[0] = 0
    in_pieces = np.nonzero(span[:, 0] != span[:, 1])[0]
    of_particle[:] = np.maximum(span[:, 0], 0)
    if in_pieces.size == 0:
        return components, of_particle
    # union of the components a particle spans (a particle cut in two pieces by the segmentation),
    # from the pixels of those particles only
    where = np.isin(lab, in_pieces)
    key = np.unique(lab[where].astype(np.int64) * (n + 1) + components[where])  # (particle, component) pairs, sorted
    del where
    particle, comp = key // (n + 1), key % (n + 1)
    first = np.r_[True, particle[1:] != particle[:-1]]
    first_comp = comp[first][np.cumsum(first) - 1]  # each pair's particle's first component
    parent = np.arange(n + 1)

    def root(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in zip(first_comp[~first].tolist(), comp[~first].tolist()):
        ra, rb = root(a), root(b)
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    roots = np.array([root(c) for c in range(n + 1)])
    _, consecutive = np.unique(roots, return_inverse=True)  # root 0 (background) stays 0
    consecutive = consecutive.astype(np.int32)
    merged = consecutive[components]
    of_particle[:] = consecutive[of_particle]
    return merged, of_particle


def measure_agglomerates(labels: np.ndarray, pixel_size_nm: float | None = None,
                         image_name: str = "") -> tuple[pd.DataFrame, np.ndarray]:
    """Measure the agglomerates of a particle label image (ImageJ definitions, as for particles).

    Returns the agglomerate table (columns of :data:`AGGLOMERATE_COLUMNS`; nm columns only with a
    pixel size) and ``of_particle`` from :func:`agglomerate_labels`.
    """
    merged, of_particle = agglomerate_labels(labels)
    cols = [c for c in AGGLOMERATE_COLUMNS if pixel_size_nm is not None or not c.endswith(("_nm", "_nm2"))]
    if merged.max() == 0:
        return pd.DataFrame({c: pd.Series(dtype=object if c == "image" else float) for c in cols}), of_particle
    table = measure_labels(merged, None, pixel_size_nm, image_name=image_name)
    counts = np.bincount(of_particle[1:], minlength=int(merged.max()) + 1)
    table = table.rename(columns={"label": "agglomerate_id"})
    table.insert(2, "particles", counts[table["agglomerate_id"].to_numpy()].astype(np.int64))
    return table[cols].reset_index(drop=True), of_particle


def link_particles(particles: pd.DataFrame, of_particle: np.ndarray, agglomerates: pd.DataFrame) -> pd.DataFrame:
    """``particles`` with ``agglomerate_id`` and ``in_agglomerate`` (its agglomerate holds two or
    more particles) added, from :func:`measure_agglomerates`'s results for the same image."""
    out = particles.copy()
    if not len(out):
        out["agglomerate_id"] = pd.Series(dtype="int64")
        out["in_agglomerate"] = pd.Series(dtype=bool)
        return out
    ids = of_particle[out["label"].to_numpy(np.int64)]
    size = dict(zip(agglomerates["agglomerate_id"].astype(np.int64), agglomerates["particles"].astype(np.int64)))
    out["agglomerate_id"] = ids
    out["in_agglomerate"] = np.array([size.get(int(i), 1) > 1 for i in ids], bool)
    return out
