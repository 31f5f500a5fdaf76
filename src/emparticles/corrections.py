"""Correcting a segmentation by hand: delete, merge and split particles, then save the corrected
labels into an ``analyze`` run folder and measure them again.

The editing functions take and return (H, W) int32 label images and leave the ids of the
particles they do not touch as they were, so that a table keyed by label stays valid; new
particles get ids above the largest one. :func:`save_corrected_labels` is the only one that
touches the disk.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi


def delete_particles(labels: np.ndarray, ids) -> np.ndarray:
    """``labels`` with the particles ``ids`` set to background."""
    out = np.array(labels, dtype=np.int32, copy=True)
    out[np.isin(out, np.asarray(list(ids), np.int32))] = 0
    return out


def merge_particles(labels: np.ndarray, ids) -> np.ndarray:
    """``labels`` with the particles ``ids`` joined into one, which keeps the smallest id. The
    one-pixel seams the segmentation left between them (background pixels with members of the
    merged particle on two opposite sides) are filled, so the merged outline is whole."""
    ids = sorted(int(i) for i in ids if int(i) > 0)
    out = np.array(labels, dtype=np.int32, copy=True)
    if len(ids) < 2:
        return out
    member = np.isin(out, ids)
    out[member] = ids[0]
    inside = member.copy()
    for axis in (0, 1):  # seams across rows and columns
        before = np.roll(member, 1, axis=axis)
        after = np.roll(member, -1, axis=axis)
        inside |= (out == 0) & before & after
    out[inside & (out == 0)] = ids[0]
    return out


def split_particle(labels: np.ndarray, particle: int, line: np.ndarray) -> np.ndarray:
    """Cut particle ``particle`` along a drawn polyline ``line`` ((n, 2) points as (row, col)):
    pixels of the particle on the line become background, and each piece of the rest becomes a
    particle (the largest keeps the id, the others get new ids). Returns ``labels`` unchanged
    when the line does not cut the particle in two."""
    from skimage.draw import line as draw_line

    out = np.array(labels, dtype=np.int32, copy=True)
    mask = out == particle
    if not mask.any() or len(line) < 2:
        return out
    cut = np.zeros_like(mask)
    pts = np.round(np.asarray(line, float)).astype(int)
    for (r0, c0), (r1, c1) in itertools.pairwise(pts):
        rr, cc = draw_line(r0, c0, r1, c1)
        ok = (rr >= 0) & (rr < out.shape[0]) & (cc >= 0) & (cc < out.shape[1])
        cut[rr[ok], cc[ok]] = True
    cut = ndi.binary_dilation(cut, structure=np.ones((2, 2), bool))  # no diagonal leak through the line
    pieces, n = ndi.label(mask & ~cut)  # 4-connectivity: the line separates
    if n < 2:
        return out
    sizes = np.bincount(pieces.ravel())[1:]
    order = np.argsort(-sizes) + 1
    out[mask] = 0
    out[pieces == order[0]] = particle
    next_id = int(out.max()) + 1
    for k in order[1:]:
        out[pieces == k] = next_id
        next_id += 1
    return out


def new_particle_id(labels: np.ndarray) -> int:
    """The id a newly painted particle should take: one above the largest."""
    return int(np.max(labels)) + 1 if np.size(labels) else 1


def save_corrected_labels(run_dir: Path, image: str, labels: np.ndarray) -> dict:
    """Write corrected labels of one image of an ``analyze`` run and redo what depends on them.

    ``labels``: (H, W) at the image's full size (the info bar's rows are set to 0). The image is
    measured again with the run's settings (edge particles, minimum area, pixel size as the run
    recorded it), its part tables, labels, overlay and ROIs are rewritten, the combined tables and
    the report rebuilt, and ``run.json`` records that the image was corrected by hand. Returns
    the image's new ``images.csv`` row."""
    from .agglomerates import link_particles, measure_agglomerates
    from .instances import Instances
    from .io.images import read_micrograph
    from .measure import measure_labels
    from .pipeline import (
        AnalysisSettings,
        AnalyzeRun,
        ImageResult,
        agglomeration_row,
        image_summary,
    )
    from .stats.edges import edge_weights
    from .units import parse_area_px

    run_dir = Path(run_dir)
    run_info = json.loads((run_dir / "run.json").read_text())
    settings = AnalysisSettings(**{k: v for k, v in run_info["settings"].items()
                                   if k in AnalysisSettings.__dataclass_fields__})
    meta_path = run_dir / ".parts" / f"{image}.json"
    info = json.loads(meta_path.read_text())
    summary = info.get("summary", {})
    path = Path(run_info["images"][image]["path"])
    mg = read_micrograph(path)
    if labels.shape != mg.shape:
        raise ValueError(f"corrected labels are {labels.shape} but {path} is {mg.shape}")
    ps = summary.get("pixel_size_nm")
    ps = float(ps) if ps is not None and np.isfinite(float(ps)) else None
    rows = int(summary.get("infobar_rows") or 0)
    mg = mg.with_(pixel_size_nm=ps, pixel_size_source=summary.get("pixel_size_source", ""), infobar_rows=rows,
                  infobar_source=summary.get("infobar_source", ""))
    full = np.array(labels, dtype=np.int32, copy=True)
    if rows:
        full[-rows:] = 0
    field = full[: full.shape[0] - rows]
    table = measure_labels(field, mg.analysed_pixels, ps, image_name=image, ultimate_points=True)
    old_scores = {int(k) + 1: s for k, s in enumerate(info.get("scores", []))}
    table.insert(2, "score", [float(old_scores.get(int(lab), np.nan)) for lab in table["label"]])
    small = table["area_px"].to_numpy(float) < parse_area_px(settings.min_area, ps)
    weights = edge_weights(table, field.shape[1], field.shape[0], settings.edge_particles)
    keep = ~small & (weights > 0)
    table["edge_weight"] = weights
    table["edge_mode"] = settings.edge_particles
    table["included"] = keep
    agglomerates, of_particle = measure_agglomerates(field, ps, image_name=image)
    table = link_particles(table, of_particle, agglomerates)
    kept = table[keep].drop(columns="included").reset_index(drop=True)
    coverage = float((field > 0).sum()) / max(field.size, 1)
    row = image_summary(mg, kept, detected=len(table), n_edge=int(table["touches_edge"].sum()),
                        n_small=int(small.sum()), coverage=coverage)
    row.update(agglomeration_row(kept, agglomerates))
    row.update(edge_mode=settings.edge_particles, model=summary.get("model", ""), corrected_by_hand=True)
    scores = np.array([old_scores.get(i, 1.0) for i in range(1, int(field.max()) + 1)], np.float32)
    result = ImageResult(mg, Instances(field, scores), full, kept, table, agglomerates, row,
                         [f"corrected by hand ({len(table)} particles)"])
    run = AnalyzeRun(run_dir, settings)
    for name, st in run_info.get("images", {}).items():
        if name == image:
            continue
        if st.get("status") in ("ok", "no particles") and run.is_done(name):
            run.record_done(name, Path(st.get("path", "")))
        else:
            run.report.statuses[name] = st
    corrected = sorted(set(run_info.get("corrected_by_hand", [])) | {image})
    run.save_image(image, result)
    run.keep_order(list(run_info.get("images", {})))
    run.corrected_by_hand = corrected
    run.finish(report=True)
    return row
