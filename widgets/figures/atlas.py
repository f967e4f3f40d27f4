"""Figures of the task-relatedness atlas: pure functions from a ``TaskAtlas`` (and its
``AtlasAgreement`` / a ``Grouping``) to plotly figures or HTML.

- :func:`atlas_matrices`: every measure's pair matrix as small multiples (ground truths
  first, then the lens measures), one figure;
- :func:`atlas_scatter`: a lens measure against a ground truth, one point per pair, the
  truth's bootstrap interval as error bars, the Spearman (and its interval) in the title;
- :func:`atlas_blocks`: one pair through the depth, one line per measure with a per-block
  form;
- :func:`agreement_heatmap`: the Spearman of every lens measure against every truth;
- :func:`pair_details_html` / :func:`grouping_html`: what every lens says of one pair,
  and a recommended grouping against random splits and the exhaustive best.

Task, measure and node names are HTML-escaped everywhere; NaN and inf never reach the
figure data (they become None, which plotly draws as a gap).
"""

from __future__ import annotations

import html
import itertools
import math
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

from widgets.common import json_safe
from workbench.blocks import block_order
from workbench.stats import spearman

MARGIN = dict(l=10, r=10, t=84, b=10)
SIGNED = "RdBu"  # a measure with both signs: centred on 0
UNSIGNED = "Blues"


def _num(v, fmt: str = ".3f") -> str:
    """A number for people (no ``np.float64(...)``); "n/a" when not finite."""
    return format(float(v), fmt) if v is not None and math.isfinite(float(v)) else "n/a"


def _pairs(n: int) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(n), 2))


def measure_label(atlas, measure: str) -> str:
    """``measure (its lens)``, or ``measure (ground truth)`` (plain text, not escaped)."""
    kind = atlas.attrs["kind"].get(measure, "")
    return f"{measure} ({'ground truth' if kind == 'truth' else kind})" if kind else measure


def pair_label(task: str, task_b: str) -> str:
    return f"{task} \u2194 {task_b}"


def _pair_index(atlas, task: str, task_b: str) -> tuple[int, int]:
    tasks = atlas.tasks
    a, b = tasks.index(task), tasks.index(task_b)
    return (a, b) if a < b else (b, a)


def _scale(values: np.ndarray) -> dict:
    """Colour scale of one matrix: centred on 0 when it has both signs."""
    v = values[np.isfinite(values)]
    if not len(v):
        return dict(zmin=-1, zmax=1, colorscale=SIGNED)
    lo, hi = float(v.min()), float(v.max())
    if lo < 0 < hi:
        lim = max(-lo, hi)
        return dict(zmin=-lim, zmax=lim, colorscale=SIGNED)
    if lo == hi:
        lo, hi = lo - 1e-9, hi + 1e-9
    return dict(zmin=lo, zmax=hi, colorscale=UNSIGNED if lo >= 0 else SIGNED)


# ---------------------------------------------------------------------- matrices


