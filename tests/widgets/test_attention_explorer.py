"""AttentionExplorer headless: grid and pattern figures update in place after clicks and
trait changes; the selection is traits that link both ways; built from saved results it
draws what the live one draws, with ablate / attribute off and saying why; ablate shows
the effect beside random heads; token text is escaped."""

from __future__ import annotations

import copy

import ipywidgets as W
import numpy as np
import pytest

from tests.widgets.compare import assert_same_figure
from widgets import AttentionExplorer, AttentionView, score_grid
from workbench.attention import head_scores
from workbench.results import Result

EVIL = "<img src=x onerror=alert(1)>"
PROMPTS = ["hot -> cold ; big -> small ; tall ->", "x y z w x y z w x y z w", "the keys near the cabinet are"]


@pytest.fixture(scope="module")
def explorer(tasklm):
    return AttentionExplorer.from_subject(tasklm, PROMPTS, n_random=4, n_boot=100)


class _Points:
    def __init__(self, xs, ys):
        self.xs, self.ys = xs, ys


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
    assert np.array_equal(np.asarray(heat.z), explorer.patterns.pattern(0, 1, 2))
    assert explorer.heatmap.layout.title.text == "L1H2 attention, prompt 0"
    assert list(explorer.grid.data[1].x) == [2] and list(explorer.grid.data[1].y) == [1]
    q = explorer.query
    w = explorer.patterns.pattern(0, 1, 2)[q]
    assert f'title="0: {w[0]:.3f}"' in explorer.tokens.value


def test_kind_and_prompt_traits_follow_their_selectors_both_ways(explorer):
    explorer.kind_select.value = "induction"
    assert explorer.kind == "induction"
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


def test_ablate_shows_the_effect_beside_random_heads(explorer):
    explorer.select(1, 0)
    bar = explorer.bars.data[0]
    explorer.ablate_button.click()
    s = explorer.ablation.summary
    assert explorer.bars.data[0] is bar
    assert list(bar.y) == pytest.approx([s["effect"], s["control_mean"]])
    assert "L1H0" in explorer.ablate_status.value and "random heads" in explorer.ablate_status.value
    assert len(explorer.ablation["control_effect"]) == 4


def test_attribute_shades_the_prompt_by_integrated_gradients(explorer):
    explorer.prompt = 0
    explorer.attribute_button.click()
    a = explorer.attribution
    assert a.attrs["prompt"] == PROMPTS[0] and a.attrs["target"] == "short"
    assert "attribution of <b>short</b>" in explorer.attribution_html.value
    assert explorer.attribution_html.value.count('class="wb-token"') == len(a.attrs["tokens"])


def test_built_from_saved_results_draws_the_same(explorer, tmp_path):
    explorer.select(1, 2)
    explorer.kind, explorer.prompt = "induction", 1
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
