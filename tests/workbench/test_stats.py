"""workbench.stats: the vectorised Spearman agrees with scipy row by row (ties included),
and the bootstrap interval is the percentile interval of exactly those resamples."""

import numpy as np
from scipy.stats import spearmanr

from workbench.stats import bootstrap_spearman, spearman, spearman_rows


def test_spearman_rows_equals_scipy_per_row_with_ties():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 4, size=(50, 9)).astype(float)  # many ties
    b = a + rng.normal(0, 1, size=a.shape)
    got = spearman_rows(a, b)
    want = [spearmanr(x, y).statistic if np.std(x) > 0 else np.nan for x, y in zip(a, b)]
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    assert np.isnan(spearman_rows(np.ones((1, 5)), b[:1, :5]))[0]


def test_bootstrap_spearman_is_the_percentile_interval_of_its_resamples():
    rng = np.random.default_rng(1)
    a = rng.normal(size=28)
    b = 0.6 * a + rng.normal(size=28)
    rho, lo, hi = bootstrap_spearman(a, b, n_boot=400, seed=5)
    assert rho == spearman(a, b) and lo < rho < hi
    idx = np.random.default_rng(5).integers(0, 28, size=(400, 28))
    draws = np.array([spearman(a[i], b[i]) for i in idx])
    np.testing.assert_allclose([lo, hi], np.percentile(draws[np.isfinite(draws)], [2.5, 97.5]), rtol=1e-12)
    # non-finite items are dropped, not propagated
    a2, b2 = np.append(a, np.nan), np.append(b, 1.0)
    assert bootstrap_spearman(a2, b2, n_boot=400, seed=5) == (rho, lo, hi)