def atlas_matrices(atlas, measures: Sequence[str] | None = None, *, cols: int = 4, row_height: int = 230) -> go.Figure:
    """Every measure's [task, task_b] matrix as small multiples in one figure: the ground
    truths first, then ``measures`` (default: every lens measure), ``cols`` per row,
    wrapping into more rows. Each panel has its own colour scale (centred on 0 for a
    signed measure; its range is in the panel's title); the diagonal is left blank (a
    task with itself is no pair). Trace ``i`` is panel ``i``; rows and columns are the
    tasks in the same order (tick labels on the first column; hover names both)."""
    from plotly.subplots import make_subplots

    lens = list(measures) if measures is not None else list(atlas.lens_measures)
    names = list(atlas.truths) + [m for m in lens if m not in atlas.truths]
    unknown = [m for m in names if m not in atlas.coord("measure")]
    if unknown:
        from workbench.errors import WorkbenchError

        raise WorkbenchError(f"no measures {unknown} in this atlas; measures: {atlas.coord('measure')}")
    tasks = atlas.tasks
    labels = [html.escape(t) for t in tasks]
    T = len(tasks)
    cols = max(1, min(cols, len(names)))
    rows = max(1, math.ceil(len(names) / cols))
    off = ~np.eye(T, dtype=bool)
    titles, traces = [], []
    all_m = atlas.coord("measure")
    for m in names:
        i = all_m.index(m)
        z = np.where(off, atlas["value"][i], np.nan)
        lo, hi = np.where(off, atlas["low"][i], np.nan), np.where(off, atlas["high"][i], np.nan)
        kind = atlas.attrs["kind"].get(m, "")
        scale = _scale(z)
        finite = z[np.isfinite(z)]
        span = f"{_num(finite.min(), '.2f')} \u2026 {_num(finite.max(), '.2f')}" if len(finite) else "no values"
        titles.append(f"<b>{html.escape(m)}</b><br><span style='font-size:10px'>{span}</span>")  # (short: 4 fit in 600 px)
        text = [[(f"{labels[a]} \u2194 {labels[b]}<br>{html.escape(m)}: {_num(z[a, b])}"
                  + (f" [{_num(lo[a, b])}, {_num(hi[a, b])}]" if kind == "truth" and np.isfinite(lo[a, b]) else ""))
                 if a != b else f"{labels[a]}" for b in range(T)] for a in range(T)]
        traces.append(go.Heatmap(z=json_safe(z), x=labels, y=labels, text=text, showscale=False,
                                 hovertemplate="%{text}<extra></extra>", name=html.escape(m), **scale))
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles, horizontal_spacing=0.03,
                        vertical_spacing=min(0.25, 70 / (row_height * rows)))
    for k, tr in enumerate(traces):
        fig.add_trace(tr, row=k // cols + 1, col=k % cols + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(autorange="reversed", showticklabels=False)
    for r in range(rows):
        fig.update_yaxes(showticklabels=True, tickfont_size=10, row=r + 1, col=1)
    for ann in fig.layout.annotations:
        ann.font.size = 12
    P = T * (T - 1) // 2
    fig.update_layout(title=dict(text=f"every measure over the {P} task pairs (ground truth first; diagonal blank)",
                                 pad=dict(b=44)),  # room for the panels' two-line titles below it
                      height=100 + row_height * rows, margin=dict(MARGIN, t=100))
    return fig


# ---------------------------------------------------------------------- scatter


def spearman_text(rho: float, low: float = float("nan"), high: float = float("nan")) -> str:
    """``Spearman ρ = 0.41 [0.10, 0.70]`` (the interval said to be missing when it is)."""
    if not math.isfinite(rho):
        return "Spearman \u03c1 = n/a"
    if math.isfinite(low) and math.isfinite(high):
        return f"Spearman \u03c1 = {rho:.2f} [{low:.2f}, {high:.2f}] (95% bootstrap over pairs)"
    return f"Spearman \u03c1 = {rho:.2f} (interval not computed)"


def agreement_of(atlas, measure: str, truth: str, agreement=None) -> tuple[float, float, float]:
    """(ρ, low, high) of ``measure`` against ``truth``: from ``agreement`` when it holds
    them, else the point Spearman over pairs with no interval (NaN)."""
    if agreement is not None and measure in agreement.coord("measure") and truth in agreement.coord("truth"):
        i, j = agreement.coord("measure").index(measure), agreement.coord("truth").index(truth)
        return float(agreement["spearman"][i, j]), float(agreement["low"][i, j]), float(agreement["high"][i, j])
    pairs = _pairs(len(atlas.tasks))
    ia, ib = [p[0] for p in pairs], [p[1] for p in pairs]
    return spearman(atlas.matrix(measure)[ia, ib], atlas.matrix(truth)[ia, ib]), float("nan"), float("nan")


def atlas_scatter(atlas, measure: str, truth: str, agreement=None, *, pair: tuple[str, str] | None = None) -> go.Figure:
    """``measure`` (x) against ``truth`` (y), one point per pair with both values (trace 0:
    ``customdata`` holds the pair's task indices, hover its names, both values and the
    truth's interval, drawn as error bars); trace 1 rings ``pair``. The title carries
    the Spearman over pairs and its interval from ``agreement`` (an AtlasAgreement)."""
    tasks = atlas.tasks
    x, y = atlas.matrix(measure), atlas.matrix(truth)
    g = atlas.coord("measure").index(truth)
    low, high = atlas["low"][g], atlas["high"][g]
    pts, custom, text, up, down = [], [], [], [], []
    for a, b in _pairs(len(tasks)):
        if not (np.isfinite(x[a, b]) and np.isfinite(y[a, b])):
            continue
        pts.append((float(x[a, b]), float(y[a, b])))
        custom.append([a, b])
        ok = np.isfinite(low[a, b]) and np.isfinite(high[a, b])
        up.append(float(high[a, b] - y[a, b]) if ok else None)
        down.append(float(y[a, b] - low[a, b]) if ok else None)
        text.append(f"<b>{html.escape(pair_label(tasks[a], tasks[b]))}</b><br>{html.escape(measure)}: {_num(x[a, b])}"
                    f"<br>{html.escape(truth)}: {_num(y[a, b])}"
                    + (f" [{_num(low[a, b])}, {_num(high[a, b])}]" if ok else " (no interval)"))
    sel_x, sel_y = [], []
    if pair is not None:
        a, b = _pair_index(atlas, *pair)
        if np.isfinite(x[a, b]) and np.isfinite(y[a, b]):
            sel_x, sel_y = [float(x[a, b])], [float(y[a, b])]
    fig = go.Figure([
        go.Scatter(x=[p[0] for p in pts], y=[p[1] for p in pts], mode="markers", customdata=custom, text=text,
                   hovertemplate="%{text}<extra></extra>", name="pairs",
                   marker=dict(size=10, color="#1f77b4", line=dict(width=1, color="white")),
                   error_y=dict(type="data", symmetric=False, array=up, arrayminus=down, color="#aec7e8", thickness=1.2)),
        go.Scatter(x=sel_x, y=sel_y, mode="markers", name="selected pair", hoverinfo="skip",
                   marker=dict(size=18, color="rgba(0,0,0,0)", line=dict(width=2.5, color="#d62728"))),
    ])
    rho, lo, hi = agreement_of(atlas, measure, truth, agreement)
    n_all = len(tasks) * (len(tasks) - 1) // 2
    shown = f"{len(pts)} pairs" if len(pts) == n_all else f"{len(pts)} of {n_all} pairs (the rest lack a value)"
    fig.update_layout(
        title=f"{html.escape(measure)} vs {html.escape(truth)} over {shown}<br>"
              f"<span style='font-size:12px'>{spearman_text(rho, lo, hi)}</span>",
        xaxis_title=html.escape(measure_label(atlas, measure)), yaxis_title=html.escape(measure_label(atlas, truth)),
        height=400, margin=MARGIN, showlegend=False, hovermode="closest", clickmode="event")
    return fig


# ---------------------------------------------------------------------- per block


def block_measures(atlas) -> list[str]:
    """The measures with a per-block form (a finite ``by_block`` value for some pair)."""
    bb = atlas["by_block"]
    return [m for i, m in enumerate(atlas.coord("measure")) if np.isfinite(bb[i]).any()]


def atlas_blocks(atlas, task: str, task_b: str, *, highlight: str | None = None) -> go.Figure:
    """Where in the depth the pair ``task`` / ``task_b`` (either order) shares (> 0) or
    conflicts (< 0):
    one line per measure with a per-block form (:func:`block_measures`, the same traces
    for every pair), x = the blocks that have a value in depth order; ``highlight``
    draws that measure's line thicker."""
    a, b = _pair_index(atlas, task, task_b)
    blocks = atlas.coord("block")
    bb = atlas["by_block"]
    measures = block_measures(atlas)
    all_m = atlas.coord("measure")
    rows = [all_m.index(m) for m in measures]
    used = [blk for j, blk in enumerate(blocks) if any(np.isfinite(bb[i, j]).any() for i in rows)]
    order = block_order(used)
    cols = [blocks.index(blk) for blk in order]
    traces, any_value = [], False
    for m, i in zip(measures, rows):
        ys = [float(bb[i, j, a, b]) if np.isfinite(bb[i, j, a, b]) else None for j in cols]
        any_value |= any(v is not None for v in ys)
        text = [f"{html.escape(m)} at {html.escape(blk)}: {_num(v) if v is not None else 'n/a'}" for blk, v in zip(order, ys)]
        traces.append(go.Scatter(x=list(order), y=ys, mode="lines+markers", name=html.escape(measure_label(atlas, m)),
                                 text=text, hovertemplate="%{text}<extra></extra>", connectgaps=False,
                                 line=dict(width=4 if m == highlight else 1.5),
                                 marker=dict(size=9 if m == highlight else 6)))
    name = html.escape(pair_label(task, task_b))
    sub = ("per-block relatedness: above 0 shares, below 0 conflicts" if any_value
           else "no measure has a per-block value for this pair")
    fig = go.Figure(traces)
    fig.update_layout(title=f"{name} through the depth<br><span style='font-size:12px'>{sub}</span>",
                      yaxis_title="relatedness", height=460, margin=dict(MARGIN, b=100),
                      # the legend in the bottom margin, below the block labels (it wraps to 3 rows when narrow)
                      legend=dict(orientation="h", yref="container", y=0, yanchor="bottom", x=0, font_size=11),
                      hovermode="closest")
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=list(order))
    fig.update_yaxes(zeroline=True, zerolinecolor="#888", zerolinewidth=1)
    return fig


