"""Figures of the feature-circuits lens: pure functions from results to plotly figures or
HTML (a ``CircuitGraph``, a ``FeatureSummary``, an ``Intervention``, a ``Faithfulness``).

:func:`circuit_figure` lays the graph out by site (one column per site in forward order,
nodes ranked by effect within a column, error nodes as diamonds; edges blue for a
positive weight, red for a negative one, thicker when stronger)."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go


MARGIN = dict(l=10, r=10, t=64, b=10)
EDGE_WIDTHS = (1.0, 2.5, 5.0)  # edge widths, by |weight| tercile of the strongest edge
EDGE_HOVER = 6  # traces 0-5: edges (sign x width); 6: edge midpoints (hover: weight); 7: nodes; 8: the selection ring
NODE_TRACE = 7
ROW_PX = 30  # vertical room per node row while the graph is small enough
MAX_HEIGHT = 900
POSITIVE, NEGATIVE = "rgba(31,119,180,0.55)", "rgba(214,39,40,0.55)"


def circuit_layout(graph, node_threshold: float, edge_threshold: float):
    """Positions of the kept nodes (``graph.subgraph``): {node index: (column, row)} and the
    kept edge indices. Rows rank a column's nodes by effect, most negative at the top."""
    nodes, edges = graph.subgraph(node_threshold, edge_threshold)
    eff, site = graph["effect"], graph["site"]
    pos = {}
    for c in range(len(graph.sites)):
        col = [int(i) for i in nodes if int(site[i]) == c]
        col.sort(key=lambda i: eff[i])
        for r, i in enumerate(col):
            pos[i] = (c, r)
    return pos, edges


def circuit_rows(pos) -> int:
    """Rows of the tallest column (at least 1)."""
    return max([r for _, r in pos.values()], default=0) + 1


def circuit_geometry(n_rows: int) -> dict:
    """Figure height, pixels per row and the largest node diameter that keeps nodes of
    one column apart (no two markers overlap, so a click lands on the node under it)."""
    plot = min(max(ROW_PX * n_rows, 300), MAX_HEIGHT - MARGIN["t"] - MARGIN["b"] - 30)
    per_row = plot / n_rows
    return {"height": int(plot + MARGIN["t"] + MARGIN["b"] + 30), "row_px": per_row,
            "max_size": max(3.0, min(30.0, 0.8 * per_row)), "labels": per_row >= 12}


def edge_segments(graph, pos, edges) -> dict[tuple[int, int], tuple[list, list]]:
    """Segments of the six edge traces: (sign, width bucket) -> (xs, ys)."""
    w = graph["edge_weight"]
    src, dst = graph["edge_src"], graph["edge_dst"]
    top = float(np.abs(w[edges]).max()) if len(edges) else 1.0
    out = {(s, b): ([], []) for s in (1, -1) for b in range(len(EDGE_WIDTHS))}
    for e in edges:
        a, d = int(src[e]), int(dst[e])
        if a not in pos or d not in pos:
            continue
        frac = abs(w[e]) / top if top else 0.0
        b = 0 if frac < 1 / 3 else 1 if frac < 2 / 3 else 2
        xs, ys = out[(1 if w[e] >= 0 else -1, b)]
        xs += [pos[a][0], pos[d][0], None]
        ys += [pos[a][1], pos[d][1], None]
    return out


def circuit_title(graph, pos, edges) -> str:
    n_err = sum(1 for i in pos if int(graph["feature"][i]) < 0)
    return f"circuit: {len(pos)} nodes ({n_err} error), {len(edges)} edges"


def node_labels(graph, summaries=(), n_tokens: int = 3) -> dict[int, str]:
    """Short labels of nodes that have a ``FeatureSummary``: the tokens the feature
    promotes most (escaped); error nodes are labelled "err"."""
    index = {name: i for i, name in enumerate(graph.coord("node"))}
    out = {i: "err" for i, f in enumerate(graph["feature"]) if int(f) < 0}
    for s in summaries:
        i = index.get(f"{s.attrs['site']}/{int(s.attrs['feature'])}")
        if i is not None and s.attrs.get("promoted"):
            out[i] = " ".join(html.escape(t.strip() or repr(t)) for t in s.attrs["promoted"][:n_tokens])
    return out


