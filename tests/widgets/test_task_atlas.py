"""TaskAtlas headless, over synthetic atlases (seeded random numbers of the right dims,
combined by ``workbench.atlas.combine``): a saved-and-reloaded atlas draws what the
in-memory one draws; the scatter's points are the pairs with the truth's intervals;
the selection traits link both ways; clicking a point (or a matrix cell, or an agreement
cell) selects and redraws; no NaN/inf reaches the front end; the grouping panel shows
hand-checked numbers; export writes the view's data; names are escaped."""

from __future__ import annotations

import html
import itertools
import math

import numpy as np
import plotly.graph_objects as go
import pytest
import traitlets

from tests.widgets.compare import assert_same_figure
from widgets.common import responsive_figure
from widgets import TaskAtlas, atlas_blocks, atlas_matrices, atlas_scatter, grouping_html
from workbench import atlas as core
from workbench.atlas import LENSES, TRUTHS, GroundTruth, LensMeasures, combine, recommend_groups
from workbench.errors import WorkbenchError
from workbench.results import Result, provenance
from workbench.stats import spearman

EVIL = "x<b>&y"  # a task name that must be escaped everywhere
TASKS = ["antonym", "capitalize", EVIL, "next_letter", "present_past", "singular_plural", "lowercase", "first_letter"]
BLOCK_MEASURES = ("heads_ie", "weight_cosine", "icl_cosine", "feature_overlap", "grad_cosine")  # atlas order


def _sym(x):
    return (x + np.swapaxes(x, -1, -2)) / 2


def synth_atlas(tasks, seed: int = 0, *, values: dict | None = None, n_layers: int = 3, n_heads: int = 4):
    """A TaskAtlas of ``tasks`` from seeded random numbers (``values``: {measure: [T, T]}
    matrices to use instead), through the same ``combine`` the real atlas uses."""
    rng = np.random.default_rng(seed)
    T = len(tasks)
    truth = _sym(rng.normal(0.2, 0.3, size=(len(TRUTHS), T, T)))
    width = _sym(rng.uniform(0.02, 0.1, size=(len(TRUTHS), T, T)))
    names = list(LENSES)
    lens = _sym(rng.uniform(-1, 1, size=(len(names), T, T)))
    for name, m in (values or {}).items():
        if name in TRUTHS:
            truth[TRUTHS.index(name)] = m
        else:
            lens[names.index(name)] = m
    for g in range(len(TRUTHS)):
        np.fill_diagonal(truth[g], np.nan)
    gt = GroundTruth(
        dims={"truth": list(TRUTHS), "task": tasks, "task_b": tasks, "seed": [0], "prompt": [0, 1]},
        data={"value": (("truth", "task", "task_b"), truth), "low": (("truth", "task", "task_b"), truth - width),
              "high": (("truth", "task", "task_b"), truth + width),
              "correct_alone": (("task", "seed", "prompt"), np.ones((T, 1, 2), bool)),
              "cotrain_directed": (("task", "task_b"), rng.normal(0, 0.1, size=(T, T)))},
        attrs={"finetuned_accuracy": {t: 0.9 for t in tasks}}, provenance=provenance(seed=seed))
    blocks = ["embed"] + [f"layer.{l}" for l in range(n_layers)] + ["final_norm", "unembed"]
    by_block = np.full((len(names), len(blocks), T, T), np.nan)
    for m in ("heads_ie", "icl_cosine"):  # per layer
        by_block[names.index(m), 1:1 + n_layers] = _sym(rng.uniform(-1, 1, size=(n_layers, T, T)))
    for m in ("weight_cosine", "grad_cosine"):  # every block
        by_block[names.index(m)] = _sym(rng.uniform(-1, 1, size=(len(blocks), T, T)))
    by_block[names.index("feature_overlap"), [1, 2]] = _sym(rng.uniform(0, 1, size=(2, T, T)))  # two SAE sites
    nodes = ["resid_post.0/3", "resid_post.0/err", "mlp_out.1/7", "mlp_out.1/<i>&", "mlp_out.1/err"]
    lm = LensMeasures(
        dims={"measure": names, "block": blocks, "task": tasks, "task_b": tasks, "layer": list(range(n_layers)),
              "head": list(range(n_heads)), "node": nodes},
        data={"value": (("measure", "task", "task_b"), lens),
              "by_block": (("measure", "block", "task", "task_b"), by_block),
              "head_ie": (("task", "layer", "head"), rng.normal(size=(T, n_layers, n_heads))),
              "node_effect": (("task", "node"), rng.uniform(size=(T, len(nodes))))},
        attrs={"lens": LENSES}, provenance=provenance(seed=seed))
    return combine(gt, lm)