# ---------------------------------------------------------------------- agreement


def agreement_labels(agreement) -> list[str]:
    """The row labels of :func:`agreement_heatmap`: ``measure (lens)``, escaped."""
    kind = agreement.attrs.get("kind", {})
    return [html.escape(f"{m} ({kind[m]})" if m in kind else m) for m in agreement.coord("measure")]


def agreement_heatmap(agreement) -> go.Figure:
    """Spearman of every lens measure (rows) against every ground truth (columns) over
    pairs; the value in each cell, its bootstrap interval in the hover."""
    measures, truths = agreement.coord("measure"), agreement.coord("truth")
    ylab = agreement_labels(agreement)
    xlab = [html.escape(t) for t in truths]
    rho, lo, hi = agreement["spearman"], agreement["low"], agreement["high"]
    text = [[f"{ylab[i]} vs {xlab[j]}<br>{spearman_text(float(rho[i, j]), float(lo[i, j]), float(hi[i, j]))}"
             for j in range(len(truths))] for i in range(len(measures))]
    cells = [[_num(rho[i, j], ".2f") if np.isfinite(rho[i, j]) else "" for j in range(len(truths))]
             for i in range(len(measures))]
    n = agreement.attrs.get("n_pairs")
    boots = agreement.attrs.get("n_boot", 0)
    fig = go.Figure(go.Heatmap(z=json_safe(np.asarray(rho, dtype=float)), x=xlab, y=ylab, zmin=-1, zmax=1,
                               colorscale=SIGNED, hovertext=text, hovertemplate="%{hovertext}<extra></extra>",
                               text=cells, texttemplate="%{text}", colorbar=dict(title="\u03c1")))
    sub = f"intervals: {boots} bootstrap draws over pairs" if boots else "intervals not computed"
    fig.update_layout(title=f"agreement with ground truth: Spearman over {n} pairs<br>"
                            f"<span style='font-size:12px'>{sub} (hover a cell; click it to plot it)</span>",
                      xaxis_title="ground truth", height=max(300, 120 + 28 * len(measures)), margin=MARGIN)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(side="bottom")
    return fig


