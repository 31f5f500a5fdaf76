"""Statistics, plots, ``summary.json`` and the self-contained ``report.html`` of an analyze run.

Reads only the run's tables (``images.csv``, ``particles.csv``, ``all_particles.csv``,
``agglomerates.csv``, ``run.json``), so a report can be rebuilt at any time with ``emparticles report RUN_DIR``.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from ..io.writers import _write, write_json
from ..stats.agglomeration import EU_RANGE_NM, agglomeration_summary, nano_share
from ..stats.distribution import describe_sizes
from ..stats.spatial import spatial_summary
from . import plots

SECTIONS = {
    "inputs": "Inputs and calibration",
    "settings": "Model and settings",
    "warnings": "Warnings",
    "images": "Per-image results",
    "distribution": "Pooled size distribution",
    "plots": "Plots",
    "agglomerates": "Agglomerates and the EU nanomaterial share",
    "spatial": "Spatial arrangement",
    "methods": "Methods and definitions",
}

METHODS = """
<p><b>Measurements</b> follow ImageJ 1.53 <i>Analyze Particles</i>: area is the pixel count (holes
excluded); perimeter is the traced outline with corners counted as &radic;2; ECD = &radic;(4A/&pi;);
Feret (max) and MinFeret are the largest distance and the smallest caliper width of the convex hull of
the pixel-corner outline, FeretAngle (0-180&deg;) the angle of the Feret chord; major/minor are the
axes of ImageJ's best-fitting ellipse; aspect ratio = major/minor; circularity = 4&pi;A/P&sup2; (capped
at 1); roundness = 4A/(&pi;&middot;major&sup2;); solidity = A/convex area; compactness = ECD/major.</p>
<p><b>Size distribution</b> (ISO 9276-1/-2): quantiles D10/D50/D90 use the weighted midpoint rule
(particle i at cumulative fraction (C<sub>i</sub> &minus; w<sub>i</sub>/2)/W, linear interpolation);
Q0, Q2 and Q3 weight each particle by ECD<sup>0</sup>, ECD<sup>2</sup>, ECD<sup>3</sup>. Confidence
intervals are percentile bootstrap intervals (particles resampled with replacement). Geometric mean
and GSD are exp of the mean and SD of ln(size). Log-normal and normal fits are maximum likelihood;
KS p-values use the fitted parameters (conservative). The number of particles needed for a D50
precision scales the bootstrap half-width as 1/&radic;n.</p>
<p><b>Edge particles</b>: <i>exclude</i> drops particles touching the field border (image border or
info bar); <i>keep</i> keeps them with their cut sizes; <i>miles-lantuejoul</i> drops them and weights
every other particle by W&middot;H/((W&minus;a)(H&minus;b)), a and b its bounding-box extents, which
removes the bias against large particles.</p>
<p><b>Spatial arrangement</b> uses each particle's ultimate eroded point (all particles, edge ones
included). Nearest-neighbour distances (NND) are compared with those of 20 simulated random patterns
of the same number of points in the same field: Fisher's F-test on the variances, then Student's
t-test (equal variances) or Welch's t-test, at &alpha; = 0.01; a significant difference means
self-avoiding (larger NND) or clustered (smaller NND). The theoretical random NND is 0.5&radic;(A/n).
Clark-Evans R uses Donnelly's edge-corrected expectation and variance; Ripley's L uses the
translation edge correction with the envelope and MAD test of 99 random patterns.</p>
<p><b>Agglomerates</b> (ISO/TS 80004-2): two particles belong to the same agglomerate when a pixel of
one touches a pixel of the other, sideways or diagonally (8-connectivity), in the segmentation; an
agglomerate is a connected group of touching particles, and a free particle an agglomerate of one.
Strongly bound aggregates and weakly bound agglomerates look alike in a projection and are not told
apart. Agglomerates touching the field border are listed but left out of the agglomerate size
distribution and of the particles-per-agglomerate figures, since they are cut.</p>
<p><b>EU nanomaterial share</b> (Commission Recommendation 2022/C 229/01): the share, by number, of
the constituent particles (inside agglomerates included) whose minimum external dimension lies in
1-100 nm, estimated by the minimum Feret diameter; 95% percentile bootstrap interval over particles.
Verdict: yes when the whole interval is at or above 50%, no when it is below, undecided otherwise.
Caveats: a projection shows two dimensions, so a plate lying flat shows its large dimensions and
its thickness is not measured; particles smaller than a few pixels are not detected, so at coarse
pixel sizes the smallest particles are missing and the share is underestimated; particles cut by
the field border follow the edge-particle mode of the run.</p>
"""

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:2px solid #2b5d8a;padding-bottom:.2em;margin-top:1.6em}
.scroll{max-width:100%;overflow-x:auto}table{border-collapse:collapse;font-size:.82em;margin:.5em 0}
td,th{border:1px solid #ccc;padding:.25em .45em;text-align:right}th{white-space:normal;max-width:9em}
.thumbs figure img{max-width:320px}.lead{background:#f4f7fa;border-left:4px solid #2b5d8a;padding:.5em 1em}
th{background:#eef3f8}td:first-child,th:first-child{text-align:left}.warn{color:#8a4b00}
figure{display:inline-block;margin:.5em;vertical-align:top}figure img{max-width:520px;border:1px solid #ddd}
figcaption{font-size:.8em;color:#555;max-width:520px}
"""


