"""CircuitExplorer and FeatureDashboard headless: the layered graph follows the threshold
traits in place, clicking a node sets the `node` trait and opens its dashboard, ablate /
steer / faithfulness show the same numbers as the library calls, built from saved results
they draw what the live ones draw (with the model's actions off, saying why), and token
text is escaped."""

from __future__ import annotations

import html

import copy

import ipywidgets as W
import numpy as np
import pytest
import torch

from tests.widgets.compare import assert_same_figure
from widgets import CircuitExplorer, FeatureDashboard, circuit_figure, contexts_html
from widgets.figures.circuits import EDGE_HOVER, NODE_TRACE, circuit_geometry, circuit_rows, circuit_layout
from workbench import WorkbenchError
from workbench.circuits import (
    SAE, ablate_features, ablated_metric, collect, faithfulness, feature_means, find_circuit, steer, train_sae,
)
from workbench.results import Result
from workbench.data import agreement_pairs, agreement_sentences
from workbench.metrics import logit_diff

EVIL = "<img src=x onerror=alert(1)>"
SITES = ("resid_post.0", "attn_out.1")


class _Points:
    def __init__(self, inds):
        self.point_inds = inds


@pytest.fixture(scope="module")
def setup(tasklm):
    torch.manual_seed(0)
    texts = agreement_sentences(600, seed=0, split="train")
    saes = {}
    for site in SITES:
        acts = collect(tasklm, site, texts)
        sae = SAE(acts.shape[-1], 64, kind="topk", k=4, site=site, model="tasklm")
        train_sae(sae, acts, steps=150, batch_size=256, lr=3e-3, progress=False)
        saes[site] = sae
    pairs = agreement_pairs(16, seed=3, split="test", tokenizer=tasklm.tokenizer)
    good, bad = list(pairs["clean_answer_id"]), list(pairs["corrupted_answer_id"])
    metric = lambda logits, batch: logit_diff(logits, batch, good, bad)  # noqa: E731
    clean, corrupted = list(pairs["clean"]), list(pairs["corrupted"])
    graph = find_circuit(tasklm, saes, clean, corrupted, metric, node_threshold=0.02, edge_threshold=0.001)
    eval_texts = agreement_sentences(80, seed=1, split="test")
    means = feature_means(tasklm, saes, eval_texts)
    return saes, graph, clean, metric, eval_texts, means


@pytest.fixture
def explorer(tasklm, setup):
    saes, graph, clean, metric, texts, means = setup
    return CircuitExplorer(graph, subject=tasklm, saes=saes, clean=clean, metric=metric, texts=texts, means=means)


def _shown_nodes(fig) -> list[int]:
    return [int(c[0]) for c in fig.data[NODE_TRACE].customdata]


def test_figure_draws_the_subgraph_layered_by_site(setup):
    _, graph, *_ = setup
    nodes, edges = graph.subgraph()
    assert len(nodes) >= 5 and len(edges) >= 3
    fig = circuit_figure(graph)
    shown = _shown_nodes(fig)
    assert sorted(shown) == sorted(int(i) for i in nodes)
    # each node sits in its site's column; within a column, rows rank by effect
    xs, ys = np.asarray(fig.data[NODE_TRACE].x), np.asarray(fig.data[NODE_TRACE].y)
    assert np.array_equal(xs, graph["site"][shown])
    for c in set(xs.tolist()):
        col = [i for i, x in zip(shown, xs) if x == c]
        rows = [y for y, x in zip(ys, xs) if x == c]
        assert [col[k] for k in np.argsort(rows)] == sorted(col, key=lambda i: graph["effect"][i])
    assert np.allclose(fig.data[NODE_TRACE].marker.color, graph["effect"][shown])
    # every kept edge is one segment (3 entries: start, end, gap) in one of the six edge traces
    assert sum(len(t.x) for t in fig.data[:6]) == 3 * len(edges)
    assert fig.layout.title.text == f"circuit: {len(nodes)} nodes ({sum(graph['feature'][nodes] < 0)} error), {len(edges)} edges"


