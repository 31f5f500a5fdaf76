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
from ..instances import Instances, instances_from_borders
from ..preprocess import normalise
from ..types import THREE_CLASS, ProbabilityMap
from .networks import build_network

DEFAULT_THRESHOLDS = {"foreground_threshold": 0.5, "seed_threshold": 0.5, "min_size_px": 9, "min_seed_px": 4}


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

    def predict(self, pixels: np.ndarray) -> ProbabilityMap:
        img = normalise(pixels)
        scale = float(self.config.get("input_scale", 1.0))
        if scale != 1.0:
            img = _resize(img, scale)
        probs = predict_tiled(self.net, img, tile=int(self.config.get("tile", 1024)),
                              overlap=int(self.config.get("overlap", 64)), device=self.device,
                              bf16=bool(self.config.get("bf16", False)), flips=self.flips)
        if scale != 1.0:
            probs = np.stack([_resize(p, pixels.shape) for p in probs])
        return ProbabilityMap(probs.astype(np.float32), THREE_CLASS, self.model_id)

    def instances(self, prob: ProbabilityMap) -> Instances:
        t = self.thresholds
        return instances_from_borders(prob, t["foreground_threshold"], t["seed_threshold"],
                                      int(t["min_size_px"]), int(t["min_seed_px"]))

    def segment(self, pixels: np.ndarray) -> tuple[Instances, ProbabilityMap]:
        prob = self.predict(pixels)
        return self.instances(prob), prob


def _resize(img: np.ndarray, scale_or_shape) -> np.ndarray:
    from skimage.transform import resize

    if isinstance(scale_or_shape, tuple):
        shape = scale_or_shape
    else:
        shape = (max(1, round(img.shape[0] * scale_or_shape)), max(1, round(img.shape[1] * scale_or_shape)))
    return resize(img, shape, order=1, preserve_range=True, anti_aliasing=False).astype(np.float32)
