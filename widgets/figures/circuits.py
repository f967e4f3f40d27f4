"""Figures of the feature-circuits lens: pure functions from results to plotly figures or
HTML (a ``CircuitGraph``, a ``FeatureSummary``, an ``Intervention``, a ``Faithfulness``).

:func:`circuit_figure` lays the graph out by site (one column per site in forward order,
nodes ranked by effect within a column, error nodes as diamonds; edges blue for a
positive weight, red for a negative one, thicker when stronger)."""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from widgets.figures.tokens import tokens_html

MARGIN = dict(l=10, r=10, t=40, b=10)
EDGE_WIDTHS = (1.0, 2.5, 5.0)  # edge widths, by |weight| tercile of the strongest edge
NODE_TRACE = 6  # traces 0-5: edges (sign x width); 6: nodes; 7: the selection ring


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


def circuit_figure(graph, node_threshold: float | None = None, edge_threshold: float | None = None,
                   selected: int | None = None) -> go.Figure:
    """The layered circuit graph at the given thresholds (default: the graph's own):
    traces 0-5 edges (sign x width), trace 6 nodes (``customdata[k][0]`` is the node
    index), trace 7 a ring around the ``selected`` node index when it is shown."""
    nt = graph.attrs["node_threshold"] if node_threshold is None else node_threshold
    et = graph.attrs["edge_threshold"] if edge_threshold is None else edge_threshold
    pos, edges = circuit_layout(graph, nt, et)
    lim = float(np.abs(graph["effect"]).max()) or 1.0
    traces = []
    for (sign, b), (xs, ys) in edge_segments(graph, pos, edges).items():
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=EDGE_WIDTHS[b], color="rgba(31,119,180,0.55)" if sign > 0
                                           else "rgba(214,39,40,0.55)")))
    idx = sorted(pos, key=lambda i: pos[i])
    eff, feat, names = graph["effect"], graph["feature"], graph.coord("node")
    top = float(np.abs(eff[idx]).max()) if idx else 1.0
    traces.append(go.Scatter(
        x=[pos[i][0] for i in idx], y=[pos[i][1] for i in idx],
        text=["err" if int(feat[i]) < 0 else str(int(feat[i])) for i in idx],
        customdata=[[i, html.escape(names[i]), float(eff[i])] for i in idx], mode="markers+text",
        textposition="middle right", showlegend=False,
        marker=dict(color=[float(eff[i]) for i in idx], size=[10 + 22 * abs(float(eff[i])) / (top or 1.0) for i in idx],
                    symbol=["diamond" if int(feat[i]) < 0 else "circle" for i in idx], colorscale="RdBu",
                    cmin=-lim, cmax=lim, line=dict(width=1, color="#333"), colorbar=dict(title="effect", thickness=12)),
        hovertemplate="%{customdata[1]}<br>effect %{customdata[2]:.4f}<extra></extra>",
    ))
    ring = [pos[selected]] if selected in pos else []
    traces.append(go.Scatter(x=[p[0] for p in ring], y=[p[1] for p in ring], mode="markers", hoverinfo="skip",
                             showlegend=False,
                             marker=dict(symbol="circle-open", size=30, color="black", line=dict(width=3))))
    fig = go.Figure(traces)
    sites = [html.escape(s) for s in graph.sites]
    fig.update_layout(
        title=circuit_title(graph, pos, edges), height=460, margin=MARGIN, plot_bgcolor="white",
        xaxis=dict(tickmode="array", tickvals=list(range(len(sites))), ticktext=sites, range=[-0.5, len(sites) - 0.3],
                   showgrid=False, zeroline=False),
        yaxis=dict(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False, title="rank by effect"),
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


def activation_histogram(summary=None, note: str = "") -> go.Figure:
    """Histogram of a feature's positive activations (a FeatureSummary); empty, titled
    ``note``, without one."""
    if summary is None:
        x, y, width, title = [], [], [], note or "activations"
    else:
        left, right = summary["bin_left"], summary["bin_right"]
        x, y, width, title = (left + right) / 2, summary["count"], right - left, histogram_title(summary)
    fig = go.Figure(go.Bar(x=x, y=y, width=width, marker_color="#1f77b4",
                           hovertemplate="%{x:.3f}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="activation", yaxis_title="tokens", height=260, margin=MARGIN, bargap=0)
    return fig


def logit_effect_bars(summary=None) -> go.Figure:
    """Tokens the feature's decoder direction promotes (right) and suppresses (left)."""
    a = summary.attrs if summary is not None else {}
    promoted, suppressed = a.get("promoted", []), a.get("suppressed", [])
    p = list(summary["promoted_logit"]) if promoted else []
    s = list(summary["suppressed_logit"]) if suppressed else []
    fig = go.Figure(go.Bar(
        x=p[::-1] + s, y=[f"+ {html.escape(t)}" for t in promoted[::-1]] + [f"- {html.escape(t)}" for t in suppressed],
        orientation="h", marker_color=["#1f77b4"] * len(p) + ["#d62728"] * len(s),
        hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title="logit effect (decoder direction through the unembedding)", height=360, margin=MARGIN,
                      yaxis=dict(type="category"))
    return fig


def contexts_html(summary) -> str:
    """Top-activating contexts grouped by quantile, tokens shaded by activation."""
    ex = summary.examples
    if not ex:
        return "<i>this feature never fires on these texts</i>"
    top = max(e["activation"] for e in ex) or 1.0
    parts, q_seen = [], None
    for e in ex:
        if e["quantile"] != q_seen:
            q_seen = e["quantile"]
            lo, hi = e["range"]
            parts.append(f'<div style="margin-top:6px;color:#555">quantile {q_seen} ({lo:.2f} to {hi:.2f})</div>')
        parts.append(f'<div title="activation {e["activation"]:.3f}">'
                     + tokens_html(e["tokens"], np.asarray(e["acts"]) / top, focus=e["focus"]) + "</div>")
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
