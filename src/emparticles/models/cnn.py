"""Trained networks as model folders, and the segmenter that runs them.

A model folder holds ``config.json`` (architecture, classes, preprocessing, tiling),
``weights.safetensors``, ``thresholds.json`` (post-processing tuned on validation images) and
``MODEL_CARD.md``; the post-processing settings travel with the weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import InputError
from ..inference import pick_device, predict_tiled
from ..instances import DEFAULT_THRESHOLDS, Instances, instances_with
from ..preprocess import normalise
from ..types import THREE_CLASS, ProbabilityMap
from .networks import build_network

__all__ = ["DEFAULT_THRESHOLDS", "CNNSegmenter", "load_network", "save_model_folder"]


def save_model_folder(net: torch.nn.Module, folder: Path, config: dict, thresholds: dict | None = None,
                      card: str = "") -> Path:
    """Write a model folder (weights as safetensors, never pickles)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
    save_file(state, str(folder / "weights.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (folder / "thresholds.json").write_text(json.dumps(thresholds or DEFAULT_THRESHOLDS, indent=2) + "\n")
    if card:
        (folder / "MODEL_CARD.md").write_text(card)
    return folder


def load_network(folder: Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict, dict]:
    """Build the folder's architecture and load its weights: (net in eval mode, config, thresholds)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    for name in ("config.json", "weights.safetensors"):
        if not (folder / name).is_file():
            raise InputError(folder, f"is not a model folder (no {name})", "pass a folder written by 'emparticles train'")
    try:
        config = json.loads((folder / "config.json").read_text())
        net = build_network(config["arch"], config.get("classes", 3))
        net.load_state_dict(load_file(str(folder / "weights.safetensors")))
    except (KeyError, ValueError, RuntimeError) as exc:
        raise InputError(folder, f"model folder cannot be loaded ({exc})", "re-export it with this version of emparticles") from None
    thresholds = dict(DEFAULT_THRESHOLDS)
    if (folder / "thresholds.json").is_file():
        thresholds.update(json.loads((folder / "thresholds.json").read_text()))
    net.eval().to(memory_format=torch.channels_last)
    return net.to(pick_device(device) if isinstance(device, str) else device), config, thresholds


class CNNSegmenter:
    """A trained 3-class network with tiled inference and border-aware instance separation."""

    def __init__(self, folder: str | Path, device: str = "auto", flips: bool = False):
        self.folder = Path(folder)
        self.device = pick_device(device)
        self.net, self.config, self.thresholds = load_network(self.folder, self.device)
        self.model_id = self.config.get("name", self.folder.name)
        self.flips = flips

    #: Median particle diameter (px) the network handles best, and the range left alone.
    TARGET_ECD_PX = 30.0
    GOOD_ECD_RANGE_PX = (12.0, 90.0)

    def predict(self, pixels: np.ndarray, scale: float = 1.0) -> ProbabilityMap:
        """Probabilities at the input's size; ``scale`` resamples the image first (e.g. 2.0 to
        enlarge small particles into the range the network was trained on)."""
        img = normalise(pixels)
        scale = scale * float(self.config.get("input_scale", 1.0))
        if scale != 1.0:
            img = _resize(img, scale)
        probs = predict_tiled(self.net, img, tile=int(self.config.get("tile", 1024)),
                              overlap=int(self.config.get("overlap", 64)), device=self.device,
                              bf16=bool(self.config.get("bf16", False)), flips=self.flips)
        if scale != 1.0:
            probs = np.stack([_resize(p, pixels.shape) for p in probs])
        return ProbabilityMap(probs.astype(np.float32), THREE_CLASS, self.model_id)

    def instances(self, prob: ProbabilityMap) -> Instances:
        return instances_with(prob, self.thresholds)

    def segment(self, pixels: np.ndarray, particle_size_px: float | None = None) -> tuple[Instances, ProbabilityMap]:
        """Segment at the scale where particles look like the training data.

        With ``particle_size_px`` (a typical diameter given by the user) the image is resampled
        once. Otherwise, if the model's config enables ``auto_rescale`` (it relies on a model that
        does not over-segment), a first pass at the native scale estimates the median diameter,
        and if it lies outside :attr:`GOOD_ECD_RANGE_PX` the image is segmented again after
        resampling towards :attr:`TARGET_ECD_PX` (by at most 4x either way).
        """
        if particle_size_px:
            scale = float(np.clip(self.TARGET_ECD_PX / particle_size_px, 0.25, 4.0))
            prob = self.predict(pixels, scale)
            return self.instances(prob), prob
        prob = self.predict(pixels)
        inst = self.instances(prob)
        if not self.config.get("auto_rescale", False):
            return inst, prob
        median = _median_ecd(inst.labels)
        lo, hi = self.GOOD_ECD_RANGE_PX
        if median and not lo <= median <= hi:
            scale = float(np.clip(self.TARGET_ECD_PX / median, 0.25, 4.0))
            prob = self.predict(pixels, scale)
            inst = self.instances(prob)
        return inst, prob


def _median_ecd(labels: np.ndarray) -> float | None:
    """Median equivalent diameter (px) of the particles not cut by the border; None if < 3."""
    n = int(labels.max())
    if n < 3:
        return None
    areas = np.bincount(labels.ravel(), minlength=n + 1)[1:].astype(float)
    edge = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    keep = np.ones(n, bool)
    keep[edge[edge > 0] - 1] = False
    areas = areas[keep & (areas > 0)]
    return float(np.median(np.sqrt(4 * areas / np.pi))) if areas.size >= 3 else None


def _resize(img: np.ndarray, scale_or_shape) -> np.ndarray:
    from skimage.transform import resize

    if isinstance(scale_or_shape, tuple):
        shape = scale_or_shape
    else:
        shape = (max(1, round(img.shape[0] * scale_or_shape)), max(1, round(img.shape[1] * scale_or_shape)))
    return resize(img, shape, order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)