def test_threshold_sliders_prune_in_place(explorer, setup):
    _, graph, *_ = setup
    nodes_trace = explorer.figure.data[NODE_TRACE]
    eff = np.abs(graph["effect"])
    t = float(np.sort(eff)[-4])  # keeps exactly the top 4 (no ties in float effects)
    explorer.node_slider.value = t
    assert explorer.node_threshold == explorer.node_slider.value
    assert explorer.figure.data[NODE_TRACE] is nodes_trace
    kept = sorted(int(i) for i in np.nonzero(eff >= explorer.node_threshold)[0])
    assert sorted(_shown_nodes(explorer.figure)) == kept and 1 <= len(kept) <= 5
    assert explorer.figure.layout.title.text.startswith(f"circuit: {len(kept)} nodes")
    n_edges = len(explorer.shown()[1])
    explorer.edge_threshold = float(np.sort(np.abs(graph["edge_weight"]))[-2])  # the trait moves the slider
    assert explorer.edge_slider.value == explorer.edge_threshold
    w = np.abs(graph["edge_weight"])
    expected = [e for e in range(len(w)) if w[e] >= explorer.edge_threshold
                and graph["edge_src"][e] in kept and graph["edge_dst"][e] in kept]
    assert list(explorer.shown()[1]) == expected and len(expected) <= min(2, n_edges)
    assert sum(len(t.x) for t in explorer.figure.data[:6]) == 3 * len(explorer.shown()[1])
    circuit = explorer.circuit()
    assert circuit == graph.circuit(explorer.node_threshold)
    assert sum(len(v) for v in circuit.values()) == len(kept)


def test_clicking_a_feature_opens_its_dashboard(explorer, setup):
    _, graph, *_ = setup
    order = _shown_nodes(explorer.figure)
    k = next(k for k, i in enumerate(order) if graph["feature"][i] >= 0)
    node = order[k]
    explorer._on_node(explorer.figure.data[NODE_TRACE], _Points([k]), None)
    assert explorer.selected == node and explorer.node == graph.coord("node")[node]
    site, f = graph.sites[int(graph["site"][node])], int(graph["feature"][node])
    dash = explorer.dashboard
    assert dash.feature == f and dash.site == site and dash.summary.attrs["site"] == site
    assert np.array_equal(np.asarray(dash.histogram.data[0].y), dash.summary["count"])
    assert list(explorer.figure.data[NODE_TRACE + 1].x) == [int(graph["site"][node])]  # the selection ring follows
    assert not explorer.ablate_button.disabled and not explorer.steer_button.disabled
    # a second click reuses the same dashboard and redraws it in place
    k2 = next(j for j, i in enumerate(order) if graph["feature"][i] >= 0 and i != node)
    hist = dash.histogram.data[0]
    explorer._on_node(explorer.figure.data[NODE_TRACE], _Points([k2]), None)
    assert explorer.dashboard is dash and dash.histogram.data[0] is hist
    assert dash.feature == int(graph["feature"][order[k2]])
    assert np.array_equal(np.asarray(hist.y), dash.summary["count"])


def test_node_trait_links_both_ways(explorer, setup):
    _, graph, *_ = setup
    names = [graph.coord("node")[i] for i in _shown_nodes(explorer.figure) if graph["feature"][i] >= 0][:2]
    mirror = W.Text()
    link = W.link((explorer, "node"), (mirror, "value"))
    try:
        explorer.select(names[0])
        assert mirror.value == names[0]
        mirror.value = names[1]  # another widget picks a node: the explorer follows
        assert explorer.node == names[1] and explorer.dashboard.feature == int(names[1].split("/")[1])
        ring = explorer.figure.data[NODE_TRACE + 1]
        i = graph.coord("node").index(names[1])
        assert list(ring.x) == [int(graph["site"][i])]
        mirror.value = ""
        assert explorer.selected is None and list(explorer.figure.data[NODE_TRACE + 1].x) == []
        assert explorer.ablate_button.disabled and "select a feature node" in explorer.ablate_button.tooltip
    finally:
        link.unlink()


