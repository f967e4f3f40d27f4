"""Figure builders of the MTL lens: pure functions from a training history
(:class:`~workbench.mtl.TrainingHistory`, live or loaded from a file) to plotly figures.

Matrices and series go out as plain lists with ``None`` where a number is missing
(a zero gradient has no cosine): a widget's state travels as JSON, which has no NaN.

    h = Result.load("run.safetensors")
    conflict_matrices(h, step=200, block="layer.1"); conflict_series(h, task_pair=("a", "b"))
    block_bars(h)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.errors import WorkbenchError
from workbench.mtl.gradients import mean_pair_cosine

ALL_BLOCKS = ""  # the block selection that means the whole shared trunk


def masked(a) -> list:
    """``a`` as (nested) lists of floats with None where it is not finite."""
    a = np.asarray(a, dtype=np.float64)
    if a.ndim == 0:
        return float(a) if np.isfinite(a) else None
    return [masked(x) for x in a] if a.ndim > 1 else [float(x) if np.isfinite(x) else None for x in a]


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


def _cosines(history, block: str | None) -> np.ndarray:
    """Cosines [step, task, task_b] overall or in one block."""
    b = _block_index(history, block)
    return history["cosine"] if b is None else history["block_cosine"][:, b]


def _where(block: str | None) -> str:
    return block if block else "all blocks"


def conflict_matrices(history, *, step: int | None = None, block: str | None = None) -> go.Figure:
    """The task x task gradient cosines at one recorded ``step`` (default: the latest),
    overall or in one ``block``, beside the lookahead affinity (row: the task stepped on)."""
    names = history.coord("task")
    i = step_index(history, step)
    empty = np.full((len(names), len(names)), np.nan)
    cos = empty if i is None else _cosines(history, block)[i]
    has_aff = "affinity" in history
    aff = history["affinity"][i] if has_aff and i is not None else empty
    at = "" if i is None else f", step {history.coord('step')[i]}"
    fig = make_subplots(rows=1, cols=2, subplot_titles=(
        f"gradient cosine ({_where(block)}{at})", "lookahead affinity" + ("" if has_aff else " (not recorded)")))
    fig.add_heatmap(z=masked(cos), x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", row=1, col=1,
                    hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>", colorbar=dict(x=0.45))
    fig.add_heatmap(z=masked(aff), x=names, y=names, colorscale="RdBu", zmid=0, row=1, col=2,
                    hovertemplate="step on %{y} -> %{x}: %{z:.3f}<extra></extra>")
    fig.update_layout(height=330, margin=dict(l=10, r=10, t=40, b=10))
    return fig


def conflict_series(history, *, task_pair: Sequence | None = None, block: str | None = None) -> go.Figure:
    """Over the recorded steps: the conflict fraction and the cosine of ``task_pair``
    (default: the mean over pairs), overall or in one ``block``, and each task's loss
    (right axis)."""
    steps = history.coord("step")
    b = _block_index(history, block)
    frac = history["conflict_fraction"] if b is None else history["block_conflict_fraction"][:, b]
    cos = _cosines(history, block)
    p = _pair(history, task_pair)
    pair_cos = mean_pair_cosine(cos) if p is None else cos[:, p[0], p[1]]
    label = "mean pairwise cosine" if p is None else f"cosine {task_pair[0]} vs {task_pair[1]}"
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_scatter(x=steps, y=masked(frac), name="conflict fraction", mode="lines+markers", secondary_y=False)
    fig.add_scatter(x=steps, y=masked(pair_cos), name=label, mode="lines", line=dict(dash="dot"), secondary_y=False)
    for t, name in enumerate(history.coord("task")):
        fig.add_scatter(x=steps, y=masked(history["loss"][:, t]), name=f"loss {name}", mode="lines", secondary_y=True)
    fig.update_layout(height=280, margin=dict(l=10, r=10, t=30, b=10), title=f"conflicts and losses ({_where(block)})",
                      xaxis_title="step")
    fig.update_yaxes(range=[-1, 1], secondary_y=False)
    return fig


def block_bars(history, *, step: int | None = None, task_pair: Sequence | None = None) -> go.Figure:
    """Per block at one recorded ``step`` (default: the latest): the cosine of
    ``task_pair`` (default: the mean over pairs)."""
    blocks = history.coord("block")
    i = step_index(history, step)
    p = _pair(history, task_pair)
    if i is None:
        y = np.full(len(blocks), np.nan)
    else:
        c = history["block_cosine"][i]
        y = mean_pair_cosine(c) if p is None else c[:, p[0], p[1]]
    what = "mean pairwise cosine" if p is None else f"cosine {task_pair[0]} vs {task_pair[1]}"
    at = "" if i is None else f", step {history.coord('step')[i]}"
    fig = go.Figure(go.Bar(x=list(blocks), y=masked(y), hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    fig.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), title=f"{what} per block{at}",
                      yaxis_range=[-1, 1])
    return fig


__all__ = ["ALL_BLOCKS", "block_bars", "conflict_matrices", "conflict_series", "masked", "step_index"]
