"""CircuitExplorer and FeatureDashboard: a sparse feature circuit you can click through.

``CircuitExplorer`` draws a :class:`~workbench.circuits.CircuitGraph` layered by site
(one column per site in forward order, nodes ranked by effect within a column, error
nodes as diamonds; edges blue for a positive weight, red for a negative one, thicker
when stronger). Node and edge threshold sliders prune it in
place; the caption gives the shown circuit's size. Clicking a feature node opens its
:class:`FeatureDashboard` below and arms the "ablate" and "steer" controls, whose metric
before/after lands in a bar chart. "faithfulness" mean-ablates everything outside the
shown nodes and reports the fraction of the metric kept.

``FeatureDashboard`` shows one feature: top-activating contexts by quantile (tokens
shaded by activation, the peak outlined, all token text HTML-escaped), the activation
histogram and the tokens its decoder direction promotes and suppresses through the
unembedding. ``show(feature)`` updates it in place.

The figure builders (:func:`circuit_figure`, :func:`activation_histogram`,
:func:`logit_effect_bars`, :func:`contexts_html`) are pure functions of results.
"""

from __future__ import annotations

import html
from typing import Mapping

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from widgets.figures import tokens_html
from workbench.errors import WorkbenchError

_MARGIN = dict(l=10, r=10, t=40, b=10)
_WIDTHS = (1.0, 2.5, 5.0)  # edge widths, by |weight| tercile of the strongest edge


# ---------------------------------------------------------------------- figure builders


def _node_label(graph, i: int) -> str:
    f = int(graph["feature"][i])
    return "err" if f < 0 else str(f)


def circuit_layout(graph, node_threshold: float, edge_threshold: float):
    """Positions of the kept nodes: {node index: (column, row)} and the kept edge indices.
    Rows rank a column's nodes by effect, most negative at the top."""
    nodes, edges = graph.subgraph(node_threshold, edge_threshold)
    eff, site = graph["effect"], graph["site"]
    pos = {}
    for c in range(len(graph.sites)):
        col = [int(i) for i in nodes if int(site[i]) == c]
        col.sort(key=lambda i: eff[i])
        for r, i in enumerate(col):
            pos[i] = (c, r)
    return pos, edges


def _edge_traces_data(graph, pos, edges):
    """Segments for the six edge traces: (sign, width bucket) -> (xs, ys)."""
    w = graph["edge_weight"]
    src, dst = graph["edge_src"], graph["edge_dst"]
    top = float(np.abs(w[edges]).max()) if len(edges) else 1.0
    out = {(s, b): ([], []) for s in (1, -1) for b in range(len(_WIDTHS))}
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


def _node_trace_data(graph, pos):
    idx = sorted(pos, key=lambda i: pos[i])
    eff = graph["effect"]
    top = float(np.abs(eff[idx]).max()) if idx else 1.0
    return dict(
        x=[pos[i][0] for i in idx], y=[pos[i][1] for i in idx],
        text=[_node_label(graph, i) for i in idx],
        customdata=[[i, html.escape(graph.coord("node")[i]), float(eff[i])] for i in idx],
        marker_color=[float(eff[i]) for i in idx],
        marker_size=[10 + 22 * abs(float(eff[i])) / (top or 1.0) for i in idx],
        marker_symbol=["diamond" if int(graph["feature"][i]) < 0 else "circle" for i in idx],
    ), idx


