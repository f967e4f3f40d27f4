"""AttentionView: one head's pattern on one prompt, with layer / head / prompt selectors.

The heatmap is a plotly ``FigureWidget`` updated in place (``batch_update``) when a
selector moves; clicking a heatmap row picks that query, whose attention over the
prompt is shown as shaded tokens below.
"""

from __future__ import annotations

import ipywidgets as W
import plotly.graph_objects as go

from widgets.figures import _labels, pattern_heatmap, tokens_html


class AttentionView(W.VBox):
    """Interactive view of an ``AttentionPatterns`` result."""

    def __init__(self, patterns, *, prompt: int = 0, layer: int | None = None, head: int = 0) -> None:
        self.patterns = patterns
        layers = patterns.coord("layer")
        heads = patterns.coord("head")
        prompts = patterns.attrs.get("prompts") or [str(i) for i in patterns.coord("prompt")]
        layer = layers[0] if layer is None else layer
        self.prompt = W.Dropdown(
            options=[(f"{i}: {p[:60]}", i) for i, p in enumerate(prompts)], value=prompt, description="prompt"
        )
        self.layer = W.Dropdown(options=layers, value=layer, description="layer")
        self.head = W.Dropdown(options=heads, value=head, description="head")
        n = int(patterns["lengths"][prompt])
        self.query = W.IntSlider(value=n - 1, min=0, max=n - 1, description="query")
        self.figure = go.FigureWidget(pattern_heatmap(patterns, prompt, layer, head))
        self.tokens = W.HTML()
        self.figure.data[0].on_click(self._on_click)
        for w in (self.prompt, self.layer, self.head):
            w.observe(self._redraw, names="value")
        self.query.observe(self._retoken, names="value")
        super().__init__([W.HBox([self.prompt, self.layer, self.head]), self.figure, self.query, self.tokens])
        self._retoken()

    @classmethod
    def from_subject(cls, subject, prompts, **kwargs) -> "AttentionView":
        """Compute the patterns of ``prompts`` on ``subject`` and show them."""
        from workbench.attention import attention_patterns

        return cls(attention_patterns(subject, prompts), **kwargs)

    def current(self):
        """The [query, key] pattern on screen."""
        return self.patterns.pattern(self.prompt.value, self.layer.value, self.head.value)

    def _redraw(self, _change=None) -> None:
        p, l, h = self.prompt.value, self.layer.value, self.head.value
        labels = _labels(self.patterns.tokens(p))
        with self.figure.batch_update():
            self.figure.data[0].z = self.current()
            self.figure.data[0].x = labels
            self.figure.data[0].y = labels
            self.figure.layout.title.text = f"L{l}H{h} attention, prompt {p}"
        n = len(labels)
        self.query.max = n - 1
        if self.query.value > n - 1:
            self.query.value = n - 1
        self._retoken()

    def _retoken(self, _change=None) -> None:
        q = self.query.value
        self.tokens.value = tokens_html(self.patterns.tokens(self.prompt.value), self.current()[q], focus=q)

    def _on_click(self, trace, points, state) -> None:
        if points.ys:
            self.query.value = int(str(points.ys[0]).split(":", 1)[0])