def test_ablate_and_steer_match_the_library(explorer, tasklm, setup):
    saes, graph, clean, metric, texts, means = setup
    top = next(n for n, _ in graph_top(graph) if not n.endswith("/err"))
    explorer.select(top)
    site, f = top.split("/")
    r = explorer.ablate()
    ref = ablate_features(tasklm, saes, {site: [int(f)]}, clean, metric, replacement="mean", means=means)
    assert np.allclose(explorer.bars.data[0].y, [ref["before"].mean(), ref["after"].mean()])
    assert r.change == pytest.approx(ref.change) and abs(ref.change) > 1e-3
    explorer.strength.value = 6.0
    explorer.steer()
    ref = steer(tasklm, saes[site], int(f), 6.0, clean, metric, site=site, positions="last")
    assert np.allclose(explorer.bars.data[0].y, [ref["before"].mean(), ref["after"].mean()])
    assert "steering with" in explorer.status.value
    # what the model now says: the first prompt's greedy continuation, as the library gives it
    said = steer(tasklm, saes[site], int(f), 6.0, clean, metric, site=site, positions="last", max_new_tokens=6).attrs
    shown = explorer.next_tokens.value
    assert html.escape(said["text_before"][0]) in shown and html.escape(said["text_after"][0]) in shown


def graph_top(graph):
    order = np.argsort(-np.abs(graph["effect"]))
    return [(graph.coord("node")[i], graph["effect"][i]) for i in order]


def test_faithfulness_matches_the_ablated_metric(explorer, tasklm, setup):
    saes, graph, clean, metric, texts, means = setup
    explorer.node_threshold = float(np.sort(np.abs(graph["effect"]))[-3])
    circuit = explorer.circuit()
    assert sum(map(len, circuit.values())) == 3
    batch = tasklm.as_batch(clean)
    full = float(metric(tasklm.logits(batch), batch).mean())  # error nodes make the spliced model exact
    empty = ablated_metric(tasklm, saes, batch, metric, {}, means)
    kept = ablated_metric(tasklm, saes, batch, metric, circuit, means)
    result = explorer.check_faithfulness()
    frac = float(result["faithfulness"][0])
    assert int(result["size"][0]) == 3 and explorer.last is result
    assert frac == pytest.approx((kept - empty) / (full - empty), rel=1e-4)
    assert np.allclose(explorer.bars.data[0].y, [full, kept], rtol=1e-4)
    assert explorer.bars.layout.title.text == f"faithfulness of 3 nodes: {frac:.3f}"
    # every node in the circuit: faithfulness is exactly 1
    everything = faithfulness(tasklm, saes, clean, metric, graph, thresholds=[0.0], means=means)
    assert int(everything["size"][0]) == len(graph.coord("node"))
    assert float(everything["faithfulness"][0]) == pytest.approx(1.0, abs=1e-5)


def test_error_nodes_cannot_be_ablated(explorer, setup):
    _, graph, *_ = setup
    err = [i for i, f in enumerate(graph["feature"]) if f < 0][0]
    explorer.select(int(err))
    assert explorer.ablate_button.disabled and explorer.steer_button.disabled
    assert "error nodes cannot be ablated" in explorer.steer_button.tooltip
    assert "error node" in explorer.node_info.value
    with pytest.raises(WorkbenchError, match="select a feature node"):
        explorer.ablate()
    assert "select a feature node" in explorer.status.value
    with pytest.raises(WorkbenchError, match="no node"):
        explorer.select("mlp_out.7/3")


def test_graph_and_saes_must_match(tasklm, setup):
    saes, graph, clean, metric, texts, means = setup
    with pytest.raises(WorkbenchError, match="sites"):
        CircuitExplorer(graph, subject=tasklm, saes={"resid_post.0": saes["resid_post.0"]}, clean=clean, metric=metric,
                        texts=texts)


