"""CircuitExplorer and FeatureDashboard: a sparse feature circuit you can click through.

``CircuitExplorer`` is a view of a :class:`~workbench.circuits.CircuitGraph` (saved or
fresh), drawn by :func:`widgets.figures.circuits.circuit_figure`: nodes coloured by the
sign of their effect and sized by its strength, labelled by the tokens a feature promotes
(when its summary is known), edges coloured by sign with their weight on hover, rows
spaced so nodes never overlap. Node and edge threshold sliders prune it in place; the
title gives the shown circuit's size. Lowering the node threshold below the one the graph
was built at shows nodes whose edges were never computed: with a model (``subject``,
``saes``, ``clean``, ``corrupted``, ``metric``) the explorer computes them
(:func:`~workbench.circuits.find_circuit` on the graph's own effects), without one it
says so under the graph. Clicking a feature node opens its :class:`FeatureDashboard`
below (an error node says it has none). The selection and thresholds are traits
(``node``, ``node_threshold``, ``edge_threshold``).

With a Subject, "ablate" and "steer" act on the selected feature (``ablate_features``,
``steer``; steering also lists what the model now says next) and "faithfulness" runs
the core :func:`~workbench.circuits.faithfulness` on the shown nodes; their metric
before/after lands in a bar chart, cleared when the selection it describes changes.
Without one they are off and say why; a saved ``Faithfulness`` result can be shown
instead (the row nearest the node threshold).

``FeatureDashboard`` shows one feature from its ``FeatureSummary``: top-activating
contexts by quantile (tokens shaded by activation with a colour key, the value on hover,
the peak outlined, all token text HTML-escaped), the activation histogram (log counts),
the top and bottom logits as lists and as bars. Its selection is the traits ``site`` and
``feature``; "show" jumps to any feature id; summaries not given are computed when a
Subject, the SAEs and texts are. Both widgets carry an "export" button (one standalone
HTML file of the current view).
"""

from __future__ import annotations

import html
import time
from typing import Mapping, Sequence

import ipywidgets as W
import numpy as np
import traitlets

from widgets.common import (
    controls_row, full_label, needs, reason_html, responsive_figure, run_busy, update_in_place, working, wrap_box,
)
from widgets.export import export_controls
from widgets.export import export_html as write_html
from widgets.figures.circuits import (
    NODE_TRACE, activation_histogram, circuit_figure, circuit_layout, contexts_html, logit_effect_bars,
    logit_lists_html, metric_bars, metric_text, next_tokens_html, node_html, node_labels, summary_title,
)
from workbench.errors import WorkbenchError

STEER_TOP_K = 8  # next tokens listed before and after steering
STEER_NEW_TOKENS = 6  # greedy continuation shown before and after steering


def _missing(**given) -> list[str]:
    return [f"{k}=" for k, v in given.items() if v is None]


# ---------------------------------------------------------------------- the dashboard


