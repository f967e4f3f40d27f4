"""AttentionExplorer headless: grid and pattern figures update in place after clicks and
trait changes; the selection is traits that link both ways; choosing a score kind selects
its top head; built from saved results it draws what the live one draws, with ablate /
attribute off and saying why; ablate runs on the selected prompt, names its metric and
shows the effect beside random heads; results of another selection leave the screen;
both actions say "working..." first; the all-heads overview selects by click; the causal
mask is grey (NaN), not zero; token text is escaped."""

from __future__ import annotations

import copy

import ipywidgets as W
import numpy as np
import pytest

from tests.widgets.compare import assert_same_figure
from widgets import AttentionExplorer, AttentionView, heads_overview, score_grid
from widgets.figures.attention import masked_pattern, overview_head
from workbench.attention import ablate_heads, head_scores
from workbench.results import Result

EVIL = "<img src=x onerror=alert(1)>"
PROMPTS = ["hot -> cold ; big -> small ; tall ->", "x y z w x y z w x y z w", "the keys near the cabinet are"]


@pytest.fixture(scope="module")
def explorer(tasklm):
    return AttentionExplorer.from_subject(tasklm, PROMPTS, n_random=4, n_boot=100)


class _Points:
    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys


def shown(z) -> np.ndarray:
    """A heatmap's z as the front end gets it (None: a gap) as floats (NaN: a gap)."""
    return np.asarray(z, dtype=float)


def values_of(widget, name="value"):
    """Record every value ``widget.<name>`` takes."""
    seen = []
    widget.observe(lambda c: seen.append(c["new"]), names=name)
    return seen


def test_grid_shows_scores_with_intervals_in_hover(explorer, tasklm):
    grid = explorer.grid.data[0]
    k = explorer.scores.coord("kind").index("previous_token")
    assert np.allclose(np.asarray(grid.z), explorer.scores["score"][k], equal_nan=True)
    assert np.asarray(grid.customdata).shape == (tasklm.n_layers, tasklm.n_heads, 3)
    assert "95% CI" in grid.hovertemplate and "control" in grid.hovertemplate
    # the explorer opens on the best head of the first kind
    assert explorer.selected == explorer.scores.best("previous_token")


def test_clicking_a_cell_sets_the_traits_and_shows_that_heads_pattern_in_place(explorer, tasklm):
    heat, grid_fig = explorer.heatmap.data[0], explorer.grid
    explorer.layer, explorer.head = 0, 0
    seen = []
    record = lambda c: seen.append((c["name"], c["new"]))  # noqa: E731
    explorer.observe(record, names=["layer", "head"])
    explorer._on_cell(grid_fig.data[0], _Points([2], [1]), None)
    explorer.unobserve(record, names=["layer", "head"])
    assert (explorer.layer, explorer.head) == (1, 2) and sorted(seen) == [("head", 2), ("layer", 1)]
    assert explorer.heatmap.data[0] is heat
    assert np.allclose(shown(heat.z), masked_pattern(explorer.patterns, 0, 1, 2), atol=6e-5, equal_nan=True)
    assert explorer.heatmap.layout.title.text == "L1H2 attention, prompt 0"
    assert list(explorer.grid.data[1].x) == [2] and list(explorer.grid.data[1].y) == [1]
    q = explorer.query
    w = explorer.patterns.pattern(0, 1, 2)[q]
    assert f'title="0: {w[0]:.3f}"' in explorer.tokens.value


def test_kind_and_prompt_traits_follow_their_selectors_both_ways(explorer):
    explorer.kind_select.value = "induction"
    assert explorer.kind == "induction"
    # the selection box moves to the top head of the score now shown
    assert explorer.selected == explorer.scores.best("induction")
    assert (list(explorer.grid.data[1].x), list(explorer.grid.data[1].y)) == (
        [explorer.head], [explorer.layer])
    assert explorer.heatmap.layout.title.text.startswith(f"L{explorer.layer}H{explorer.head} ")
    k = explorer.scores.coord("kind").index("induction")
    assert np.allclose(np.asarray(explorer.grid.data[0].z), explorer.scores["score"][k], equal_nan=True)
    assert explorer.grid.layout.title.text == "induction score per head"
    explorer.kind = "self"
    assert explorer.kind_select.value == "self" and explorer.grid.layout.title.text == "self score per head"
    explorer.prompt = 2
    n = int(explorer.patterns["lengths"][2])
    assert explorer.prompt_select.value == 2
    assert explorer.query == n - 1 and explorer.query_slider.max == n - 1 and len(explorer.heatmap.data[0].x) == n
    explorer._on_row(explorer.heatmap.data[0], _Points([0], [explorer.heatmap.data[0].y[2]]), None)
    assert explorer.query == 2 and explorer.query_slider.value == 2 and explorer.tokens.selected == 2
    # clicking a token in the strip (its front end sets `selected`) picks that query
    explorer.tokens.selected = 4
    assert explorer.query == 4 and 'data-pos="4" title="4: ' in explorer.tokens.value
    with pytest.raises(Exception, match="score kind"):
        explorer.kind = "nonsense"


