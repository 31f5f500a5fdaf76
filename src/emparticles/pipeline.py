"""The road of one image and of a batch: read -> info bar -> segment -> measure -> write.

Only this module, :mod:`emparticles.io` and the CLI touch the disk.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import inspect
import json
import os
import platform
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from . import __version__
from .agglomerates import AGGLOMERATE_COLUMNS, link_particles, measure_agglomerates
from .blocks import BLOCKS_ABOVE_PX, HALO_PX, segment_in_blocks
from .errors import EmparticlesError, InputError
from .instances import Instances
from .io import images as io_images
from .io.exports import write_coco, write_imagej_rois, write_parquet
from .io.infobar import detect_infobar
from .io.writers import write_csv, write_json, write_label_tiff, write_overlay
from .measure import empty_particle_table, measure_labels, with_physical_units
from .models.registry import Segmenter
from .stats.edges import edge_weights
from .types import Micrograph
from .units import parse_area_px, parse_length_nm


@dataclass
class AnalysisSettings:
    """Everything that decides an ``analyze`` result; saved in ``run.json``.

    Attributes
    ----------
    model : registered model name or model folder.
    pixel_size_nm : user-given nm per pixel (overrides file metadata), or None.
    crop_bottom : force this many info-bar rows (None = detect).
    detect_infobar : look for a data bar when ``crop_bottom`` is None.
    edge_particles : particles touching the field's border: ``exclude`` (default), ``keep`` or
        ``miles-lantuejoul`` (excluded, the others weighted; see :mod:`emparticles.stats.edges`).
    min_area : smallest particle kept: pixels (``"20"``) or an area (``"100nm2"``).
    device : ``auto``, ``cpu`` or ``cuda``.
    particle_size : typical particle diameter hint (``"20nm"`` or ``"15px"``), or None (automatic).
    scale_bar : ``auto``: read the burned-in scale bar; it calibrates an image without a pixel size
        in its metadata (when read with high confidence) and cross-checks one with; ``off``: never.
    particles : ``any`` (default), ``bright`` (SEM: particles brighter than their surroundings;
        dark pits and pores are left out) or ``dark`` (TEM bright field); see
        :func:`~emparticles.instances.wrong_contrast`.
    keep_figure_text : keep what the network found on text drawn over the field (panel letters,
        scale-bar labels); by default it is left out (:mod:`emparticles.figure_text`).
    """

    model: str = "classical"
    pixel_size_nm: float | None = None
    crop_bottom: int | None = None
    detect_infobar: bool = True
    edge_particles: str = "exclude"
    min_area: str = "0"
    device: str = "auto"
    particle_size: str | None = None
    scale_bar: str = "auto"
    particles: str = "any"
    keep_figure_text: bool = False

    def fingerprint(self) -> str:
        """Short hash of the settings; a finished image is reused only if this matches."""
        settings = asdict(self)
        if settings["particles"] == "any":  # added later: runs that do not use it keep their fingerprint
            del settings["particles"]
        blob = json.dumps({**settings, "version": __version__}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


#: Columns ``analyze`` adds to a measured particle table (see PARTICLE_COLUMNS for the rest).
ANALYSIS_COLUMNS: dict[str, tuple[str, str]] = {
    "score": ("", "model confidence: mean foreground probability of the particle (3 decimals)"),
    "edge_weight": ("", "weight in the size statistics (0 = excluded; >1 = Miles-Lantuejoul correction)"),
    "edge_mode": ("", "edge-particle handling: exclude, keep or miles-lantuejoul"),
    "included": ("", "used in the statistics (all_particles.csv only)"),
    "agglomerate_id": ("", "the agglomerate (connected group of touching particles) it belongs to; see agglomerates.csv"),
    "in_agglomerate": ("", "its agglomerate holds two or more particles (False: a free particle)"),
}


@dataclass
class ImageResult:
    """What one analysed image produced."""

    micrograph: Micrograph
    instances: Instances
    full_labels: np.ndarray  # (H, W) int32 at the input's full size, 0 in the info bar
    particles: pd.DataFrame  # the rows kept for statistics (column edge_weight)
    all_particles: pd.DataFrame  # every particle found (column included)
    agglomerates: pd.DataFrame = field(default_factory=pd.DataFrame)  # every agglomerate (touching group)
    summary: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- single image
def locate_infobar(mg: Micrograph, crop_bottom: int | None = None, detect: bool = True) -> Micrograph:
    """Decide how many bottom rows are the microscope's data bar."""
    h = mg.shape[0]
    if crop_bottom is not None:
        if not 0 <= crop_bottom < h - io_images.MIN_SIDE_PX:
            raise InputError(mg.path, f"--crop-bottom {crop_bottom} leaves no image ({h} rows)", f"give 0..{h - io_images.MIN_SIDE_PX - 1}")
        return mg.with_(infobar_rows=int(crop_bottom), infobar_source="user")
    if not detect:
        return mg.with_(infobar_rows=0, infobar_source="disabled")
    rows = mg.metadata.get("infobar_rows_from_metadata")
    if rows:
        return mg.with_(infobar_rows=int(rows), infobar_source=mg.metadata.get("infobar_metadata_source", "metadata"))
    rows = detect_infobar(mg.pixels)
    return mg.with_(infobar_rows=rows, infobar_source="detected" if rows else "none found")


