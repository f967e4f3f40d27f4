"""AttentionView: one head's pattern on one prompt, with layer / head / prompt selectors.

A view of an ``AttentionPatterns`` result (saved or fresh). The selection is held in
traits (``prompt``, ``layer``, ``head``, ``query``) that the selectors, clicks and other
widgets can set or observe (``ipywidgets.link``). The heatmap is a plotly
``FigureWidget`` updated in place; clicking a row (or a token of the strip below) picks
that query, whose attention over the prompt shades the tokens (hover a token to shade
them by its attention instead; they wrap onto further lines on long prompts). In a causal
model the keys a query cannot see are grey, not zero. :meth:`AttentionView.export_html` writes the
view as one standalone HTML file.
"""

from __future__ import annotations

import ipywidgets as W
import traitlets

from widgets.common import (
    TokenStrip, controls_row, full_label, member, responsive_figure, update_in_place, wrap_box,
)
from widgets.export import export_controls
from widgets.export import export_html as write_html
from widgets.figures.attention import attention_tokens_html, pattern_heatmap


class HeadSelection(traitlets.HasTraits):
    """The selection shared by the attention widgets, as traits over ``self.patterns`` (an
    ``AttentionPatterns`` result): prompt, layer, head and query, each checked against what
    the patterns hold."""

    prompt = traitlets.Int(0, help="the prompt shown (index)")
    layer = traitlets.Int(0, help="the layer of the head shown")
    head = traitlets.Int(0, help="the head shown")
    query = traitlets.Int(0, help="the query position whose attention shades the tokens")

    def _length(self, prompt: int) -> int:
        return int(self.patterns["lengths"][prompt])

    @traitlets.validate("prompt")
    def _valid_prompt(self, proposal):
        return member(proposal, list(range(len(self.patterns.coord("prompt")))), "prompt")

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        return member(proposal, self.patterns.coord("layer"), "layer")

    @traitlets.validate("head")
    def _valid_head(self, proposal):
        return member(proposal, self.patterns.coord("head"), "head")

    @traitlets.validate("query")
    def _valid_query(self, proposal):
        return member(proposal, list(range(self._length(self.prompt))), "query")


class AttentionView(HeadSelection, W.VBox):
    """Interactive view of an ``AttentionPatterns`` result."""


    def __init__(self, patterns, *, prompt: int = 0, layer: int | None = None, head: int | None = None,
                 query: int | None = None) -> None:
        self.patterns = patterns
        layers, heads = patterns.coord("layer"), patterns.coord("head")
        layer = layers[0] if layer is None else layer
        head = heads[0] if head is None else head
        texts = patterns.attrs.get("prompts") or [str(i) for i in patterns.coord("prompt")]
        self.prompt_select = full_label(W.Dropdown(
            options=[(f"{i}: {str(p)[:80]}", i) for i, p in enumerate(texts)], description="prompt",
            layout=W.Layout(width="auto", max_width="100%")))
        self.layer_select = full_label(W.Dropdown(options=layers, description="layer", layout=W.Layout(width="auto")))
        self.head_select = full_label(W.Dropdown(options=heads, description="head", layout=W.Layout(width="auto")))
        self.query_slider = full_label(W.IntSlider(min=0, max=self._length(prompt) - 1, description="query position",
                                                   layout=W.Layout(width="auto", min_width="320px")))
        self.figure = responsive_figure(pattern_heatmap(patterns, prompt, layer, head))
        self.tokens = TokenStrip(layout=W.Layout(width="100%", max_width="100%"))
        self.export_box = export_controls(self, "attention_view.html")
        super().__init__([controls_row([self.prompt_select, self.layer_select, self.head_select]),
                          wrap_box([self.figure]), self.query_slider, self.tokens, self.export_box],
                         prompt=prompt, layer=layer, head=head,
                         query=self._length(prompt) - 1 if query is None else query, layout=W.Layout(width="100%"))
        for name, control in (("prompt", self.prompt_select), ("layer", self.layer_select),
                              ("head", self.head_select), ("query", self.query_slider)):
            W.link((self, name), (control, "value"))
        self.add_class("wb-attention-view")  # a stable handle for page tests and styles
        W.link((self, "query"), (self.tokens, "selected"))
        self.figure.data[0].on_click(self._on_click)
        self.observe(self._redraw, names=["prompt", "layer", "head"])
        self.observe(self._retoken, names="query")
        self._retoken()

    @classmethod
    def from_subject(cls, subject, prompts, **kwargs) -> "AttentionView":
        """Compute the patterns of ``prompts`` on ``subject`` and show them."""
        from workbench.attention import attention_patterns

        return cls(attention_patterns(subject, prompts), **kwargs)

    # ------------------------------------------------------------------ traits

    # ------------------------------------------------------------------ drawing

    def current(self):
        """The [query, key] pattern on screen."""
        return self.patterns.pattern(self.prompt, self.layer, self.head)

    def _redraw(self, _change=None) -> None:
        update_in_place(self.figure, pattern_heatmap(self.patterns, self.prompt, self.layer, self.head))
        n = self._length(self.prompt)
        if self.query > n - 1:
            self.query = n - 1
        self.query_slider.max = n - 1
        self._retoken()

    def _retoken(self, _change=None) -> None:
        self.tokens.value = attention_tokens_html(self.patterns, self.prompt, self.layer, self.head, self.query)

    def _on_click(self, trace, points, state) -> None:
        if points.ys:
            self.query = int(str(points.ys[0]).split(":", 1)[0])

    def export_html(self, path):
        """Write the current view (the pattern with plotly.js inlined, tokens inline, the
        selection as text) to one standalone HTML file."""
        return write_html(self, path, title="AttentionView")
