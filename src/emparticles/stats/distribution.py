"""Size distributions (ISO 9276-1/-2 style): summary statistics with bootstrap confidence
intervals, number/area/volume-weighted forms, parametric fits and histogram binning.

All functions take plain arrays of sizes (e.g. ECD in nm) and optional per-particle weights
(e.g. Miles-Lantuejoul edge-correction weights); nothing here reads images or files.

Quantiles use one definition everywhere: the weighted midpoint ("Hazen") rule, where particle i of
n sorted sizes sits at cumulative fraction (C_i - w_i/2) / W and sizes are interpolated linearly
between those positions. With equal weights it equals ``numpy.percentile(..., method="hazen")``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

#: Moment order r of ISO 9276-1: Q0 number-, Q2 area-, Q3 volume-weighted distribution.
WEIGHTINGS = {"number": 0, "area": 2, "volume": 3}


def weighted_quantile(values: np.ndarray, q, weights: np.ndarray | None = None) -> np.ndarray:
    """Quantiles ``q`` (fractions in [0, 1]) of ``values`` under the weighted Hazen rule."""
    x = np.asarray(values, float)
    if x.size == 0:
        return np.full(np.shape(q), np.nan)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    order = np.argsort(x, kind="stable")
    x, w = x[order], w[order]
    cw = np.cumsum(w)
    pos = (cw - 0.5 * w) / cw[-1]
    return np.interp(np.asarray(q, float), pos, x)


def bootstrap_indices(n: int, n_boot: int, rng: np.random.Generator, chunk: int = 2_000_000):
    """Yield (b, n) index arrays of bootstrap resamples, in chunks that fit in memory."""
    per = max(1, chunk // max(n, 1))
    done = 0
    while done < n_boot:
        b = min(per, n_boot - done)
        yield rng.integers(0, n, size=(b, n))
        done += b


def bootstrap_quantiles(values, q, weights=None, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """(n_boot, len(q)) quantiles of bootstrap resamples (particles drawn with replacement,
    each keeping its weight). Vectorised: resamples are sorted row-wise in one call."""
    x = np.asarray(values, float)
    w = None if weights is None else np.asarray(weights, float)
    q = np.atleast_1d(np.asarray(q, float))
    rng = np.random.default_rng(seed)
    out = []
    for idx in bootstrap_indices(x.size, n_boot, rng):
        xs = x[idx]
        ws = np.ones_like(xs) if w is None else w[idx]
        order = np.argsort(xs, axis=1, kind="stable")
        xs = np.take_along_axis(xs, order, 1)
        ws = np.take_along_axis(ws, order, 1)
        cw = np.cumsum(ws, axis=1)
        pos = (cw - 0.5 * ws) / cw[:, -1:]
        # interpolate each row at q: find the segment by searchsorted per row
        res = np.empty((xs.shape[0], q.size))
        for j, qq in enumerate(q):
            k = (pos < qq).sum(axis=1)
            lo = np.clip(k - 1, 0, x.size - 1)
            hi = np.clip(k, 0, x.size - 1)
            p_lo = np.take_along_axis(pos, lo[:, None], 1)[:, 0]
            p_hi = np.take_along_axis(pos, hi[:, None], 1)[:, 0]
            x_lo = np.take_along_axis(xs, lo[:, None], 1)[:, 0]
            x_hi = np.take_along_axis(xs, hi[:, None], 1)[:, 0]
            t = np.where(p_hi > p_lo, (qq - p_lo) / np.where(p_hi > p_lo, p_hi - p_lo, 1.0), 0.0)
            res[:, j] = x_lo + np.clip(t, 0, 1) * (x_hi - x_lo)
        out.append(res)
    return np.vstack(out)


@dataclass(frozen=True)
class Interval:
    """A value with its two-sided confidence interval."""

    value: float
    low: float
    high: float


@dataclass(frozen=True)
class Fit:
    """A fitted distribution and its goodness of fit.

    ``ks_p`` is the Kolmogorov-Smirnov p-value with parameters estimated from the same data
    (conservative: a Lilliefors-type test would reject more often).
    """

    name: str
    params: dict
    ks_statistic: float
    ks_p: float
    aic: float


def fit_lognormal(x: np.ndarray, weights=None) -> Fit:
    """Maximum-likelihood log-normal: median exp(mu), geometric SD exp(sigma)."""
    x = np.asarray(x, float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    lx = np.log(x)
    mu = float(np.average(lx, weights=w))
    sigma = float(math.sqrt(np.average((lx - mu) ** 2, weights=w)))
    dist = stats.lognorm(s=sigma, scale=math.exp(mu))
    ks = stats.kstest(x, dist.cdf)
    loglik = float(np.sum(w * dist.logpdf(x)) * x.size / w.sum())
    return Fit("lognormal", {"mu": mu, "sigma": sigma, "median": math.exp(mu), "gsd": math.exp(sigma)},
               float(ks.statistic), float(ks.pvalue), 4.0 - 2.0 * loglik)


def fit_normal(x: np.ndarray, weights=None) -> Fit:
    """Maximum-likelihood normal: mean and (population) standard deviation."""
    x = np.asarray(x, float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    mean = float(np.average(x, weights=w))
    sd = float(math.sqrt(np.average((x - mean) ** 2, weights=w)))
    dist = stats.norm(mean, sd)
    ks = stats.kstest(x, dist.cdf)
    loglik = float(np.sum(w * dist.logpdf(x)) * x.size / w.sum())
    return Fit("normal", {"mean": mean, "sd": sd}, float(ks.statistic), float(ks.pvalue), 4.0 - 2.0 * loglik)


def histogram_edges(x: np.ndarray, bins: int | str | np.ndarray = "fd", log: bool = False) -> np.ndarray:
    """Bin edges: Freedman-Diaconis by default, a bin count, explicit edges, or any numpy rule;
    ``log=True`` applies the rule to log(x) and returns geometric edges."""
    x = np.asarray(x, float)
    if isinstance(bins, (np.ndarray, list, tuple)):
        return np.asarray(bins, float)
    data = np.log(x) if log else x
    if data.size < 2 or np.ptp(data) == 0:
        lo, hi = (data.min() - 0.5, data.max() + 0.5) if data.size else (0.0, 1.0)
        edges = np.linspace(lo, hi, 2)
    else:
        edges = np.histogram_bin_edges(data, bins=bins)
    return np.exp(edges) if log else edges


@dataclass(frozen=True)
class SizeDistribution:
    """Summary of one size distribution (all sizes in the unit of the input)."""

    measure: str
    unit: str
    weighting: str
    count: int
    mean: float
    sd: float
    median: float
    mode: float
    geometric_mean: float
    gsd: float
    d10: Interval
    d50: Interval
    d90: Interval
    span: float
    fits: dict[str, Fit] = field(default_factory=dict)
    best_fit: str = ""
    n_for_d50_precision: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _mode(x: np.ndarray, w: np.ndarray) -> float:
    """Mode of a kernel density estimate on log(size) (sizes are skewed)."""
    if x.size < 3 or np.ptp(x) == 0:
        return float(np.median(x)) if x.size else math.nan
    lx = np.log(x)
    kde = stats.gaussian_kde(lx, weights=w)
    grid = np.linspace(lx.min(), lx.max(), 512)
    return float(math.exp(grid[int(np.argmax(kde(grid)))]))


def describe_sizes(
    sizes,
    weights=None,
    measure: str = "ecd",
    unit: str = "nm",
    weighting: str = "number",
    n_boot: int = 2000,
    confidence: float = 0.95,
    precision_targets=(0.02, 0.05, 0.10),
    seed: int = 0,
) -> SizeDistribution:
    """Describe a size distribution.

    Parameters
    ----------
    sizes : (n,) positive sizes (ECD, Feret...).
    weights : (n,) per-particle weights (edge correction) or None.
    weighting : ``number`` (Q0), ``area`` (Q2) or ``volume`` (Q3): the size weights x^r multiply
        the particle weights, as in ISO 9276-1.
    n_boot : bootstrap resamples for the confidence intervals of D10/D50/D90.
    precision_targets : relative half-widths of the D50 interval for which the number of particles
        needed is estimated (the bootstrap half-width scales as 1/sqrt(n)).
    """
    x = np.asarray(sizes, float)
    x = x[np.isfinite(x)] if weights is None else x
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {list(WEIGHTINGS)}")
    w = w * x ** WEIGHTINGS[weighting]
    n = int(x.size)
    nan_iv = Interval(math.nan, math.nan, math.nan)
    if n == 0:
        return SizeDistribution(measure, unit, weighting, 0, *(math.nan,) * 6, nan_iv, nan_iv, nan_iv, math.nan)
    mean = float(np.average(x, weights=w))
    sd = float(math.sqrt(np.average((x - mean) ** 2, weights=w) * (n / (n - 1)))) if n > 1 else math.nan
    d10, d50, d90 = weighted_quantile(x, [0.1, 0.5, 0.9], w)
    lx = np.log(x) if (x > 0).all() else None
    gm = float(math.exp(np.average(lx, weights=w))) if lx is not None else math.nan
    gsd = float(math.exp(math.sqrt(np.average((lx - np.log(gm)) ** 2, weights=w) * n / max(n - 1, 1)))) if lx is not None and n > 1 else math.nan
    alpha = (1 - confidence) / 2
    if n > 1 and n_boot > 0:
        boot = bootstrap_quantiles(x, [0.1, 0.5, 0.9], w, n_boot=n_boot, seed=seed)
        lo, hi = np.quantile(boot, [alpha, 1 - alpha], axis=0)
    else:
        lo = hi = np.full(3, math.nan)
    fits, best = {}, ""
    if n >= 3 and np.ptp(x) > 0 and lx is not None:
        with warnings.catch_warnings():  # near-identical sizes make scipy's moments warn
            warnings.simplefilter("ignore", RuntimeWarning)
            fits = {f.name: f for f in (fit_lognormal(x, w), fit_normal(x, w))}
        best = min(fits.values(), key=lambda f: f.aic).name
    needed = {}
    if n > 1 and np.isfinite(hi[1]) and d50 > 0:
        half = (hi[1] - lo[1]) / 2 / d50
        for target in precision_targets:
            needed[f"{target:.0%}"] = math.ceil(n * (half / target) ** 2) if half > 0 else n
    return SizeDistribution(
        measure, unit, weighting, n, mean, sd, float(d50), _mode(x, w), gm, gsd,
        Interval(float(d10), float(lo[0]), float(hi[0])),
        Interval(float(d50), float(lo[1]), float(hi[1])),
        Interval(float(d90), float(lo[2]), float(hi[2])),
        float((d90 - d10) / d50) if d50 else math.nan,
        fits, best, needed,
    )
