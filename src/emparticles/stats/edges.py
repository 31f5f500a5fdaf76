"""What to do with particles cut by the field's border.

- ``exclude`` (default): drop them. Simple, but biased against large particles, which touch the
  border more often.
- ``keep``: keep them with their cut (too small) sizes.
- ``miles-lantuejoul``: drop them, and weight every inside particle by the inverse probability
  that a particle of its extent lies wholly inside the field (Miles 1978, Lantuejoul 1980):
  w = (W H) / ((W - a)(H - b)), with a, b its bounding-box width and height. This makes the
  number-weighted size distribution unbiased.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

EDGE_MODES = ("exclude", "keep", "miles-lantuejoul")


def edge_weights(particles: pd.DataFrame, field_width_px: float, field_height_px: float, mode: str = "exclude") -> np.ndarray:
    """Per-particle weights for ``mode``: 0 drops a particle, 1 keeps it, >1 corrects for edges.

    ``particles`` needs ``touches_edge`` and the ``bbox_*_px`` columns of a particle table.
    """
    if mode not in EDGE_MODES:
        raise ValueError(f"edge mode must be one of {EDGE_MODES}")
    touches = particles["touches_edge"].to_numpy(bool)
    if mode == "keep":
        return np.ones(len(particles))
    if mode == "exclude":
        return (~touches).astype(float)
    a = (particles["bbox_x1_px"] - particles["bbox_x0_px"] + 1).to_numpy(float)
    b = (particles["bbox_y1_px"] - particles["bbox_y0_px"] + 1).to_numpy(float)
    inside = np.clip((field_width_px - a) * (field_height_px - b), 1e-9, None)
    w = field_width_px * field_height_px / inside
    return np.where(touches, 0.0, w)
