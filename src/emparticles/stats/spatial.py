"""Spatial arrangement of particles in a rectangular field: nearest-neighbour tests, Clark-Evans R
with Donnelly's edge correction, Ripley's L with a Monte-Carlo envelope, and simulators of the
three reference patterns (Poisson, hard-core, Thomas cluster) used to validate them.

Points are particle positions (ultimate eroded points) as an (n, 2) array of (x, y) in any length
unit; ``width`` and ``height`` give the field in the same unit, with its corner at (0, 0).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats
from scipy.spatial import cKDTree

CLASSES = ("random", "self-avoiding", "clustered")


def nearest_neighbour_distances(points: np.ndarray) -> np.ndarray:
    """(n,) distance from each point to its nearest other point."""
    pts = np.asarray(points, float)
    if len(pts) < 2:
        return np.full(len(pts), np.nan)
    d, _ = cKDTree(pts).query(pts, k=2)
    return d[:, 1]


# --------------------------------------------------------------------------------- patterns
def simulate_poisson(n: int, width: float, height: float, rng: np.random.Generator) -> np.ndarray:
    """n points uniformly at random (complete spatial randomness, binomial process)."""
    return rng.uniform((0, 0), (width, height), size=(n, 2))


def simulate_hardcore(n: int, width: float, height: float, r: float, rng: np.random.Generator,
                      max_tries: int = 200_000) -> np.ndarray:
    """Up to n points no closer than ``r`` (random sequential inhibition)."""
    pts: list[tuple[float, float]] = []
    grid: dict[tuple[int, int], list[int]] = {}
    tries = 0
    while len(pts) < n and tries < max_tries:
        tries += 1
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        gx, gy = int(x // r), int(y // r)
        ok = True
        for i in range(gx - 1, gx + 2):
            for j in range(gy - 1, gy + 2):
                for k in grid.get((i, j), ()):
                    if (pts[k][0] - x) ** 2 + (pts[k][1] - y) ** 2 < r * r:
                        ok = False
                        break
                if not ok:
                    break
            if not ok:
                break
        if ok:
            grid.setdefault((gx, gy), []).append(len(pts))
            pts.append((x, y))
    return np.array(pts, float).reshape(-1, 2)


def simulate_thomas(n_parents: int, mean_children: float, sigma: float, width: float, height: float,
                    rng: np.random.Generator) -> np.ndarray:
    """Thomas cluster process: Poisson parents, Poisson(mean_children) children each, Gaussian
    displacement ``sigma``; children outside the field are dropped."""
    parents = rng.uniform((0, 0), (width, height), size=(n_parents, 2))
    counts = rng.poisson(mean_children, n_parents)
    children = np.repeat(parents, counts, axis=0) + rng.normal(0, sigma, (counts.sum(), 2))
    inside = (children[:, 0] >= 0) & (children[:, 0] < width) & (children[:, 1] >= 0) & (children[:, 1] < height)
    return children[inside]


# ---------------------------------------------------------------------------------- tests
@dataclass(frozen=True)
class NearestNeighbourTest:
    """Observed nearest-neighbour distances against those of random patterns in the same field.

    The reference sample pools the NNDs of ``n_reference`` simulated random patterns of the same
    size in the same field, so edge effects are the same on both sides. Fisher's F-test compares
    the variances; Student's t-test (equal variances) or Welch's t-test (unequal) then compares
    the means. A significant difference classifies the pattern as self-avoiding (larger NND) or
    clustered (smaller NND); otherwise it is random.
    """

    n: int
    mean_nnd: float
    sd_nnd: float
    expected_random_nnd: float  # 0.5 sqrt(A / n)
    reference_mean_nnd: float
    reference_sd_nnd: float
    f_statistic: float
    f_p: float
    t_test: str
    t_statistic: float
    t_p: float
    alpha: float
    classification: str


def nnd_test(points, width: float, height: float, alpha: float = 0.01, n_reference: int = 20,
             seed: int = 0) -> NearestNeighbourTest:
    """Classify a point pattern as random, self-avoiding or clustered (see NearestNeighbourTest)."""
    pts = np.asarray(points, float)
    n = len(pts)
    area = width * height
    if n < 3:
        nan = math.nan
        return NearestNeighbourTest(n, nan, nan, nan, nan, nan, nan, nan, "", nan, nan, alpha, "too few particles")
    obs = nearest_neighbour_distances(pts)
    rng = np.random.default_rng(seed)
    ref = np.concatenate([nearest_neighbour_distances(simulate_poisson(n, width, height, rng)) for _ in range(n_reference)])
    v_obs, v_ref = obs.var(ddof=1), ref.var(ddof=1)
    f = v_obs / v_ref
    df1, df2 = n - 1, ref.size - 1
    f_p = 2 * min(stats.f.cdf(f, df1, df2), stats.f.sf(f, df1, df2))
    equal_var = f_p >= alpha
    with warnings.catch_warnings():  # identical NNDs (a perfect lattice) make scipy warn, not fail
        warnings.simplefilter("ignore", RuntimeWarning)
        t = stats.ttest_ind(obs, ref, equal_var=equal_var)
    if t.pvalue >= alpha:
        verdict = "random"
    else:
        verdict = "self-avoiding" if obs.mean() > ref.mean() else "clustered"
    return NearestNeighbourTest(
        n, float(obs.mean()), float(obs.std(ddof=1)), 0.5 * math.sqrt(area / n), float(ref.mean()),
        float(ref.std(ddof=1)), float(f), float(f_p), "Student" if equal_var else "Welch",
        float(t.statistic), float(t.pvalue), alpha, verdict,
    )


@dataclass(frozen=True)
class ClarkEvans:
    """Clark-Evans aggregation index R = observed / expected mean NND with Donnelly's (1978)
    edge-corrected expectation and variance for a rectangle; R < 1 clustered, R > 1 regular."""

    r: float
    expected_nnd: float
    z: float
    p: float


def clark_evans(points, width: float, height: float) -> ClarkEvans:
    pts = np.asarray(points, float)
    n = len(pts)
    if n < 3:
        return ClarkEvans(math.nan, math.nan, math.nan, math.nan)
    area, perimeter = width * height, 2 * (width + height)
    expected = 0.5 * math.sqrt(area / n) + (0.0514 + 0.041 / math.sqrt(n)) * perimeter / n
    var = 0.0703 * area / n**2 + 0.037 * perimeter * math.sqrt(area / n**5)
    obs = nearest_neighbour_distances(pts).mean()
    z = (obs - expected) / math.sqrt(var)
    return ClarkEvans(float(obs / expected), float(expected), float(z), float(2 * stats.norm.sf(abs(z))))


def ripley_k(points, width: float, height: float, radii: np.ndarray) -> np.ndarray:
    """Ripley's K(r) with the translation edge correction for a rectangle."""
    pts = np.asarray(points, float)
    n = len(pts)
    radii = np.asarray(radii, float)
    if n < 2:
        return np.full(radii.shape, np.nan)
    tree = cKDTree(pts)
    pairs = tree.query_pairs(float(radii.max()), output_type="ndarray")
    if len(pairs) == 0:
        return np.zeros(radii.shape)
    d = pts[pairs[:, 0]] - pts[pairs[:, 1]]
    dist = np.hypot(d[:, 0], d[:, 1])
    weight = (width * height) / ((width - np.abs(d[:, 0])) * (height - np.abs(d[:, 1])))
    order = np.argsort(dist)
    cum = np.concatenate([[0.0], np.cumsum(weight[order])])
    counts = cum[np.searchsorted(dist[order], radii, side="right")]
    area = width * height
    return 2.0 * counts * area / (n * (n - 1))  # each unordered pair counts twice