def test_selection_links_to_another_widget(explorer):
    view = AttentionView(explorer.patterns)
    links = [W.link((explorer, "layer"), (view, "layer")), W.link((explorer, "head"), (view, "head"))]
    try:
        explorer.select(0, 3)
        assert (view.layer, view.head) == (0, 3) and view.figure.layout.title.text.startswith("L0H3")
        view.head = 1
        assert explorer.selected == (0, 1) and explorer.heatmap.layout.title.text.startswith("L0H1")
        assert list(explorer.grid.data[1].x) == [1]
    finally:
        for link in links:
            link.unlink()


def test_opens_on_the_top_head_of_the_score_shown(explorer):
    again = AttentionExplorer(explorer.scores, explorer.patterns, kind="induction")
    assert again.kind == "induction" and again.selected == explorer.scores.best("induction")
    assert list(again.grid.data[1].x) == [again.head] and list(again.grid.data[1].y) == [again.layer]


def test_ablate_runs_on_the_selected_prompt_names_its_metric_and_goes_stale(explorer, tasklm):
    explorer.prompt = 2
    explorer.select(1, 0)
    assert explorer.ablation is None and "press ablate" in explorer.bars.layout.title.text
    assert explorer.ablate_button.description == "ablate L1H0 on prompt 2"
    bar = explorer.bars.data[0]
    statuses = values_of(explorer.ablate_status)
    explorer.ablate_button.click()
    assert statuses[0].startswith("<i>working...</i>")  # said before the result came
    s = explorer.ablation.summary
    # it ran on the selected prompt only (the same numbers as ablating there directly)
    want = ablate_heads(tasklm, [PROMPTS[2]], [(1, 0)], metric="loss", n_random=4, seed=0).summary
    assert s["base"] == pytest.approx(want["base"]) and s["effect"] == pytest.approx(want["effect"])
    assert explorer.bars.data[0] is bar
    assert list(bar.y) == pytest.approx([s["effect"], s["control_mean"]])
    assert "L1H0" in explorer.ablate_status.value and "random heads" in explorer.ablate_status.value
    assert "loss" in explorer.ablate_status.value and "prompt 2" in explorer.ablate_status.value
    assert "on prompt 2: loss" in explorer.bars.layout.title.text
    assert explorer.bars.layout.yaxis.title.text == "change of loss"
    assert len(explorer.ablation["control_effect"]) == 4 and not explorer.ablate_button.disabled
    # another head or another prompt: the result leaves the screen ...
    explorer.select(0, 1)
    assert explorer.ablation is None and list(explorer.bars.data[0].y) == [0.0, 0.0]
    assert "L1H0" not in explorer.ablate_status.value and "press ablate" in explorer.ablate_status.value
    explorer.select(1, 0)
    explorer.prompt = 0
    assert explorer.ablation is None and list(explorer.bars.data[0].y) == [0.0, 0.0]
    # ... and comes back with its selection
    explorer.prompt = 2
    assert list(explorer.bars.data[0].y) == pytest.approx([s["effect"], s["control_mean"]])


def test_attribute_says_working_then_shades_the_prompt_and_goes_stale(explorer):
    explorer.prompt = 0
    shown_values = values_of(explorer.attribution_html)
    explorer.attribute_button.click()
    assert shown_values[0].startswith("<i>working...</i>")
    a = explorer.attribution
    assert a.attrs["prompt"] == PROMPTS[0] and a.attrs["target"] == "short"
    assert "attribution of <b>short</b>" in explorer.attribution_html.value
    assert explorer.attribution_html.value.count('class="wb-token"') == len(a.attrs["tokens"])
    explorer.select(0, 2)  # another head: the attribution (of the prompt) stays
    assert "attribution of <b>short</b>" in explorer.attribution_html.value
    explorer.prompt = 1  # another prompt: it goes
    assert explorer.attribution is None and explorer.attribution_html.value == ""
    explorer.prompt = 0
    assert "attribution of <b>short</b>" in explorer.attribution_html.value


def test_overview_shows_every_head_and_selects_by_click(explorer):
    explorer.prompt = 1
    ov = explorer.overview
    n = int(explorer.patterns["lengths"][1])
    layers, heads = explorer.patterns.coord("layer"), explorer.patterns.coord("head")
    z = shown(ov.data[0].z)
    assert z.shape == (len(layers) * (n + 1) - 1, len(heads) * (n + 1) - 1)
    t = n + 1
    assert np.allclose(z[1 * t:1 * t + n, 2 * t:2 * t + n], masked_pattern(explorer.patterns, 1, 1, 2)[:n, :n],
                       atol=6e-5, equal_nan=True)
    assert np.isnan(z[0, 1]) and np.isnan(z[n, 0])  # causal mask and the gap between thumbnails
    trace = ov.data[0]
    explorer._on_thumbnail(trace, _Points([3 * t + 1], [1 * t + 2]), None)
    assert explorer.selected == (1, 3) and ov.data[0] is trace
    assert ov.layout.shapes[0].x0 == 3 * t - 0.5 and ov.layout.shapes[0].y0 == 1 * t - 0.5
    assert overview_head(explorer.patterns, 1, t - 1, 0) is None  # a gap selects nothing
    fig = heads_overview(explorer.patterns, 1, (1, 3))
    assert np.array_equal(shown(fig.data[0].z), z, equal_nan=True)