def circuit_figure(graph, node_threshold: float | None = None, edge_threshold: float | None = None,
                   selected: int | None = None, labels: dict[int, str] | None = None) -> go.Figure:
    """The layered circuit graph at the given thresholds (default: the graph's own).

    Traces 0-5: edges (sign x width; blue positive, red negative); 6: a marker at each
    edge's midpoint whose hover gives its weight and ends; 7: the nodes, coloured by the
    sign and size of their effect (``customdata[k][0]`` is the node index; text: its
    label from ``labels`` {node index: text}, else its feature id); 8: a ring around the
    ``selected`` node index when it is shown. The height grows with the tallest column
    and node sizes stay below the row spacing, so nodes never overlap."""
    nt = graph.attrs["node_threshold"] if node_threshold is None else node_threshold
    et = graph.attrs["edge_threshold"] if edge_threshold is None else edge_threshold
    labels = labels or {}
    pos, edges = circuit_layout(graph, nt, et)
    geo = circuit_geometry(circuit_rows(pos))
    lim = float(np.abs(graph["effect"]).max()) or 1.0
    names = graph.coord("node")
    traces = []
    for (sign, b), (xs, ys) in edge_segments(graph, pos, edges).items():
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=EDGE_WIDTHS[b], color=POSITIVE if sign > 0 else NEGATIVE)))
    w, src, dst = graph["edge_weight"], graph["edge_src"], graph["edge_dst"]
    mid = [e for e in edges if int(src[e]) in pos and int(dst[e]) in pos]
    traces.append(go.Scatter(
        x=[(pos[int(src[e])][0] + pos[int(dst[e])][0]) / 2 for e in mid],
        y=[(pos[int(src[e])][1] + pos[int(dst[e])][1]) / 2 for e in mid],
        customdata=[[html.escape(names[int(src[e])]), html.escape(names[int(dst[e])]), float(w[e])] for e in mid],
        mode="markers", showlegend=False,
        marker=dict(size=7, opacity=0.35, color=[POSITIVE if w[e] >= 0 else NEGATIVE for e in mid]),
        hovertemplate="edge %{customdata[0]} &rarr; %{customdata[1]}<br>weight %{customdata[2]:+.4f}<extra></extra>"))
    idx = sorted(pos, key=lambda i: pos[i])
    eff, feat = graph["effect"], graph["feature"]
    top = float(np.abs(eff[idx]).max()) if idx else 1.0
    big = geo["max_size"]
    small = min(8.0, big)
    text = [labels.get(i, "err" if int(feat[i]) < 0 else str(int(feat[i]))) for i in idx]
    traces.append(go.Scatter(
        x=[pos[i][0] for i in idx], y=[pos[i][1] for i in idx], text=text if geo["labels"] else None,
        customdata=[[i, html.escape(names[i]), float(eff[i]), labels.get(i, "")] for i in idx],
        mode="markers+text" if geo["labels"] else "markers", textposition="middle right", showlegend=False,
        textfont=dict(size=11), cliponaxis=False,
        marker=dict(color=[float(eff[i]) for i in idx],
                    size=[small + (big - small) * abs(float(eff[i])) / (top or 1.0) for i in idx],
                    symbol=["diamond" if int(feat[i]) < 0 else "circle" for i in idx], colorscale="RdBu",
                    cmin=-lim, cmax=lim, line=dict(width=1, color="#333"),
                    colorbar=dict(title=dict(text="effect", side="right"), thickness=12, x=1.0, xpad=6, len=0.9)),
        hovertemplate="%{customdata[1]}<br>effect %{customdata[2]:+.4f}<br>%{customdata[3]}<extra></extra>",
    ))
    ring = [pos[selected]] if selected in pos else []
    traces.append(go.Scatter(x=[p[0] for p in ring], y=[p[1] for p in ring], mode="markers", hoverinfo="skip",
                             showlegend=False,
                             marker=dict(symbol="circle-open", size=big + 10, color="black", line=dict(width=3))))
    fig = go.Figure(traces)
    sites = [html.escape(s) for s in graph.sites]
    rows = circuit_rows(pos)
    fig.update_layout(
        title=circuit_title(graph, pos, edges), height=geo["height"], margin=MARGIN, plot_bgcolor="white",
        hovermode="closest", dragmode="pan",
        xaxis=dict(tickmode="array", tickvals=list(range(len(sites))), ticktext=sites, range=[-0.4, len(sites) - 0.2],
                   showgrid=False, zeroline=False, fixedrange=False),
        yaxis=dict(range=[rows - 0.5, -0.5], showticklabels=False, showgrid=False, zeroline=False,
                   title="rank by effect (most negative at the top)"),
    )
    return fig


def node_html(graph, node: int) -> str:
    """One line about a node: its name and effect (error nodes say what they are)."""
    f = int(graph["feature"][node])
    return (f"<b>{html.escape(graph.coord('node')[node])}</b>: effect {graph['effect'][node]:+.4f}"
            + ("" if f >= 0 else " (error node: the part of the site the SAE misses)"))


def histogram_title(summary) -> str:
    a = summary.attrs
    return (f"{html.escape(a['site'])}/{a['feature']}: active on {a['frequency']:.2%} of tokens, "
            f"max {a['max_activation']:.2f}")