def particle_size_px(hint: str | None, pixel_size_nm: float | None, path=None) -> float | None:
    """A ``--particle-size`` hint in pixels: ``"15px"`` as is, a length via the pixel size."""
    if not hint:
        return None
    text = str(hint).strip().lower()
    if text.endswith("px"):
        try:
            value = float(text[:-2])
        except ValueError:
            raise InputError(None, f"--particle-size '{hint}' is not a size", "write e.g. 15px or 20nm") from None
        if value <= 0:
            raise InputError(None, f"--particle-size '{hint}' must be positive", "write e.g. 15px or 20nm")
        return value
    nm = parse_length_nm(hint, "--particle-size")
    if pixel_size_nm is None:
        raise InputError(path, f"--particle-size {hint} needs the pixel size, which is unknown", "give it in px, or give --pixel-size")
    return nm / pixel_size_nm


def segment_micrograph(mg: Micrograph, model: Segmenter, particle_size: str | None = None,
                       notes: list[str] | None = None, figure_text: bool = True,
                       text_lines: Callable[[], list] | None = None,
                       network_done: Callable[[], None] | None = None) -> tuple[Instances, np.ndarray]:
    """Segment the analysed field (info bar excluded); a field over
    :data:`~emparticles.blocks.BLOCKS_ABOVE_PX` block by block (:mod:`emparticles.blocks`).
    With ``figure_text``, particles on text drawn over the field (a panel letter, a scale bar's
    label) are left out (:mod:`emparticles.figure_text`); not in a field segmented in blocks: such
    a frame comes from a microscope, not from a figure, and its text would be unreadable at the
    size the detector sees it.

    Returns the instances of the field and the (H, W) label image at the full input size, with 0
    in the info bar (the instances' labels are a view of its rows). ``notes`` receives warnings.
    ``text_lines``: gives the field's :func:`~emparticles.figure_text.text_lines_over`, found
    elsewhere (in another thread) while the field was segmented. ``network_done``: called once
    the network's passes are over, by a model whose ``segment`` takes it (the trained networks);
    before segmenting for other models and for a field segmented in blocks, where the network's
    passes and the rest interleave. Not called when the field is found uniform.
    """
    field_pixels = mg.analysed_pixels
    if float(field_pixels.min()) == float(field_pixels.max()):
        where = (f"the field above the {mg.infobar_rows}-row info bar" if mg.infobar_rows else "the image")
        raise InputError(
            mg.path,
            f"{where} is uniform (every pixel = {field_pixels.flat[0]}), nothing to segment",
            "check the exposure/detector settings or the export" + (", or the info bar (--crop-bottom)" if mg.infobar_rows else ""),
        )
    size_px = particle_size_px(particle_size, mg.pixel_size_nm, mg.path)
    full = np.zeros(mg.shape, np.int32)
    signals = network_done is not None and "network_done" in inspect.signature(model.segment).parameters
    if network_done is not None and (not signals or field_pixels.size > BLOCKS_ABOVE_PX):
        network_done()  # the network's passes and the rest interleave (block by block, or in the model)
        signals = False
    if field_pixels.size > BLOCKS_ABOVE_PX:
        done = segment_in_blocks(model, field_pixels, size_px, out=full[: field_pixels.shape[0]])
        if done.cut_particles and notes is not None:
            notes.append(f"{done.cut_particles} particles wider than the {HALO_PX}-px context of the blocks this large "
                         "frame was segmented in may have their outline cut at a block's edge (check the overlay)")
        return done.instances, full
    instances, _ = (model.segment(field_pixels, size_px, network_done=network_done) if signals
                    else model.segment(field_pixels, size_px))
    if figure_text:
        instances = drop_figure_text(instances, field_pixels, notes, text_lines() if text_lines else None)
    full[: field_pixels.shape[0]] = instances.labels
    return Instances(full[: field_pixels.shape[0]], instances.scores), full


def drop_figure_text(instances: Instances, field_pixels: np.ndarray, notes: list[str] | None = None,
                     detected: list | None = None) -> Instances:
    """``instances`` without the particles on text drawn over the field
    (:func:`~emparticles.figure_text.particles_on_text`, with the lines ``detected`` if they
    were found already); ``notes`` receives a line saying what was left out."""
    from .figure_text import particles_on_text
    from .instances import drop_instances

    flags, lines = particles_on_text(field_pixels, instances.labels, detected)
    if not flags.any():
        return instances
    if notes is not None:
        read = ", ".join(f'"{line.text}"' for line in lines[:3]) + (", ..." if len(lines) > 3 else "")
        notes.append(f"{int(flags.sum())} objects on text drawn over the field ({read}) left out "
                     "(--keep-figure-text keeps them)")
    return drop_instances(instances, flags)


