"""CircuitExplorer and FeatureDashboard: a sparse feature circuit you can click through.

``CircuitExplorer`` is a view of a :class:`~workbench.circuits.CircuitGraph` (saved or
fresh), drawn by :func:`widgets.figures.circuit_figure`. Node and edge threshold sliders
prune it in place; the caption gives the shown circuit's size. Clicking a feature node
opens its :class:`FeatureDashboard` below. The selection and thresholds are traits
(``node``, ``node_threshold``, ``edge_threshold``).

With a Subject (and the SAEs, the clean prompts and the metric the graph was found
with), "ablate" and "steer" act on the selected feature (``ablate_features``, ``steer``)
and "faithfulness" runs the core :func:`~workbench.circuits.faithfulness` on the shown
nodes; their metric before/after lands in a bar chart. Without one they are off and say
why; a saved ``Faithfulness`` result can be shown instead (the row nearest the node
threshold).

``FeatureDashboard`` shows one feature from its ``FeatureSummary``: top-activating
contexts by quantile (tokens shaded by activation, the peak outlined, all token text
HTML-escaped), the activation histogram and the tokens its decoder direction promotes and
suppresses through the unembedding. Its selection is the traits ``site`` and
``feature``; summaries not given are computed when a Subject, the SAEs and texts are.
"""

from __future__ import annotations

import html
from typing import Mapping, Sequence

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import traitlets

from widgets.common import needs, reason_html, update_in_place
from widgets.figures.circuits import (
    NODE_TRACE, activation_histogram, circuit_figure, circuit_layout, contexts_html, logit_effect_bars, metric_bars,
    metric_text, node_html, summary_title,
)
from workbench.errors import WorkbenchError


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
        self.histogram = go.FigureWidget(activation_histogram())
        self.logits = go.FigureWidget(logit_effect_bars())
        super().__init__([self.title, W.HBox([W.VBox([self.contexts], layout=W.Layout(width="50%")),
                                              W.VBox([self.histogram, self.logits], layout=W.Layout(width="50%"))])])
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

    def _draw(self, _change=None) -> None:
        s = self.summary = self.summary_of(self.site, self.feature)
        if s is None:
            note = f"no saved summary of {self.site}/{self.feature}"
            self.title.value = f"<b>{html.escape(note)}</b> " + reason_html(self.offline)
            self.contexts.value = ""
            update_in_place(self.histogram, activation_histogram(None, note=html.escape(note)))
            update_in_place(self.logits, logit_effect_bars())
            return
        self.title.value = summary_title(s)
        self.contexts.value = contexts_html(s)
        update_in_place(self.histogram, activation_histogram(s))
        update_in_place(self.logits, logit_effect_bars(s))


# ---------------------------------------------------------------------- the explorer


