"""Figure builders of the MTL lens: pure functions from a training history
(:class:`~workbench.mtl.TrainingHistory`, live or loaded from a file) to plotly figures.

Matrices and series go out as plain lists with ``None`` where a number is missing
(a zero gradient has no cosine): a widget's state travels as JSON, which has no NaN.

    h = Result.load("run.safetensors")
    cosine_matrix(h, step=200, block="layer.1"); affinity_matrix(h)
    conflict_series(h, task_pair=("a", "b"), smoothing=0.6)   # titled panels, raw + smoothed
    block_bars(h)                                              # one bar per block and task pair
    runs_overlay({"equal": h_eq, "pcgrad": h_pc})              # several runs on the same axes
"""

from __future__ import annotations

import html
import itertools
from typing import Mapping, Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.errors import WorkbenchError
from workbench.mtl.gradients import mean_pair_cosine

ALL_BLOCKS = ""  # the block selection that means the whole shared trunk
MARGIN = dict(l=10, r=10, t=64, b=10)
PALETTE = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf")


def masked(a) -> list:
    """``a`` as (nested) lists of floats with None where it is not finite."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return float(a) if np.isfinite(a) else None
    return [masked(x) for x in a] if a.ndim > 1 else [float(x) if np.isfinite(x) else None for x in a]


def smooth(values, weight: float) -> np.ndarray:
    """TensorBoard's smoothing: an exponential moving average with ``weight`` in [0, 1)
    (0: the raw values), debiased at the start; NaN values are skipped (and stay NaN)."""
    if not 0.0 <= weight < 1.0:
        raise WorkbenchError(f"smoothing must be in [0, 1), got {weight!r}")
    v = np.asarray(values, dtype=np.float64)
    out = np.full_like(v, np.nan)
    last, n = 0.0, 0
    for i, x in enumerate(v):
        if not np.isfinite(x):
            continue
        last, n = last * weight + (1 - weight) * x, n + 1
        out[i] = last / (1 - weight ** n) if weight > 0 else x
    return out


def step_index(history, step: int | None) -> int | None:
    """Index of recorded ``step`` in the history (None: the latest; None when nothing is recorded)."""
    steps = history.coord("step")
    if step is None:
        return len(steps) - 1 if steps else None
    if step not in steps:
        shown = steps if len(steps) <= 12 else [*steps[:5], "...", *steps[-5:]]
        raise WorkbenchError(f"step {step} was not recorded; recorded steps: {shown}")
    return steps.index(step)


def _block_index(history, block: str | None) -> int | None:
    if not block:
        return None
    blocks = history.coord("block")
    if block not in blocks:
        raise WorkbenchError(f"no block {block!r}; blocks: {blocks} (or {ALL_BLOCKS!r} for all of them)")
    return blocks.index(block)


def _pair(history, task_pair: Sequence | None) -> tuple[int, int] | None:
    if not task_pair:
        return None
    tasks = history.coord("task")
    if len(task_pair) != 2 or any(t not in tasks for t in task_pair) or task_pair[0] == task_pair[1]:
        raise WorkbenchError(f"task_pair must be two different tasks of {tasks}, got {tuple(task_pair)}")
    return tasks.index(task_pair[0]), tasks.index(task_pair[1])


def task_pairs(history) -> list[tuple[str, str]]:
    """Every pair of tasks (i < j, in the tasks' order)."""
    return list(itertools.combinations(history.coord("task"), 2))


def _cosines(history, block: str | None) -> np.ndarray:
    """Cosines [step, task, task_b] overall or in one block."""
    b = _block_index(history, block)
    return history["cosine"] if b is None else history["block_cosine"][:, b]


def _where(block: str | None) -> str:
    return block if block else "all blocks"


def _in(block: str | None) -> str:
    """" in layer.1" for one block, nothing for the whole trunk (short panel titles)."""
    return f" in {html.escape(block)}" if block else ""


def _at(history, i: int | None) -> str:
    return "" if i is None else f", step {history.coord('step')[i]}"


def _heatmap_layout(fig: go.Figure, title: str, n: int) -> go.Figure:
    fig.update_layout(title=title, height=max(300, 120 + 48 * n), margin=MARGIN,
                      yaxis=dict(autorange="reversed", automargin=True), xaxis=dict(automargin=True))
    return fig


def cosine_matrix(history, *, step: int | None = None, block: str | None = None) -> go.Figure:
    """The task x task gradient cosines at one recorded ``step`` (default: the latest),
    overall or in one ``block``."""
    names = [html.escape(t) for t in history.coord("task")]
    i = step_index(history, step)
    cos = np.full((len(names),) * 2, np.nan) if i is None else _cosines(history, block)[i]
    fig = go.Figure(go.Heatmap(z=masked(cos), x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>",
                               colorbar=dict(title="cosine")))
    return _heatmap_layout(fig, f"gradient cosine ({_where(block)}{_at(history, i)})", len(names))


def affinity_matrix(history, *, step: int | None = None) -> go.Figure:
    """The lookahead affinity at one recorded ``step`` (row: the task stepped on; empty,
    saying so, when the run did not record it)."""
    names = [html.escape(t) for t in history.coord("task")]
    i = step_index(history, step)
    has = "affinity" in history
    aff = history["affinity"][i] if has and i is not None else np.full((len(names),) * 2, np.nan)
    finite = np.abs(aff[np.isfinite(aff)])
    lim = float(finite.max()) if finite.size and finite.max() > 0 else 1.0  # fixed, symmetric: no NaN range
    fig = go.Figure(go.Heatmap(z=masked(aff), x=names, y=names, colorscale="RdBu", zmin=-lim, zmax=lim,
                               hovertemplate="step on %{y} -> %{x}: %{z:.4f}<extra></extra>",
                               colorbar=dict(title="affinity")))
    title = f"lookahead affinity{_at(history, i)}" if has else "lookahead affinity (not recorded in this run)"
    return _heatmap_layout(fig, title, len(names))


def conflict_series(history, *, task_pair: Sequence | None = None, block: str | None = None,
                    smoothing: float = 0.0) -> go.Figure:
    """Three titled panels over the recorded steps: the conflict fraction, the cosine of
    ``task_pair`` (default: the mean over pairs), overall or in one ``block``, and each
    task's loss. Each series is drawn raw (faint) and smoothed (``smoothing``: the
    TensorBoard weight, 0 = raw only). Traces: per series (raw, smoothed), in the order
    conflict fraction, cosine, then the tasks' losses."""
    steps = history.coord("step")
    b = _block_index(history, block)
    frac = history["conflict_fraction"] if b is None else history["block_conflict_fraction"][:, b]
    cos = _cosines(history, block)
    p = _pair(history, task_pair)
    pair_cos = mean_pair_cosine(cos) if p is None else cos[:, p[0], p[1]]
    label = "mean over pairs" if p is None else f"{html.escape(task_pair[0])} vs {html.escape(task_pair[1])}"
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09, subplot_titles=(
        f"conflict fraction{_in(block)}", f"cosine{_in(block)}, {label}", "loss per task"))
    fig.update_annotations(font_size=12)
    series = [(frac, "conflict fraction", 1, PALETTE[0]), (pair_cos, f"cosine {label}", 2, PALETTE[1])]
    series += [(history["loss"][:, t], f"loss {html.escape(name)}", 3, PALETTE[(2 + t) % len(PALETTE)])
               for t, name in enumerate(history.coord("task"))]
    for values, name, col, color in series:
        raw = np.asarray(values, dtype=np.float64)
        fig.add_scatter(x=steps, y=masked(raw), name=name, mode="lines", line=dict(color=color, width=1),
                        opacity=0.3 if smoothing > 0 else 1.0, showlegend=col == 3 and smoothing == 0, legendgroup=name,
                        hovertemplate=f"{name} (raw), step %{{x}}: %{{y:.4f}}<extra></extra>", row=1, col=col)
        fig.add_scatter(x=steps, y=masked(smooth(raw, smoothing)), name=name, mode="lines",
                        line=dict(color=color, width=2), visible=smoothing > 0, legendgroup=name,
                        showlegend=col == 3 and smoothing > 0, hovertemplate=f"{name} (smoothed), step %{{x}}: %{{y:.4f}}<extra></extra>",
                        row=1, col=col)
    fig.update_xaxes(title_text="step", tickformat="d")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(range=[-1, 1], row=1, col=2)
    fig.update_layout(height=340, margin=MARGIN, legend=dict(orientation="h", yanchor="top", y=-0.32, x=0))
    return fig


