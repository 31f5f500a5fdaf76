"""Plots and the self-contained HTML report of an ``analyze`` run."""

from .build import build_report

__all__ = ["build_report"]