def test_causal_mask_is_grey_not_zero(explorer):
    pat = masked_pattern(explorer.patterns, 0, 0, 0)
    n = len(pat)
    assert np.isnan(pat[np.triu_indices(n, 1)]).all() and not np.isnan(pat[np.tril_indices(n)]).any()
    assert explorer.heatmap.layout.plot_bgcolor == "#d9d9d9"


def test_export_writes_the_view(explorer, tmp_path):
    explorer.export_box.children[1].value = str(tmp_path / "explorer.html")
    explorer.export_box.run()
    text = (tmp_path / "explorer.html").read_text()
    assert "score per head" in text and "wb-token" in text and "plotly" in text.lower()
    assert "wrote" in explorer.export_box.children[2].value


def test_built_from_saved_results_draws_the_same(explorer, tmp_path):
    explorer.kind, explorer.prompt = "induction", 1
    explorer.select(1, 2)
    explorer.ablate()
    explorer.attribute()
    paths = {n: getattr(explorer, n).save(tmp_path / f"{n}.safetensors") for n in ("scores", "patterns", "ablation",
                                                                                  "attribution")}
    saved = {n: Result.load(p) for n, p in paths.items()}
    offline = AttentionExplorer(saved["scores"], saved["patterns"], ablation=saved["ablation"],
                                attribution=saved["attribution"], kind="induction", layer=1, head=2, prompt=1)
    assert offline.selected == (1, 2) and offline.query == explorer.query
    for fig in ("grid", "heatmap", "bars"):
        assert_same_figure(getattr(offline, fig), getattr(explorer, fig))
    assert offline.tokens.value == explorer.tokens.value
    assert offline.attribution_html.value == explorer.attribution_html.value
    # clicking works the same offline
    offline._on_cell(offline.grid.data[0], _Points([0], [0]), None)
    explorer._on_cell(explorer.grid.data[0], _Points([0], [0]), None)
    assert offline.selected == (0, 0)
    assert_same_figure(offline.heatmap, explorer.heatmap)
    # the actions that need the model are off, and say why
    for button in (offline.ablate_button, offline.attribute_button):
        assert button.disabled and "ablate and attribute need a model" in button.tooltip
    assert "subject=" in offline.reason.value
    assert offline.ablate() is None and "ablate needs a model" in offline.ablate_status.value
    assert not explorer.ablate_button.disabled and explorer.reason.value == ""


def test_score_grid_is_pure(tasklm):
    r = head_scores(tasklm, PROMPTS, kinds=["self"], n_boot=50)
    fig = score_grid(r, "self", (1, 3))
    assert np.allclose(np.asarray(fig.data[0].z), r["score"][0], equal_nan=True)
    assert list(fig.data[1].x) == [3] and list(fig.data[1].y) == [1]


def test_token_text_is_escaped(explorer):
    original = explorer.patterns
    explorer.patterns = copy.deepcopy(original)
    explorer.patterns.attrs["tokens"][0][1] = EVIL
    try:
        explorer.prompt = 0
        explorer._redraw_pattern()
        assert EVIL not in explorer.tokens.value and "&lt;img src=x onerror=alert(1)&gt;" in explorer.tokens.value
        assert all(EVIL not in str(lbl) for lbl in explorer.heatmap.data[0].x)
    finally:
        explorer.patterns = original


def test_updates_before_the_first_draw_reach_the_opening_state(explorer):
    # set in the cell that builds it (no view yet): the state the front end opens with is the new one
    again = AttentionExplorer(explorer.scores, explorer.patterns)
    assert not again.grid.drawn
    again.kind = "induction"
    l, h = explorer.scores.best("induction")
    assert again.grid._widget_layout["title"]["text"] == "induction score per head"
    assert again.heatmap._widget_layout["title"]["text"].startswith(f"L{l}H{h} attention")
    assert again.grid._widget_data[1]["x"] == [h]
    # once a view has drawn it (its layout report came back), updates go as updates only
    again.grid._on_drawn()
    before = again.grid._widget_layout["title"]["text"]
    again.kind = "self"
    assert again.grid._widget_layout["title"]["text"] == before
    assert again.grid.layout.title.text == "self score per head"


def test_a_head_change_without_ablations_leaves_the_bars_alone(explorer):
    explorer.prompt = 1
    explorer.select(0, 0)
    edits = explorer.bars._last_trace_edit_id
    explorer.select(0, 1)  # neither head has an ablation on prompt 1: the bars would draw the same
    assert explorer.bars._last_trace_edit_id == edits
    assert explorer.bars.layout.title.text.startswith("ablation effect on loss on prompt 1")
    explorer.prompt = 0  # another prompt: another title
    assert explorer.bars._last_trace_edit_id == edits + 1
