"""Figures of the task-vectors lens: pure functions from results to plotly figures (a
``MergeAccuracy``, a ``TaskVectorDiagnostics``, a ``FunctionVector``, a ``LayerSweep``)."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

MARGIN = dict(l=10, r=10, t=40, b=10)


def merge_bars(merge, finetuned=None) -> go.Figure:
    """Per-task accuracy bars of a merge (a ``MergeAccuracy``), beside each task's
    fine-tuned model (a ``MergeAccuracy`` of method "finetuned") when given and complete."""
    tasks = merge.coord("task")
    labels = [html.escape(t) for t in tasks]
    data = [go.Bar(x=labels, y=list(merge["accuracy"]), name="merged", marker_color="#1f77b4")]
    if finetuned is not None:
        ft = finetuned.as_dict()
        ys = [ft.get(t, np.nan) for t in tasks]
        if not np.isnan(ys).any():
            data.append(go.Bar(x=labels, y=ys, name="fine-tuned", marker_color="#c7c7c7"))
    fig = go.Figure(data)
    method = merge.attrs.get("method", "merged")
    fig.update_layout(title=f"{html.escape(method)} merge: mean zero-shot accuracy {merge.mean:.2f}",
                      yaxis_range=[0, 1.05], barmode="group", height=340, margin=MARGIN, yaxis_title="accuracy")
    return fig


def cosine_heatmap(diag) -> go.Figure:
    """Whole-model cosine between task vectors (a TaskVectorDiagnostics result)."""
    names = [html.escape(t) for t in diag.coord("task")]
    fig = go.Figure(go.Heatmap(z=diag["cosine"], x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="task-vector cosine", height=340, margin=MARGIN, yaxis_autorange="reversed")
    return fig


def ie_heatmap(fv, heads: Sequence[tuple[int, int]] = ()) -> go.Figure:
    """Indirect effect of each head [layer, head] of a ``FunctionVector`` (trace 0), the
    ``heads`` in the vector marked (trace 1)."""
    ie = fv["indirect_effect"]
    lim = float(np.abs(ie).max()) or 1.0
    fig = go.Figure([
        go.Heatmap(z=ie, x=fv.coord("head"), y=fv.coord("layer"), zmin=-lim, zmax=lim, colorscale="RdBu",
                   hovertemplate="L%{y}H%{x}: %{z:.4f}<extra></extra>"),
        go.Scatter(x=[h for _, h in heads], y=[l for l, _ in heads], mode="markers",
                   marker=dict(symbol="x", size=14, color="black"), name="in vector", hoverinfo="skip"),
    ])
    fig.update_layout(title=f"indirect effect per head ({html.escape(fv.task)})", xaxis_title="head",
                      yaxis_title="layer", height=340, margin=MARGIN, showlegend=False,
                      xaxis=dict(tick0=0, dtick=1), yaxis=dict(tick0=0, dtick=1))
    return fig


def sweep_figure(sweep=None, note: str = "") -> go.Figure:
    """A ``LayerSweep``: accuracy with the vector added at each layer (bars) against the
    unpatched zero-shot baseline (dashed); empty, titled ``note``, without one."""
    if sweep is None:
        x, y, bx, by, title = [], [], [], [], note or "layer sweep"
    else:
        x = list(sweep.coord("layer"))
        y = list(sweep["accuracy"])
        base = float(sweep["zero_shot"])
        bx, by = [x[0] - 0.5, x[-1] + 0.5], [base, base]
        title = f"layer sweep: {len(sweep.heads)} heads ({html.escape(sweep.task)})"
    fig = go.Figure([
        go.Bar(x=x, y=y, name="with vector", marker_color="#2ca02c"),
        go.Scatter(x=bx, y=by, mode="lines", name="zero-shot", line=dict(dash="dash", color="black")),
    ])
    fig.update_layout(title=title, xaxis_title="layer (vector added to resid_pre)", yaxis_title="accuracy",
                      yaxis_range=[0, 1.05], height=340, margin=MARGIN, xaxis=dict(tick0=0, dtick=1))
    return fig
