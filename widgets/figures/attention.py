"""Figures of the attention-heads lens: pure functions from results to plotly figures or
HTML (an ``AttentionPatterns``, a ``HeadScores``, a ``HeadAblation``, a ``TokenAttribution``)."""

from __future__ import annotations

import html
import json

import numpy as np
import plotly.graph_objects as go

from widgets.figures.tokens import position_labels, tokens_html

PATTERN_SCALE = "Blues"
MARGIN = dict(l=10, r=10, t=40, b=10)
MASKED = "#d9d9d9"  # the background that shows through masked (never attendable) cells
DECIMALS = 4  # attention drawn to 1e-4 (hover shows 3 decimals): a third of the bytes of full floats per redraw


def is_causal(patterns) -> bool:
    """Whether the patterns come from a causal model (``attrs['causal']``; for results saved
    without it: no attention above the diagonal anywhere)."""
    causal = patterns.attrs.get("causal")
    if causal is not None:
        return bool(causal)
    p = np.asarray(patterns["pattern"])
    return bool(np.all(np.triu(np.ones(p.shape[-2:], dtype=bool), 1) <= (p == 0)))


def masked_pattern(patterns, prompt: int, layer: int, head: int) -> np.ndarray:
    """One head's [query, key] pattern with the causal mask (keys after the query) as NaN,
    so a figure draws them as background (greyed out) rather than as zero attention."""
    pat = np.asarray(patterns.pattern(prompt, layer, head), dtype=float)
    if is_causal(patterns):
        pat = np.where(np.triu(np.ones(pat.shape, dtype=bool), 1), np.nan, pat)
    return pat


def pattern_heatmap(patterns, prompt: int = 0, layer: int = 0, head: int = 0) -> go.Figure:
    """One head's attention pattern on one prompt: queries down, keys across; in a causal
    model the keys a query cannot see are grey (not zero)."""
    pat = np.round(masked_pattern(patterns, prompt, layer, head), DECIMALS)
    labels = position_labels(patterns.tokens(prompt))
    fig = go.Figure(
        go.Heatmap(
            z=pat, x=labels, y=labels, zmin=0.0, zmax=1.0, colorscale=PATTERN_SCALE, hoverongaps=False,
            hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>",
        )
    )
    fig.update_layout(
        title=f"L{layer}H{head} attention, prompt {prompt}",
        xaxis_title="key (attended to)", yaxis_title="query (attending)", plot_bgcolor=MASKED,
        xaxis_showgrid=False, yaxis_showgrid=False,
        yaxis_autorange="reversed", height=420, margin=MARGIN,
    )
    return fig


def heads_overview(patterns, prompt: int = 0, selected: tuple[int, int] | None = None) -> go.Figure:
    """Every head's pattern on one prompt as a thumbnail, layers down and heads across (as
    CircuitsVis / bertviz's overview); the causal mask and the gaps between thumbnails
    are grey; ``selected`` (layer, head) is outlined in red. One heatmap trace (trace 0):
    a click at (x, y) is head ``x // (n + 1)``, layer ``y // (n + 1)`` with ``n`` the
    prompt's length (see :func:`overview_head`)."""
    layers, heads = patterns.coord("layer"), patterns.coord("head")
    n = int(patterns["lengths"][prompt])
    t = n + 1
    z = np.full((len(layers) * t - 1, len(heads) * t - 1), np.nan)
    for i, layer in enumerate(layers):
        for j, head in enumerate(heads):
            z[i * t:i * t + n, j * t:j * t + n] = np.round(masked_pattern(patterns, prompt, layer, head)[:n, :n],
                                                           DECIMALS)
    shapes = overview_outline(patterns, prompt, selected)
    fig = go.Figure(go.Heatmap(z=z, zmin=0.0, zmax=1.0, colorscale=PATTERN_SCALE, hoverongaps=False,
                               hovertemplate="attention %{z:.3f}<extra></extra>"))
    fig.update_layout(
        title=f"every head on prompt {prompt} ({len(layers)} layers x {len(heads)} heads; click one)",
        plot_bgcolor=MASKED, shapes=shapes, height=max(240, 90 * len(layers) + 90), margin=MARGIN,
        xaxis=dict(tickvals=[j * t + (n - 1) / 2 for j in range(len(heads))], ticktext=[f"H{h}" for h in heads],
                   showgrid=False, zeroline=False, side="top"),
        yaxis=dict(tickvals=[i * t + (n - 1) / 2 for i in range(len(layers))], ticktext=[f"L{l}" for l in layers],
                   showgrid=False, zeroline=False, autorange="reversed"),
    )
    return fig