def activation_histogram(summary=None, note: str = "", log: bool = True) -> go.Figure:
    """Histogram of a feature's positive activations (a FeatureSummary), token counts on a
    log scale (``log``) so the rare strong activations show beside the many weak ones;
    empty, titled ``note``, without one."""
    if summary is None:
        x, y, width, title = [], [], [], note or "activations"
    else:
        left, right = summary["bin_left"], summary["bin_right"]
        x, y, width, title = (left + right) / 2, summary["count"], right - left, histogram_title(summary)
    fig = go.Figure(go.Bar(x=x, y=y, width=width, marker_color="#1f77b4",
                           hovertemplate="activation %{x:.3f}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="activation", height=280, margin=MARGIN, bargap=0,
                      yaxis=dict(title="tokens (log scale)" if log else "tokens", type="log" if log else "linear"))
    return fig


def logit_effect_bars(summary=None) -> go.Figure:
    """Tokens the feature's decoder direction promotes (blue, right) and suppresses (red,
    left), labels in full (the axis makes room for them)."""
    a = summary.attrs if summary is not None else {}
    promoted, suppressed = a.get("promoted", []), a.get("suppressed", [])
    p = list(summary["promoted_logit"]) if promoted else []
    s = list(summary["suppressed_logit"]) if suppressed else []
    fig = go.Figure(go.Bar(
        x=p[::-1] + s, y=[f"+ {html.escape(t)}" for t in promoted[::-1]] + [f"- {html.escape(t)}" for t in suppressed],
        orientation="h", marker_color=["#1f77b4"] * len(p) + ["#d62728"] * len(s),
        hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title="logit effect (decoder direction through the unembedding)",
                      height=max(260, 90 + 18 * (len(p) + len(s))), margin=MARGIN,
                      yaxis=dict(type="category", automargin=True), xaxis_title="logit change per unit activation")
    return fig


def logit_lists_html(summary=None) -> str:
    """The top and bottom logits as two text lists (token and value), as sae_vis shows them."""
    if summary is None or not summary.attrs.get("promoted"):
        return "<i>no logit effect (the model has no unembedding, or no summary)</i>"

    def column(title, tokens, values, color):
        rows = "".join(f'<tr><td style="font-family:monospace;white-space:pre;padding:0 6px">{html.escape(t)}</td>'
                       f'<td style="text-align:right;color:{color}">{float(v):+.3f}</td></tr>'
                       for t, v in zip(tokens, values))
        return (f'<div style="flex:1 1 160px;min-width:140px"><b>{title}</b>'
                f'<table style="border-collapse:collapse">{rows}</table></div>')

    a = summary.attrs
    return ('<div class="wb-logit-lists" style="display:flex;flex-flow:row wrap;gap:4px 16px">'
            + column("top logits (promoted)", a["promoted"], summary["promoted_logit"], "#1f77b4")
            + column("bottom logits (suppressed)", a["suppressed"], summary["suppressed_logit"], "#d62728")
            + "</div>")


def activation_tokens_html(tokens, acts, top: float, focus: int | None = None) -> str:
    """Tokens shaded by activation / ``top``; hovering a token shows its activation value
    (token text escaped); ``focus`` is outlined (the peak)."""
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, acts)):
        w = min(max(float(a) / top, 0.0), 1.0) if top else 0.0
        border = "outline:2px solid #d62728;" if focus == i else ""
        spans.append(f'<span class="wb-token" data-pos="{i}" title="{html.escape(tok)}: activation {float(a):.3f}" '
                     f'style="background:rgba(31,119,180,{w:.3f});{border}padding:1px 3px;margin:1px;'
                     f'border-radius:3px;font-family:monospace;white-space:pre">{html.escape(tok)}</span>')
    return '<div class="wb-tokens" style="line-height:2">' + "".join(spans) + "</div>"


def colour_key_html(top: float) -> str:
    """The shading of the contexts: 0 to the strongest activation shown."""
    return ('<div style="display:flex;align-items:center;gap:6px;font-size:12px;color:#555">activation 0'
            '<span style="display:inline-block;width:140px;height:10px;border:1px solid #ccc;'
            'background:linear-gradient(to right, rgba(31,119,180,0), rgba(31,119,180,1))"></span>'
            f'{top:.2f} (hover a token for its value; the outlined token is the peak)</div>')


def contexts_html(summary) -> str:
    """Top-activating contexts grouped by quantile, tokens shaded by activation (hover: the
    value), with a colour key."""
    ex = summary.examples
    if not ex:
        return "<i>this feature never fires on these texts</i>"
    top = max(e["activation"] for e in ex) or 1.0
    parts, q_seen = [colour_key_html(top)], None
    for e in ex:
        if e["quantile"] != q_seen:
            q_seen = e["quantile"]
            lo, hi = e["range"]
            parts.append(f'<div style="margin-top:6px;color:#555">quantile {q_seen} ({lo:.2f} to {hi:.2f})</div>')
        parts.append(f'<div title="peak activation {e["activation"]:.3f}">'
                     + activation_tokens_html(e["tokens"], e["acts"], top, focus=e["focus"]) + "</div>")
    return "".join(parts)