class _Points:
    def __init__(self, inds=(), xs=(), ys=()):
        self.point_inds, self.xs, self.ys = list(inds), list(xs), list(ys)


def _pairs(T):
    return list(itertools.combinations(range(T), 2))


def _figures(view):
    return [view.scatter, view.blocks, view.agreement_figure, view.matrices]


def _bad_floats(obj, path="") -> list[str]:
    """Paths of every NaN/inf float (numpy arrays included) in a figure's JSON."""
    if isinstance(obj, float):
        return [] if math.isfinite(obj) else [path]
    if isinstance(obj, np.ndarray):
        if obj.dtype.kind in "fc":
            return [] if np.isfinite(obj).all() else [path]
        return _bad_floats(obj.tolist(), path) if obj.dtype == object else []
    if isinstance(obj, dict):
        return [p for k, v in obj.items() for p in _bad_floats(v, f"{path}.{k}")]
    if isinstance(obj, (list, tuple)):
        return [p for i, v in enumerate(obj) for p in _bad_floats(v, f"{path}[{i}]")]
    return []


@pytest.fixture(scope="module")
def atlas():
    return synth_atlas(TASKS, seed=0)


@pytest.fixture(scope="module")
def agreement(atlas):
    return atlas.agreement(n_boot=10, seed=0)


@pytest.fixture
def view(atlas, agreement):
    return TaskAtlas(atlas, agreement=agreement)


def test_a_saved_atlas_draws_what_the_fresh_one_draws(atlas, agreement, tmp_path):
    path = tmp_path / "atlas.safetensors"
    atlas.save(path)
    loaded = Result.load(path)
    assert isinstance(loaded, core.TaskAtlas) and loaded.equals(atlas)
    fresh, saved = TaskAtlas(atlas, agreement=agreement), TaskAtlas.from_result(loaded, agreement=agreement)
    for a, b in zip(_figures(fresh), _figures(saved)):
        assert_same_figure(a, b)
    assert fresh.details.value == saved.details.value and fresh.grouping_panel.value == saved.grouping_panel.value
    assert (saved.measure, saved.truth, saved.group_size) == ("heads_ie", "cotrain", 2)
    # the widget draws exactly what the builders draw from the saved result
    built = atlas_scatter(loaded, "heads_ie", "cotrain", agreement, pair=saved.pair)
    assert_same_figure(saved.scatter, responsive_figure(built))
    assert_same_figure(saved.matrices, responsive_figure(atlas_matrices(loaded)))
    # without a saved agreement the reloaded view computes the same one (here before returning)
    own = TaskAtlas(loaded, n_boot=10, background=False)
    for v in ("spearman", "low", "high"):
        assert np.array_equal(own.agreement[v], agreement[v], equal_nan=True)
    assert own.scatter.layout.title.text == fresh.scatter.layout.title.text