def block_bars(history, *, step: int | None = None, task_pair: Sequence | None = None) -> go.Figure:
    """Per block at one recorded ``step`` (default: the latest): the cosine of every task
    pair, one bar trace per pair (so the conflicting pair shows, not only the average);
    with ``task_pair`` that pair is drawn solid and the others faint."""
    blocks = [html.escape(b) for b in history.coord("block")]
    i = step_index(history, step)
    p = _pair(history, task_pair)
    tasks = history.coord("task")
    fig = go.Figure()
    for k, (a, b) in enumerate(task_pairs(history)):
        ia, ib = tasks.index(a), tasks.index(b)
        y = np.full(len(blocks), np.nan) if i is None else history["block_cosine"][i][:, ia, ib]
        solid = p is None or (ia, ib) == p
        name = f"{html.escape(a)} vs {html.escape(b)}"
        fig.add_bar(x=blocks, y=masked(y), name=name, opacity=1.0 if solid else 0.25,
                    marker_color=PALETTE[k % len(PALETTE)],
                    hovertemplate=f"{name}, %{{x}}: %{{y:.3f}}<extra></extra>")
    if i is None:
        what = "per-block cosine of each task pair (no record yet)"
    else:
        c = history["block_cosine"][i]
        mean = mean_pair_cosine(c) if p is None else c[:, p[0], p[1]]
        worst = int(np.nanargmin(mean)) if np.isfinite(mean).any() else None
        pick = "mean over pairs" if p is None else f"{html.escape(task_pair[0])} vs {html.escape(task_pair[1])}"
        what = (f"per-block cosine{_at(history, i)}"
                + (f"; lowest ({pick}): {blocks[worst]} {float(mean[worst]):+.2f}" if worst is not None else ""))
    fig.update_layout(height=300, margin=MARGIN, title=what, barmode="group", yaxis=dict(range=[-1, 1], title="cosine"),
                      legend=dict(orientation="h", yanchor="top", y=-0.18, x=0), showlegend=True)
    return fig