def overview_outline(patterns, prompt: int, selected: tuple[int, int] | None) -> list[dict]:
    """The red outline of the ``selected`` (layer, head) thumbnail of :func:`heads_overview`
    (its layout shapes: moving the selection changes only these)."""
    layers, heads = patterns.coord("layer"), patterns.coord("head")
    if selected is None or selected[0] not in layers or selected[1] not in heads:
        return []
    n = int(patterns["lengths"][prompt])
    i, j, t = layers.index(selected[0]), heads.index(selected[1]), n + 1
    return [dict(type="rect", x0=j * t - 0.5, x1=j * t + n - 0.5, y0=i * t - 0.5, y1=i * t + n - 0.5,
                 line=dict(color="red", width=2))]


def overview_head(patterns, prompt: int, x: float, y: float) -> tuple[int, int] | None:
    """The (layer, head) of the thumbnail at cell (x, y) of :func:`heads_overview`
    (None on a gap between thumbnails)."""
    t = int(patterns["lengths"][prompt]) + 1
    i, j = int(round(y)) // t, int(round(x)) // t
    if int(round(y)) % t == t - 1 or int(round(x)) % t == t - 1:
        return None
    layers, heads = patterns.coord("layer"), patterns.coord("head")
    if not (0 <= i < len(layers) and 0 <= j < len(heads)):
        return None
    return layers[i], heads[j]


def attention_tokens_html(patterns, prompt: int, layer: int, head: int, query: int) -> str:
    """The prompt's tokens shaded by the attention of ``query`` (outlined) under one head.
    The strip carries the head's whole pattern (``data-pattern``: JSON rows per query,
    null where masked), so a front end can shade by any token's attention on hover."""
    n = int(patterns["lengths"][prompt])
    rows = masked_pattern(patterns, prompt, layer, head)[:n, :n]
    pattern = json.dumps([[None if np.isnan(a) else round(float(a), 3) for a in row] for row in rows],
                         separators=(",", ":"))
    return tokens_html(patterns.tokens(prompt), patterns.pattern(prompt, layer, head)[query], focus=query,
                       data={"pattern": pattern})


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
        title=f"{html.escape(kind)} score per head", xaxis_title="head", yaxis_title="layer",
        xaxis=dict(tick0=0, dtick=1), yaxis=dict(tick0=0, dtick=1), height=320, margin=MARGIN,
    )
    return fig


def _heads(ablation) -> str:
    return ", ".join(f"L{l}H{h}" for l, h in ablation.attrs["heads"])


def ablation_bars(ablation=None, *, metric: str = "metric", where: str = "") -> go.Figure:
    """The change of ``metric`` from ablating chosen heads beside random heads (mean and std
    over the draws) of a ``HeadAblation`` result, measured on ``where`` (e.g. "prompt 2");
    empty bars before any ablation."""
    on = f" on {where}" if where else ""
    if ablation is None:
        x, y, err = ["chosen heads", "random heads"], [0.0, 0.0], [0.0, 0.0]
        title = f"ablation effect on {html.escape(metric)}{on}: press ablate"
    else:
        s = ablation.summary
        heads = _heads(ablation)
        x = [heads, f"{len(ablation.coord('draw'))} random draws"]
        y = [float(s["effect"]), float(s["control_mean"])]
        err = [0.0, 0.0 if np.isnan(s["control_std"]) else float(s["control_std"])]
        title = f"ablating {heads}{on}: {html.escape(metric)} {s['effect']:+.3f} vs random {s['control_mean']:+.3f}"
    fig = go.Figure(go.Bar(x=x, y=y, error_y=dict(type="data", array=err)))
    fig.update_layout(title=title, yaxis_title=f"change of {html.escape(metric)}", height=260, margin=MARGIN)
    return fig


def ablation_text(ablation, *, metric: str = "metric", where: str = "", replacement: str | None = None) -> str:
    """One line: the metric (named) before and after ablating, beside the random heads."""
    s = ablation.summary
    rep = replacement or ablation.attrs.get("replacement")
    how = f" ({html.escape(str(rep))}-ablated)" if rep else ""
    on = f" on {html.escape(where)}" if where else ""
    return (f"{_heads(ablation)}{how}{on}: {html.escape(metric)} {s['base']:.3f} &rarr; {s['ablated']:.3f} "
            f"({s['effect']:+.3f}); random heads {s['control_mean']:+.3f} &plusmn; {s['control_std']:.3f}")


def attribution_html(attribution) -> str:
    """A ``TokenAttribution``: the attributed prediction and the tokens shaded by |attribution|."""
    from workbench.attention.attribution import normalised

    a = attribution.attrs
    return (f"<div>attribution of <b>{html.escape(a['target'])}</b> "
            f"(log p {a['logprob']:.2f}, IG delta {a['delta']:.3f})</div>"
            + tokens_html(a["tokens"], normalised(attribution)))