def drop_scale_bar(instances: Instances, full: np.ndarray, mg: Micrograph) -> tuple[Instances, np.ndarray]:
    """Leave out particles on a scale bar or its label drawn over the field (a bar in the info
    bar is already outside it): the bar is kept out of the measurement like the info bar.

    A particle is on them when half its pixels or more lie in their boxes grown by 2 px. A large
    particle the bar is drawn over stays: on the grouped split's EMPS validation and test figures,
    the particles touching a bar's box were 16 false ones, 14 of them 78-100% inside it (two of
    16-19% now stay), and 6 true ones of up to 150,000 px, 0-4% inside it, which touching alone
    had left out."""
    sb = mg.metadata.get("scale_bar") or {}
    # a bar read with high confidence only: a "low" one may be a bright particle taken for a bar
    boxes = [b for b in (sb.get("box"), sb.get("label_box")) if b] if sb.get("confidence") == "high" else []
    h = instances.labels.shape[0]
    on = np.zeros(instances.labels.shape, bool)
    for x0, y0, x1, y1 in boxes:
        if y0 < h:
            on[max(0, y0 - 2):min(h, y1 + 2), max(0, x0 - 2):x1 + 2] = True
    if not on.any():
        return instances, full
    from .instances import drop_instances

    area = np.bincount(instances.labels.ravel(), minlength=instances.count + 1)
    inside = np.bincount(instances.labels[on], minlength=instances.count + 1)
    drop = (area > 0) & (inside >= 0.5 * area)
    drop[0] = False
    if not drop.any():
        return instances, full
    kept = drop_instances(instances, drop)
    out = np.zeros_like(full)
    out[:h] = kept.labels
    return Instances(out[:h], kept.scores), out


def drop_wrong_contrast(instances: Instances, full: np.ndarray, mg: Micrograph,
                        particles: str) -> tuple[Instances, np.ndarray, int]:
    """Leave out the particles whose contrast to their surroundings contradicts ``particles``
    (``bright``, ``dark``; ``any`` keeps all): the instances, the full-size labels and how many
    were left out."""
    from .instances import drop_instances, wrong_contrast

    flags = wrong_contrast(instances.labels, mg.analysed_pixels, particles)
    n = int(flags.sum())
    if not n:
        return instances, full, 0
    kept = drop_instances(instances, flags)
    out = np.zeros_like(full)
    out[: kept.labels.shape[0]] = kept.labels
    return Instances(out[: kept.labels.shape[0]], kept.scores), out, n


def model_used(model: Segmenter) -> str:
    """The model that segmented the latest image: the chosen member of a selecting model
    (``"kind": "select"`` in its config), else the model itself."""
    return getattr(model, "last_choice", "") or model.model_id


#: Decimals of a particle's score in the tables. Its float32 mean differs in the seventh decimal
#: with the number of threads the network ran on (oneDNN splits the convolutions' sums by thread),
#: so that a cluster worker on one thread and a serial run on two wrote different last digits
#: (63 of 3,076 particles, at most 6e-8); three decimals are what a confidence can claim.
SCORE_DECIMALS = 3

#: Below this median particle score an image's result gets a low-confidence warning (scores are
#: mean foreground probabilities; on 15 EMPS images the default model's median was 0.90-0.99)
LOW_CONFIDENCE = 0.75


def analyse_micrograph(mg: Micrograph, model: Segmenter, settings: AnalysisSettings,
                       segmented: tuple[Instances, np.ndarray, list[str]] | None = None,
                       measured_px: pd.DataFrame | None = None) -> ImageResult:
    """Segment and measure one prepared micrograph (info bar already located, scale bar read).
    ``segmented``: what :func:`segment_micrograph` gave for it (instances, full-size labels and
    its notes), when it ran already. ``measured_px``: those instances measured in pixels
    (:func:`~emparticles.measure.measure_labels` without a pixel size, ultimate points
    included), used if no particle on the scale bar or of the wrong contrast is left out."""
    warnings: list[str] = list(mg.notes)
    if segmented is None:
        instances, full = segment_micrograph(mg, model, settings.particle_size, warnings,
                                             figure_text=not settings.keep_figure_text)
    else:
        instances, full, notes = segmented
        warnings += notes
    as_segmented = instances
    instances, full = drop_scale_bar(instances, full, mg)
    instances, full, n_contrast = drop_wrong_contrast(instances, full, mg, settings.particles)
    if n_contrast:
        warnings.append(f"{n_contrast} objects {'darker' if settings.particles == 'bright' else 'brighter'} than their "
                        f"surroundings left out (--particles {settings.particles})")
    if measured_px is not None and instances is as_segmented:
        table = with_physical_units(measured_px, mg.pixel_size_nm)
    else:
        table = measure_labels(instances.labels, mg.analysed_pixels, mg.pixel_size_nm, image_name=mg.stem,
                               ultimate_points=True)
    if len(table):
        table.insert(2, "score", np.round(instances.scores[table["label"].to_numpy() - 1].astype(float), SCORE_DECIMALS))
    detected = len(table)
    min_area_px = parse_area_px(settings.min_area, mg.pixel_size_nm)
    small = table["area_px"].to_numpy(float) < min_area_px
    edge = table["touches_edge"].to_numpy(bool)
    field_h, field_w = mg.analysed_pixels.shape
    weights = edge_weights(table, field_w, field_h, settings.edge_particles)
    keep = ~small & (weights > 0)
    table["edge_weight"] = weights
    table["edge_mode"] = settings.edge_particles
    table["included"] = keep
    agglomerates, of_particle = measure_agglomerates(instances.labels, mg.pixel_size_nm, image_name=mg.stem)
    table = link_particles(table, of_particle, agglomerates)
    kept = table[keep].drop(columns="included").reset_index(drop=True)
    if mg.pixel_size_nm is None:
        warnings.append("pixel size unknown: all lengths are in pixels (give --pixel-size, e.g. 2.5nm)")
    scores = instances.scores
    if detected == 0:
        warnings.append("no particles found")
    elif scores.size and float(np.median(scores)) < LOW_CONFIDENCE:
        warnings.append(f"low confidence: the model is unsure of what it found (median particle score "
                        f"{float(np.median(scores)):.2f}); check the overlay: the image may not be a micrograph of "
                        "particles this model knows (try another --model, or finetune on a few annotated images)")
    elif len(kept) == 0:
        warnings.append("every particle found was excluded (touching the edge or below --min-area)")
    coverage = float((instances.labels > 0).sum()) / mg.analysed_pixels.size
    summary = image_summary(mg, kept, detected=detected, n_edge=int(edge.sum()), n_small=int(small.sum()),
                            coverage=coverage)
    summary.update(agglomeration_row(kept, agglomerates))
    summary["edge_mode"] = settings.edge_particles
    summary["model"] = model_used(model)
    return ImageResult(mg, instances, full, kept, table, agglomerates, summary, warnings)


