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
