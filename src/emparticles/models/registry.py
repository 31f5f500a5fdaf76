"""Model registry: a plain dict of names to builders behind one factory."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import InputError
from ..instances import Instances
from ..types import ProbabilityMap
from .classical import ClassicalSegmenter


class Segmenter(Protocol):
    """What every segmentation model offers the pipeline (semantic models also have
    ``predict(pixels) -> ProbabilityMap`` and ``instances(prob) -> Instances``)."""

    model_id: str

    def segment(self, pixels: np.ndarray, particle_size_px: float | None = None) -> tuple[Instances, ProbabilityMap]:
        """Both steps at once; ``particle_size_px`` is an optional typical particle diameter."""


#: Model folders shipped inside the package.
SHIPPED_DIR = Path(__file__).parent / "weights"


def _shipped_models() -> dict[str, tuple[Callable[[str], Segmenter], str]]:
    found = {}
    if SHIPPED_DIR.is_dir():
        for folder in sorted(p for p in SHIPPED_DIR.iterdir() if (p / "config.json").is_file()):
            desc = json.loads((folder / "config.json").read_text()).get("description", "trained network")
            found[folder.name] = (lambda device, f=folder: _cnn(f, device), desc)
    return found


def _cnn(folder: Path, device: str) -> Segmenter:
    """A model folder: a Mask R-CNN or a selection among models when its config says so, else a
    semantic network."""
    config = folder / "config.json"
    kind = json.loads(config.read_text()).get("kind") if config.is_file() else None
    if kind == "maskrcnn":
        from .maskrcnn import MaskRCNNSegmenter

        return MaskRCNNSegmenter(folder, device)
    if kind == "select":
        from .select import SelectingSegmenter

        return SelectingSegmenter(folder, device)
    from .cnn import CNNSegmenter

    return CNNSegmenter(folder, device)


#: name -> (builder taking a device string, one-line description)
MODELS: dict[str, tuple[Callable[[str], Segmenter], str]] = {
    **_shipped_models(),
    "classical": (lambda device: ClassicalSegmenter(), "Otsu threshold + distance watershed; no training, CPU"),
}

#: A shipped model whose config says ``"default": true``, else the classical baseline.
DEFAULT_MODEL = next((name for name in MODELS if name != "classical"
                      and json.loads((SHIPPED_DIR / name / "config.json").read_text()).get("default")), "classical")


def available_models() -> dict[str, str]:
    """Registered model names and their descriptions."""
    return {name: desc for name, (_, desc) in MODELS.items()}


def check_device_name(device: str) -> None:
    """Fail on a ``--device`` that is no device (``auto``, ``cpu``, ``cuda``, ``cuda:N``), without
    importing torch or asking for a GPU (cluster workers may have one where the client has none)."""
    device = str(device)
    if device not in ("auto", "cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(None, f"--device {device!r} is not a device", "use auto, cpu or cuda")


def check_model(name_or_path: str | None = None) -> None:
    """Fail as :func:`load_model` would on an unknown name or a path that is not a model folder,
    without loading anything (for a client that leaves the loading to cluster workers)."""
    name = name_or_path or DEFAULT_MODEL
    if name in MODELS:
        return
    path = Path(name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(path, "is not a model folder (no config.json)",
                             "pass a folder with config.json and weights.safetensors")
        return
    if path.exists():
        raise InputError(path, "is not a model folder", "pass a folder with config.json and weights.safetensors")
    raise InputError(None, f"unknown model '{name}'", f"choose one of: {', '.join(MODELS)}, or a model folder path")


def load_model(name_or_path: str | None = None, device: str = "auto") -> Segmenter:
    """Build a registered model by name, or load a model folder from a path.

    Raises
    ------
    InputError : unknown name (the message lists the valid ones) or unusable folder.
    """
    name = name_or_path or DEFAULT_MODEL
    check_model(name)
    if name in MODELS:
        return MODELS[name][0](device)
    return _cnn(Path(name), device)
