"""Segmentation models behind one interface; see :mod:`emparticles.models.registry`."""

from .registry import Segmenter, available_models, load_model

__all__ = ["Segmenter", "available_models", "load_model"]
