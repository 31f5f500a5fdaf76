"""Figures (matplotlib, Agg): each function takes tables/arrays and returns a Figure."""

from __future__ import annotations

import math

import matplotlib

matplotlib.use("Agg")
# SVG text as text, not glyph outlines: editable in Inkscape/Illustrator, ~25% smaller and faster to write.
matplotlib.rcParams["svg.fonttype"] = "none"
import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from scipy import stats

from ..stats.distribution import SizeDistribution, histogram_edges

SHAPE_COLUMNS = ["area_px", "solidity", "circularity", "compactness", "roundness", "feret_angle_deg"]


def size_histogram(x, w, dist: SizeDistribution, label: str, bins="fd", log_bins: bool = False):
    """Histogram (Freedman-Diaconis bins by default) as number density with the fitted curves."""
    fig, ax = plt.subplots(figsize=(6, 4))
    edges = histogram_edges(x, bins, log=log_bins)
    ax.hist(x, bins=edges, weights=w, density=True, color="#8fb8de", edgecolor="#2b5d8a", label="particles")
    grid = np.linspace(max(edges[0], 1e-9), edges[-1], 400)
    for name, fit in dist.fits.items():
        if name == "lognormal":
            pdf = stats.lognorm(fit.params["sigma"], scale=fit.params["median"]).pdf(grid)
        else:
            pdf = stats.norm(fit.params["mean"], fit.params["sd"]).pdf(grid)
        ax.plot(grid, pdf, lw=2, label=f"{name} fit (KS {fit.ks_statistic:.3f})")
    for q, name in ((dist.d10, "D10"), (dist.d50, "D50"), (dist.d90, "D90")):
        ax.axvline(q.value, color="k", ls=":", lw=1)
        ax.text(q.value, ax.get_ylim()[1] * 0.95, name, rotation=90, va="top", ha="right", fontsize=8)
    ax.set_xlabel(label)
    ax.set_ylabel("number density")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def cumulative(x, w, label: str):
    """Cumulative distributions Q0 (number) and Q3 (volume), ISO 9276-1."""
    fig, ax = plt.subplots(figsize=(6, 4))
    order = np.argsort(x)
    xs, ws = np.asarray(x)[order], np.asarray(w)[order]
    for r, name in ((0, "Q0 number"), (2, "Q2 area"), (3, "Q3 volume")):
        cw = np.cumsum(ws * xs**r)
        ax.step(xs, cw / cw[-1], where="post", label=name)
    ax.set_xlabel(label)
    ax.set_ylabel("cumulative fraction")
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def violins(particles: pd.DataFrame, column: str, label: str, max_images: int = 30):
    """One violin of ``column`` per image."""
    groups = [(name, g[column].dropna().to_numpy()) for name, g in particles.groupby("image", sort=False)]
    groups = [(n, v) for n, v in groups if len(v) >= 2][:max_images]
    fig, ax = plt.subplots(figsize=(max(4, 0.6 * len(groups) + 2), 4))
    if groups:
        ax.violinplot([v for _, v in groups], showmedians=True)
        ax.set_xticks(range(1, len(groups) + 1), [n for n, _ in groups], rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(label)
    fig.tight_layout()
    return fig


def feret_angle_kde(angles_deg):
    """Kernel density of the Feret angle on 0-180 degrees (wrapped, as the angle is axial)."""
    a = np.asarray(angles_deg, float)
    fig, ax = plt.subplots(figsize=(6, 3.5))
    grid = np.linspace(0, 180, 361)
    if a.size >= 3 and np.ptp(a) > 0:
        kde = stats.gaussian_kde(np.concatenate([a - 180, a, a + 180]))
        ax.plot(grid, 3 * kde(grid), lw=2)
        ax.fill_between(grid, 0, 3 * kde(grid), alpha=0.3)
    ax.set_xlim(0, 180)
    ax.set_xlabel("Feret angle (deg)")
    ax.set_ylabel("density")
    fig.tight_layout()
    return fig


def correlation_matrix(particles: pd.DataFrame):
    """Spearman correlation of area, solidity, circularity, compactness, roundness, Feret angle."""
    cols = [c for c in SHAPE_COLUMNS if c in particles]
    corr = particles[cols].corr(method="spearman")
    fig, ax = plt.subplots(figsize=(5.5, 4.8))
    im = ax.imshow(corr.to_numpy(), vmin=-1, vmax=1, cmap="RdBu_r")
    names = [c.replace("_px", "").replace("_deg", "") for c in cols]
    ax.set_xticks(range(len(cols)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(cols)), names)
    for i in range(len(cols)):
        for j in range(len(cols)):
            v = corr.iloc[i, j]
            ax.text(j, i, "" if math.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=ax, label="Spearman rho")
    fig.tight_layout()
    return fig


def ripley_plot(ripley: dict, name: str, unit: str):
    """L(r) - r with the envelope of random patterns."""
    r = np.asarray(ripley["radii"])
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.fill_between(r, np.asarray(ripley["l_low"]) - r, np.asarray(ripley["l_high"]) - r, color="0.85", label="random envelope")
    ax.plot(r, np.asarray(ripley["l_observed"]) - r, lw=2, label="observed")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel(f"r ({unit})")
    ax.set_ylabel(f"L(r) - r ({unit})")
    ax.set_title(f"{name}: Ripley's L (MAD p = {ripley['mad_p']:.3f})", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def d50_trend(rows: pd.DataFrame, unit: str):
    """D50 with its confidence interval per sample (or time point)."""
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(rows) + 2), 4))
    x = rows["time"].to_numpy(float) if "time" in rows and rows["time"].notna().all() else np.arange(len(rows))
    ax.errorbar(x, rows["d50"], yerr=[rows["d50"] - rows["d50_low"], rows["d50_high"] - rows["d50"]], fmt="o-", capsize=4)
    if "time" not in rows or not rows["time"].notna().all():
        ax.set_xticks(x, rows["sample"], rotation=30, ha="right")
    else:
        ax.set_xlabel("time")
    ax.set_ylabel(f"D50 ({unit})")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def particles_and_agglomerates(particle_ecd, agglomerate_ecd, unit: str):
    """Number distributions of the ECD of the constituent particles and of the agglomerates
    (free particles count as agglomerates of one), on common log-spaced bins."""
    fig, ax = plt.subplots(figsize=(6, 4))
    both = np.concatenate([np.asarray(particle_ecd, float), np.asarray(agglomerate_ecd, float)])
    both = both[np.isfinite(both) & (both > 0)]
    edges = np.geomspace(both.min(), both.max() * 1.0001, 30) if both.size >= 2 else 10
    ax.hist(particle_ecd, bins=edges, color="#8fb8de", edgecolor="#2b5d8a", alpha=0.8, label="constituent particles")
    ax.hist(agglomerate_ecd, bins=edges, histtype="step", lw=2, color="#c05a00", label="agglomerates")
    ax.set_xscale("log")
    ax.set_xlabel(f"ECD ({unit})")
    ax.set_ylabel("count")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