def test_built_from_saved_results_draws_the_same(explorer, tasklm, setup, tmp_path):
    saes, graph, clean, metric, texts, means = setup
    feats = [graph.coord("node")[i] for i in np.argsort(-np.abs(graph["effect"])) if graph["feature"][i] >= 0][:2]
    explorer.node_threshold = float(np.sort(np.abs(graph["effect"]))[-5])
    explorer.select(feats[0])
    faith = faithfulness(tasklm, saes, clean, metric, graph, thresholds=[explorer.node_threshold, 0.0], means=means)
    summary = explorer.dashboard.summary

    def reload(result, name):
        return Result.load(result.save(tmp_path / f"{name}.safetensors"))

    offline = CircuitExplorer(reload(graph, "graph"), summaries=[reload(summary, "summary")],
                              faithfulness=reload(faith, "faith"), node=feats[0])
    offline.node_threshold = explorer.node_threshold
    assert_same_figure(offline.figure, explorer.figure)
    dash, live_dash = offline.dashboard, explorer.dashboard
    assert dash.feature == live_dash.feature and dash.title.value == live_dash.title.value
    assert dash.contexts.value == live_dash.contexts.value
    assert_same_figure(dash.histogram, live_dash.histogram)
    assert_same_figure(dash.logits, live_dash.logits)
    # the saved faithfulness row nearest the threshold, as the live button shows it
    explorer.check_faithfulness()
    assert_same_figure(offline.bars, explorer.bars)
    assert offline.status.value == explorer.status.value
    # clicking a node sets the trait offline too; the ring follows
    k = _shown_nodes(offline.figure).index(graph.coord("node").index(feats[1]))
    offline._on_node(offline.figure.data[NODE_TRACE], _Points([k]), None)
    assert offline.node == feats[1]
    explorer.node = feats[1]
    # the same graph and ring; only the live one labels feats[1] by its tokens (it summarised it)
    live_nodes, off_nodes = explorer.figure.data[NODE_TRACE], offline.figure.data[NODE_TRACE]
    i1 = [int(c[0]) for c in live_nodes.customdata].index(graph.coord("node").index(feats[1]))
    assert off_nodes.text[i1] == feats[1].split("/")[1] and live_nodes.text[i1] != off_nodes.text[i1]
    for k, (a, b) in enumerate(zip(offline.figure.data, explorer.figure.data)):
        if k != NODE_TRACE:
            assert_same_figure_trace(a, b)
    assert list(live_nodes.x) == list(off_nodes.x) and list(live_nodes.y) == list(off_nodes.y)
    # a feature with no saved summary: the dashboard says why it shows nothing
    assert dash.feature == int(feats[1].split("/")[1]) and dash.summary is None
    assert "no saved summary" in dash.title.value and "needs a model" in dash.title.value
    assert len(dash.histogram.data[0].x) == 0
    # the actions that need the model are off, and say why
    for button in (offline.ablate_button, offline.steer_button, offline.faith_button):
        assert button.disabled and "need a model: pass subject=, saes=, clean=, metric=" in button.tooltip
    assert "need a model" in offline.reason.value
    assert offline.steer() is None and "need a model" in offline.status.value


def test_dashboard_escapes_token_text(tasklm, setup):
    saes, graph, *_ = setup
    texts = agreement_sentences(40, seed=4, split="test")
    f0, f1 = [int(n.split("/")[1]) for n, _ in graph_top(graph) if n.startswith("attn_out.1/")
              and not n.endswith("err")][:2]
    dash = FeatureDashboard.from_subject(tasklm, saes["attn_out.1"], f0, texts)
    s = copy.deepcopy(dash.summary)
    assert s.attrs["examples"], "the strongest circuit feature fires on agreement sentences"
    s.attrs["examples"][0]["tokens"][0] = EVIL
    out = contexts_html(s)
    assert EVIL not in out and "&lt;img src=x onerror=alert(1)&gt;" in out
    # switching features redraws in place and caches the summary
    hist = dash.histogram.data[0]
    dash.show(f1)
    assert dash.feature == f1 and dash.histogram.data[0] is hist
    first = dash.summary
    dash.show(f0)
    dash.show(f1)
    assert dash.summary is first
    with pytest.raises(WorkbenchError, match="out of range"):
        dash.show(10_000)


@pytest.fixture(scope="module")
def corrupted(tasklm):
    return list(agreement_pairs(16, seed=3, split="test", tokenizer=tasklm.tokenizer)["corrupted"])


def _pixel_rows(fig):
    """Each shown node's (column, y pixel centre, diameter) from the figure's own geometry."""
    lay = fig.layout
    plot_h = lay.height - lay.margin.t - lay.margin.b
    lo, hi = lay.yaxis.range  # reversed: [rows - 0.5, -0.5]
    nodes = fig.data[NODE_TRACE]
    ys = [(y - hi) / (lo - hi) * plot_h for y in nodes.y]
    return list(zip(nodes.x, ys, nodes.marker.size))