class FeatureDashboard(W.VBox):
    """One feature's ``FeatureSummary``: contexts, histogram, logit effect.

    ``summaries``: one or more FeatureSummary results (saved or fresh). With ``subject``,
    ``saes`` ({site: SAE}) and ``texts``, a feature without a summary gets one computed
    (``summary_kw`` go to :func:`~workbench.circuits.feature_summary`); without them it
    shows why it cannot."""

    site = traitlets.Unicode(help="the site of the feature shown")
    feature = traitlets.Int(-1, help="the feature shown")

    def __init__(self, summaries=(), *, subject=None, saes: Mapping[str, object] | None = None, texts=None,
                 site: str | None = None, feature: int | None = None, **summary_kw) -> None:
        if hasattr(summaries, "attrs"):
            summaries = [summaries]
        self.summaries = {(s.attrs["site"], int(s.attrs["feature"])): s for s in summaries}
        self.subject, self.saes, self.summary_kw = subject, dict(saes or {}), summary_kw
        self.texts = None if texts is None else list(texts)
        missing = _missing(subject=subject, saes=saes, texts=texts)
        self.offline = None if not missing else (
            f"computing a feature's summary needs a model: pass {', '.join(missing)} (or show a saved summary)")
        if site is None or feature is None:
            if not self.summaries:
                raise WorkbenchError("no summary to show: pass a FeatureSummary, or site= and feature= with a model")
            site, feature = next(iter(self.summaries))
        self.summary = None
        self.title = W.HTML()
        self.contexts = W.HTML()
        self.logit_lists = W.HTML()
        # the first feature's figures are built with its data: the front end gets them whole
        # in the message that creates them (no update has to land while it starts the model)
        first = self.summary_of(site, feature)
        note = html.escape(f"no saved summary of {site}/{feature}")
        self.histogram = responsive_figure(activation_histogram(first, note=note))
        self.logits = responsive_figure(logit_effect_bars(first))
        sites = sorted({*self.saes, *(k[0] for k in self.summaries), site})
        self.site_select = full_label(W.Dropdown(options=sites, value=site, description="site",
                                                 layout=W.Layout(width="auto")))
        self.feature_box = full_label(W.BoundedIntText(value=int(feature), min=0, max=10**9, description="feature id",
                                                       layout=W.Layout(width="180px")))
        self.show_button = W.Button(description="show", icon="search", tooltip="jump to this feature's dashboard")
        self.jump_status = W.HTML()
        self.show_button.on_click(lambda _b: self._jump())
        self.export_box = export_controls(self, "feature_dashboard.html")
        super().__init__([
            self.title,
            controls_row([self.site_select, self.feature_box, self.show_button, self.jump_status]),
            wrap_box([W.VBox([W.HTML("<b>Top-activating contexts</b>"), self.contexts]), self.histogram]),
            wrap_box([W.VBox([self.logit_lists]), self.logits]),
            self.export_box,
        ], layout=W.Layout(width="100%"))
        self.add_class("wb-feature-dashboard")
        self.observe(self._draw, names=["site", "feature"])
        self.show(feature, site=site)

    @classmethod
    def from_subject(cls, subject, sae, feature: int, texts, *, site: str | None = None,
                     **summary_kw) -> "FeatureDashboard":
        """Summarise ``feature`` of ``sae`` over ``texts`` and show it; other features of
        ``sae`` are summarised when shown."""
        from workbench.circuits import feature_summary

        summary = feature_summary(subject, sae, feature, texts, site=site, **summary_kw)
        return cls([summary], subject=subject, saes={summary.attrs["site"]: sae}, texts=texts, **summary_kw)

    def summary_of(self, site: str, feature: int):
        """The summary of ``site/feature``: given, cached or computed (None when it cannot be)."""
        key = (site, int(feature))
        if key not in self.summaries and self.offline is None:
            from workbench.circuits import feature_summary

            if site not in self.saes:
                raise WorkbenchError(f"no SAE for site {site!r}; sites with SAEs: {list(self.saes)}")
            self.summaries[key] = feature_summary(self.subject, self.saes[site], int(feature), self.texts, site=site,
                                                  **self.summary_kw)
        return self.summaries.get(key)

    def show(self, feature: int, *, site: str | None = None):
        """Switch to ``feature`` (at ``site``, default: the current one); returns its summary
        (None when there is none and no model to compute it)."""
        site = self.site if site is None else site
        self.summary_of(site, feature)  # raises on a bad feature before the traits move
        with self.hold_trait_notifications():
            self.site, self.feature = site, int(feature)
        if self.summary is None or (self.summary.attrs["site"], int(self.summary.attrs["feature"])) != (site, feature):
            self._draw()
        return self.summary

    def _jump(self) -> None:
        """The "show" button: the feature id and site typed above (said on screen when it
        cannot be shown)."""
        site, feature = self.site_select.value, int(self.feature_box.value)
        self.jump_status.value = working(f"summarising {site}/{feature}")
        start = time.perf_counter()
        try:
            self.show(feature, site=site)
        except WorkbenchError as err:
            self.jump_status.value = reason_html(str(err))
            return
        took = time.perf_counter() - start
        self.jump_status.value = f"<small>{html.escape(site)}/{feature} shown" + (
            f" in {took:.1f} s</small>" if took > 0.5 else "</small>")

    def _draw(self, _change=None) -> None:
        self.site_select.value = self.site if self.site in self.site_select.options else self.site_select.value
        self.feature_box.value = max(self.feature, 0)
        s = self.summary = self.summary_of(self.site, self.feature)
        if s is None:
            note = f"no saved summary of {self.site}/{self.feature}"
            self.title.value = f"<b>{html.escape(note)}</b> " + reason_html(self.offline)
            self.contexts.value = ""
            self.logit_lists.value = ""
            update_in_place(self.histogram, activation_histogram(None, note=html.escape(note)))
            update_in_place(self.logits, logit_effect_bars())
            return
        self.title.value = summary_title(s)
        self.contexts.value = contexts_html(s)
        self.logit_lists.value = logit_lists_html(s)
        update_in_place(self.histogram, activation_histogram(s))
        update_in_place(self.logits, logit_effect_bars(s))

    def export_html(self, path):
        """Write the current dashboard (contexts inline, figures with plotly.js inlined) to
        one standalone HTML file."""
        return write_html(self, path, title=f"FeatureDashboard {self.site}/{self.feature}")