def _fmt(v, digits=4):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return ""
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return str(v)


#: Column headings in words (the tables' own column names are kept in the CSV files)
HEADINGS = {
    "image": "image", "width_px": "width (px)", "height_px": "height (px)", "pixel_size_nm": "pixel size (nm)",
    "pixel_size_source": "pixel size from", "length_unit": "unit", "infobar_rows": "info bar rows",
    "infobar_source": "info bar found by", "status": "status", "particles_detected": "particles found",
    "particles_measured": "in the statistics", "edge_particles": "cut by the border", "coverage": "area covered",
    "ecd_d10_nm": "ECD D10 (nm)", "ecd_d50_nm": "ECD D50 (nm)", "ecd_d90_nm": "ECD D90 (nm)",
    "ecd_d10_px": "ECD D10 (px)", "ecd_d50_px": "ECD D50 (px)", "ecd_d90_px": "ECD D90 (px)",
    "unit": "unit", "count": "particles", "mean": "mean", "sd": "SD", "D10": "D10", "D50": "D50",
    "D50_low": "D50 95% CI low", "D50_high": "D50 95% CI high", "D90": "D90", "GSD": "GSD", "n": "points",
    "nnd_mean_nnd": "mean NND", "nnd_expected_random_nnd": "NND expected if random",
    "nnd_reference_mean_nnd": "mean NND of simulated random fields", "nnd_f_statistic": "F (variances)",
    "nnd_f_p": "F-test p", "nnd_t_test": "t-test used", "nnd_t_statistic": "t", "nnd_t_p": "t-test p",
    "nnd_classification": "arrangement", "clark_evans_r": "Clark-Evans R", "clark_evans_z": "Clark-Evans z",
    "clark_evans_p": "Clark-Evans p", "ripley_mad_p": "Ripley's L p (MAD)", "setting": "setting", "value": "value",
}


