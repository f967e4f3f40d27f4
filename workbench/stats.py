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


__all__ = ["cosine", "cosine_from_gramian", "spearman"]