def agglomeration_row(particles: pd.DataFrame, agglomerates: pd.DataFrame) -> dict:
    """The agglomeration columns of an ``images.csv`` row (see
    :func:`~emparticles.stats.agglomeration.agglomeration_summary`)."""
    from .stats.agglomeration import agglomeration_summary

    s = agglomeration_summary(particles, agglomerates)
    return {k: s[k] for k in ("agglomerates", "agglomerates_of_two_or_more", "free_particles", "agglomerated_particles",
                              "fraction_agglomerated", "particles_per_agglomerate_mean",
                              "particles_per_agglomerate_median")}


def image_summary(mg: Micrograph, particles: pd.DataFrame, detected: int, n_edge: int, n_small: int,
                  coverage: float) -> dict:
    """One row of ``images.csv``."""
    ecd_px = particles["ecd_px"].to_numpy(float) if len(particles) else np.zeros(0)
    d = np.percentile(ecd_px, (10, 50, 90)) if ecd_px.size else (np.nan, np.nan, np.nan)
    ps = mg.pixel_size_nm
    row = {
        "image": mg.stem,
        "path": str(mg.path) if mg.path else "",
        "width_px": mg.shape[1],
        "height_px": mg.shape[0],
        "pixel_size_nm": ps if ps is not None else np.nan,
        "pixel_size_source": mg.pixel_size_source or "unknown",
        **pixel_size_xy(mg),
        "length_unit": "nm" if ps is not None else "px",
        "infobar_rows": mg.infobar_rows,
        "infobar_source": mg.infobar_source,
        **scale_bar_columns(mg),
        "particles_detected": detected,
        "particles_measured": len(particles),
        "edge_particles": n_edge,
        "below_min_area": n_small,
        "coverage": coverage,
        "ecd_d10_px": d[0], "ecd_d50_px": d[1], "ecd_d90_px": d[2],
        "ecd_d10_nm": d[0] * ps if ps else np.nan,
        "ecd_d50_nm": d[1] * ps if ps else np.nan,
        "ecd_d90_nm": d[2] * ps if ps else np.nan,
    }
    return row


def pixel_size_xy(mg: Micrograph) -> dict:
    """Pixel width and height (nm) as the file states them when they are what is used, else the
    pixel size used for both (``--pixel-size``, a scale bar)."""
    ps = mg.pixel_size_nm if mg.pixel_size_nm is not None else np.nan
    from_file = mg.pixel_size_source not in ("user", "scale-bar") and "pixel_size_x_nm" in mg.metadata
    return {"pixel_size_x_nm": mg.metadata["pixel_size_x_nm"] if from_file else ps,
            "pixel_size_y_nm": mg.metadata["pixel_size_y_nm"] if from_file else ps}


def scale_bar_columns(mg: Micrograph) -> dict:
    """The scale-bar reading's columns of ``images.csv`` (empty when none was looked for)."""
    sb = mg.metadata.get("scale_bar") or {}
    box = sb.get("box")
    return {"scale_bar_value_nm": sb.get("value_nm") if sb.get("value_nm") is not None else np.nan,
            "scale_bar_px": sb.get("bar_px") if sb.get("bar_px") is not None else np.nan,
            "scale_bar_text": sb.get("text", ""), "scale_bar_confidence": sb.get("confidence", ""),
            "scale_bar_box": " ".join(str(v) for v in box) if box else "",
            "scale_bar_agreement": sb.get("agreement", np.nan)}