def test_nodes_never_overlap_so_a_click_hits_the_node_under_it(setup):
    """The report: clicking the centre of a node selected the one under it (markers of
    one column overlapped). Rows are now spaced wider than the largest marker, at the
    graph's threshold and at the lowest one (every node)."""
    _, graph, *_ = setup
    for nt in (graph.attrs["node_threshold"], 0.0):
        fig = circuit_figure(graph, nt, 0.0)
        rows = _pixel_rows(fig)
        for c in {x for x, _, _ in rows}:
            col = sorted((y, d) for x, y, d in rows if x == c)
            for (y0, d0), (y1, d1) in zip(col, col[1:]):
                assert y1 - y0 >= (d0 + d1) / 2, (nt, c, y0, y1, d0, d1)
        n = circuit_rows(circuit_layout(graph, nt, 0.0)[0])
        assert fig.layout.height == circuit_geometry(n)["height"] and fig.layout.height <= 900
    # a large circuit gets a taller figure than a small one
    assert circuit_figure(graph, 0.0, 0.0).layout.height > circuit_figure(graph, float(np.abs(graph["effect"]).max()),
                                                                         0.0).layout.height


def test_edges_hover_with_their_weight_and_nodes_are_sign_coloured(setup):
    _, graph, *_ = setup
    fig = circuit_figure(graph)
    _, edges = graph.subgraph()
    hover = fig.data[EDGE_HOVER]
    assert len(hover.x) == len(edges)
    assert sorted(c[2] for c in hover.customdata) == sorted(graph["edge_weight"][edges].tolist())
    assert "weight" in hover.hovertemplate
    nodes = fig.data[NODE_TRACE]
    assert nodes.marker.colorscale and nodes.marker.cmin == -nodes.marker.cmax
    assert np.allclose(nodes.marker.color, graph["effect"][[int(c[0]) for c in nodes.customdata]])


def test_error_node_takes_the_previous_dashboard_away(explorer, setup):
    _, graph, *_ = setup
    feat = next(n for n, _ in graph_top(graph) if not n.endswith("/err"))
    err = next(n for n, _ in graph_top(graph) if n.endswith("/err"))
    explorer.select(feat)
    assert explorer.dashboard_box.children == (explorer.dashboard,)
    explorer.select(err)
    assert explorer.dashboard_box.children == () and "no feature dashboard" in explorer.node_info.value
    explorer.select(feat)  # back: the same dashboard again
    assert explorer.dashboard_box.children == (explorer.dashboard,) and explorer.dashboard.feature == int(feat.split("/")[1])
    explorer.node = ""
    assert explorer.dashboard_box.children == ()


def test_stale_results_are_cleared(explorer, setup):
    _, graph, *_ = setup
    feats = [n for n, _ in graph_top(graph) if not n.endswith("/err")][:2]
    explorer.select(feats[0])
    explorer.steer()
    assert "steering with" in explorer.status.value and explorer.bars.data[0].y[0] != 0
    assert "model says next" in explorer.next_tokens.value
    explorer.select(feats[1])  # the steering described the other feature
    assert explorer.status.value == "" and list(explorer.bars.data[0].y) == [0.0, 0.0]
    assert explorer.next_tokens.value == "" and explorer.last is None
    explorer.check_faithfulness()
    assert explorer.bars.layout.title.text.startswith("faithfulness of")
    explorer.node_threshold = explorer.node_threshold * 2  # other nodes shown: the measured faithfulness is stale
    assert explorer.status.value == "" and explorer.bars.layout.title.text == "metric change"


def test_low_thresholds_compute_the_edges_of_the_shown_nodes(tasklm, setup, corrupted):
    """The report: below the build threshold the edge count stayed fixed (edges existed only
    for the original circuit). With the corrupted prompts the explorer computes them (the
    library's find_circuit at the new threshold); without them it says why."""
    saes, graph, clean, metric, texts, means = setup
    build = graph.attrs["node_threshold"]
    low = build / 4
    assert (np.abs(graph["effect"]) >= low).sum() > (np.abs(graph["effect"]) >= build).sum()
    ex = CircuitExplorer(graph, subject=tasklm, saes=saes, clean=clean, corrupted=corrupted, metric=metric,
                         texts=texts, means=means)
    before = len(ex.shown()[1])
    ex.edge_threshold = graph.attrs["edge_threshold"]
    ex.node_threshold = low
    ref = find_circuit(tasklm, saes, clean, corrupted, metric, node_threshold=ex.node_threshold,
                       edge_threshold=graph.attrs["edge_threshold"], effects=graph)
    nodes, edges = ref.subgraph(ex.node_threshold, ex.edge_threshold)
    assert len(edges) > before and len(ex.shown()[1]) == len(edges)
    assert np.allclose(ex.graph["edge_weight"], ref["edge_weight"]) and ex.graph.attrs["node_threshold"] == low
    assert ex.figure.layout.title.text.endswith(f"{len(edges)} edges")
    assert "edges computed for the" in ex.edge_note.value
    # raising the threshold again reuses the computed edges (no recompute) and keeps them consistent
    g = ex.graph
    ex.node_threshold = build
    assert ex.graph is g and list(ex.shown()[1]) == list(g.subgraph(build, ex.edge_threshold)[1])
    # offline: the same threshold shows the nodes, and says their edges are missing and why
    off = CircuitExplorer(graph)
    off.node_threshold = low
    assert len(off.shown()[1]) == before  # the nodes below the build threshold come without edges
    assert "edges were computed only between nodes with |effect| &gt;= " in off.edge_note.value
    assert "corrupted=" in off.edge_note.value
    off.node_threshold = build
    assert off.edge_note.value == ""