def runs_overlay(histories: Mapping[str, object], *, smoothing: float = 0.0, block: str | None = None) -> go.Figure:
    """Several runs (name -> TrainingHistory, e.g. one per aggregator) on the same axes:
    three titled panels, the conflict fraction, the mean pairwise cosine (overall or in
    one ``block``) and the mean task loss over the recorded steps, smoothed with
    ``smoothing``. Traces: per run, its three panels' lines."""
    if not histories:
        raise WorkbenchError("runs_overlay needs at least one run: pass {name: TrainingHistory}")
    fig = make_subplots(rows=1, cols=3, horizontal_spacing=0.09, subplot_titles=(
        f"conflict fraction{_in(block)}", f"mean pair cosine{_in(block)}", "mean task loss"))
    fig.update_annotations(font_size=12)
    for k, (name, h) in enumerate(histories.items()):
        steps = h.coord("step")
        bi = _block_index(h, block)
        frac = h["conflict_fraction"] if bi is None else h["block_conflict_fraction"][:, bi]
        values = (frac, mean_pair_cosine(_cosines(h, block)), np.nanmean(h["loss"], axis=1) if len(steps) else [])
        color, label = PALETTE[k % len(PALETTE)], html.escape(str(name))
        for col, v in enumerate(values, start=1):
            fig.add_scatter(x=steps, y=masked(smooth(v, smoothing)), name=label, legendgroup=label, mode="lines",
                            line=dict(color=color, width=2), showlegend=col == 1, row=1, col=col,
                            hovertemplate=f"{label}, step %{{x}}: %{{y:.4f}}<extra></extra>")
    fig.update_xaxes(title_text="step", tickformat="d")
    fig.update_yaxes(range=[-0.02, 1.02], row=1, col=1)
    fig.update_yaxes(range=[-1, 1], row=1, col=2)
    fig.update_layout(height=360, margin=MARGIN, legend=dict(orientation="h", yanchor="top", y=-0.32, x=0))
    return fig


__all__ = [
    "ALL_BLOCKS", "affinity_matrix", "block_bars", "conflict_series", "cosine_matrix", "masked", "runs_overlay",
    "smooth", "step_index", "task_pairs",
]