@dataclass(frozen=True)
class RipleyL:
    """L(r) = sqrt(K(r)/pi) with the pointwise envelope of ``n_sim`` random patterns and the
    global maximum-absolute-deviation test of L(r) - r (Diggle's MAD test)."""

    radii: list
    l_observed: list
    l_low: list
    l_high: list
    mad_p: float
    above_envelope: bool
    below_envelope: bool


def ripley_l(points, width: float, height: float, n_sim: int = 99, n_radii: int = 40,
             seed: int = 0) -> RipleyL:
    pts = np.asarray(points, float)
    n = len(pts)
    radii = np.linspace(0, 0.25 * min(width, height), n_radii + 1)[1:]
    if n < 3:
        empty = [math.nan] * n_radii
        return RipleyL(radii.tolist(), empty, empty, empty, math.nan, False, False)
    lo = np.sqrt(ripley_k(pts, width, height, radii) / math.pi)
    rng = np.random.default_rng(seed)
    sims = np.array([np.sqrt(ripley_k(simulate_poisson(n, width, height, rng), width, height, radii) / math.pi)
                     for _ in range(n_sim)])
    u_obs = np.max(np.abs(lo - radii))
    u_sim = np.max(np.abs(sims - radii), axis=1)
    p = (1 + int((u_sim >= u_obs).sum())) / (n_sim + 1)
    low, high = sims.min(axis=0), sims.max(axis=0)
    return RipleyL(radii.tolist(), lo.tolist(), low.tolist(), high.tolist(), float(p),
                   bool((lo > high).any()), bool((lo < low).any()))


def spatial_summary(points, width: float, height: float, unit: str, seed: int = 0) -> dict:
    """Every spatial statistic of one field, as a flat dict for tables and JSON."""
    nn = nnd_test(points, width, height, seed=seed)
    ce = clark_evans(points, width, height)
    rl = ripley_l(points, width, height, seed=seed)
    return {
        "unit": unit, "n": nn.n, "field_width": width, "field_height": height,
        "density_per_unit2": nn.n / (width * height),
        **{f"nnd_{k}": v for k, v in asdict(nn).items() if k != "n"},
        "clark_evans_r": ce.r, "clark_evans_expected_nnd": ce.expected_nnd, "clark_evans_z": ce.z,
        "clark_evans_p": ce.p, "ripley_mad_p": rl.mad_p, "ripley_above_envelope": rl.above_envelope,
        "ripley_below_envelope": rl.below_envelope, "_ripley": asdict(rl),
    }
