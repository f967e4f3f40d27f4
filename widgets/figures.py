"""Figure builders: pure functions from results to plotly figures or HTML.

They never touch a live model: everything drawn here can be drawn from a saved
result in a plain script.
"""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np
import plotly.graph_objects as go

PATTERN_SCALE = "Blues"


def _labels(tokens: Sequence[str]) -> list[str]:
    # plotly needs unique category labels; keep the position so repeats stay apart
    return [f"{i}: {html.escape(t)}" for i, t in enumerate(tokens)]


def pattern_heatmap(patterns, prompt: int = 0, layer: int = 0, head: int = 0) -> go.Figure:
    """One head's attention pattern on one prompt: queries down, keys across."""
    pat = patterns.pattern(prompt, layer, head)
    labels = _labels(patterns.tokens(prompt))
    fig = go.Figure(
        go.Heatmap(
            z=pat, x=labels, y=labels, zmin=0.0, zmax=1.0, colorscale=PATTERN_SCALE,
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"L{layer}H{head} attention, prompt {prompt}",
        xaxis_title="key (attended to)", yaxis_title="query (attending)",
        yaxis_autorange="reversed", height=420, margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def tokens_html(tokens: Sequence[str], weights: Sequence[float] | np.ndarray, *, focus: int | None = None) -> str:
    """Tokens as inline spans shaded by ``weights`` in [0, 1]. Token text is HTML-escaped;
    ``focus`` (a position) gets an outline, e.g. the query whose attention is shown."""
    w = np.clip(np.asarray(weights, dtype=float), 0.0, 1.0)
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, w)):
        border = "outline:2px solid #d62728;" if focus == i else ""
        spans.append(
            f'<span class="wb-token" data-pos="{i}" title="{i}: {a:.3f}" '
            f'style="background:rgba(31,119,180,{a:.3f});{border}padding:1px 3px;margin:1px;'
            f'border-radius:3px;font-family:monospace;white-space:pre">{html.escape(tok)}</span>'
        )
    return '<div class="wb-tokens" style="line-height:2">' + "".join(spans) + "</div>"


def score_grid(scores, kind: str) -> go.Figure:
    """Layer x head heatmap of one score kind of a ``HeadScores`` result; hovering a cell
    shows its 95% interval and the shuffled-token control."""
    k = scores.coord("kind").index(kind)
    z = scores["score"][k]
    extra = np.stack([scores["ci_low"][k], scores["ci_high"][k], scores["control"][k]], axis=-1)
    fig = go.Figure(
        go.Heatmap(
            z=z, x=scores.coord("head"), y=scores.coord("layer"), customdata=extra, zmin=0.0, zmax=1.0,
            colorscale="Viridis",
            hovertemplate="L%{y}H%{x}<br>score %{z:.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                          "<br>control %{customdata[2]:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"{kind} score per head", xaxis_title="head", yaxis_title="layer", xaxis_dtick=1, yaxis_dtick=1,
        height=320, margin=dict(l=10, r=10, t=40, b=10),
    )
    return fig


def ablation_bars(ablation=None) -> go.Figure:
    """The metric change from ablating chosen heads beside random heads (mean and std
    over the draws) of a ``HeadAblation`` result; empty bars before any ablation."""
    fig = go.Figure(go.Bar(x=["chosen heads", "random heads"], y=[0.0, 0.0], error_y=dict(type="data", array=[0.0, 0.0])))
    fig.update_layout(title="ablation effect", yaxis_title="metric change", height=260, margin=dict(l=10, r=10, t=40, b=10))
    if ablation is not None:
        update_ablation_bars(fig, ablation)
    return fig


def update_ablation_bars(fig, ablation) -> None:
    s = ablation.summary
    heads = ", ".join(f"L{l}H{h}" for l, h in ablation.attrs["heads"])
    bar = fig.data[0]
    bar.y = [s["effect"], s["control_mean"]]
    bar.error_y = dict(type="data", array=[0.0, 0.0 if np.isnan(s["control_std"]) else s["control_std"]])
    bar.x = [heads, f"{len(ablation.coord('draw'))} random draws"]
    fig.layout.title.text = f"ablating {heads}: {s['effect']:+.3f} vs random {s['control_mean']:+.3f}"
