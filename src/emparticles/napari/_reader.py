"""napari reader: an ``analyze`` run folder, or a micrograph with its calibration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

INFOBAR_COLOUR = "#8b0000"


def napari_get_reader(path):
    """The reader for ``path`` (a run folder with ``run.json``, or one micrograph), else None."""
    from ..io.images import IMAGE_SUFFIXES

    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(path)
    if p.is_dir() and (p / "run.json").is_file():
        return read_run
    if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES:
        return read_image
    return None


def _scale(pixel_size_nm) -> tuple[float, float]:
    ok = pixel_size_nm is not None and np.isfinite(float(pixel_size_nm))
    return (float(pixel_size_nm), float(pixel_size_nm)) if ok else (1.0, 1.0)


def read_image(path) -> list[tuple]:
    """One micrograph as an Image layer whose scale is its pixel size in nm (metadata, else a
    confidently read scale bar; 1 with ``unit: px`` in its metadata when unknown)."""
    from ..io.images import read_micrograph
    from ..pipeline import calibrate_from_scale_bar, locate_infobar

    path = Path(path[0] if isinstance(path, (list, tuple)) else path)
    mg = calibrate_from_scale_bar(locate_infobar(read_micrograph(path)))
    meta = {"path": str(path), "pixel_size_nm": mg.pixel_size_nm, "pixel_size_source": mg.pixel_size_source,
            "unit": "nm" if mg.pixel_size_nm else "px", "infobar_rows": mg.infobar_rows}
    layers = [(mg.pixels, {"name": path.stem, "scale": _scale(mg.pixel_size_nm), "metadata": meta}, "image")]
    layers += _infobar_layer(path.stem, mg.shape, mg.infobar_rows, mg.pixel_size_nm)
    return layers


def _infobar_layer(name: str, shape, rows: int, pixel_size_nm) -> list[tuple]:
    if not rows:
        return []
    h, w = shape
    box = np.array([[h - rows, 0], [h - rows, w], [h, w], [h, 0]], float)
    return [([box], {"name": f"{name} info bar", "shape_type": "rectangle", "face_color": INFOBAR_COLOUR,
                     "edge_width": 0, "opacity": 0.55, "scale": _scale(pixel_size_nm)}, "shapes")]


def read_run(path) -> list[tuple]:
    """The images of an ``analyze`` run folder: for each, an Image layer (scale = pixel size in
    nm), a Labels layer of every particle found with the ids of ``all_particles.csv``, a Labels
    layer of the particles left out of the statistics (edge, minimum area) drawn as outlines, and
    the info bar shaded."""
    import pandas as pd
    import tifffile

    from ..io.images import read_micrograph

    run_dir = Path(path[0] if isinstance(path, (list, tuple)) else path)
    run = json.loads((run_dir / "run.json").read_text())
    images = pd.read_csv(run_dir / "images.csv")
    everything = pd.read_csv(run_dir / "all_particles.csv") if (run_dir / "all_particles.csv").exists() else None
    layers = []
    for _, row in images.iterrows():
        name = str(row["image"])
        labels_path = run_dir / "labels" / f"{name}.tif"
        if row.get("status") not in ("ok", "no particles") or not labels_path.exists():
            continue
        source = Path(run["images"].get(name, {}).get("path", ""))
        ps = row.get("pixel_size_nm")
        ps = float(ps) if pd.notna(ps) else None
        scale = _scale(ps)
        labels = tifffile.imread(labels_path).astype(np.int32)
        meta = {"run_dir": str(run_dir), "image": name, "path": str(source), "pixel_size_nm": ps,
                "unit": "nm" if ps else "px", "infobar_rows": int(row.get("infobar_rows") or 0)}
        if source.is_file():
            layers.append((read_micrograph(source).pixels, {"name": name, "scale": scale, "metadata": meta}, "image"))
        layers.append((labels, {"name": f"{name} particles", "scale": scale, "metadata": meta, "opacity": 0.45},
                       "labels"))
        if everything is not None and len(everything):
            mine = everything[everything["image"] == name]
            left_out = mine.loc[~mine["included"].astype(bool), "label"].to_numpy(int)
            if left_out.size:
                apart = np.where(np.isin(labels, left_out), labels, 0)
                layers.append((apart, {"name": f"{name} left out of the statistics", "scale": scale, "metadata": meta,
                                       "opacity": 0.9, "blending": "translucent_no_depth"}, "labels"))
        layers += _infobar_layer(name, labels.shape, meta["infobar_rows"], ps)
    return layers
