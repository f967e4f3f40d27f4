"""AttentionView: one head's pattern on one prompt, with layer / head / prompt selectors.

A view of an ``AttentionPatterns`` result (saved or fresh). The selection is held in
traits (``prompt``, ``layer``, ``head``, ``query``) that the selectors, clicks and other
widgets can set or observe (``ipywidgets.link``). The heatmap is a plotly
``FigureWidget`` updated in place; clicking a row (or a token of the strip below) picks
that query, whose attention over the prompt shades the tokens.
"""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go
import traitlets

from widgets.common import TokenStrip, member, update_in_place
from widgets.figures.attention import attention_tokens_html, pattern_heatmap


class AttentionView(W.VBox):
    """Interactive view of an ``AttentionPatterns`` result."""

    prompt = traitlets.Int(0, help="the prompt shown (index)")
    layer = traitlets.Int(0, help="the layer of the head shown")
    head = traitlets.Int(0, help="the head shown")
    query = traitlets.Int(0, help="the query position whose attention shades the tokens")

    def __init__(self, patterns, *, prompt: int = 0, layer: int | None = None, head: int | None = None,
                 query: int | None = None) -> None:
        self.patterns = patterns
        layers, heads = patterns.coord("layer"), patterns.coord("head")
        layer = layers[0] if layer is None else layer
        head = heads[0] if head is None else head
        texts = patterns.attrs.get("prompts") or [str(i) for i in patterns.coord("prompt")]
        self.prompt_select = W.Dropdown(options=[(f"{i}: {str(p)[:60]}", i) for i, p in enumerate(texts)],
                                        description="prompt")
        self.layer_select = W.Dropdown(options=layers, description="layer")
        self.head_select = W.Dropdown(options=heads, description="head")
        self.query_slider = W.IntSlider(min=0, max=self._length(prompt) - 1, description="query")
        self.figure = go.FigureWidget(pattern_heatmap(patterns, prompt, layer, head))
        self.tokens = TokenStrip()
        super().__init__([W.HBox([self.prompt_select, self.layer_select, self.head_select]), self.figure,
                          self.query_slider, self.tokens],
                         prompt=prompt, layer=layer, head=head,
                         query=self._length(prompt) - 1 if query is None else query)
        for name, control in (("prompt", self.prompt_select), ("layer", self.layer_select),
                              ("head", self.head_select), ("query", self.query_slider)):
            W.link((self, name), (control, "value"))
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
