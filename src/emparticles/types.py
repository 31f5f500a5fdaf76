"""The values that travel between stages: Micrograph -> ProbabilityMap -> Labels -> ParticleTable."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Micrograph:
    """One electron micrograph and what is known about it.

    Attributes
    ----------
    pixels : (H, W) array, the original grey values (uint8, uint16 or float32).
    pixel_size_nm : nanometres per pixel, or ``None`` when unknown (lengths then stay in pixels).
    pixel_size_source : where the pixel size came from, e.g. ``"tiff:CZ_SEM"``, ``"user"``, ``""``.
    path : the file it was read from, if any.
    infobar_rows : rows at the bottom that hold the microscope's data bar (0 = none).
    infobar_source : how those rows were decided: ``"detected"``, ``"user"``, ``"disabled"``, ``""``.
    notes : warnings met while reading (multi-page file, colour image, non-square pixels...).
    metadata : vendor facts worth keeping (instrument, magnification...), JSON-serialisable.
    """

    pixels: np.ndarray
    pixel_size_nm: float | None = None
    pixel_size_source: str = ""
    path: Path | None = None
    infobar_rows: int = 0
    infobar_source: str = ""
    notes: tuple[str, ...] = ()
    metadata: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int]:
        return self.pixels.shape  # type: ignore[return-value]

    @property
    def stem(self) -> str:
        return self.path.stem if self.path is not None else "image"

    @property
    def analysed_pixels(self) -> np.ndarray:
        """The image without its info bar: (H - infobar_rows, W)."""
        h = self.pixels.shape[0] - self.infobar_rows
        return self.pixels[:h]

    def with_(self, **changes) -> Micrograph:
        """A copy with some fields changed."""
        return replace(self, **changes)


#: channel names of a 3-class probability map, in order.
THREE_CLASS = ("background", "particle", "boundary")
#: channel names of a 3-class map with a distance channel: each pixel's distance to the outline of
#: its own particle, relative to the largest in that particle (1 at the centre, 0 on background).
#: The first three channels sum to 1; the distance is a sigmoid output of its own.
WITH_DISTANCE = THREE_CLASS + ("distance",)


def network_channels(outputs: int) -> tuple[str, ...]:
    """Channel names of a semantic network's ``outputs`` output maps (3 or 4)."""
    if outputs == 3:
        return THREE_CLASS
    if outputs == 4:
        return WITH_DISTANCE
    raise ValueError(f"a network with {outputs} outputs is neither 3-class nor 3-class with distance")


#: channel names of a 2-class probability map, in order.
TWO_CLASS = ("background", "particle")


@dataclass(frozen=True)
class ProbabilityMap:
    """Class probabilities from a segmentation model.

    Attributes
    ----------
    probabilities : (C, H, W) float32 in [0, 1]; the class channels sum to 1 (a ``distance``
        channel, if any, is not a class).
    channels : names of the C channels, e.g. ``("background", "particle", "boundary")``.
    model_id : the model that made it.
    """

    probabilities: np.ndarray
    channels: tuple[str, ...]
    model_id: str

    def channel(self, name: str) -> np.ndarray:
        """The (H, W) probability of one named class."""
        try:
            return self.probabilities[self.channels.index(name)]
        except ValueError:
            raise KeyError(f"no channel '{name}'; channels are {self.channels}") from None

    @property
    def foreground(self) -> np.ndarray:
        """(H, W) probability that a pixel belongs to a particle (its body or its boundary)."""
        fg = self.channel("particle")
        if "boundary" in self.channels:
            fg = fg + self.channel("boundary")
        return fg


def relabel_consecutive(labels: np.ndarray) -> np.ndarray:
    """Return an int32 (H, W) label image whose particles are numbered 1..N in raster order of
    their first pixel, 0 staying background."""
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be 2-D, got shape {labels.shape}")
    flat = labels.ravel()
    ids, first = np.unique(flat, return_index=True)
    keep = ids != 0
    ids, first = ids[keep], first[keep]
    order = np.argsort(first, kind="stable")
    lut_keys = ids[order]
    out = np.zeros(flat.shape, np.int32)
    if lut_keys.size:
        idx = np.searchsorted(ids, flat)
        idx = np.clip(idx, 0, ids.size - 1)
        new_ids = np.empty(ids.size, np.int32)
        new_ids[order] = np.arange(1, ids.size + 1, dtype=np.int32)
        hit = ids[idx] == flat
        out[hit] = new_ids[idx[hit]]
    return out.reshape(labels.shape)