class CircuitExplorer(W.VBox):
    """Explore ``graph`` (a CircuitGraph). ``summaries``: saved FeatureSummary results for
    the dashboards; ``faithfulness``: a saved Faithfulness result to show.

    For the live actions pass ``subject``, the ``saes`` ({site: SAE}), the ``clean``
    prompts and the ``metric`` the graph was found with; ``texts`` feed the feature
    dashboards, ``means`` (from :func:`~workbench.circuits.feature_means`) are what
    mean-ablation and faithfulness use (computed from ``texts`` when not given)."""

    node = traitlets.Unicode("", help='the selected node\'s name ("site/feature" or "site/err"; "" for none)')
    node_threshold = traitlets.Float(help="nodes with |effect| below this are hidden")
    edge_threshold = traitlets.Float(help="edges with |weight| below this are hidden")

    def __init__(self, graph, *, summaries: Sequence = (), faithfulness=None, subject=None,
                 saes: Mapping[str, object] | None = None, clean=None, metric=None, texts=None, means=None,
                 steer_positions: str = "last", node: str = "") -> None:
        self.graph, self.subject, self.metric, self.clean = graph, subject, metric, clean
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
        self.faith = faithfulness
        self.last = faithfulness  # the last Intervention or Faithfulness shown
        self.summaries = list(summaries)
        self.dashboard: FeatureDashboard | None = None

        top = float(np.abs(graph["effect"]).max()) or 1.0
        w = np.abs(graph["edge_weight"])
        etop = float(w.max()) if len(w) else 1.0
        nt = max(graph.attrs["node_threshold"], top * 1e-4)
        et = max(graph.attrs["edge_threshold"], etop * 1e-4)
        self.node_slider = W.FloatLogSlider(base=10, min=np.log10(top) - 4, max=np.log10(top), step=0.05,
                                            description="node |effect|", readout_format=".3g", continuous_update=False)
        self.edge_slider = W.FloatLogSlider(base=10, min=np.log10(etop) - 4, max=np.log10(etop), step=0.05,
                                            description="edge |weight|", readout_format=".3g", continuous_update=False)
        self.figure = go.FigureWidget(circuit_figure(graph, nt, et))
        self.node_info = W.HTML("<i>click a feature node</i>")
        self.ablate_value = W.Dropdown(options=["mean", "zero"], value="mean", description="ablate to")
        self.ablate_button = W.Button(description="ablate", tooltip="ablate the selected feature")
        self.strength = W.FloatSlider(value=4.0, min=-20.0, max=20.0, step=0.5, description="strength",
                                      continuous_update=False)
        self.steer_button = W.Button(description="steer", tooltip="add strength x the feature's direction")
        self.faith_button = W.Button(description="faithfulness",
                                     tooltip="mean-ablate everything outside the shown nodes")
        self.reason = W.HTML(reason_html(self.offline))
        self.status = W.HTML()
        self.bars = go.FigureWidget(metric_bars())
        self.dashboard_box = W.VBox()
        super().__init__([
            W.HBox([self.node_slider, self.edge_slider, self.faith_button]),
            self.figure, self.node_info,
            W.HBox([self.ablate_value, self.ablate_button, self.strength, self.steer_button]),
            self.reason, self.status, self.bars, self.dashboard_box,
        ], node_threshold=nt, edge_threshold=et)
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

    def redraw(self) -> None:
        figure = circuit_figure(self.graph, self.node_threshold, self.edge_threshold, self.selected)
        update_in_place(self.figure, figure)

    def _on_threshold(self) -> None:
        self.redraw()
        if self.faith is not None and self.offline is not None:  # a saved curve: its row nearest the threshold
            self._show_metric(self.faith)

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
        self.redraw()
        if i is None:
            self.node_info.value = "<i>click a feature node</i>"
            return
        self.node_info.value = node_html(self.graph, i)
        site, feature = self._site_feature(i)
        if feature < 0:
            return
        if self.dashboard is None:
            self.dashboard = FeatureDashboard(self.summaries, subject=self.subject, saes=self.saes, texts=self.texts,
                                              site=site, feature=feature)
            self.dashboard_box.children = [self.dashboard]
        else:
            self.dashboard.show(feature, site=site)

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
        self.last = result

    def _run(self, fn):
        if self.offline is not None:
            self.status.value = reason_html(self.offline)
            return None
        try:
            result = fn()
        except Exception as e:  # shown in the widget, then raised for the notebook
            self.status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            raise
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

        return self._run(run)

    def steer(self):
        """Add ``strength`` x the selected feature's decoder direction on the clean prompts;
        returns the ``Intervention``."""
        from workbench.circuits import steer

        def run():
            site, f = self._selected_feature()
            return steer(self.subject, self.saes[site], f, self.strength.value, self.clean, self.metric, site=site,
                         positions=self.steer_positions)

        return self._run(run)

    def check_faithfulness(self):
        """Faithfulness of the shown nodes (:func:`workbench.circuits.faithfulness` at the
        node threshold: everything outside them mean-ablated); returns the ``Faithfulness``."""
        from workbench.circuits import faithfulness

        def run():
            self.faith = faithfulness(self.subject, self.saes, self.clean, self.metric, self.graph,
                                      thresholds=[self.node_threshold], means=self.means)
            return self.faith

        return self._run(run)