def circuit_figure(graph, node_threshold: float | None = None, edge_threshold: float | None = None) -> go.Figure:
    """The layered circuit graph: trace 0-5 edges (sign x width), trace 6 nodes, trace 7
    the selection ring."""
    nt = graph.attrs["node_threshold"] if node_threshold is None else node_threshold
    et = graph.attrs["edge_threshold"] if edge_threshold is None else edge_threshold
    pos, edges = circuit_layout(graph, nt, et)
    segs = _edge_traces_data(graph, pos, edges)
    lim = float(np.abs(graph["effect"]).max()) or 1.0
    traces = []
    for (sign, b), (xs, ys) in segs.items():
        traces.append(go.Scatter(x=xs, y=ys, mode="lines", hoverinfo="skip", showlegend=False,
                                 line=dict(width=_WIDTHS[b], color="rgba(31,119,180,0.55)" if sign > 0
                                           else "rgba(214,39,40,0.55)")))
    nd, _ = _node_trace_data(graph, pos)
    traces.append(go.Scatter(
        x=nd["x"], y=nd["y"], text=nd["text"], customdata=nd["customdata"], mode="markers+text",
        textposition="middle right", showlegend=False,
        marker=dict(color=nd["marker_color"], size=nd["marker_size"], symbol=nd["marker_symbol"], colorscale="RdBu",
                    cmin=-lim, cmax=lim, line=dict(width=1, color="#333"), colorbar=dict(title="effect", thickness=12)),
        hovertemplate="%{customdata[1]}<br>effect %{customdata[2]:.4f}<extra></extra>",
    ))
    traces.append(go.Scatter(x=[], y=[], mode="markers", hoverinfo="skip", showlegend=False,
                             marker=dict(symbol="circle-open", size=30, color="black", line=dict(width=3))))
    fig = go.Figure(traces)
    sites = [html.escape(s) for s in graph.sites]
    fig.update_layout(
        title=_circuit_title(graph, pos, edges), height=460, margin=_MARGIN, plot_bgcolor="white",
        xaxis=dict(tickmode="array", tickvals=list(range(len(sites))), ticktext=sites, range=[-0.5, len(sites) - 0.3],
                   showgrid=False, zeroline=False),
        yaxis=dict(autorange="reversed", showticklabels=False, showgrid=False, zeroline=False, title="rank by effect"),
    )
    return fig


def _circuit_title(graph, pos, edges) -> str:
    n_err = sum(1 for i in pos if int(graph["feature"][i]) < 0)
    return f"circuit: {len(pos)} nodes ({n_err} error), {len(edges)} edges"


def activation_histogram(summary) -> go.Figure:
    """Histogram of a feature's positive activations (a FeatureSummary)."""
    left, right, count = summary["bin_left"], summary["bin_right"], summary["count"]
    fig = go.Figure(go.Bar(x=(left + right) / 2, y=count, width=(right - left), marker_color="#1f77b4",
                           hovertemplate="%{x:.3f}: %{y} tokens<extra></extra>"))
    fig.update_layout(title=_hist_title(summary), xaxis_title="activation", yaxis_title="tokens", height=260,
                      margin=_MARGIN, bargap=0)
    return fig


def _hist_title(summary) -> str:
    a = summary.attrs
    return f"{html.escape(a['site'])}/{a['feature']}: active on {a['frequency']:.2%} of tokens, max {a['max_activation']:.2f}"


