"""Statistics against closed forms, numpy/scipy, and simulations with known truth."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from emparticles.stats import (
    compare_sizes,
    describe_sizes,
    edge_weights,
    histogram_edges,
    weighted_quantile,
)
from emparticles.stats.spatial import (
    clark_evans,
    nnd_test,
    ripley_l,
    simulate_hardcore,
    simulate_poisson,
    simulate_thomas,
)


def sample(n=400, seed=0, median=20.0, gsd=1.4):
    return np.random.default_rng(seed).lognormal(math.log(median), math.log(gsd), n)


def test_quantiles_follow_the_hazen_rule():
    x = sample(257)
    q = [0.1, 0.5, 0.9, 0.0, 1.0]
    np.testing.assert_allclose(weighted_quantile(x, q), np.percentile(x, np.array(q) * 100, method="hazen"), rtol=1e-12)
    # positions (C - w/2)/W = 0.125, 0.375, 0.75 -> the median lies a third of the way from 2 to 3
    assert weighted_quantile([1.0, 2.0, 3.0], 0.5, [1, 1, 2]) == pytest.approx(2 + 1 / 3)


def test_summary_agrees_with_numpy_and_scipy():
    x = sample(500)
    d = describe_sizes(x, n_boot=200)
    assert d.count == 500
    assert d.mean == pytest.approx(np.mean(x), rel=1e-12)
    assert d.sd == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert d.median == pytest.approx(np.percentile(x, 50, method="hazen"), rel=1e-12)
    assert d.geometric_mean == pytest.approx(stats.gmean(x), rel=1e-12)
    assert d.gsd == pytest.approx(math.exp(np.std(np.log(x), ddof=1)), rel=1e-12)
    assert d.span == pytest.approx((d.d90.value - d.d10.value) / d.d50.value, rel=1e-12)
    s, _loc, scale = stats.lognorm.fit(x, floc=0)
    ln = d.fits["lognormal"]
    assert ln.params["sigma"] == pytest.approx(s, rel=1e-9) and ln.params["median"] == pytest.approx(scale, rel=1e-9)
    assert ln.ks_statistic == pytest.approx(stats.kstest(x, stats.lognorm(s, 0, scale).cdf).statistic, rel=1e-9)
    mu, sd = stats.norm.fit(x)
    assert d.fits["normal"].params["mean"] == pytest.approx(mu, rel=1e-12)
    assert d.fits["normal"].params["sd"] == pytest.approx(sd, rel=1e-12)
    assert d.best_fit == "lognormal"
    assert d.d10.low <= d.d10.value <= d.d10.high and d.d50.low <= d.d50.value <= d.d50.high
    assert 0.7 * 20 < d.mode < 1.2 * 20  # log-normal mode = median / exp(sigma^2)


def test_weighted_forms_and_integer_weights():
    x = sample(300)
    q3 = describe_sizes(x, weighting="volume", n_boot=0)
    assert q3.d50.value == pytest.approx(weighted_quantile(x, 0.5, x**3), rel=1e-12)
    assert q3.d50.value > describe_sizes(x, n_boot=0).d50.value  # volume weighting favours large
    w = np.random.default_rng(1).integers(1, 4, x.size)
    weighted = describe_sizes(x, weights=w, n_boot=0)
    assert weighted.mean == pytest.approx(np.repeat(x, w).mean(), rel=1e-12)


def test_d50_interval_covers_the_truth_about_95_percent():
    covered = 0
    for seed in range(100):
        d = describe_sizes(sample(150, seed=seed), n_boot=400, seed=seed)
        covered += d.d50.low <= 20.0 <= d.d50.high
    assert 88 <= covered <= 100


def test_particles_needed_scale_with_precision():
    d = describe_sizes(sample(400), n_boot=500)
    need = d.n_for_d50_precision
    assert need["2%"] > need["5%"] > need["10%"]
    assert need["5%"] / need["10%"] == pytest.approx(4, rel=0.05)


def test_histogram_edges():
    x = sample(1000)
    np.testing.assert_allclose(histogram_edges(x), np.histogram_bin_edges(x, "fd"))
    assert len(histogram_edges(x, 12)) == 13
    log_edges = histogram_edges(x, 10, log=True)
    assert np.allclose(np.diff(np.log(log_edges)), np.diff(np.log(log_edges))[0])


def test_miles_lantuejoul_weights():
    p = pd.DataFrame({"touches_edge": [False, True, False], "bbox_x0_px": [10, 0, 50], "bbox_x1_px": [19, 5, 50],
                      "bbox_y0_px": [10, 3, 60], "bbox_y1_px": [29, 8, 60]})
    w = edge_weights(p, 100, 200, "miles-lantuejoul")
    assert w[1] == 0
    assert w[0] == pytest.approx(100 * 200 / ((100 - 10) * (200 - 20)))
    assert w[2] == pytest.approx(100 * 200 / (99 * 199))
    assert edge_weights(p, 100, 200, "exclude").tolist() == [1, 0, 1]
    assert edge_weights(p, 100, 200, "keep").tolist() == [1, 1, 1]


def test_spatial_classification_on_100_simulated_fields_each():
    w = h = 1000.0
    right = {"random": 0, "self-avoiding": 0, "clustered": 0}
    for seed in range(100):
        rng = np.random.default_rng(seed)
        right["random"] += nnd_test(simulate_poisson(150, w, h, rng), w, h, seed=seed).classification == "random"
        right["self-avoiding"] += nnd_test(simulate_hardcore(150, w, h, 45.0, rng), w, h, seed=seed).classification == "self-avoiding"
        right["clustered"] += nnd_test(simulate_thomas(15, 10, 25, w, h, rng), w, h, seed=seed).classification == "clustered"
    assert all(v >= 95 for v in right.values()), right


def test_nnd_test_reports_theory_and_tests():
    pts = simulate_poisson(200, 500, 400, np.random.default_rng(3))
    t = nnd_test(pts, 500, 400)
    assert t.expected_random_nnd == pytest.approx(0.5 * math.sqrt(500 * 400 / 200))
    assert t.t_test in ("Student", "Welch") and 0 <= t.f_p <= 1 and 0 <= t.t_p <= 1


def test_clark_evans_on_a_lattice_and_ripley_on_clusters():
    xs, ys = np.meshgrid(np.arange(10, 1000, 20.0), np.arange(10, 1000, 20.0))
    lattice = np.column_stack([xs.ravel(), ys.ravel()])
    ce = clark_evans(lattice, 1000, 1000)
    assert ce.r > 1.9 and ce.p < 1e-6  # a square lattice has R = 2 without edge effects
    rl = ripley_l(simulate_thomas(15, 10, 25, 1000, 1000, np.random.default_rng(0)), 1000, 1000, n_sim=39)
    assert rl.above_envelope and rl.mad_p <= 0.05
    rl = ripley_l(simulate_poisson(150, 1000, 1000, np.random.default_rng(1)), 1000, 1000, n_sim=39)
    assert rl.mad_p > 0.05


def test_compare_detects_a_shift_and_not_noise():
    a, b = sample(300, seed=1), sample(300, seed=2, median=23.0)
    c = compare_sizes(a, b, "a", "b")
    assert c.significant and c.d50_shift_low > 0 and c.d50_shift_low < 3.0 < c.d50_shift_high
    same = compare_sizes(sample(300, seed=3), sample(300, seed=4))
    assert not same.significant and same.d50_shift_low < 0 < same.d50_shift_high
