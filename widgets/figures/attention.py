"""Figures of the attention-heads lens: pure functions from results to plotly figures or
HTML (an ``AttentionPatterns``, a ``HeadScores``, a ``HeadAblation``, a ``TokenAttribution``)."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from widgets.figures.tokens import position_labels, tokens_html

PATTERN_SCALE = "Blues"
MARGIN = dict(l=10, r=10, t=40, b=10)


def pattern_heatmap(patterns, prompt: int = 0, layer: int = 0, head: int = 0) -> go.Figure:
    """One head's attention pattern on one prompt: queries down, keys across."""
    pat = patterns.pattern(prompt, layer, head)
    labels = position_labels(patterns.tokens(prompt))
    fig = go.Figure(
        go.Heatmap(
            z=pat, x=labels, y=labels, zmin=0.0, zmax=1.0, colorscale=PATTERN_SCALE,
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"L{layer}H{head} attention, prompt {prompt}",
        xaxis_title="key (attended to)", yaxis_title="query (attending)",
        yaxis_autorange="reversed", height=420, margin=MARGIN,
    )
    return fig


def attention_tokens_html(patterns, prompt: int, layer: int, head: int, query: int) -> str:
    """The prompt's tokens shaded by the attention of ``query`` (outlined) under one head."""
    return tokens_html(patterns.tokens(prompt), patterns.pattern(prompt, layer, head)[query], focus=query)


def score_grid(scores, kind: str, selected: tuple[int, int] | None = None) -> go.Figure:
    """Layer x head heatmap of one score kind of a ``HeadScores`` result (trace 0); hovering
    a cell shows its 95% interval and the shuffled-token control. Trace 1 rings the
    ``selected`` (layer, head)."""
    k = scores.coord("kind").index(kind)
    z = scores["score"][k]
    extra = np.stack([scores["ci_low"][k], scores["ci_high"][k], scores["control"][k]], axis=-1)
    fig = go.Figure([
        go.Heatmap(
            z=z, x=scores.coord("head"), y=scores.coord("layer"), customdata=extra, zmin=0.0, zmax=1.0,
            colorscale="Viridis",
            hovertemplate="L%{y}H%{x}<br>score %{z:.3f}<br>95% CI [%{customdata[0]:.3f}, %{customdata[1]:.3f}]"
                          "<br>control %{customdata[2]:.3f}<extra></extra>",
        ),
        go.Scatter(x=[] if selected is None else [selected[1]], y=[] if selected is None else [selected[0]],
                   mode="markers", hoverinfo="skip", showlegend=False,
                   marker=dict(symbol="square-open", size=22, color="red", line=dict(width=3))),
    ])
    fig.update_layout(
        title=f"{html.escape(kind)} score per head", xaxis_title="head", yaxis_title="layer", xaxis_dtick=1,
        yaxis_dtick=1, height=320, margin=MARGIN,
    )
    return fig


def ablation_bars(ablation=None) -> go.Figure:
    """The metric change from ablating chosen heads beside random heads (mean and std over
    the draws) of a ``HeadAblation`` result; empty bars before any ablation."""
    if ablation is None:
        x, y, err, title = ["chosen heads", "random heads"], [0.0, 0.0], [0.0, 0.0], "ablation effect"
    else:
        s = ablation.summary
        heads = ", ".join(f"L{l}H{h}" for l, h in ablation.attrs["heads"])
        x = [heads, f"{len(ablation.coord('draw'))} random draws"]
        y = [s["effect"], s["control_mean"]]
        err = [0.0, 0.0 if np.isnan(s["control_std"]) else s["control_std"]]
        title = f"ablating {heads}: {s['effect']:+.3f} vs random {s['control_mean']:+.3f}"
    fig = go.Figure(go.Bar(x=x, y=y, error_y=dict(type="data", array=err)))
    fig.update_layout(title=title, yaxis_title="metric change", height=260, margin=MARGIN)
    return fig


def ablation_text(ablation) -> str:
    """One line: the metric before and after ablating, beside the random heads."""
    s = ablation.summary
    heads = ", ".join(f"L{l}H{h}" for l, h in ablation.attrs["heads"])
    return (f"{heads}: metric {s['base']:.3f} &rarr; {s['ablated']:.3f} ({s['effect']:+.3f}); "
            f"random heads {s['control_mean']:+.3f} &plusmn; {s['control_std']:.3f}")


def attribution_html(attribution) -> str:
    """A ``TokenAttribution``: the attributed prediction and the tokens shaded by |attribution|."""
    from workbench.attention.attribution import normalised

    a = attribution.attrs
    return (f"<div>attribution of <b>{html.escape(a['target'])}</b> "
            f"(log p {a['logprob']:.2f}, IG delta {a['delta']:.3f})</div>"
            + tokens_html(a["tokens"], normalised(attribution)))