def test_scatter_points_are_the_pairs_with_the_truth_intervals(view, atlas, agreement):
    tr = view.scatter.data[0]
    pairs = _pairs(len(TASKS))
    m, g = atlas.matrix("heads_ie"), atlas.matrix("cotrain")
    gi = atlas.coord("measure").index("cotrain")
    assert [tuple(c) for c in tr.customdata] == pairs
    assert np.allclose(tr.x, [m[a, b] for a, b in pairs]) and np.allclose(tr.y, [g[a, b] for a, b in pairs])
    assert np.allclose(tr.error_y.array, [atlas["high"][gi, a, b] - g[a, b] for a, b in pairs])
    assert np.allclose(tr.error_y.arrayminus, [g[a, b] - atlas["low"][gi, a, b] for a, b in pairs])
    rho = spearman([m[a, b] for a, b in pairs], [g[a, b] for a, b in pairs])
    i, j = agreement.coord("measure").index("heads_ie"), agreement.coord("truth").index("cotrain")
    assert agreement["spearman"][i, j] == pytest.approx(rho)
    lo, hi = agreement["low"][i, j], agreement["high"][i, j]
    assert f"Spearman \u03c1 = {rho:.2f} [{lo:.2f}, {hi:.2f}]" in view.scatter.layout.title.text
    assert "over 28 pairs" in view.scatter.layout.title.text
    # hover: both names, both values and the interval
    k = pairs.index((0, 1))
    assert tr.text[k].startswith("<b>antonym \u2194 capitalize</b>")
    assert f"cotrain: {g[0, 1]:.3f} [{atlas['low'][gi, 0, 1]:.3f}, {atlas['high'][gi, 0, 1]:.3f}]" in tr.text[k]
    # the view opens on the pair of highest ground truth, ringed
    best = max(pairs, key=lambda p: g[p])
    assert view.pair == (TASKS[best[0]], TASKS[best[1]])
    assert list(view.scatter.data[1].x) == [m[best]] and list(view.scatter.data[1].y) == [g[best]]
    # the dropdowns move the scatter
    view.measure_select.value = "grad_cosine"
    assert view.measure == "grad_cosine"
    assert np.allclose(view.scatter.data[0].x, [atlas.matrix("grad_cosine")[p] for p in pairs])
    assert view.scatter.layout.xaxis.title.text == "grad_cosine (gradients)"
    view.truth = "merge_ties"
    assert view.truth_select.value == "merge_ties"
    assert np.allclose(view.scatter.data[0].y, [atlas.matrix("merge_ties")[p] for p in pairs])
    assert view.scatter.layout.title.text.startswith("grad_cosine vs merge_ties")


def test_selection_traits_link_both_ways(view):
    class Mirror(traitlets.HasTraits):
        measure = traitlets.Unicode()
        truth = traitlets.Unicode()
        pair = traitlets.Tuple(traitlets.Unicode(), traitlets.Unicode())
        group_size = traitlets.Int()

    mirror = Mirror()
    links = [traitlets.link((view, n), (mirror, n)) for n in ("measure", "truth", "pair", "group_size")]
    try:
        assert (mirror.measure, mirror.truth, mirror.pair, mirror.group_size) == (
            view.measure, view.truth, view.pair, view.group_size)
        view.measure_select.value = "feature_overlap"  # the dropdown moves the trait, the trait the mirror
        assert mirror.measure == "feature_overlap"
        mirror.truth = "merge_ta"  # another widget picks a truth: the view follows
        assert view.truth == "merge_ta" and view.truth_select.value == "merge_ta"
        mirror.pair = ("lowercase", "capitalize")  # either order (the dropdown lists the atlas's task order)
        assert view.pair == ("lowercase", "capitalize") and view.pair_select.value == ("capitalize", "lowercase")
        assert "lowercase \u2194 capitalize" in view.blocks.layout.title.text
        view.pair_select.value = ("antonym", "lowercase")
        assert view.pair == mirror.pair == ("antonym", "lowercase")
        mirror.group_size = 4
        assert view.size_select.value == 4 and view.grouping.attrs["group_size"] == 4
        view.size_select.value = 2
        assert mirror.group_size == 2
    finally:
        for link in links:
            link.unlink()
    with pytest.raises(traitlets.TraitError, match="lens measure"):
        view.measure = "cotrain"
    with pytest.raises(traitlets.TraitError, match="ground truth"):
        view.truth = "heads_ie"
    with pytest.raises(traitlets.TraitError, match="two different tasks"):
        view.pair = ("antonym", "antonym")
    with pytest.raises(traitlets.TraitError, match="groups of"):
        view.group_size = 3


