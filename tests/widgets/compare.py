"""Compare what two widgets draw: the traces of their figures, without plotly's random uids."""

from __future__ import annotations

import numpy as np

from widgets.common import trace_data


def same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple, np.ndarray)) or isinstance(b, (list, tuple, np.ndarray)):
        try:
            x, y = np.asarray(a), np.asarray(b)
        except ValueError:  # ragged: compare item by item
            return len(a) == len(b) and all(same(p, q) for p, q in zip(a, b))
        if x.shape != y.shape:
            return False
        if x.dtype.kind in "fc" or y.dtype.kind in "fc":
            return bool(np.array_equal(x.astype(float), y.astype(float), equal_nan=True))
        if x.dtype == object or y.dtype == object:
            return all(same(p, q) for p, q in zip(x.ravel().tolist(), y.ravel().tolist()))
        return bool(np.array_equal(x, y))
    return a == b


def assert_same_figure(a, b) -> None:
    """The same traces (data and style) and the same title."""
    da, db = trace_data(a), trace_data(b)
    assert len(da) == len(db)
    for i, (x, y) in enumerate(zip(da, db)):
        assert same(x, y), f"trace {i} differs"
    assert a.layout.title.text == b.layout.title.text
