"""AttentionExplorer headless: grid and pattern figures update in place after clicks and
selector changes; ablate shows the effect beside random heads; token text is escaped."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from widgets import AttentionExplorer, score_grid
from workbench.attention import head_scores

EVIL = "<img src=x onerror=alert(1)>"
PROMPTS = ["hot -> cold ; big -> small ; tall ->", "x y z w x y z w x y z w", "the keys near the cabinet are"]


@pytest.fixture(scope="module")
def explorer(tasklm):
    return AttentionExplorer(tasklm, PROMPTS, n_random=4, n_boot=100)


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


def test_clicking_a_cell_shows_that_heads_pattern_in_place(explorer, tasklm):
    heat, grid_fig = explorer.heatmap.data[0], explorer.grid
    explorer._on_cell(grid_fig.data[0], _Points([2], [1]), None)
    assert explorer.selected == (1, 2)
    assert explorer.heatmap.data[0] is heat
    assert np.array_equal(np.asarray(heat.z), explorer.patterns.pattern(0, 1, 2))
    assert explorer.heatmap.layout.title.text == "L1H2 attention, prompt 0"
    assert list(explorer.grid.data[1].x) == [2] and list(explorer.grid.data[1].y) == [1]
    q = explorer.query.value
    w = explorer.patterns.pattern(0, 1, 2)[q]
    assert f'title="0: {w[0]:.3f}"' in explorer.tokens.value


def test_kind_and_prompt_selectors(explorer):
    explorer.kind.value = "induction"
    k = explorer.scores.coord("kind").index("induction")
    assert np.allclose(np.asarray(explorer.grid.data[0].z), explorer.scores["score"][k], equal_nan=True)
    assert explorer.grid.layout.title.text == "induction score per head"
    explorer.prompt.value = 2
    n = int(explorer.patterns["lengths"][2])
    assert explorer.query.max == n - 1 and len(explorer.heatmap.data[0].x) == n
    explorer._on_row(explorer.heatmap.data[0], _Points([0], [explorer.heatmap.data[0].y[2]]), None)
    assert explorer.query.value == 2


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
    explorer.prompt.value = 0
    explorer.attribute_button.click()
    a = explorer.attribution
    assert a.attrs["prompt"] == PROMPTS[0] and a.attrs["target"] == "short"
    assert "attribution of <b>short</b>" in explorer.attribution_html.value
    assert explorer.attribution_html.value.count('class="wb-token"') == len(a.attrs["tokens"])


def test_score_grid_is_pure(tasklm):
    r = head_scores(tasklm, PROMPTS, kinds=["self"], n_boot=50)
    fig = score_grid(r, "self")
    assert np.allclose(np.asarray(fig.data[0].z), r["score"][0], equal_nan=True)


def test_token_text_is_escaped(explorer):
    original = explorer.patterns
    explorer.patterns = copy.deepcopy(original)
    explorer.patterns.attrs["tokens"][0][1] = EVIL
    try:
        explorer.prompt.value = 0
        explorer._redraw_pattern()
        assert EVIL not in explorer.tokens.value and "&lt;img src=x onerror=alert(1)&gt;" in explorer.tokens.value
        assert all(EVIL not in str(lbl) for lbl in explorer.heatmap.data[0].x)
    finally:
        explorer.patterns = original