# ---------------------------------------------------------------------- HTML panels


def _groups(groups) -> str:
    return " \u00b7 ".join("{" + ", ".join(html.escape(str(t)) for t in g) + "}" for g in groups)


def grouping_html(grouping) -> str:
    """A recommended grouping (a ``Grouping``): the groups, their measured ground truth
    beside the mean ± std over every split (a random split's expectation), the
    exhaustive best split and the share of splits the recommendation beats or ties."""
    a = grouping.attrs
    n = len(grouping.coord("split"))
    return (
        f'<div class="wb-grouping">'
        f"<div>groups of {int(a['group_size'])} that maximise <b>{html.escape(a['measure'])}</b>: "
        f"{_groups(a['recommended'])}</div>"
        f"<div>measured <b>{html.escape(a['truth'])}</b> (mean within-group pair): "
        f"<b>{_num(a['recommended_value'])}</b></div>"
        f"<div>random split: {_num(a['random_mean'])} \u00b1 {_num(a['random_std'])} "
        f"(mean \u00b1 std over all {n} splits)</div>"
        f"<div>exhaustive best: {_num(a['best_value'])} with {_groups(a['best'])}</div>"
        f"<div>the recommendation beats or ties <b>{_num(100 * a['percentile'], '.0f')}%</b> of the {n} splits</div>"
        f"</div>"
    )