def logit_effect_bars(summary) -> go.Figure:
    """Tokens the feature's decoder direction promotes (right) and suppresses (left)."""
    a = summary.attrs
    promoted, suppressed = a.get("promoted", []), a.get("suppressed", [])
    p = list(summary["promoted_logit"]) if promoted else []
    s = list(summary["suppressed_logit"]) if suppressed else []
    fig = go.Figure(go.Bar(
        x=p[::-1] + s, y=[f"+ {html.escape(t)}" for t in promoted[::-1]] + [f"- {html.escape(t)}" for t in suppressed],
        orientation="h", marker_color=["#1f77b4"] * len(p) + ["#d62728"] * len(s),
        hovertemplate="%{y}: %{x:.3f}<extra></extra>"))
    fig.update_layout(title="logit effect (decoder direction through the unembedding)", height=360, margin=_MARGIN,
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


# ---------------------------------------------------------------------- widgets


class FeatureDashboard(W.VBox):
    """One feature of ``sae`` over ``texts``: contexts, histogram, logit effect.
    ``summary_kw`` go to :func:`~workbench.circuits.feature_summary`."""

    def __init__(self, subject, sae, feature: int, texts, *, site: str | None = None, **summary_kw) -> None:
        self.subject, self.texts, self.summary_kw = subject, list(texts), summary_kw
        self.sae, self.site = sae, site
        self._cache: dict[tuple, object] = {}
        self.summary = self._summary(sae, int(feature), site)
        self.title = W.HTML()
        self.contexts = W.HTML()
        self.histogram = go.FigureWidget(activation_histogram(self.summary))
        self.logits = go.FigureWidget(logit_effect_bars(self.summary))
        super().__init__([self.title, W.HBox([W.VBox([self.contexts], layout=W.Layout(width="50%")),
                                              W.VBox([self.histogram, self.logits], layout=W.Layout(width="50%"))])])
        self._draw()

    def _summary(self, sae, feature: int, site):
        from workbench.circuits import feature_summary

        key = (id(sae), site, feature)
        if key not in self._cache:
            self._cache[key] = feature_summary(self.subject, sae, feature, self.texts, site=site, **self.summary_kw)
        return self._cache[key]

    @property
    def feature(self) -> int:
        return int(self.summary.attrs["feature"])

    def show(self, feature: int, *, sae=None, site: str | None = None):
        """Switch to ``feature`` (of ``sae`` at ``site``, default: the current ones); returns its summary."""
        if sae is not None:
            self.sae, self.site = sae, site
        self.summary = self._summary(self.sae, int(feature), self.site)
        self._draw()
        return self.summary

    def _draw(self) -> None:
        s = self.summary
        a = s.attrs
        self.title.value = (f"<b>feature {a['feature']} at {html.escape(a['site'])}</b>: fires on "
                            f"{a['frequency']:.2%} of {a['n_texts']} texts' tokens")
        self.contexts.value = contexts_html(s)
        h = activation_histogram(s).data[0]
        with self.histogram.batch_update():
            self.histogram.data[0].x, self.histogram.data[0].y, self.histogram.data[0].width = h.x, h.y, h.width
            self.histogram.layout.title.text = _hist_title(s)
        b = logit_effect_bars(s).data[0]
        with self.logits.batch_update():
            self.logits.data[0].x, self.logits.data[0].y, self.logits.data[0].marker.color = b.x, b.y, b.marker.color


class CircuitExplorer(W.VBox):
    """Explore ``graph`` (a CircuitGraph found with ``saes`` on ``clean`` prompts for
    ``metric``). ``texts`` feed the feature dashboards; ``means`` (from
    :func:`~workbench.circuits.feature_means`) are used by mean-ablation and the
    faithfulness check (computed from ``texts`` when not given)."""

    def __init__(self, subject, saes: Mapping[str, object], graph, clean, metric, *, texts, means=None,
                 steer_positions: str = "last") -> None:
        from workbench.circuits.attribution import ordered_saes

        self.subject, self.graph, self.metric = subject, graph, metric
        self.saes = ordered_saes(subject, saes)
        if list(self.saes) != graph.sites:
            raise WorkbenchError(f"the graph's sites {graph.sites} differ from the SAEs' {list(self.saes)}")
        self.clean, self.texts, self._means = clean, list(texts), means
        self.steer_positions = steer_positions
        self.selected: int | None = None
        self.last = None  # the last Intervention or faithfulness figure
        self._baseline = None  # (clean batch, metric of the spliced model, metric with every node mean-ablated)
        top = float(np.abs(graph["effect"]).max()) or 1.0
        w = np.abs(graph["edge_weight"])
        etop = float(w.max()) if len(w) else 1.0
        nt, et = graph.attrs["node_threshold"], graph.attrs["edge_threshold"]
        self.node_threshold = W.FloatLogSlider(value=max(nt, top * 1e-4), base=10, min=np.log10(top) - 4,
                                               max=np.log10(top), step=0.05, description="node |effect|",
                                               readout_format=".3g", continuous_update=False)
        self.edge_threshold = W.FloatLogSlider(value=max(et, etop * 1e-4), base=10, min=np.log10(etop) - 4,
                                               max=np.log10(etop), step=0.05, description="edge |weight|",
                                               readout_format=".3g", continuous_update=False)
        self.figure = go.FigureWidget(circuit_figure(graph, self.node_threshold.value, self.edge_threshold.value))
        self._order: list[int] = []
        self.node_info = W.HTML("<i>click a feature node</i>")
        self.ablate_value = W.Dropdown(options=["mean", "zero"], value="mean", description="ablate to")
        self.ablate_button = W.Button(description="ablate", tooltip="ablate the selected feature", disabled=True)
        self.strength = W.FloatSlider(value=4.0, min=-20.0, max=20.0, step=0.5, description="strength",
                                      continuous_update=False)
        self.steer_button = W.Button(description="steer", tooltip="add strength x the feature's direction", disabled=True)
        self.faith_button = W.Button(description="faithfulness", tooltip="mean-ablate everything outside the shown nodes")
        self.status = W.HTML()
        self.bars = go.FigureWidget(go.Figure(go.Bar(x=["before", "after"], y=[0.0, 0.0], marker_color=["#7f7f7f",
                                                                                                       "#1f77b4"])))
        self.bars.update_layout(title="metric change", height=260, margin=_MARGIN, yaxis_title="metric")
        self.dashboard: FeatureDashboard | None = None
        self.dashboard_box = W.VBox()

        self.node_threshold.observe(lambda _c: self.redraw(), names="value")
        self.edge_threshold.observe(lambda _c: self.redraw(), names="value")
        self.figure.data[6].on_click(self._on_node)
        self.ablate_button.on_click(lambda _b: self.ablate())
        self.steer_button.on_click(lambda _b: self.steer())
        self.faith_button.on_click(lambda _b: self.check_faithfulness())
        super().__init__([
            W.HBox([self.node_threshold, self.edge_threshold, self.faith_button]),
            self.figure, self.node_info,
            W.HBox([self.ablate_value, self.ablate_button, self.strength, self.steer_button]),
            self.status, self.bars, self.dashboard_box,
        ])
        self.redraw()

    # ------------------------------------------------------------------ drawing

    def shown(self) -> tuple[list[int], np.ndarray]:
        """(node indices, edge indices) shown at the current thresholds."""
        pos, edges = circuit_layout(self.graph, self.node_threshold.value, self.edge_threshold.value)
        return sorted(pos, key=lambda i: pos[i]), edges

    def redraw(self) -> None:
        g = self.graph
        pos, edges = circuit_layout(g, self.node_threshold.value, self.edge_threshold.value)
        segs = _edge_traces_data(g, pos, edges)
        nd, self._order = _node_trace_data(g, pos)
        with self.figure.batch_update():
            for t, (xs, ys) in zip(self.figure.data[:6], segs.values()):
                t.x, t.y = xs, ys
            n = self.figure.data[6]
            n.x, n.y, n.text, n.customdata = nd["x"], nd["y"], nd["text"], nd["customdata"]
            n.marker.color, n.marker.size, n.marker.symbol = nd["marker_color"], nd["marker_size"], nd["marker_symbol"]
            ring = self.figure.data[7]
            if self.selected in pos:
                ring.x, ring.y = [pos[self.selected][0]], [pos[self.selected][1]]
            else:
                ring.x, ring.y = [], []
            self.figure.layout.title.text = _circuit_title(g, pos, edges)

    def circuit(self) -> dict[str, list]:
        """The shown nodes as {site: [feature, ..., "err"]}."""
        out: dict[str, list] = {s: [] for s in self.graph.sites}
        for i in self.shown()[0]:
            f = int(self.graph["feature"][i])
            out[self.graph.sites[int(self.graph["site"][i])]].append("err" if f < 0 else f)
        return out

    # ------------------------------------------------------------------ selection

    def _on_node(self, trace, points, state) -> None:
        if points.point_inds:
            self.select(self._order[points.point_inds[0]])

    def select(self, node: int | str):
        """Select a node by index or name ("site/feature"); a feature node opens its dashboard."""
        g = self.graph
        if isinstance(node, str):
            names = g.coord("node")
            if node not in names:
                raise WorkbenchError(f"no node {node!r} in this graph; nodes look like {names[0]!r}")
            node = names.index(node)
        self.selected = int(node)
        site = g.sites[int(g["site"][node])]
        feature = int(g["feature"][node])
        is_feature = feature >= 0
        self.ablate_button.disabled = self.steer_button.disabled = not is_feature
        self.node_info.value = (f"<b>{html.escape(g.coord('node')[node])}</b>: effect {g['effect'][node]:+.4f}"
                                + ("" if is_feature else " (error node: the part of the site the SAE misses)"))
        self.redraw()
        if is_feature:
            if self.dashboard is None:
                self.dashboard = FeatureDashboard(self.subject, self.saes[site], feature, self.texts, site=site)
                self.dashboard_box.children = [self.dashboard]
            else:
                self.dashboard.show(feature, sae=self.saes[site], site=site)
        return self.dashboard

    def _selected_feature(self) -> tuple[str, int]:
        if self.selected is None or int(self.graph["feature"][self.selected]) < 0:
            raise WorkbenchError("select a feature node first (error nodes cannot be ablated or steered)")
        return self.graph.sites[int(self.graph["site"][self.selected])], int(self.graph["feature"][self.selected])

    # ------------------------------------------------------------------ actions

    @property
    def means(self):
        if self._means is None:
            from workbench.circuits import feature_means

            self._means = feature_means(self.subject, self.saes, self.texts)
        return self._means

    def _show_change(self, before: float, after: float, what: str) -> None:
        with self.bars.batch_update():
            self.bars.data[0].y = [before, after]
            self.bars.layout.title.text = what
        self.status.value = f"{what}: metric {before:.3f} &rarr; {after:.3f} ({after - before:+.3f})"

    def _guard(self, fn):
        try:
            return fn()
        except Exception as e:  # shown in the widget, then raised for the notebook
            self.status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            raise

    def ablate(self):
        """Ablate the selected feature on the clean prompts (SAEs spliced in, errors kept)."""
        from workbench.circuits import ablate_features

        def run():
            site, f = self._selected_feature()
            value = self.ablate_value.value
            r = ablate_features(self.subject, self.saes, {site: [f]}, self.clean, self.metric, value=value,
                                means=self.means if value == "mean" else None)
            self.last = r
            self._show_change(float(r["before"].mean()), float(r["after"].mean()),
                              f"{value}-ablating {html.escape(site)}/{f}")
            return r

        return self._guard(run)

    def steer(self):
        """Add ``strength`` x the selected feature's decoder direction on the clean prompts."""
        from workbench.circuits import steer

        def run():
            site, f = self._selected_feature()
            r = steer(self.subject, self.saes[site], f, self.strength.value, self.clean, self.metric, site=site,
                      positions=self.steer_positions)
            self.last = r
            self._show_change(float(r["before"].mean()), float(r["after"].mean()),
                              f"steering with {html.escape(site)}/{f} x {self.strength.value:g}")
            return r

        return self._guard(run)

    def check_faithfulness(self) -> float:
        """Faithfulness of the shown nodes: (m(C) - m(empty)) / (m(model) - m(empty))."""
        from workbench.circuits import ablated_metric
        from workbench.circuits.attribution import spliced_run
        from workbench.effects import as_inputs
        from workbench.metrics import mean_metric

        def run():
            if self._baseline is None:  # the model's and the all-ablated metric: the same at every threshold
                batch = self.subject.as_batch(as_inputs(self.clean))
                _, _, logits = spliced_run(self.subject, batch, self.saes)
                full = float(mean_metric(self.metric, logits, batch))
                self._baseline = batch, full, ablated_metric(self.subject, self.saes, batch, self.metric, {}, self.means)
            batch, full, empty = self._baseline
            circuit = self.circuit()
            kept = ablated_metric(self.subject, self.saes, batch, self.metric, circuit, self.means)
            frac = (kept - empty) / (full - empty) if full != empty else float("nan")
            n = sum(map(len, circuit.values()))
            with self.bars.batch_update():
                self.bars.data[0].y = [full, kept]
                self.bars.layout.title.text = f"faithfulness of {n} nodes: {frac:.3f}"
            self.status.value = (f"{n} nodes keep {frac:.1%} of the metric (model {full:.3f}, circuit {kept:.3f}, "
                                 f"everything mean-ablated {empty:.3f})")
            self.last = frac
            return frac

        return self._guard(run)
