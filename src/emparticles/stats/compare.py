"""Comparison of two size samples (samples, batches or time points)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from .distribution import bootstrap_quantiles, weighted_quantile


@dataclass(frozen=True)
class Comparison:
    """Sample ``b`` against reference ``a``.

    ``d50_shift`` is D50(b) - D50(a) with a percentile-bootstrap interval; ``welch_t`` compares the
    means of log sizes (geometric means); ``ks`` and ``mann_whitney`` compare whole distributions.
    """

    name_a: str
    name_b: str
    n_a: int
    n_b: int
    d50_a: float
    d50_b: float
    d50_shift: float
    d50_shift_low: float
    d50_shift_high: float
    d50_shift_percent: float
    ks_statistic: float
    ks_p: float
    mann_whitney_u: float
    mann_whitney_p: float
    welch_t: float
    welch_p: float
    alpha: float

    @property
    def significant(self) -> bool:
        """Any of the three tests rejects 'same distribution' at ``alpha``."""
        return min(self.ks_p, self.mann_whitney_p, self.welch_p) < self.alpha


def compare_sizes(a, b, name_a: str = "a", name_b: str = "b", n_boot: int = 2000, confidence: float = 0.95,
                  alpha: float = 0.05, seed: int = 0) -> Comparison:
    """Compare two samples of positive sizes."""
    a = np.asarray(a, float)
    b = np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        raise ValueError(f"need at least 2 particles per sample (got {a.size} and {b.size})")
    d50_a, d50_b = float(weighted_quantile(a, 0.5)), float(weighted_quantile(b, 0.5))
    ba = bootstrap_quantiles(a, [0.5], n_boot=n_boot, seed=seed)[:, 0]
    bb = bootstrap_quantiles(b, [0.5], n_boot=n_boot, seed=seed + 1)[:, 0]
    shift = bb - ba
    q = (1 - confidence) / 2
    lo, hi = np.quantile(shift, [q, 1 - q])
    ks = stats.ks_2samp(a, b)
    mw = stats.mannwhitneyu(a, b, alternative="two-sided")
    wt = stats.ttest_ind(np.log(a), np.log(b), equal_var=False)
    return Comparison(name_a, name_b, int(a.size), int(b.size), d50_a, d50_b, d50_b - d50_a, float(lo), float(hi),
                      100 * (d50_b - d50_a) / d50_a if d50_a else math.nan, float(ks.statistic), float(ks.pvalue),
                      float(mw.statistic), float(mw.pvalue), float(wt.statistic), float(wt.pvalue), alpha)