def _table(df: pd.DataFrame) -> str:
    shown = df.rename(columns={c: HEADINGS.get(c, c.replace("_", " ")) for c in df.columns})
    for col in shown.columns:  # counts as counts: 9 of 29, not 9.0 of 29.0
        values = shown[col]
        if values.dtype.kind == "f" and values.notna().any() and (values.dropna() % 1 == 0).all() and \
                values.dropna().abs().max() < 1e12 and col not in ("pixel size (nm)",):
            shown[col] = values.astype("Int64")
    table = shown.to_html(index=False, escape=True, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    return f"<div class='scroll'>{table}</div>"


def _figure_html(png: bytes, caption: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _save(fig, plots_dir: Path, name: str) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    png = buf.getvalue()
    _write(plots_dir / f"{name}.png", lambda p: p.write_bytes(png))
    _write(plots_dir / f"{name}.svg", lambda p: fig.savefig(p, format="svg"))
    plt.close(fig)
    return png


def _setting(value) -> str:
    """A setting in words: None is "not set (automatic)", booleans yes/no."""
    if value is None:
        return "not set (automatic)"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value if isinstance(value, str) else json.dumps(value)


def _interval(iv) -> str:
    return f"{_fmt(iv.value)} [{_fmt(iv.low)}, {_fmt(iv.high)}]"


#: Size measures a report can describe: name -> (nm column, px column, nm unit, px unit).
SIZE_MEASURES = {
    "ecd": ("ecd_nm", "ecd_px", "nm", "px"),
    "feret_max": ("feret_max_nm", "feret_max_px", "nm", "px"),
    "feret_min": ("feret_min_nm", "feret_min_px", "nm", "px"),
    "area": ("area_nm2", "area_px", "nm^2", "px^2"),
}


def build_report(run_dir: str | Path, n_boot: int = 2000, seed: int = 0, measure: str = "ecd",
                 bins: str | int = "fd", log_bins: bool = False) -> dict:
    """Compute the run's statistics and write ``summary.json``, ``plots/`` and ``report.html``.

    Parameters
    ----------
    measure : size measure of the distribution: ``ecd`` (default), ``feret_max``, ``feret_min``
        or ``area``.
    bins : histogram bins: a numpy rule (``fd`` = Freedman-Diaconis, ``sturges``...) or a count.
    log_bins : bins equal in log(size).

    Returns the summary dict.
    """
    if measure not in SIZE_MEASURES:
        raise ValueError(f"measure must be one of {list(SIZE_MEASURES)}")
    nm_col, px_col, nm_unit, px_unit = SIZE_MEASURES[measure]
    run_dir = Path(run_dir)
    run = json.loads((run_dir / "run.json").read_text())
    settings = run.get("settings", {})
    edge_mode = settings.get("edge_particles", "exclude")
    images = pd.read_csv(run_dir / "images.csv")
    particles = pd.read_csv(run_dir / "particles.csv")
    all_path = run_dir / "all_particles.csv"
    all_particles = pd.read_csv(all_path) if all_path.exists() else particles
    ok = images[images["status"] == "ok"] if "status" in images else images
    warnings: list[str] = []

    calibrated = ok["pixel_size_nm"].notna() if len(ok) else pd.Series(dtype=bool)
    if len(ok) and calibrated.all():
        unit, column, pooled = nm_unit, nm_col, particles
    elif len(ok) and not calibrated.any():
        unit, column, pooled = px_unit, px_col, particles
        warnings.append("No image has a known pixel size: every size is in pixels.")
    else:
        unit, column = nm_unit, nm_col
        cal_names = set(ok.loc[calibrated, "image"])
        pooled = particles[particles["image"].isin(cal_names)]
        missing = sorted(set(ok["image"]) - cal_names)
        warnings.append(f"Pixel size unknown for {', '.join(missing)}: left out of the pooled distribution.")
    sizes = ok["pixel_size_nm"].dropna().to_numpy(float) if len(ok) else np.zeros(0)
    if sizes.size >= 2 and sizes.max() / sizes.min() > 3:
        warnings.append(f"Images of very different pixel sizes ({sizes.min():.4g} to {sizes.max():.4g} nm/px) are pooled "
                        "into one distribution: the coarse images cannot see the small particles the fine ones show. "
                        "Pool only images of one magnification (emparticles compare treats them as samples).")
    for _, row in images.iterrows():
        if row.get("status") not in ("ok", None):
            warnings.append(f"{row['image']}: {row.get('status')} ({row.get('message', '')})")
        detected = int(row.get("particles_detected", 0) or 0)
        edge = int(row.get("edge_particles", 0) or 0)
        if detected and edge / detected > 0.2:
            warnings.append(f"{row['image']}: {edge} of {detected} particles touch the field border "
                            f"({100 * edge / detected:.0f}%); consider a lower magnification or edge mode miles-lantuejoul.")

    x = pooled[column].to_numpy(float) if column in pooled else np.zeros(0)
    w = pooled["edge_weight"].to_numpy(float) if "edge_weight" in pooled else np.ones_like(x)
    good = np.isfinite(x) & (x > 0)
    x, w = x[good], w[good]
    dist = describe_sizes(x, w, measure=measure, unit=unit, n_boot=n_boot, seed=seed)
    weighted = {name: describe_sizes(x, w, measure=measure, unit=unit, weighting=name, n_boot=max(200, n_boot // 4), seed=seed)
                for name in ("area", "volume")} if x.size and measure != "area" else {}
    if 0 < dist.count < 100:
        warnings.append(f"Only {dist.count} particles in the pooled distribution: D50 is uncertain "
                        f"({_interval(dist.d50)} {unit}); about {dist.n_for_d50_precision.get('5%', '?')} are needed for +-5%.")

    # per-image distributions
    per_image = []
    for name, g in particles.groupby("image", sort=False):
        img_row = images[images["image"] == name].iloc[0]
        col = nm_col if pd.notna(img_row.get("pixel_size_nm")) and nm_col in g else px_col
        u = nm_unit if col == nm_col else px_unit
        gv = g[col].to_numpy(float)
        gw = g["edge_weight"].to_numpy(float) if "edge_weight" in g else None
        d = describe_sizes(gv, gw, unit=u, n_boot=500, seed=seed)
        per_image.append({"image": name, "unit": u, "count": d.count, "mean": d.mean, "sd": d.sd,
                          "D10": d.d10.value, "D50": d.d50.value, "D50_low": d.d50.low, "D50_high": d.d50.high,
                          "D90": d.d90.value, "GSD": d.gsd})
    per_image_df = pd.DataFrame(per_image)

    # spatial, per image, from every particle's ultimate eroded point
    spatial_rows, ripleys = [], {}
    for _, row in ok.iterrows():
        g = all_particles[all_particles["image"] == row["image"]]
        ps = row.get("pixel_size_nm")
        scale, u = (float(ps), "nm") if pd.notna(ps) else (1.0, "px")
        if "uep_x_px" not in g or len(g) < 3:
            continue
        pts = g[["uep_x_px", "uep_y_px"]].to_numpy(float) * scale
        width = float(row["width_px"]) * scale
        height = float(row["height_px"] - row.get("infobar_rows", 0)) * scale
        s = spatial_summary(pts, width, height, u, seed=seed)
        ripleys[row["image"]] = (s.pop("_ripley"), u)
        spatial_rows.append({"image": row["image"], **s})
    spatial_df = pd.DataFrame(spatial_rows)

    agglomeration = agglomerate_statistics(run_dir, ok, pooled, unit, column, n_boot, seed)

    # plots
    plots_dir = run_dir / "plots"
    figures = []
    name_of = {"ecd": "ECD", "feret_max": "Feret max", "feret_min": "Feret min", "area": "Area"}[measure]
    label = f"{name_of} ({unit})"
    bin_rule = int(bins) if str(bins).isdigit() else bins
    if x.size >= 2:
        figures.append((_save(plots.size_histogram(x, w, dist, label, bins=bin_rule, log_bins=log_bins), plots_dir, f"{measure}_histogram"),
                        f"{name_of} histogram (bins: {bins}{', log' if log_bins else ''}) with log-normal and normal fits; edge mode {edge_mode}"))
        figures.append((_save(plots.cumulative(x, w, label), plots_dir, f"{measure}_cumulative"),
                        "Cumulative distributions Q0 (number), Q2 (area), Q3 (volume)"))
    if len(particles):
        vcol = column if column in particles else px_col
        figures.append((_save(plots.violins(particles, vcol, f"{name_of} ({unit if vcol == column else px_unit})"), plots_dir, f"{measure}_violin_per_image"),
                        f"{name_of} per image"))
        figures.append((_save(plots.feret_angle_kde(particles["feret_angle_deg"]), plots_dir, "feret_angle_kde"),
                        "Feret angle density (axial, wrapped at 0/180 deg)"))
        if len(particles) >= 3:
            figures.append((_save(plots.correlation_matrix(particles), plots_dir, "shape_correlation"),
                            "Spearman correlation of shape descriptors"))
    if agglomeration.get("figure") is not None:
        figures.append((_save(agglomeration.pop("figure"), plots_dir, "particles_and_agglomerates_ecd"),
                        ("ECD of the constituent particles and of the agglomerates (free particles count "
                         "as agglomerates of one; agglomerates cut by the border left out)")))
    agglomeration.pop("figure", None)
    for i, (name, (rip, u)) in enumerate(ripleys.items()):
        if i >= 6:
            break
        figures.append((_save(plots.ripley_plot(rip, name, u), plots_dir, f"ripley_{name}"), f"{name}: Ripley's L(r) - r"))

    summary = {
        "run": str(run_dir), "edge_particles": edge_mode, "size_measure": measure, "unit": unit,
        "histogram_bins": str(bins), "log_bins": log_bins,
        "pooled": dist.to_dict(), "pooled_area_weighted": weighted.get("area").to_dict() if weighted else None,
        "pooled_volume_weighted": weighted.get("volume").to_dict() if weighted else None,
        "per_image": per_image, "spatial": spatial_rows, "warnings": warnings,
        "agglomeration": agglomeration.get("summary"), "agglomerate_size": agglomeration.get("size"),
        "eu_nano_share": agglomeration.get("nano"),
        "settings": settings, "versions": run.get("versions", {}),
    }
    write_json(summary, run_dir / "summary.json")
    _write(run_dir / "report.html", lambda p: p.write_text(
        _html(run, images, settings, warnings, per_image_df, dist, weighted, figures, spatial_df, unit, name_of,
              agglomeration, _thumbnails(run_dir, ok)), encoding="utf-8"))
    return summary


def agglomerate_statistics(run_dir: Path, ok: pd.DataFrame, particles: pd.DataFrame, unit: str, column: str,
                           n_boot: int, seed: int) -> dict:
    """Agglomeration summary, agglomerate size distribution (ECD, agglomerates not cut by the
    border) and EU nanomaterial share of the pooled particles; a figure of both distributions.
    Empty for a run without ``agglomerates.csv``."""
    path = run_dir / "agglomerates.csv"
    if not path.exists():
        return {}
    agglomerates = pd.read_csv(path)
    agglomerates = agglomerates[agglomerates["image"].isin(set(ok["image"]))] if len(agglomerates) else agglomerates
    if set(particles["image"]) != set(ok["image"]) and len(particles):
        agglomerates = agglomerates[agglomerates["image"].isin(set(particles["image"]))]
    summary = agglomeration_summary(particles, agglomerates)
    length_unit = "nm" if unit.startswith("nm") else "px"
    ecd_col = f"ecd_{length_unit}"
    whole = agglomerates[~agglomerates["touches_edge"].astype(bool)] if len(agglomerates) else agglomerates
    sizes = whole[ecd_col].to_numpy(float) if ecd_col in whole else np.zeros(0)
    size = describe_sizes(sizes, unit=length_unit, n_boot=max(200, n_boot // 4), seed=seed) if sizes.size else None
    if length_unit == "nm" and "feret_min_nm" in particles:
        w = particles["edge_weight"].to_numpy(float) if "edge_weight" in particles else None
        nano = nano_share(particles["feret_min_nm"].to_numpy(float), w, n_boot=n_boot, seed=seed).to_dict()
        smallest = float(np.nanmax(ok["pixel_size_nm"])) * 3 if len(ok) else float("nan")
        nano["resolution_note"] = (f"particles below about {smallest:.3g} nm (3 pixels at the coarsest pixel size of "
                                   f"the run) cannot be detected and are missing from the count")
    else:
        nano = {"verdict": "not assessable", "explanation": "The pixel size is unknown for some images, so minimum "
                "dimensions in nm, and the EU share, cannot be given. Give --pixel-size."}
    nano["range_nm"] = list(EU_RANGE_NM)
    p_ecd = particles[ecd_col].to_numpy(float) if ecd_col in particles else np.zeros(0)
    figure = plots.particles_and_agglomerates(p_ecd, sizes, length_unit) if p_ecd.size and sizes.size else None
    return {"summary": summary, "size": size.to_dict() if size else None, "nano": nano, "figure": figure,
            "unit": length_unit}


def _agglomerate_html(agglomeration: dict) -> str:
    if not agglomeration:
        return "<p>No agglomerate table in this run (made by an older version): run analyze again.</p>"
    s, nano, u = agglomeration["summary"], agglomeration["nano"], agglomeration["unit"]
    size = agglomeration.get("size") or {}
    rows = [("constituent particles (in the statistics)", s["particles"]),
            ("free particles", s["free_particles"]),
            ("particles in agglomerates of two or more", s["agglomerated_particles"]),
            ("fraction agglomerated", _fmt(s["fraction_agglomerated"], 3)),
            ("agglomerates (free particles included)", s["agglomerates"]),
            ("of which not cut by the border", s["agglomerates_not_touching_edge"]),
            ("of two or more particles", s["agglomerates_of_two_or_more"]),
            ("particles per agglomerate: mean", _fmt(s["particles_per_agglomerate_mean"], 3)),
            ("particles per agglomerate: median", _fmt(s["particles_per_agglomerate_median"], 3)),
            ("particles per agglomerate: largest", s["particles_per_agglomerate_max"])]
    if size:
        for q in ("d10", "d50", "d90"):
            iv = size[q]
            rows.append((f"agglomerate ECD {q.upper()} ({u}) [95% CI]",
                         f"{_fmt(iv['value'])} [{_fmt(iv['low'])}, {_fmt(iv['high'])}]"))
    body = _table(pd.DataFrame(rows, columns=["agglomeration", "value"]))
    verdict = {"yes": "Yes", "no": "No", "undecided": "Undecided"}.get(nano.get("verdict"), "Not assessable")
    body += (f"<p><b>Nanomaterial by the EU definition: {verdict}.</b> {html.escape(nano.get('explanation', ''))}</p>")
    if "resolution_note" in nano:
        body += f"<p>Caveat: {html.escape(nano['resolution_note'])}; see Methods for the others.</p>"
    return body


def _thumbnails(run_dir: Path, ok: pd.DataFrame, most: int = 24, width: int = 320) -> list[tuple[str, bytes]]:
    """(image, PNG) of the segmentation overlays of up to ``most`` analysed images, ``width`` px wide."""
    from PIL import Image

    thumbs = []
    for name in list(ok["image"])[:most] if len(ok) else []:
        path = run_dir / "overlays" / f"{name}.png"
        if not path.exists():
            continue
        with Image.open(path) as im:
            im = im.convert("RGB")
            im.thumbnail((width, width * 4))
            buf = io.BytesIO()
            im.save(buf, format="PNG", optimize=True)
        thumbs.append((str(name), buf.getvalue()))
    return thumbs


LEAD = """<p class='lead'>This report describes the particles that emparticles found and measured in the
images listed under <i>Inputs</i>. Each particle was outlined by a segmentation model (named under
<i>Model and settings</i>) and measured with ImageJ's definitions; lengths are in nanometres where the
pixel size was known (from the microscope's metadata or the image's scale bar) and in pixels otherwise.
Particles cut by the image border are left out of the size statistics unless the settings say otherwise.
Check the outlines under <i>Per-image results</i> before citing any figure, and read <i>Warnings</i>
first: they say what may make a figure unreliable. Definitions are under <i>Methods</i>.</p>"""


def _html(run, images, settings, warnings, per_image_df, dist, weighted, figures, spatial_df, unit, name_of="ECD",
          agglomeration: dict | None = None, thumbs: list | None = None) -> str:
    head = (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>emparticles report</title>"
            f"<style>{CSS}</style></head><body><h1>Particle analysis report</h1>"
            f"<p>{html.escape(str(len(images)))} image(s); updated {html.escape(run.get('updated', ''))}; "
            f"emparticles {html.escape(run.get('versions', {}).get('emparticles', ''))}.</p>")
    parts = [head, LEAD]
    nav = " &middot; ".join(f"<a href='#{k}'>{v}</a>" for k, v in SECTIONS.items())
    parts.append(f"<nav>{nav}</nav>")

    cols = [c for c in ["image", "width_px", "height_px", "pixel_size_nm", "pixel_size_source", "length_unit",
                        "infobar_rows", "infobar_source", "status"] if c in images]
    parts.append(f"<section id='inputs'><h2>{SECTIONS['inputs']}</h2>{_table(images[cols])}</section>")

    srows = pd.DataFrame([{"setting": k.replace("_", " "), "value": _setting(v)} for k, v in settings.items()])
    parts.append(f"<section id='settings'><h2>{SECTIONS['settings']}</h2>{_table(srows)}</section>")

    wl = "".join(f"<li class='warn'>{html.escape(w)}</li>" for w in warnings) or "<li>None.</li>"
    parts.append(f"<section id='warnings'><h2>{SECTIONS['warnings']}</h2><ul>{wl}</ul></section>")

    icols = [c for c in ["image", "particles_detected", "particles_measured", "edge_particles", "coverage",
                         "ecd_d10_nm", "ecd_d50_nm", "ecd_d90_nm", "ecd_d10_px", "ecd_d50_px", "ecd_d90_px"] if c in images]
    body = _table(images[icols])
    if len(per_image_df):
        body += "<p>Size distribution per image (D50 with 95% bootstrap interval):</p>" + _table(per_image_df)
    if thumbs:
        body += ("<p>Segmentation of each image (cyan: measured; orange: left out, e.g. cut by the border; red: "
                 "info bar):</p><div class='thumbs'>" + "".join(_figure_html(png, name) for name, png in thumbs)
                 + "</div>")
    parts.append(f"<section id='images'><h2>{SECTIONS['images']}</h2>{body}</section>")

    if dist.count:
        rows = [("particles", dist.count), ("mean", _fmt(dist.mean)), ("SD", _fmt(dist.sd)),
                ("median", _fmt(dist.median)), ("mode", _fmt(dist.mode)),
                ("geometric mean", _fmt(dist.geometric_mean)), ("GSD", _fmt(dist.gsd)),
                ("D10 [95% CI]", _interval(dist.d10)), ("D50 [95% CI]", _interval(dist.d50)),
                ("D90 [95% CI]", _interval(dist.d90)), ("span (D90-D10)/D50", _fmt(dist.span))]
        for name, d in weighted.items():
            rows.append((f"D50 {name}-weighted (Q{2 if name == 'area' else 3})", _interval(d.d50)))
        for name, fit in dist.fits.items():
            params = ", ".join(f"{k} {_fmt(v)}" for k, v in fit.params.items())
            rows.append((f"{name} fit", f"{params}; KS {_fmt(fit.ks_statistic)} (p {_fmt(fit.ks_p)}); AIC {_fmt(fit.aic)}"))
        rows.append(("best fit (AIC)", dist.best_fit))
        if dist.d50.value and np.isfinite(dist.d50.high) and np.isfinite(dist.d50.low):
            now = (dist.d50.high - dist.d50.low) / 2 / dist.d50.value
            rows.append(("D50 precision now (half-width of its 95% CI)", f"+-{100 * now:.1f}%"))
        for target, n in dist.n_for_d50_precision.items():
            needed = max(int(n), 50)  # below about 50 particles a bootstrap interval is itself unreliable
            rows.append((f"particles for D50 +-{target}", "reached" if needed <= dist.count
                         else f"about {needed} (measured: {dist.count})"))
        tab = pd.DataFrame(rows, columns=[f"{name_of} ({unit})", "value"])
        body = _table(tab)
    else:
        body = "<p>No particles to describe.</p>"
    parts.append(f"<section id='distribution'><h2>{SECTIONS['distribution']}</h2>{body}</section>")

    figs = "".join(_figure_html(png, cap) for png, cap in figures) or "<p>No plots (no particles).</p>"
    parts.append(f"<section id='plots'><h2>{SECTIONS['plots']}</h2>{figs}</section>")

    if len(spatial_df):
        key = ["image", "n", "nnd_classification", "nnd_mean_nnd", "nnd_expected_random_nnd", "clark_evans_r",
               "clark_evans_p", "ripley_mad_p", "unit"]
        detail = ["image", "nnd_reference_mean_nnd", "nnd_f_statistic", "nnd_f_p", "nnd_t_test", "nnd_t_statistic",
                  "nnd_t_p", "clark_evans_z"]
        body = ("<p>Arrangement of the particles' centres per image: <i>random</i>, <i>self-avoiding</i> (more evenly "
                "spaced than random) or <i>clustered</i>, from their nearest-neighbour distances (NND); Clark-Evans "
                "R is 1 for a random pattern, above 1 for even spacing, below 1 for clustering.</p>"
                + _table(spatial_df[[c for c in key if c in spatial_df]])
                + "<details><summary>Test statistics</summary>"
                + _table(spatial_df[[c for c in detail if c in spatial_df]]) + "</details>")
    else:
        body = "<p>Too few particles for spatial statistics.</p>"
    parts.append(f"<section id='agglomerates'><h2>{SECTIONS['agglomerates']}</h2>"
                 f"{_agglomerate_html(agglomeration or {})}</section>")
    parts.append(f"<section id='spatial'><h2>{SECTIONS['spatial']}</h2>{body}</section>")
    parts.append(f"<section id='methods'><h2>{SECTIONS['methods']}</h2>{METHODS}</section>")
    parts.append("</body></html>")
    return "\n".join(parts)