# ----------------------------------------------------------------------------------- batches
def find_images(inputs: list[str]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files, folders (their images, not recursive) and glob patterns.

    Returns (image paths in order, without duplicates; problems as (input, message) pairs).
    """
    paths: list[Path] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            try:
                found = sorted(c for c in p.iterdir() if c.suffix.lower() in io_images.IMAGE_SUFFIXES and c.is_file())
            except PermissionError:
                problems.append((item, "folder cannot be read (permission denied). Fix: check its permissions"))
                continue
            except OSError as exc:
                problems.append((item, f"folder cannot be read ({exc.strerror}). Fix: check the path"))
                continue
            if not found:
                problems.append((item, f"folder holds no images ({', '.join(sorted(io_images.IMAGE_SUFFIXES))}). Fix: check the folder"))
            paths.extend(found)
        elif p.exists():
            paths.append(p)
        elif any(ch in item for ch in "*?["):
            matches = sorted(Path(m) for m in glob.glob(item) if Path(m).is_file())
            if not matches:
                problems.append((item, "pattern matches no file. Fix: check the pattern"))
            paths.extend(matches)
        else:
            problems.append((item, "file not found. Fix: check the path"))
    unique: list[Path] = []
    seen: set[Path] = set()
    for p in paths:
        key = p.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(p)
    return unique, problems


def unique_stems(paths: list[Path]) -> list[str]:
    """Output names per image: the file stem, with ``-2``, ``-3``... when two stems clash."""
    counts: dict[str, int] = {}
    names = []
    for p in paths:
        stem = p.stem
        counts[stem] = counts.get(stem, 0) + 1
        names.append(stem if counts[stem] == 1 else f"{stem}-{counts[stem]}")
    return names


@functools.cache
def _package_versions() -> tuple[tuple[str, str], ...]:
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("numpy", "scipy", "scikit-image", "tifffile", "pandas", "numba", "torch"):
        try:
            found.append((package, version(package)))
        except PackageNotFoundError:  # pragma: no cover
            pass
    return tuple(found)


def software_versions() -> dict[str, str]:
    """Versions of the software that made a result (read from package metadata once, no imports)."""
    return {"emparticles": __version__, "python": platform.python_version(), **dict(_package_versions())}


@dataclass
class BatchReport:
    """Outcome of a batch: per-image status and counts."""

    statuses: dict[str, dict] = field(default_factory=dict)

    @property
    def failed(self) -> list[str]:
        return [k for k, v in self.statuses.items() if v["status"] != "ok"]


_INTEGER_IMAGE_COLUMNS = ("width_px", "height_px", "infobar_rows", "particles_detected", "particles_measured",
                          "edge_particles", "below_min_area", "agglomerates", "agglomerates_of_two_or_more",
                          "free_particles", "agglomerated_particles")
#: The per-image part tables of a finished image (``.parts/NAME.KIND.parquet``)
PART_KINDS = ("particles", "all", "agglomerates")


class AnalyzeRun:
    """An ``analyze`` output folder: per-image parts under ``.parts/`` plus the combined tables.

    Each image's results are written (atomically) as soon as it is done: labels, overlay, ROIs
    and its tables (``.parts/NAME.particles.parquet`` and ``NAME.all.parquet``, typed and fast to
    write), then ``.parts/NAME.json``, which marks the image finished. The combined
    ``particles.csv``/``all_particles.csv``/``images.csv``/``run.json`` are rewritten by
    :meth:`combine` (after every image through :meth:`combine_if_due`, and at the end), so an
    interrupted batch keeps everything finished so far; a re-run skips finished images whose
    settings fingerprint matches unless ``overwrite`` is set, and rebuilds the combined tables
    from the parts.
    """

    #: combine_if_due() rewrites the combined tables only while that takes at most this share of
    #: the time since they were last written: a batch of N images would otherwise spend time
    #: growing with N^2 rewriting them (pandas writes about 8,000 particle rows per second).
    COMBINE_SHARE = 0.1

    def __init__(self, out_dir: Path, settings: AnalysisSettings, overwrite: bool = False):
        self.out = Path(out_dir)
        self.settings = settings
        self.overwrite = overwrite
        self.parts = self.out / ".parts"
        try:
            for d in (self.out, self.parts, self.out / "labels", self.out / "overlays", self.out / "rois"):
                d.mkdir(parents=True, exist_ok=True)
            # a name of its own: cluster workers open the same folder at the same moment, and a
            # shared probe was unlinked under one worker by another (its first image then failed)
            probe = self.out / f".write-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise InputError(self.out, f"output folder cannot be written ({exc.strerror})", "choose another -o folder or fix its permissions") from None
        self.report = BatchReport()
        self.started = time.strftime("%Y-%m-%dT%H:%M:%S")
        # images whose labels were corrected by hand (napari, Fiji), kept across re-runs
        self.corrected_by_hand: list[str] = []
        try:
            self.corrected_by_hand = list(json.loads((self.out / "run.json").read_text()).get("corrected_by_hand", []))
        except (OSError, ValueError):
            pass
        # Tables of the images analysed in this process, so that combining after every image does
        # not read every earlier image's parts back from disk; images reused from an earlier run
        # are read from their parts.
        self._tables: dict[str, tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]] = {}
        self._combined = False  # the combined tables include every image recorded so far
        self._particles: pd.DataFrame | None = None  # the combined particle table, once combined
        self._last_combine = (0.0, 0.0)  # (when the last combine ended, how long it took), perf_counter s

    def is_done(self, name: str) -> bool:
        meta = self.parts / f"{name}.json"
        if self.overwrite or not meta.exists():
            return False
        try:
            info = json.loads(meta.read_text())
        except (OSError, ValueError):
            return False
        if info.get("fingerprint") != self.settings.fingerprint() or info.get("status") != "ok":
            return False
        return all(self._part(name, kind).exists() for kind in PART_KINDS)

    def _part(self, name: str, kind: str) -> Path:
        """Path of an image's part table: ``kind`` is ``particles`` (measured), ``all`` or
        ``agglomerates``."""
        return self.parts / f"{name}.{kind}.parquet"

    def record_done(self, name: str, path: Path) -> None:
        info = json.loads((self.parts / f"{name}.json").read_text())
        warnings = info.get("warnings", [])
        self.report.statuses[name] = {"path": str(path), "status": "ok", "message": "; ".join(warnings),
                                      "warnings": warnings, "reused": True}
        self._combined = False

    def record_result(self, name: str, path: Path, status: dict) -> None:
        """Record an image that another process (a cluster worker) analysed and saved into this
        folder; ``status`` holds its ``status``, ``message`` and ``warnings``."""
        self.report.statuses[name] = {"path": str(path), **status}
        self._combined = False

    def keep_order(self, names: list[str]) -> None:
        """Order the images of the combined tables as ``names`` (the inputs' order), whatever
        order they finished in; input problems recorded before them stay first."""
        first = [k for k in self.report.statuses if k.startswith("input:")]
        ordered = first + [n for n in names if n in self.report.statuses]
        rest = [k for k in self.report.statuses if k not in set(ordered)]
        self.report.statuses = {k: self.report.statuses[k] for k in ordered + rest}
        self._combined = False

    def save_image(self, name: str, result: ImageResult) -> None:
        mg = result.micrograph
        particles = result.particles.copy()
        particles["image"] = name
        measured = {int(v) for v in particles["label"]} if len(particles) else set()

        def images() -> None:
            write_overlay(mg.pixels, result.full_labels, self.out / "overlays" / f"{name}.png", measured, mg.infobar_rows)

        # The overlay PNG is drawn and compressed in a second thread (numpy and Pillow's encoder
        # release the GIL) while this one writes the label TIFF, the tables and the ROIs: measured
        # on a 1280x960 SEM image with 380 particles, 0.40 s -> 0.15 s for this method (with the
        # palette overlay and Parquet parts). The TIFF was in the second thread too, which this one
        # then waited for (72 ms of 167).
        with ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(images)
            write_label_tiff(result.full_labels, self.out / "labels" / f"{name}.tif", mg.pixel_size_nm)
            everything = result.all_particles.copy()
            everything["image"] = name
            write_parquet(particles, self._part(name, "particles"))
            write_parquet(everything, self._part(name, "all"))
            agglomerates = result.agglomerates.copy()
            agglomerates["image"] = name
            write_parquet(agglomerates, self._part(name, "agglomerates"))
            write_imagej_rois(result.full_labels, self.out / "rois" / f"{name}.zip")
            pending.result()  # re-raises a failure to write them: the image is then not finished
        self._tables[name] = (particles, everything, agglomerates)
        summary = {**result.summary, "image": name}
        status = "ok" if result.summary["particles_measured"] > 0 else "no particles"
        write_json({"fingerprint": self.settings.fingerprint(), "status": status, "summary": summary,
                    "warnings": result.warnings,
                    "scores": np.round(result.instances.scores.astype(float), SCORE_DECIMALS).tolist()},
                   self.parts / f"{name}.json")
        self.report.statuses[name] = {"path": str(mg.path), "status": status,
                                      "message": "; ".join(result.warnings), "warnings": result.warnings}
        self._combined = False

    def save_failure(self, name: str, path: Path, message: str, known: dict | None = None) -> None:
        """Record a failed image, with what was read of it before it failed (``known``: pixel
        size, its source, info bar...; see :func:`known_facts`)."""
        self.report.statuses[name] = {"path": str(path), "status": "failed", "message": message, "warnings": []}
        self._tables.pop(name, None)
        self._combined = False
        facts = {k: (None if isinstance(v, float) and np.isnan(v) else v) for k, v in (known or {}).items()}
        write_json({"fingerprint": self.settings.fingerprint(), "status": "failed", "message": message,
                    "summary": {"image": name, "path": str(path), **facts}}, self.parts / f"{name}.json")

    def combine_if_due(self) -> None:
        """:meth:`combine`, unless the last combine took more than :attr:`COMBINE_SHARE` of the
        time since it ended (the parts already hold every finished image; :meth:`finish` and an
        interrupted CLI run combine in any case)."""
        ended, took = self._last_combine
        if not self._combined and time.perf_counter() - ended >= took / self.COMBINE_SHARE:
            self.combine()

    def combine(self) -> None:
        """Rewrite particles.csv, images.csv and run.json from the parts of this run's images."""
        start = time.perf_counter()
        tables, everything, agglomerates, rows = [], [], [], []
        for name in self.report.statuses:
            meta_path = self.parts / f"{name}.json"
            try:
                info = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                continue
            row = dict(info.get("summary", {}))
            row["status"] = info.get("status", "")
            row["message"] = self.report.statuses[name].get("message", "")
            rows.append(row)
            if info.get("status") in ("ok", "no particles"):
                for k, (kind, into) in enumerate((("particles", tables), ("all", everything),
                                                  ("agglomerates", agglomerates))):
                    part = self._part(name, kind)
                    if name in self._tables:
                        df = self._tables[name][k]
                    else:
                        df = pd.read_parquet(part) if part.exists() else None
                    if df is not None and len(df):
                        into.append(df)
        empty = empty_particle_table(True, ultimate_points=True)
        particles = (pd.concat(tables, ignore_index=True) if tables
                     else empty.assign(edge_weight=[], agglomerate_id=[], in_agglomerate=[]))
        write_csv(particles, self.out / "particles.csv")
        write_csv(pd.concat(everything, ignore_index=True) if everything else empty.assign(edge_weight=[], included=[], agglomerate_id=[],
                                                                             in_agglomerate=[]),
                  self.out / "all_particles.csv")
        write_csv(pd.concat(agglomerates, ignore_index=True) if agglomerates
                  else pd.DataFrame({c: [] for c in AGGLOMERATE_COLUMNS}), self.out / "agglomerates.csv")
        images = pd.DataFrame(rows) if rows else pd.DataFrame(columns=["image", "path", "status", "message"])
        for col in _INTEGER_IMAGE_COLUMNS:
            if col in images:
                images[col] = images[col].astype("Int64")
        write_csv(images, self.out / "images.csv")
        write_json({
            "command": "analyze",
            "started": self.started,
            "updated": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "settings": asdict(self.settings),
            "settings_fingerprint": self.settings.fingerprint(),
            "edge_particles": self.settings.edge_particles,
            "versions": software_versions(),
            "images": self.report.statuses,
            "failed": len(self.report.failed),
            **({"corrected_by_hand": self.corrected_by_hand} if self.corrected_by_hand else {}),
        }, self.out / "run.json")
        self._combined = True
        self._particles = particles
        now = time.perf_counter()
        self._last_combine = (now, now - start)


    def finish(self, report: bool = True) -> None:
        """Combined tables, exports (Parquet, COCO JSON) and, unless told not to, the report."""
        if not self._combined:
            self.combine()
        write_parquet(self._particles, self.out / "particles.parquet")
        scores: dict[str, np.ndarray] = {}

        def labels():  # one image's labels in memory at a time, as written (16-bit up to 65,535 particles)
            import tifffile

            for name, st in self.report.statuses.items():
                path = self.out / "labels" / f"{name}.tif"
                if st["status"] in ("ok", "no particles") and path.exists():
                    info = json.loads((self.parts / f"{name}.json").read_text())
                    scores[name] = np.asarray(info.get("scores", []), float)
                    yield name, tifffile.imread(path)

        write_coco(labels(), self.out / "coco_instances.json", scores)
        if report and scores:  # no report of a run without one analysed image (scores: one per image read)
            from .report import build_report

            build_report(self.out)


def analyse_path(path: Path, model: Segmenter, settings: AnalysisSettings) -> ImageResult:
    """Read, locate the info bar, read the scale bar, segment and measure one file."""
    mg = io_images.read_micrograph(path, settings.pixel_size_nm)
    mg = locate_infobar(mg, settings.crop_bottom, settings.detect_infobar)
    if (settings.scale_bar == "off" or _hint_needs_pixel_size(settings.particle_size)
            or _threads_allowed() < 2):
        mg = calibrate_from_scale_bar(mg, settings.scale_bar)
        try:
            return analyse_micrograph(mg, model, settings)
        except EmparticlesError as exc:
            exc.known = known_facts(mg)  # a failed image still records what was read of it
            raise
    # The scale bar is read in a second thread while this one separates and trims the field's
    # particles, which needs no pixel size without a --particle-size in nm. That thread waits for
    # the network's passes to end: beside them it took a core from ONNX Runtime's two threads,
    # whose every layer then waited for the slower one (analyze of the benchmark's 1280x960
    # frame, with the particles measured in pixels meanwhile: 0.796 -> 0.733 s to the measured
    # table, median of 10 processes alternating with the old order; a small image searched whole
    # lets it start at once: see CNNSegmenter.segment). The text detector's look over the field
    # for figure text goes first in that thread: the segmentation needs it before the scale bar.
    # A process allowed one thread (a cluster worker of one thread) reads the bar first instead.
    network_done = threading.Event()

    def after_network(work: Callable, *args):
        network_done.wait()
        return work(*args)

    with ThreadPoolExecutor(max_workers=1) as pool:
        lines = None
        if not settings.keep_figure_text and mg.analysed_pixels.size <= BLOCKS_ABOVE_PX:
            from .figure_text import text_lines_over

            lines = pool.submit(after_network, text_lines_over, mg.analysed_pixels).result
        reading = pool.submit(after_network, calibrate_from_scale_bar, mg, settings.scale_bar)
        notes: list[str] = []
        try:
            try:
                instances, full = segment_micrograph(mg, model, settings.particle_size, notes,
                                                     figure_text=not settings.keep_figure_text, text_lines=lines,
                                                     network_done=network_done.set)
            finally:
                network_done.set()  # after a failure too: the thread's work must not wait for ever
        except EmparticlesError as exc:
            exc.known = known_facts(_read_or_as_it_was(reading, mg))
            raise
        # the particles are measured in pixels while the bar is still being read (the wait for it
        # was 30-50 ms on the benchmark's frame); units are added once the pixel size is known
        measured = measure_labels(instances.labels, mg.analysed_pixels, None, image_name=mg.stem, ultimate_points=True)
        mg = reading.result()
    try:
        return analyse_micrograph(mg, model, settings, segmented=(instances, full, notes), measured_px=measured)
    except EmparticlesError as exc:
        exc.known = known_facts(mg)
        raise


def _threads_allowed() -> int:
    """The threads this process's compute may use (one on a cluster worker of one thread, where
    a second thread would only take another worker's core)."""
    from .inference import compute_threads

    return compute_threads()


def _hint_needs_pixel_size(particle_size: str | None) -> bool:
    """Whether a ``--particle-size`` hint is a length (needs the pixel size) rather than pixels."""
    return bool(particle_size) and not str(particle_size).strip().lower().endswith("px")


def _read_or_as_it_was(reading, mg: Micrograph) -> Micrograph:
    """The calibrated micrograph of a scale-bar reading in another thread, or ``mg`` if it failed."""
    try:
        return reading.result()
    except Exception:  # noqa: BLE001 - the segmentation's own error is the one reported
        return mg


def known_facts(mg: Micrograph) -> dict:
    """What is known of an image before segmentation: its ``images.csv`` columns of size,
    calibration, info bar and scale bar."""
    ps = mg.pixel_size_nm
    return {"width_px": mg.shape[1], "height_px": mg.shape[0], "pixel_size_nm": ps if ps is not None else np.nan,
            "pixel_size_source": mg.pixel_size_source or "unknown",
            **pixel_size_xy(mg), "length_unit": "nm" if ps is not None else "px",
            "infobar_rows": mg.infobar_rows, "infobar_source": mg.infobar_source, **scale_bar_columns(mg)}


#: A scale bar and the metadata disagreeing by more than this is reported
SCALE_BAR_TOLERANCE = 0.03


def calibrate_from_scale_bar(mg: Micrograph, mode: str = "auto") -> Micrograph:
    """Read the burned-in scale bar (:func:`~emparticles.io.scalebar.read_scale_bar`) and record
    it in ``mg.metadata["scale_bar"]``. Precedence: ``--pixel-size``, then the file's metadata,
    then the bar: a ``high`` reading calibrates an image that has no pixel size (source
    ``scale-bar``); one that has is cross-checked, with a note when they differ by more than
    :data:`SCALE_BAR_TOLERANCE`. A ``low`` reading never calibrates; its reason becomes a note."""
    if mode == "off":
        return mg
    if mode != "auto":
        raise InputError(None, f"--scale-bar {mode!r} is not a mode", "use auto or off")
    from .io.scalebar import read_scale_bar

    reading = read_scale_bar(mg.pixels, mg.infobar_rows)
    record = {"confidence": reading.confidence, "value_nm": reading.value_nm, "text": reading.text,
              "bar_px": reading.bar_px, "box": list(reading.box) if reading.box else None,
              "label_box": list(reading.label_box) if reading.label_box else None, "reason": reading.reason,
              "pixel_size_nm": reading.pixel_size_nm}
    notes = list(mg.notes)
    changes: dict = {}
    if mg.pixel_size_nm is None:
        if reading.pixel_size_nm:
            changes = {"pixel_size_nm": reading.pixel_size_nm, "pixel_size_source": "scale-bar"}
        elif reading.confidence == "low":
            notes.append(f"a scale bar was found but not trusted ({reading.reason}): give --pixel-size")
    elif reading.pixel_size_nm and mg.pixel_size_source != "user":
        record["agreement"] = reading.pixel_size_nm / mg.pixel_size_nm - 1
        if abs(record["agreement"]) > SCALE_BAR_TOLERANCE:
            notes.append(f"the scale bar ({reading.text} over {reading.bar_px:.0f} px: {reading.pixel_size_nm:.4g} nm/px) "
                         f"disagrees with the file's {mg.pixel_size_source} pixel size ({mg.pixel_size_nm:.4g} nm/px) by "
                         f"{100 * record['agreement']:+.1f}%; the metadata is used: check which is right")
    return mg.with_(metadata={**mg.metadata, "scale_bar": record}, notes=tuple(notes), **changes)


def error_message(exc: BaseException) -> str:
    """One line for the user: our own errors as they are, anything else with its type."""
    if isinstance(exc, EmparticlesError):
        return str(exc)
    return f"unexpected {type(exc).__name__}: {exc}"