def test_clicking_a_point_selects_the_pair_and_shows_it(view, atlas):
    pairs = _pairs(len(TASKS))
    k = pairs.index((1, 2))  # capitalize <-> the escaped task
    view._on_point(view.scatter.data[0], _Points([k]), None)
    assert view.pair == ("capitalize", EVIL) and view.pair_select.value == ("capitalize", EVIL)
    assert list(view.scatter.data[1].x) == [atlas.matrix(view.measure)[1, 2]]
    # the details: every measure's value of the pair, shared heads and nodes, the directed gains
    det = atlas.pair_details("capitalize", EVIL)
    for m in atlas.coord("measure"):
        assert f"<td>{m}</td>" in view.details.value
        assert f"<b>{det[m]:.3f}</b>" in view.details.value
    heads = ", ".join(f"L{l}H{h}" for l, h in det["shared_heads"]) or "none"
    assert f"heads (indirect effect): {heads}</div>" in view.details.value
    nodes = ", ".join(html.escape(n) for n in det["shared_nodes"]) or "none"
    assert f"(features and error nodes): {nodes}</div>" in view.details.value
    assert f"<b>{atlas['cotrain_directed'][1, 2]:+.3f}</b>" in view.details.value
    # the per-block view: one line per measure with a per-block form, blocks in depth order
    blocks = view.blocks.data
    assert [t.name.split(" (")[0] for t in blocks] == list(BLOCK_MEASURES)
    order = ["embed", "layer.0", "layer.1", "layer.2", "final_norm", "unembed"]
    bb, ms, bs = atlas["by_block"], atlas.coord("measure"), atlas.coord("block")
    for t in blocks:
        m = t.name.split(" (")[0]
        assert list(t.x) == order
        want = [bb[ms.index(m), bs.index(b), 1, 2] for b in order]
        assert [None if not np.isfinite(w) else pytest.approx(w) for w in want] == list(t.y)
    assert html.escape(f"capitalize \u2194 {EVIL}") in view.blocks.layout.title.text
    # the measure shown in the scatter is drawn thicker
    thick = [t.name.split(" (")[0] for t in blocks if t.line.width == 4]
    assert thick == ([view.measure] if view.measure in BLOCK_MEASURES else [])
    view.measure = "icl_cosine"
    assert [t.name.split(" (")[0] for t in view.blocks.data if t.line.width == 4] == ["icl_cosine"]


def test_clicking_a_matrix_cell_or_an_agreement_cell(view, atlas):
    trace = view.matrices.data[5]  # any panel: the cell's row and column are the pair
    view._on_cell(trace, _Points(xs=[html.escape(EVIL)], ys=["next_letter"]), None)
    assert view.pair == ("next_letter", EVIL)  # (row, column)
    view._on_cell(trace, _Points(xs=["antonym"], ys=["antonym"]), None)  # the diagonal is no pair
    assert view.pair == ("next_letter", EVIL)
    view._on_agreement_cell(view.agreement_figure.data[0],
                            _Points(xs=["merge_ties"], ys=["tag_affinity (gradients)"]), None)
    assert (view.measure, view.truth) == ("tag_affinity", "merge_ties")
    assert view.scatter.layout.title.text.startswith("tag_affinity vs merge_ties")
    # the agreement heatmap's cells are the agreement's Spearmans, the interval in the hover
    ag = view.agreement
    z = np.array(view.agreement_figure.data[0].z, dtype=float)
    assert np.allclose(z, ag["spearman"], equal_nan=True)
    i, j = ag.coord("measure").index("tag_affinity"), ag.coord("truth").index("merge_ties")
    assert f"[{ag['low'][i, j]:.2f}, {ag['high'][i, j]:.2f}]" in view.agreement_figure.data[0].hovertext[i][j]