def pair_details_html(atlas, task: str, task_b: str, *, top_k: int = 4) -> str:
    """What every lens says of one pair (from ``atlas.pair_details``): each ground truth
    with its interval and the directed co-training gains, each lens measure with the
    pair's rank among all pairs, the shared top heads and the shared top nodes."""
    ta, tb = task, task_b  # in the order given (co-training is directed)
    a, b = atlas.tasks.index(ta), atlas.tasks.index(tb)
    det = atlas.pair_details(ta, tb, top_k=top_k)
    pairs = _pairs(len(atlas.tasks))
    all_m = atlas.coord("measure")
    ea, eb = html.escape(ta), html.escape(tb)
    rows = []
    for m in all_m:
        i = all_m.index(m)
        v = det.get(m, float("nan"))
        kind = atlas.attrs["kind"].get(m, "")
        if kind == "truth":
            lo, hi = atlas["low"][i, a, b], atlas["high"][i, a, b]
            extra = f"[{_num(lo)}, {_num(hi)}]" if np.isfinite(lo) and np.isfinite(hi) else "no interval"
        else:
            vals = np.array([atlas["value"][i, p, q] for p, q in pairs])
            ok = vals[np.isfinite(vals)]
            extra = (f"rank {int((ok > v).sum()) + 1} of {len(ok)} pairs" if np.isfinite(v) and len(ok) else "")
        rows.append(f"<tr><td>{html.escape(m)}</td><td style='color:#666'>"
                    f"{html.escape('ground truth' if kind == 'truth' else kind)}</td>"
                    f"<td style='text-align:right'><b>{_num(v)}</b></td><td style='color:#666'>{extra}</td></tr>")
    parts = [f'<div class="wb-pair"><div><b>{ea} \u2194 {eb}</b></div>',
             "<table style='border-collapse:collapse;font-size:13px'>"
             "<tr><th align=left>measure</th><th align=left>lens</th><th>value</th><th></th></tr>"
             + "".join(rows) + "</table>"]
    if "cotrain_directed" in atlas:
        d = atlas["cotrain_directed"]
        parts.append(f"<div>co-training: training with {eb} changes {ea}'s accuracy by <b>{_num(d[a, b], '+.3f')}</b>; "
                     f"training with {ea} changes {eb}'s by <b>{_num(d[b, a], '+.3f')}</b></div>")
    if "shared_heads" in det:
        heads = ", ".join(f"L{int(l)}H{int(h)}" for l, h in det["shared_heads"]) or "none"
        parts.append(f"<div>shared top-{top_k} heads (indirect effect): {heads}</div>")
    if "shared_nodes" in det:
        nodes = ", ".join(html.escape(str(n)) for n in det["shared_nodes"]) or "none"
        parts.append(f"<div>shared top-{4 * top_k} circuit nodes (features and error nodes): {nodes}</div>")
    parts.append("</div>")
    return "".join(parts)


__all__ = [
    "agreement_heatmap", "agreement_labels", "agreement_of", "atlas_blocks", "atlas_matrices", "atlas_scatter", "block_measures",
    "grouping_html", "measure_label", "pair_details_html", "pair_label", "spearman_text",
]