# ---------------------------------------------------------------------- the explorer


class CircuitExplorer(W.VBox):
    """Explore ``graph`` (a CircuitGraph). ``summaries``: saved FeatureSummary results for
    the dashboards (and the node labels); ``faithfulness``: a saved Faithfulness result to
    show.

    For the live actions pass ``subject``, the ``saes`` ({site: SAE}), the ``clean`` (and
    ``corrupted``) prompts and the ``metric`` the graph was found with; ``texts`` feed the
    feature dashboards, ``means`` (from :func:`~workbench.circuits.feature_means`) are what
    mean-ablation and faithfulness use (computed from ``texts`` when not given). With
    ``corrupted`` too, edges of nodes below the graph's build threshold are computed when
    the threshold slider shows them."""

    node = traitlets.Unicode("", help='the selected node\'s name ("site/feature" or "site/err"; "" for none)')
    node_threshold = traitlets.Float(help="nodes with |effect| below this are hidden")
    edge_threshold = traitlets.Float(help="edges with |weight| below this are hidden")

    def __init__(self, graph, *, summaries: Sequence = (), faithfulness=None, subject=None,
                 saes: Mapping[str, object] | None = None, clean=None, corrupted=None, metric=None, texts=None,
                 means=None, steer_positions: str = "last", node: str = "") -> None:
        self.graph, self.subject, self.metric, self.clean, self.corrupted = graph, subject, metric, clean, corrupted
        self.saes = saes
        if subject is not None and saes is not None:
            from workbench.circuits.attribution import ordered_saes

            self.saes = ordered_saes(subject, saes)
            if list(self.saes) != graph.sites:
                raise WorkbenchError(f"the graph's sites {graph.sites} differ from the SAEs' {list(self.saes)}")
        self.texts = None if texts is None else list(texts)
        self._means, self.steer_positions = means, steer_positions
        missing = _missing(subject=subject, saes=saes, clean=clean, metric=metric)
        self.offline = None if not missing else (
            f"ablate, steer and faithfulness need a model: pass {', '.join(missing)}")
        missing_edges = missing + _missing(corrupted=corrupted)
        self.edges_offline = None if not missing_edges else (
            f"pass {', '.join(missing_edges)} to compute them")
        self.faith = faithfulness
        self.last = faithfulness  # the last Intervention or Faithfulness shown
        self.summaries = list(summaries)
        self.dashboard: FeatureDashboard | None = None

        top = float(np.abs(graph["effect"]).max()) or 1.0
        w = np.abs(graph["edge_weight"])
        etop = float(w.max()) if len(w) else 1.0
        nt = max(graph.attrs["node_threshold"], top * 1e-4)
        et = max(graph.attrs["edge_threshold"], etop * 1e-4)
        self.node_slider = full_label(W.FloatLogSlider(
            base=10, min=np.log10(top) - 4, max=np.log10(top), step=0.05, description="node |effect| >=",
            readout_format=".3g", continuous_update=False, layout=W.Layout(width="min(100%, 420px)")))
        self.edge_slider = full_label(W.FloatLogSlider(
            base=10, min=np.log10(etop) - 4, max=np.log10(etop), step=0.05, description="edge |weight| >=",
            readout_format=".3g", continuous_update=False, layout=W.Layout(width="min(100%, 420px)")))
        names = graph.coord("node")
        if node and node not in names:
            raise WorkbenchError(f"no node {node!r} in this graph; nodes look like {names[0]!r}")
        self.figure = responsive_figure(circuit_figure(graph, nt, et, names.index(node) if node else None,
                                                       labels=self._labels(node)))
        self.edge_note = W.HTML()
        self.node_info = W.HTML("<i>click a feature node</i>")
        self.ablate_value = full_label(W.Dropdown(options=["mean", "zero"], value="mean", description="ablate to",
                                                  layout=W.Layout(width="auto")))
        self.ablate_button = W.Button(description="ablate", tooltip="ablate the selected feature")
        self.strength = full_label(W.FloatSlider(value=4.0, min=-20.0, max=20.0, step=0.5, description="strength",
                                                 continuous_update=False))
        self.steer_button = W.Button(description="steer", tooltip="add strength x the feature's direction")
        self.faith_button = W.Button(description="faithfulness",
                                     tooltip="mean-ablate everything outside the shown nodes")
        self.reason = W.HTML(reason_html(self.offline))
        self.status = W.HTML()
        self.next_tokens = W.HTML()
        self.bars = responsive_figure(metric_bars())
        self.dashboard_box = W.VBox(layout=W.Layout(width="100%"))
        self.export_box = export_controls(self, "circuit_explorer.html")
        super().__init__([
            controls_row([self.node_slider, self.edge_slider, self.faith_button]),
            wrap_box([self.figure], min_width=600), self.edge_note, self.node_info,
            controls_row([self.ablate_value, self.ablate_button, self.strength, self.steer_button]),
            self.reason, self.status,
            wrap_box([self.bars, W.VBox([self.next_tokens])], min_width=360),
            self.dashboard_box, self.export_box,
        ], node_threshold=nt, edge_threshold=et, layout=W.Layout(width="100%"))
        self.add_class("wb-circuit-explorer")
        W.link((self, "node_threshold"), (self.node_slider, "value"))
        W.link((self, "edge_threshold"), (self.edge_slider, "value"))
        self.figure.data[NODE_TRACE].on_click(self._on_node)
        self.observe(lambda _c: self._on_threshold(), names=["node_threshold", "edge_threshold"])
        self.observe(self._on_select, names="node")
        self.ablate_button.on_click(lambda _b: self.ablate())
        self.steer_button.on_click(lambda _b: self.steer())
        self.faith_button.on_click(lambda _b: self.check_faithfulness())
        needs(self.faith_button, self.offline)
        self._arm()
        self._on_threshold()
        if faithfulness is not None:
            self._show_metric(faithfulness)
        if node:
            self.node = node

    # ------------------------------------------------------------------ traits

    @traitlets.validate("node")
    def _valid_node(self, proposal):
        name = proposal["value"]
        names = self.graph.coord("node")
        if name and name not in names:
            raise WorkbenchError(f"no node {name!r} in this graph; nodes look like {names[0]!r}")
        return name

    @property
    def selected(self) -> int | None:
        """The selected node's index (None when none is)."""
        return self.graph.coord("node").index(self.node) if self.node else None

    # ------------------------------------------------------------------ drawing

    def shown(self) -> tuple[list[int], np.ndarray]:
        """(node indices, edge indices) shown at the current thresholds."""
        pos, edges = circuit_layout(self.graph, self.node_threshold, self.edge_threshold)
        return sorted(pos, key=lambda i: pos[i]), edges

    def circuit(self) -> dict[str, list]:
        """The shown nodes as {site: [feature, ..., "err"]} (``CircuitGraph.circuit``)."""
        return self.graph.circuit(self.node_threshold)

    def _labels(self, node: str = "") -> dict[int, str]:
        known = list(self.summaries)
        if self.dashboard is not None:
            known += [s for s in self.dashboard.summaries.values() if s is not None]
        elif node and not node.endswith("/err") and self.texts is not None and self.offline is None:
            # the opening node's summary, computed now so the first figure already carries its label
            from workbench.circuits import feature_summary

            site, feature = node.rsplit("/", 1)
            if not any((s.attrs["site"], int(s.attrs["feature"])) == (site, int(feature)) for s in known):
                self.summaries.append(feature_summary(self.subject, self.saes[site], int(feature), self.texts,
                                                      site=site))
                known = list(self.summaries)
        return node_labels(self.graph, known)

    def redraw(self) -> None:
        figure = circuit_figure(self.graph, self.node_threshold, self.edge_threshold, self.selected,
                                labels=self._labels())
        update_in_place(self.figure, figure)

    def edges_complete(self) -> bool:
        """Whether every edge at the current thresholds was computed (the graph was built at
        a node and edge threshold at or below them)."""
        a = self.graph.attrs
        return self.node_threshold >= a["node_threshold"] and self.edge_threshold >= a["edge_threshold"]

    def compute_edges(self):
        """Edges between every node shown (:func:`workbench.circuits.find_circuit` on the
        graph's own node effects, at the current thresholds); the graph shown becomes the
        new one (its nodes and effects are the same). Returns it."""
        from workbench.circuits import find_circuit

        if self.edges_offline is not None:
            raise WorkbenchError(f"computing edges needs a model: {self.edges_offline}")
        a = self.graph.attrs
        nt, et = min(self.node_threshold, a["node_threshold"]), min(self.edge_threshold, a["edge_threshold"])
        n = int((np.abs(self.graph["effect"]) >= nt).sum())
        self.edge_note.value = working(f"computing the edges between {n} nodes")
        start = time.perf_counter()
        self.graph = find_circuit(self.subject, self.saes, self.clean, self.corrupted, self.metric, node_threshold=nt,
                                  edge_threshold=et, effects=self.graph)
        self.edge_note.value = (f"<small>edges computed for the {n} nodes with |effect| >= {nt:.3g} "
                                f"in {time.perf_counter() - start:.1f} s</small>")
        return self.graph

    def _on_threshold(self) -> None:
        if not self.edges_complete():
            if self.edges_offline is None:
                self.compute_edges()
            else:
                self.edge_note.value = reason_html(
                    f"edges were computed only between nodes with |effect| >= {self.graph.attrs['node_threshold']:.3g} "
                    f"and |weight| >= {self.graph.attrs['edge_threshold']:.3g} (when the graph was built); "
                    f"the nodes below show without theirs: {self.edges_offline}")
        elif self.edge_note.value.startswith("<span"):
            self.edge_note.value = ""
        self.redraw()
        if self.faith is not None and self.offline is not None:  # a saved curve: its row nearest the threshold
            self._show_metric(self.faith)
        elif self.last is not None and self.last.kind == "faithfulness":  # a live result of other nodes: stale
            self._clear_metric()

    # ------------------------------------------------------------------ selection

    def _on_node(self, trace, points, state) -> None:
        if points.point_inds:
            self.select(int(trace.customdata[points.point_inds[0]][0]))

    def select(self, node: int | str):
        """Select a node by index or name ("site/feature"); a feature node opens its dashboard."""
        self.node = node if isinstance(node, str) else self.graph.coord("node")[int(node)]
        return self.dashboard

    def _site_feature(self, i: int) -> tuple[str, int]:
        return self.graph.sites[int(self.graph["site"][i])], int(self.graph["feature"][i])

    def _arm(self) -> None:
        i = self.selected
        why = (self.offline if self.offline is not None else "select a feature node first" if i is None else
               "error nodes cannot be ablated or steered; select a feature node" if self._site_feature(i)[1] < 0 else
               None)
        needs(self.ablate_button, why)
        needs(self.steer_button, why)

    def _on_select(self, _change=None) -> None:
        i = self.selected
        self._arm()
        if self.last is not None and self.last.kind != "faithfulness":  # an ablation or steering of another node
            self._clear_metric()
        if i is None:
            self.node_info.value = "<i>click a feature node</i>"
            self.dashboard_box.children = ()
            self.redraw()
            return
        self.node_info.value = node_html(self.graph, i)
        site, feature = self._site_feature(i)
        if feature < 0:  # an error node has no dashboard: take the previous feature's away
            self.node_info.value += " It has no feature dashboard."
            self.dashboard_box.children = ()
            self.redraw()
            return
        known = self.dashboard.summaries if self.dashboard is not None else {
            (s.attrs["site"], int(s.attrs["feature"])): s for s in self.summaries}
        if (site, feature) not in known and self.texts is not None and self.offline is None:
            self.node_info.value += " " + working("summarising the feature")
        if self.dashboard is None:
            self.dashboard = FeatureDashboard(self.summaries, subject=self.subject, saes=self.saes, texts=self.texts,
                                              site=site, feature=feature)
        else:
            self.dashboard.show(feature, site=site)
        self.node_info.value = node_html(self.graph, i)
        self.dashboard_box.children = (self.dashboard,)
        self.redraw()  # the ring, and the node's label once its summary is known

    def _selected_feature(self) -> tuple[str, int]:
        if self.selected is None or self._site_feature(self.selected)[1] < 0:
            raise WorkbenchError("select a feature node first (error nodes cannot be ablated or steered)")
        return self._site_feature(self.selected)

    # ------------------------------------------------------------------ actions (need the model)

    @property
    def means(self):
        if self._means is None and self.texts is not None and self.offline is None:
            from workbench.circuits import feature_means

            self._means = feature_means(self.subject, self.saes, self.texts)
        return self._means

    def _show_metric(self, result) -> None:
        threshold = self.node_threshold if result.kind == "faithfulness" else None
        update_in_place(self.bars, metric_bars(result, threshold))
        self.status.value = metric_text(result, threshold)
        self.next_tokens.value = next_tokens_html(result) if result.kind != "faithfulness" else ""
        self.last = result

    def _clear_metric(self) -> None:
        update_in_place(self.bars, metric_bars())
        self.status.value = ""
        self.next_tokens.value = ""
        self.last = None

    def _run(self, what: str, fn):
        if self.offline is not None:
            self.status.value = reason_html(self.offline)
            return None
        result = run_busy(self.status, None, what, fn)  # an error is shown in the widget, then raised
        self._show_metric(result)
        return result

    def ablate(self):
        """Ablate the selected feature on the clean prompts (SAEs spliced in, errors kept);
        returns the ``Intervention``."""
        from workbench.circuits import ablate_features

        def run():
            site, f = self._selected_feature()
            value = self.ablate_value.value
            return ablate_features(self.subject, self.saes, {site: [f]}, self.clean, self.metric, replacement=value,
                                   means=self.means if value == "mean" else None)

        return self._run("ablating", run)

    def steer(self):
        """Add ``strength`` x the selected feature's decoder direction on the clean prompts;
        returns the ``Intervention`` (with the next tokens before and after)."""
        from workbench.circuits import steer

        def run():
            site, f = self._selected_feature()
            return steer(self.subject, self.saes[site], f, self.strength.value, self.clean, self.metric, site=site,
                         positions=self.steer_positions, top_k=STEER_TOP_K, max_new_tokens=STEER_NEW_TOKENS)

        return self._run("steering", run)

    def check_faithfulness(self):
        """Faithfulness of the shown nodes (:func:`workbench.circuits.faithfulness` at the
        node threshold: everything outside them mean-ablated); returns the ``Faithfulness``."""
        from workbench.circuits import faithfulness

        def run():
            self.faith = faithfulness(self.subject, self.saes, self.clean, self.metric, self.graph,
                                      thresholds=[self.node_threshold], means=self.means)
            return self.faith

        return self._run("measuring faithfulness", run)

    def export_html(self, path):
        """Write the current view (the graph, the metric bars, the dashboard; plotly.js
        inlined, the selection as text) to one standalone HTML file."""
        return write_html(self, path, title="CircuitExplorer")
