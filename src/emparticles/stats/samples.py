"""Samples for comparison: particle tables of several runs, optionally regrouped by a mapping file."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError


def load_run_particles(run_dir: Path) -> pd.DataFrame:
    """The ``particles.csv`` of an analyze folder, with a ``run`` column."""
    path = Path(run_dir) / "particles.csv"
    if not path.exists():
        raise InputError(run_dir, "has no particles.csv", "pass folders written by 'emparticles analyze'")
    df = pd.read_csv(path)
    df["run"] = Path(run_dir).name
    return df


def size_samples(runs: list[Path], group_by: Path | None = None) -> tuple[dict[str, np.ndarray], str, dict[str, float]]:
    """ECD samples by run folder, or by the ``group`` column of a CSV mapping ``image`` -> ``group``
    (optional ``time`` column for time series).

    Returns ({sample: sizes}, unit, {sample: time}).
    """
    tables = [load_run_particles(r) for r in runs]
    df = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    if df.empty:
        raise InputError(None, "the runs hold no particles", "check the folders")
    use_nm = "ecd_nm" in df and df["ecd_nm"].notna().all()
    column, unit = ("ecd_nm", "nm") if use_nm else ("ecd_px", "px")
    times: dict[str, float] = {}
    if group_by is not None:
        try:
            mapping = pd.read_csv(group_by)
        except (OSError, ValueError) as exc:
            raise InputError(group_by, f"cannot be read as CSV ({exc})", "give a CSV with columns image,group[,time]") from None
        if not {"image", "group"} <= set(mapping.columns):
            raise InputError(group_by, "needs the columns image and group", "add them (time is optional)")
        df = df.merge(mapping, on="image", how="inner")
        key = "group"
        if "time" in mapping:
            times = mapping.groupby("group")["time"].first().astype(float).to_dict()
    else:
        key = "run"
    samples = {str(name): g[column].to_numpy(float) for name, g in df.groupby(key, sort=False)}
    return samples, unit, times
