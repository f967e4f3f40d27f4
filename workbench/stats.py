"""Small numerical helpers every lens shares: cosines from a Gramian, rank agreement.

One implementation each, so that "cosine" or "Spearman" means the same number in every
lens (a zero vector has no direction: its cosines are NaN, never 0).
"""

from __future__ import annotations

import numpy as np


def cosine_from_gramian(g) -> np.ndarray:
    """Cosines [..., T, T] from Gramians [..., T, T] (inner products of T vectors).

    Entries involving a zero vector are NaN (no direction)."""
    g = np.asarray(g, dtype=np.float64)
    d = np.sqrt(np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0, None))
    outer = d[..., :, None] * d[..., None, :]
    with np.errstate(invalid="ignore", divide="ignore"):
        c = g / outer
    return np.where(outer > 0, np.clip(c, -1.0, 1.0), np.nan)


def cosine(a, b) -> float:
    """Cosine between two vectors (NaN when either is zero)."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    return float(cosine_from_gramian(np.array([[a @ a, a @ b], [a @ b, b @ b]]))[0, 1])


def spearman(a, b) -> float:
    """Spearman rank correlation over the entries where both are finite (NaN when fewer
    than three such entries or either side is constant)."""
    from scipy.stats import spearmanr

    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman correlation of each row of ``a`` with the same row of ``b`` ([n, m] each),
    vectorised (average ranks for ties, as :func:`spearman`); NaN for a constant row.
    Rows must be finite."""
    from scipy.stats import rankdata

    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(1, keepdims=True)
    rb -= rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, (ra * rb).sum(1) / np.where(den > 0, den, 1.0), np.nan)


def bootstrap_spearman(a, b, *, n_boot: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Spearman of ``a`` and ``b`` (paired items) and its 95% percentile interval over
    ``n_boot`` resamples of the items with replacement (resamples where a side is constant
    are left out). Items where either side is not finite are dropped first."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    ok = np.isfinite(a) & np.isfinite(b)
    a, b = a[ok], b[ok]
    rho = spearman(a, b)
    if len(a) < 3:
        return rho, float("nan"), float("nan")
    idx = np.random.default_rng(seed).integers(0, len(a), size=(n_boot, len(a)))
    draws = spearman_rows(a[idx], b[idx])
    draws = draws[np.isfinite(draws)]
    if not len(draws):
        return rho, float("nan"), float("nan")
    lo, hi = np.percentile(draws, [2.5, 97.5])
    return rho, float(lo), float(hi)


__all__ = ["bootstrap_spearman", "cosine", "cosine_from_gramian", "spearman", "spearman_rows"]