def test_no_nan_or_inf_reaches_the_front_end(agreement):
    values = {"heads_top": _sym(np.random.default_rng(3).uniform(size=(8, 8)))}
    values["heads_top"][0, 1] = values["heads_top"][1, 0] = np.nan  # one pair without a value
    values["fv_cosine"] = np.full((8, 8), np.nan)  # a measure with no value at all
    values["weight_sign"] = _sym(np.random.default_rng(4).uniform(size=(8, 8)))
    values["weight_sign"][2, 3] = values["weight_sign"][3, 2] = np.inf
    atlas = synth_atlas(TASKS, seed=1, values=values)
    view = TaskAtlas(atlas, agreement=atlas.agreement(n_boot=0), measure="heads_top")
    assert "27 of 28 pairs" in view.scatter.layout.title.text and len(view.scatter.data[0].x) == 27
    assert "interval not computed" in view.scatter.layout.title.text

    def check():
        for fig in _figures(view):
            assert _bad_floats(fig.to_plotly_json()) == [], fig.layout.title.text

    check()
    view._on_point(view.scatter.data[0], _Points([3]), None)
    view.measure = "fv_cosine"
    assert len(view.scatter.data[0].x) == 0 and "0 of 28 pairs" in view.scatter.layout.title.text
    assert "no grouping from fv_cosine" in view.grouping_reason.value and view.grouping is None
    check()
    view.measure = "weight_sign"
    assert len(view.scatter.data[0].x) == 27
    view.pair = ("antonym", "capitalize")
    check()
    # the builders themselves send none either
    for fig in (atlas_scatter(atlas, "heads_top", "merge_ta"), atlas_blocks(atlas, "antonym", "lowercase"),
                atlas_matrices(atlas)):
        assert _bad_floats(fig.to_plotly_json()) == []


def test_grouping_panel_shows_the_hand_checked_numbers():
    tasks = ["A<b>", "B&", "C", "D"]
    nan = np.nan
    rel = np.array([[nan, .9, .2, .4], [.9, nan, .5, .3], [.2, .5, nan, .1], [.4, .3, .1, nan]])
    gt = np.array([[nan, .1, .5, .0], [.1, nan, .1, .3], [.5, .1, nan, .3], [.0, .3, .3, nan]])
    atlas = synth_atlas(tasks, seed=2, values={"heads_ie": rel, "cotrain": gt})
    view = TaskAtlas(atlas, agreement=atlas.agreement(n_boot=0), measure="heads_ie", truth="cotrain")
    # the three splits: AB|CD (heads_ie 0.50, cotrain 0.20), AC|BD (0.25, 0.40), AD|BC (0.45, 0.05)
    g = view.grouping.attrs
    assert g["recommended"] == [["A<b>", "B&"], ["C", "D"]] and g["best"] == [["A<b>", "C"], ["B&", "D"]]
    assert g["recommended_value"] == pytest.approx(0.2) and g["best_value"] == pytest.approx(0.4)
    assert g["random_mean"] == pytest.approx(0.65 / 3) and g["random_std"] == pytest.approx(np.std([.2, .4, .05]))
    assert g["percentile"] == pytest.approx(2 / 3)
    panel = view.grouping_panel.value
    assert "{A&lt;b&gt;, B&amp;} \u00b7 {C, D}" in panel and "<b>0.200</b>" in panel
    assert "random split: 0.217 \u00b1 0.143 (mean \u00b1 std over all 3 splits)" in panel
    assert "exhaustive best: 0.400 with {A&lt;b&gt;, C} \u00b7 {B&amp;, D}" in panel
    assert "beats or ties <b>67%</b> of the 3 splits" in panel
    assert "A<b>" not in panel and panel == grouping_html(recommend_groups(atlas, "heads_ie", truth="cotrain"))
    # 4 tasks: groups of 4 would be one split; only 2 is offered
    assert [v for _, v in view.size_select.options] == [2]
    # another truth: the panel follows
    view.truth = "merge_ta"
    assert view.grouping.attrs["truth"] == "merge_ta" and "measured <b>merge_ta</b>" in view.grouping_panel.value
    # five tasks split into neither size: the control is off and says why
    five = TaskAtlas(synth_atlas(["a", "b", "c", "d", "e"], seed=3), agreement=None, n_boot=0, background=False)
    assert five.size_select.disabled and five.grouping is None and five.grouping_panel.value == ""
    assert "5 tasks do not split into groups of 2 or 4" in five.grouping_reason.value


