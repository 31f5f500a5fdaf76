"""A model that sends each image to the most confident of several trained networks.

Each member segments the image its own way (scale search included); the result kept is the one
whose particles have the highest mean score (mean foreground probability), the same criterion the
scale search uses. A network that does not know an image's kind of particle (an EMPS-trained one
on SEM agglomerates, a SEM-tuned one on TEM crops) merges or fragments them into weak, uncertain
particles and loses the comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..instances import Instances
from ..preprocess import normalise
from ..types import ProbabilityMap


def mean_score(inst: Instances) -> float:
    """Mean particle score of an image's instances (0 when it has none)."""
    return float(inst.scores.mean()) if inst.scores.size else 0.0


class SelectingSegmenter:
    """A model folder whose ``config.json`` has ``"kind": "select"`` and ``"members"``: model
    names (shipped) or folder paths (relative to this folder), each with a ``segment_normalised``.

    ``last_choice`` names the member that segmented the latest image.
    """

    def __init__(self, folder: str | Path, device: str = "auto"):
        from .registry import MODELS, load_model

        self.folder = Path(folder)
        config = json.loads((self.folder / "config.json").read_text())
        names = config.get("members") or []
        if len(names) < 2:
            raise InputError(self.folder, "a selecting model needs two or more members", 'list them in config.json "members"')
        self.members = []
        for name in names:
            where = name if name in MODELS else str((self.folder / name).resolve())
            member = load_model(where, device)
            if not hasattr(member, "segment_normalised"):
                raise InputError(self.folder, f"member '{name}' is not a trained semantic network", "use U-Net family members")
            self.members.append(member)
        self.config = config
        self.model_id = config.get("name", self.folder.name)
        self.last_choice = ""

    def segment(self, pixels: np.ndarray, particle_size_px: float | None = None) -> tuple[Instances, ProbabilityMap]:
        """Every member's segmentation of (H, W) ``pixels``; returns the most confident one's
        instances and probabilities at the input's size."""
        img = normalise(pixels)
        results = [m.segment_normalised(img, particle_size_px) for m in self.members]
        best = max(range(len(results)), key=lambda i: mean_score(results[i][0]))
        self.last_choice = self.members[best].model_id
        return results[best]
