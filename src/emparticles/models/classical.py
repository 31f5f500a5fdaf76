"""The classical baseline: denoise, Otsu threshold with automatic polarity, distance watershed.

It needs no training and works on clean images with well-separated contrast; touching particles
of very different sizes and textured backgrounds are where the trained models do better.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.filters import threshold_otsu

from ..instances import Instances, instances_from_foreground
from ..preprocess import normalise
from ..types import TWO_CLASS, ProbabilityMap


def noise_sigma(img: np.ndarray) -> float:
    """Noise standard deviation from the median absolute difference of horizontal neighbours
    (robust to edges, which are few)."""
    diff = np.abs(np.diff(img.astype(np.float32), axis=1))
    return float(np.median(diff)) / (0.6745 * np.sqrt(2.0))


@dataclass
class ClassicalSegmenter:
    """Threshold-and-watershed segmentation.

    Attributes
    ----------
    sigma : Gaussian denoising sigma in pixels.
    softness : width of the logistic that turns distance-to-threshold into a probability,
        as a fraction of the normalised grey range.
    polarity : ``"auto"`` (background is the phase that fills most of the image border),
        ``"dark"`` (particles darker than background, TEM bright field) or ``"bright"`` (SEM).
    h : watershed seed height in pixels (larger merges more).
    min_size_px : smallest particle kept.
    min_contrast : particles must differ from the background by this many noise standard
        deviations, else the image is taken to hold none.
    """

    sigma: float = 1.0
    softness: float = 0.04
    polarity: str = "auto"
    h: float = 1.5
    min_size_px: int = 9
    min_contrast: float = 3.0
    name: str = "classical"

    @property
    def model_id(self) -> str:
        return self.name

    def predict(self, pixels: np.ndarray) -> ProbabilityMap:
        """(H, W) grey image -> 2-class ProbabilityMap (background, particle)."""
        img = normalise(pixels)
        if self.sigma > 0:
            img = ndi.gaussian_filter(img, self.sigma)
        if float(img.max()) <= float(img.min()):
            p = np.zeros(img.shape, np.float32)
            return ProbabilityMap(np.stack([1 - p, p]), TWO_CLASS, self.model_id)
        t = float(threshold_otsu(img))
        dark = self._particles_are_dark(img, t)
        if not self._has_contrast(pixels, img, t):
            p = np.zeros(img.shape, np.float32)
            return ProbabilityMap(np.stack([1 - p, p]), TWO_CLASS, self.model_id)
        z = (t - img) if dark else (img - t)
        p = 1.0 / (1.0 + np.exp(-z / self.softness))
        p = p.astype(np.float32)
        return ProbabilityMap(np.stack([1.0 - p, p]), TWO_CLASS, self.model_id)

    def _particles_are_dark(self, img: np.ndarray, t: float) -> bool:
        if self.polarity in ("dark", "bright"):
            return self.polarity == "dark"
        # The image border is mostly background: a bright border means dark particles.
        border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
        return float((border > t).mean()) > 0.5

    def _has_contrast(self, pixels: np.ndarray, smoothed: np.ndarray, t: float) -> bool:
        """Do the two Otsu classes differ by more than the noise? Pure noise or an empty
        substrate splits into two classes too; their means then differ by less than
        ``min_contrast`` noise standard deviations."""
        sigma = noise_sigma(normalise(pixels))
        lo, hi = smoothed[smoothed <= t], smoothed[smoothed > t]
        if lo.size == 0 or hi.size == 0:
            return False
        return float(hi.mean() - lo.mean()) > self.min_contrast * max(sigma, 1e-6)

    def instances(self, prob: ProbabilityMap) -> Instances:
        return instances_from_foreground(prob, 0.5, self.min_size_px, self.h)

    def segment(self, pixels: np.ndarray, particle_size_px: float | None = None) -> tuple[Instances, ProbabilityMap]:
        """Threshold and split; ``particle_size_px`` sets the watershed seed height to a fifth of
        the typical radius when given."""
        if particle_size_px:
            prob = self.predict(pixels)
            return instances_from_foreground(prob, 0.5, self.min_size_px, max(1.0, particle_size_px / 10)), prob
        prob = self.predict(pixels)
        return self.instances(prob), prob