def test_group_size_four_on_eight_tasks(view, atlas):
    view.group_size = 4
    want = recommend_groups(atlas, view.measure, truth=view.truth, group_size=4)
    assert view.grouping.attrs == want.attrs and view.grouping_panel.value == grouping_html(want)
    assert "over all 35 splits" in view.grouping_panel.value  # 8 tasks into two groups of 4


def test_export_writes_the_view(view, atlas, tmp_path, monkeypatch):
    view.pair = ("antonym", EVIL)
    out = view.export_html(tmp_path / "atlas.html")
    text = out.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and text.count("<script") >= 4
    assert "plotly.js v" in text or "Plotly" in text and len(text) > 1_000_000  # plotly.js inlined: opens offline
    assert view.details.value in text and view.grouping_panel.value in text
    assert "pair: antonym \u2194 x&lt;b&gt;&amp;y" in text  # the selection, as text
    x0 = float(view.scatter.data[0].x[0])
    assert repr(x0)[:12] in text  # the scatter's data
    assert EVIL not in text
    # the export button does the same, to the file name it shows
    monkeypatch.chdir(tmp_path)
    view.export_box.run()
    assert (tmp_path / "task_atlas.html").stat().st_size > 1_000_000
    assert "wrote task_atlas.html" in view.export_box.children[2].value
    with pytest.raises(ValueError, match="must end in .html"):
        view.export_html(tmp_path / "atlas.png")


def test_names_are_escaped_everywhere(view, atlas):
    esc = html.escape(EVIL)
    assert EVIL not in view.header.value and esc in view.header.value
    view.pair = ("capitalize", EVIL)
    assert EVIL not in view.details.value and esc in view.details.value
    assert "<i>&" not in view.details.value
    for fig in _figures(view):
        assert EVIL not in str(fig.to_plotly_json())
    assert esc in view.matrices.data[0].y and esc in view.blocks.layout.title.text
    assert any(esc in t for t in view.scatter.data[0].text)
    assert any(label == f"capitalize \u2194 {EVIL}" for label, _ in view.pair_select.options)  # plain text widget


def test_from_subject_runs_the_atlas_and_views_it(monkeypatch, atlas):
    calls = []

    def fake(subject, tasks=None, *, config=None, cache_dir=None, progress=True):
        calls.append((subject, tasks, config, cache_dir, progress))
        return atlas

    monkeypatch.setattr(core, "task_atlas", fake)
    cfg = core.AtlasConfig(steps=2)
    view = TaskAtlas.from_subject("subject", TASKS, cfg, "cache", n_boot=0, background=False)
    assert calls == [("subject", TASKS, cfg, "cache", True)]
    assert view.atlas is atlas and "computed live in" in view.status.value


def test_intervals_are_computed_in_the_background(atlas):
    view = TaskAtlas(atlas, n_boot=8)
    view.interval_thread.join(120)
    assert view.intervals_done.is_set() and view.agreement.attrs["n_boot"] == 8
    want = atlas.agreement(n_boot=8)
    assert np.array_equal(view.agreement["low"], want["low"], equal_nan=True)
    i = want.coord("measure").index(view.measure)
    j = want.coord("truth").index(view.truth)
    assert f"[{want['low'][i, j]:.2f}, {want['high'][i, j]:.2f}]" in view.scatter.layout.title.text
    assert "agreement intervals computed" in view.status.value
    assert "8 bootstrap draws" in view.agreement_figure.layout.title.text


def test_bad_input_says_what_is_accepted(agreement):
    with pytest.raises(WorkbenchError, match="workbench.atlas.TaskAtlas"):
        TaskAtlas(agreement)
    fig = atlas_scatter(synth_atlas(TASKS[:4]), "heads_ie", "cotrain")
    assert isinstance(fig, go.Figure) and "interval not computed" in fig.layout.title.text