def test_dashboard_jumps_to_any_feature_and_lists_logits(tasklm, setup, tmp_path):
    saes, graph, clean, metric, texts, means = setup
    dash = FeatureDashboard.from_subject(tasklm, saes["attn_out.1"], 3, texts[:30])
    dash.feature_box.value = 7
    dash.show_button.click()
    assert dash.feature == 7 and dash.summary.attrs["feature"] == 7 and "shown" in dash.jump_status.value
    assert "top logits" in dash.logit_lists.value and "bottom logits" in dash.logit_lists.value
    for t in dash.summary.attrs["promoted"][:3]:
        assert html_escape(t) in dash.logit_lists.value
    if dash.summary.examples:
        assert "activation 0" in dash.contexts.value and ": activation " in dash.contexts.value
    assert dash.histogram.layout.yaxis.type == "log"
    # the state a view created now draws from holds the new feature (not the empty first figure)
    assert list(dash.logits.get_state()["_widget_data"][0]["y"]) == list(dash.logits.data[0].y)
    assert len(dash.logits.data[0].y) == 2 * len(dash.summary.attrs["promoted"]) > 0
    dash.feature_box.value = 64  # out of range: said on screen, the dashboard stays
    dash.show_button.click()
    assert dash.feature == 7 and "out of range" in dash.jump_status.value
    out = dash.export_html(tmp_path / "dash.html").read_text()
    assert out.count('class="plotly-graph-div"') == 2 and "top logits" in out


def test_explorer_exports_its_view(explorer, setup, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the export button writes its default file name here
    _, graph, *_ = setup
    explorer.select(next(n for n, _ in graph_top(graph) if not n.endswith("/err")))
    explorer.export_box.run()
    assert "wrote" in explorer.export_box.children[2].value
    text = explorer.export_html(tmp_path / "explorer.html").read_text()
    assert text.count('class="plotly-graph-div"') == 4  # graph, metric bars, histogram, logit bars
    assert "node |effect| &gt;=" in text and "quantile" in text


def assert_same_figure_trace(a, b):
    from tests.widgets.compare import same

    ja = {k: v for k, v in a.to_plotly_json().items() if k != "uid"}
    jb = {k: v for k, v in b.to_plotly_json().items() if k != "uid"}
    assert same(ja, jb)


def html_escape(t):
    import html

    return html.escape(t)


def test_opening_node_is_drawn_in_the_first_message(tasklm, setup):
    """node= draws the ring, the node's label and its dashboard into the figures' first state
    (what the front end gets when it creates them), so nothing depends on an update landing
    while the front end starts the figure (anywidget gives a model 2 s to start)."""
    saes, graph, clean, metric, texts, means = setup
    feat = next(n for n, _ in graph_top(graph) if not n.endswith("/err"))
    ex = CircuitExplorer(graph, subject=tasklm, saes=saes, clean=clean, metric=metric, texts=texts, means=means,
                         node=feat)
    i = graph.coord("node").index(feat)
    first = ex.figure.get_state()["_widget_data"]
    assert list(first[NODE_TRACE + 1]["x"]) == [int(graph["site"][i])]
    assert ex.dashboard.feature == int(feat.split("/")[1])
    bars = ex.dashboard.logits.get_state()["_widget_data"][0]
    assert len(bars["y"]) == 2 * len(ex.dashboard.summary.attrs["promoted"]) > 0
