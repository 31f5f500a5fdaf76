"""Agglomeration and the EU nanomaterial share, from particle and agglomerate tables.

The EU definition of a nanomaterial (Commission Recommendation 2022/C 229/01) counts the
constituent particles, those inside aggregates and agglomerates included: a material is a
nanomaterial when 50% or more of them, by number, have a minimum external dimension in 1-100 nm.
From a projection image the minimum external dimension is estimated by the minimum Feret
diameter of the particle's outline (the third dimension is not seen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd

from .distribution import bootstrap_indices

#: Minimum external dimension range of the EU definition (nm)
EU_RANGE_NM = (1.0, 100.0)
#: Share of constituent particles by number that makes a nanomaterial
EU_THRESHOLD = 0.5


@dataclass(frozen=True)
class NanoShare:
    """Share of constituent particles whose minimum external dimension lies in the EU range."""

    share: float  # weighted share in [0, 1], nan without particles
    low: float  # bootstrap interval (percentile), at ``confidence``
    high: float
    confidence: float
    particles: int  # particles counted
    in_range: int  # of which in the range (unweighted count)
    below_range: int  # with a minimum dimension under 1 nm
    verdict: str  # "yes", "no", "undecided" or "not assessable"
    explanation: str  # the verdict in plain words

    def to_dict(self) -> dict:
        return asdict(self)


def nano_share(feret_min_nm, weights=None, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0,
               lower_nm: float = EU_RANGE_NM[0], upper_nm: float = EU_RANGE_NM[1]) -> NanoShare:
    """The EU-definition share of ``feret_min_nm`` values in [``lower_nm``, ``upper_nm``] with a
    percentile bootstrap interval (particles drawn with replacement, each keeping its weight:
    ``weights`` are the edge weights of the analysis, 1 without a correction).

    The verdict is "yes" when the whole interval lies at or above 50%, "no" when it lies below,
    and "undecided" when it straddles 50%; "not assessable" without particles.
    """
    x = np.asarray(feret_min_nm, float)
    w = np.ones_like(x) if weights is None else np.asarray(weights, float)
    good = np.isfinite(x) & np.isfinite(w) & (w > 0)
    x, w = x[good], w[good]
    inside = ((x >= lower_nm) & (x <= upper_nm)).astype(float)
    below = int((x < lower_nm).sum())
    if x.size == 0:
        return NanoShare(np.nan, np.nan, np.nan, confidence, 0, 0, 0, "not assessable",
                         "No measured particle with a known size: the share cannot be estimated.")
    share = float((w * inside).sum() / w.sum())
    rng = np.random.default_rng(seed)
    boots = np.concatenate([(w[idx] * inside[idx]).sum(1) / w[idx].sum(1)
                            for idx in bootstrap_indices(x.size, n_boot, rng)])
    alpha = (1 - confidence) / 2
    low, high = (float(v) for v in np.quantile(boots, [alpha, 1 - alpha]))
    said = (f"{100 * share:.1f}% ({100 * confidence:.0f}% interval {100 * low:.1f}-{100 * high:.1f}%) of the "
            "constituent particles have a minimum Feret diameter of 1-100 nm: ")
    if low >= EU_THRESHOLD:
        verdict, words = "yes", said + "a nanomaterial by the EU definition."
    elif high < EU_THRESHOLD:
        verdict, words = "no", said + "not a nanomaterial by the EU definition."
    else:
        verdict, words = "undecided", said + ("the interval straddles 50%, so these images do not decide; "
                                              "measure more particles.")
    return NanoShare(share, low, high, confidence, int(x.size), int(inside.sum()), below, verdict, words)


def agglomeration_summary(particles: pd.DataFrame, agglomerates: pd.DataFrame) -> dict:
    """Free and agglomerated particles and the size of agglomerates.

    ``particles``: the particles used in the statistics, with ``in_agglomerate`` (and
    ``image``). ``agglomerates``: every agglomerate found, with ``particles`` and
    ``touches_edge``. Particles per agglomerate are counted over agglomerates that do not touch
    the field's border (a cut agglomerate's count is unknown), free particles included as
    agglomerates of one; ``agglomerates_of_two_or_more`` counts those of several particles.
    """
    n = len(particles)
    agglomerated = int(particles["in_agglomerate"].astype(bool).sum()) if n and "in_agglomerate" in particles else 0
    whole = agglomerates[~agglomerates["touches_edge"].astype(bool)] if len(agglomerates) else agglomerates
    counts = whole["particles"].to_numpy(float) if len(whole) else np.zeros(0)
    return {
        "particles": n,
        "free_particles": n - agglomerated,
        "agglomerated_particles": agglomerated,
        "fraction_agglomerated": agglomerated / n if n else float("nan"),
        "agglomerates": len(agglomerates),
        "agglomerates_not_touching_edge": len(whole),
        "agglomerates_of_two_or_more": int((counts >= 2).sum()),
        "particles_per_agglomerate_mean": float(counts.mean()) if counts.size else float("nan"),
        "particles_per_agglomerate_median": float(np.median(counts)) if counts.size else float("nan"),
        "particles_per_agglomerate_max": int(counts.max()) if counts.size else 0,
    }