def summary_title(summary) -> str:
    a = summary.attrs
    return (f"<b>feature {a['feature']} at {html.escape(a['site'])}</b>: fires on "
            f"{a['frequency']:.2%} of {a['n_texts']} texts' tokens")


def intervention_text(intervention) -> str:
    """What an ``Intervention`` did: "mean-ablating site/f" or "steering with site/f x s"."""
    a = intervention.attrs
    if a.get("kind") == "steer":
        return f"steering with {html.escape(a['site'])}/{a['feature']} x {a['strength']:g}"
    feats = ", ".join(f"{html.escape(s)}/{f}" for s, fs in a["features"].items() for f in fs)
    return f"{a['value']}-ablating {feats}"


def metric_bars(result=None, threshold: float | None = None) -> go.Figure:
    """The metric before and after: of an ``Intervention`` (means over prompts), or of a
    ``Faithfulness`` row (the model against the circuit, at ``threshold``, default its
    first row); zeros without a result."""
    x, y, title = ["before", "after"], [0.0, 0.0], "metric change"
    if result is not None and result.kind == "faithfulness":
        row = faithfulness_row(result, threshold)
        x = ["model", "circuit"]
        y = [float(result.attrs["metric_full"]), float(result["metric"][row])]
        title = f"faithfulness of {int(result['size'][row])} nodes: {float(result['faithfulness'][row]):.3f}"
    elif result is not None:
        y = [float(result["before"].mean()), float(result["after"].mean())]
        title = intervention_text(result)
    fig = go.Figure(go.Bar(x=x, y=y, marker_color=["#7f7f7f", "#1f77b4"]))
    fig.update_layout(title=title, height=260, margin=MARGIN, yaxis_title="metric")
    return fig


def faithfulness_row(faith, threshold: float | None = None) -> int:
    """The row of a ``Faithfulness`` result nearest ``threshold`` (the first row when None)."""
    if threshold is None:
        return 0
    ts = np.asarray(faith.coord("threshold"), dtype=float)
    return int(np.argmin(np.abs(np.log10(np.maximum(ts, 1e-30)) - np.log10(max(threshold, 1e-30)))))


def metric_text(result, threshold: float | None = None) -> str:
    """One line under the bars, for an ``Intervention`` or a ``Faithfulness`` row."""
    if result.kind == "faithfulness":
        row = faithfulness_row(result, threshold)
        a = result.attrs
        return (f"{int(result['size'][row])} nodes keep {float(result['faithfulness'][row]):.1%} of the metric "
                f"(model {a['metric_full']:.3f}, circuit {float(result['metric'][row]):.3f}, everything mean-ablated "
                f"{a['metric_empty']:.3f})")
    before, after = float(result["before"].mean()), float(result["after"].mean())
    return f"{intervention_text(result)}: metric {before:.3f} &rarr; {after:.3f} ({after - before:+.3f})"


def next_tokens_html(intervention=None) -> str:
    """What the model says next before and after steering (an ``Intervention`` of
    :func:`workbench.circuits.steer` with ``top_k``): two ranked lists of tokens with their
    mean probability at the last position; tokens that rose into the list are bold; with
    ``max_new_tokens``, the first prompt's greedy continuation before and after (escaped)."""
    a = intervention.attrs if intervention is not None else {}
    if "top_after" not in a:
        return ""
    before = {t for t, _ in a["top_before"]}

    def column(title, rows, mark):
        body = "".join(
            f'<tr><td style="font-family:monospace;white-space:pre;padding:0 6px;'
            f'{"font-weight:bold" if mark and t not in before else ""}">{html.escape(t)}</td>'
            f'<td style="text-align:right">{p:.1%}</td></tr>' for t, p in rows)
        return (f'<div style="flex:1 1 160px;min-width:140px"><b>{title}</b>'
                f'<table style="border-collapse:collapse">{body}</table></div>')

    said = ""
    if a.get("text_before"):  # the first prompt's greedy continuation, without and with the steering
        said = ('<div class="wb-continuation" style="flex:1 1 100%"><b>first prompt continues</b>'
                f'<br>before: <span style="font-family:monospace;white-space:pre-wrap">{html.escape(a["text_before"][0])}</span>'
                f'<br>after: <span style="font-family:monospace;white-space:pre-wrap">{html.escape(a["text_after"][0])}</span>'
                '</div>')
    return ('<div class="wb-next-tokens" style="display:flex;flex-flow:row wrap;gap:4px 16px">'
            + column("model says next (before)", a["top_before"], False)
            + column(f"after {intervention_text(intervention)}", a["top_after"], True) + said + "</div>")
