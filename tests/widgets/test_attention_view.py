"""AttentionView headless: traits (linked both ways to the selectors and to other
widgets), in-place figure updates, clicks, a view rebuilt from a saved result, escaped
token text."""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import pytest

from tests.widgets.compare import assert_same_figure
from widgets import AttentionView, pattern_heatmap, tokens_html
from widgets.figures.attention import masked_pattern
from workbench.attention import attention_patterns
from workbench.results import Result

EVIL = "<img src=x onerror=alert(1)>"


def shown(z) -> np.ndarray:
    """A heatmap's z as floats (the front end's None gaps as NaN)."""
    return np.asarray(z, dtype=float)


@pytest.fixture(scope="module")
def patterns(tasklm):
    prompts = ["hot -> cold ; big -> small ; tall ->", "the keys near the cabinet are"]
    return attention_patterns(tasklm, prompts)


def test_patterns_result(patterns, tasklm):
    assert patterns["pattern"].shape[:3] == (2, tasklm.n_layers, tasklm.n_heads)
    assert patterns.tokens(0)[:3] == ["<bos>", "hot", "->"]
    p = patterns.pattern(1, 0, 0)
    assert p.shape == (7, 7) and np.allclose(p.sum(-1), 1, atol=1e-5)
    # the padded tail of the shorter prompt is zero
    assert patterns["pattern"][1, :, :, 7:, :].max() == 0 and patterns["pattern"][1, :, :, :, 7:].max() == 0


def test_figure_builder_is_pure(patterns):
    fig = pattern_heatmap(patterns, prompt=0, layer=1, head=2)
    assert np.allclose(shown(fig.data[0].z), masked_pattern(patterns, 0, 1, 2), atol=6e-5, equal_nan=True)
    assert fig.layout.title.text == "L1H2 attention, prompt 0"


def test_selectors_update_the_traits_and_the_figure_in_place(patterns):
    view = AttentionView(patterns)
    fig_id = id(view.figure)
    heat = view.figure.data[0]
    view.layer_select.value = 1
    view.head_select.value = 3
    assert (view.layer, view.head) == (1, 3)
    assert id(view.figure) == fig_id and view.figure.data[0] is heat
    assert np.allclose(shown(view.figure.data[0].z), masked_pattern(patterns, 0, 1, 3), atol=6e-5, equal_nan=True)
    assert view.figure.layout.title.text == "L1H3 attention, prompt 0"
    view.prompt_select.value = 1
    assert view.prompt == 1
    assert np.asarray(view.figure.data[0].z).shape == (7, 7)
    assert view.query_slider.max == 6 and view.query_slider.value == 6 and view.query == 6
    assert len(view.figure.data[0].x) == 7


def test_traits_set_the_selectors_and_link_views(patterns):
    a, b = AttentionView(patterns), AttentionView(patterns)
    a.head = 2
    assert a.head_select.value == 2 and a.figure.layout.title.text == "L0H2 attention, prompt 0"
    link = W.link((a, "head"), (b, "head"))
    assert b.head == 2
    b.head_select.value = 1  # a click on b's selector moves a
    assert a.head == 1
    assert np.allclose(shown(a.figure.data[0].z), masked_pattern(patterns, 0, 0, 1), atol=6e-5, equal_nan=True)
    link.unlink()
    seen = []
    a.observe(lambda c: seen.append(c["new"]), names="query")
    a.query = 2
    assert seen == [2] and a.query_slider.value == 2 and a.tokens.selected == 2
    with pytest.raises(Exception, match="layer 7 is not shown"):
        a.layer = 7
    with pytest.raises(Exception, match="query"):
        a.query = 99


def test_view_from_a_saved_result_draws_the_same(patterns, tmp_path):
    again = Result.load(patterns.save(tmp_path / "patterns.safetensors"))
    live, saved = AttentionView(patterns, prompt=1, layer=1, head=2), AttentionView(again, prompt=1, layer=1, head=2)
    assert_same_figure(saved.figure, live.figure)
    assert saved.tokens.value == live.tokens.value
    saved.query, live.query = 3, 3
    assert saved.tokens.value == live.tokens.value


def test_clicking_a_row_selects_that_query(patterns):
    view = AttentionView(patterns)
    heat = view.figure.data[0]

    class Points:
        ys = [heat.y[3]]
        xs = [heat.x[1]]

    view._on_click(heat, Points(), None)
    assert view.query == 3 and view.query_slider.value == 3
    assert 'data-pos="3" title="3: ' in view.tokens.value and "outline" in view.tokens.value
    weights = patterns.pattern(0, view.layer, view.head)[3]
    assert f'title="1: {weights[1]:.3f}"' in view.tokens.value


def test_token_text_is_escaped():
    html = tokens_html(["ok", EVIL], [0.2, 0.9])
    assert EVIL not in html and "&lt;img src=x onerror=alert(1)&gt;" in html


def test_tokens_wrap_between_tokens():
    # each token an inline block: a long prompt breaks onto further lines between tokens
    html = tokens_html(["a"] * 41, np.zeros(41), focus=40)
    assert html.count("display:inline-block") == 41 and "white-space:normal" in html.split(">")[0]


def test_causal_mask_is_grey_and_a_bidirectional_pattern_is_not_masked(patterns):
    fig = pattern_heatmap(patterns, prompt=0, layer=0, head=0)
    z = shown(fig.data[0].z)
    assert np.isnan(z[0, 1:]).all() and fig.layout.plot_bgcolor == "#d9d9d9"
    import copy

    bidir = copy.deepcopy(patterns)
    bidir.attrs["causal"] = False
    assert not np.isnan(masked_pattern(bidir, 0, 0, 0)).any()


def test_export_writes_the_view(patterns, tmp_path):
    view = AttentionView(patterns, layer=1, head=2)
    out = view.export_html(tmp_path / "view.html")
    text = out.read_text()
    assert "L1H2 attention, prompt 0" in text and text.count('class="wb-token"') == int(patterns["lengths"][0])
    assert "layer: 1" in text and "head: 2" in text


def test_escaping_through_the_widget(patterns):
    import copy

    p = copy.deepcopy(patterns)
    p.attrs["tokens"][0][1] = EVIL
    view = AttentionView(p)
    assert EVIL not in view.tokens.value
    assert all(EVIL not in str(lbl) for lbl in view.figure.data[0].x)


def test_the_strip_carries_the_pattern_for_hover_highlighting(patterns):
    import html as html_lib
    import json
    import re

    from widgets.common import TokenStrip

    view = AttentionView(patterns, prompt=1, layer=1, head=2)
    assert isinstance(view.tokens, TokenStrip) and "mouseover" in TokenStrip._esm
    raw = re.search(r'data-pattern="([^"]*)"', view.tokens.value).group(1)
    rows = json.loads(html_lib.unescape(raw))
    want = masked_pattern(patterns, 1, 1, 2)[:7, :7]
    assert len(rows) == 7 and all(len(r) == 7 for r in rows)
    assert rows[0][1] is None and rows[6][0] == pytest.approx(float(want[6, 0]), abs=5e-4)
    assert np.allclose(np.array(rows, dtype=float), want, atol=5e-4, equal_nan=True)
