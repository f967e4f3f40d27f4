"""AttentionExplorer: which heads do what, and do they matter?

A view of a ``HeadScores`` result and an ``AttentionPatterns`` result (saved or fresh): a
layer x head grid of the chosen score kind (hover: its 95% interval and the control);
clicking a cell shows that head's pattern on the chosen prompt as a heatmap and as tokens
shaded by attention from the chosen query (click a row or a token to pick it). The
selection is held in traits (``kind``, ``layer``, ``head``, ``prompt``, ``query``) that
other widgets can link to.

With a Subject, "ablate" measures the metric change from ablating the selected head
beside random heads, and "attribute" shades the prompt's tokens by integrated gradients
of the model's prediction (captum); without one, both are off and say why, and a saved
``HeadAblation`` / ``TokenAttribution`` can be shown instead. Figures update in place.
"""

from __future__ import annotations

import html

import ipywidgets as W
import plotly.graph_objects as go
import traitlets

from widgets.common import TokenStrip, member, needs, reason_html, update_in_place
from widgets.figures.attention import (
    ablation_bars, ablation_text, attention_tokens_html, attribution_html, pattern_heatmap, score_grid,
)

NO_MODEL = "a model: build the explorer with subject=... (or AttentionExplorer.from_subject)"


class AttentionExplorer(W.VBox):
    kind = traitlets.Unicode(help="the score kind on the grid")
    layer = traitlets.Int(help="the selected head's layer")
    head = traitlets.Int(help="the selected head")
    prompt = traitlets.Int(0, help="the prompt whose pattern is shown (index)")
    query = traitlets.Int(0, help="the query position whose attention shades the tokens")

    def __init__(self, scores, patterns, *, subject=None, ablation=None, attribution=None, ablation_prompts=None,
                 metric="loss", replacement: str = "zero", n_random: int = 10, seed: int = 0, kind: str | None = None,
                 layer: int | None = None, head: int | None = None, prompt: int = 0) -> None:
        self.scores, self.patterns = scores, patterns
        self.subject, self.metric, self.replacement = subject, metric, replacement
        self.n_random, self.seed = n_random, seed
        self.ablation_prompts = ablation_prompts if ablation_prompts is not None else patterns.attrs.get("prompts")
        self.ablation, self.attribution = ablation, attribution
        kinds = scores.coord("kind")
        kind = kinds[0] if kind is None else kind
        if layer is None or head is None:
            layer, head = scores.best(kind)
        texts = patterns.attrs.get("prompts") or [str(i) for i in patterns.coord("prompt")]
        n = int(patterns["lengths"][prompt])
        self.kind_select = W.Dropdown(options=kinds, description="score")
        self.prompt_select = W.Dropdown(options=[(f"{i}: {str(p)[:60]}", i) for i, p in enumerate(texts)],
                                        description="prompt")
        self.query_slider = W.IntSlider(min=0, max=n - 1, description="query")
        self.grid = go.FigureWidget(score_grid(scores, kind, (layer, head)))
        self.heatmap = go.FigureWidget(pattern_heatmap(patterns, prompt, layer, head))
        self.tokens = TokenStrip()
        self.ablate_button = W.Button(description="ablate", tooltip="ablate the selected head beside random heads")
        self.ablate_status = W.HTML()
        self.bars = go.FigureWidget(ablation_bars(ablation))
        self.attribute_button = W.Button(description="attribute", tooltip="integrated gradients of the prediction")
        self.attribution_html = W.HTML()
        self.reason = W.HTML()
        super().__init__([
            W.HBox([self.kind_select, self.prompt_select]),
            W.HBox([self.grid, self.heatmap]),
            self.query_slider, self.tokens,
            W.HBox([self.attribute_button, self.attribution_html]),
            W.HBox([self.ablate_button, self.ablate_status]), self.bars, self.reason,
        ], kind=kind, layer=layer, head=head, prompt=prompt, query=n - 1)
        W.link((self, "kind"), (self.kind_select, "value"))
        W.link((self, "prompt"), (self.prompt_select, "value"))
        W.link((self, "query"), (self.query_slider, "value"))
        W.link((self, "query"), (self.tokens, "selected"))
        self.grid.data[0].on_click(self._on_cell)
        self.heatmap.data[0].on_click(self._on_row)
        self.observe(self._on_kind, names="kind")
        self.observe(self._on_head, names=["layer", "head"])
        self.observe(self._on_prompt, names="prompt")
        self.observe(lambda _c: self._retoken(), names="query")
        self.ablate_button.on_click(lambda _b: self.ablate())
        self.attribute_button.on_click(lambda _b: self.attribute())
        offline = None if subject is not None else f"ablate and attribute need {NO_MODEL}"
        needs(self.ablate_button, offline)
        needs(self.attribute_button, offline)
        self.reason.value = reason_html(offline)
        if ablation is not None:
            self.ablate_status.value = ablation_text(ablation)
        if attribution is not None:
            self.attribution_html.value = attribution_html(attribution)
        self._retoken()

    @classmethod
    def from_subject(cls, subject, prompts, *, kinds=None, n_boot: int = 500, seed: int = 0,
                     **kwargs) -> "AttentionExplorer":
        """Score every head of ``subject`` on ``prompts`` (``head_scores``; default kinds:
        all that apply) and take their patterns (``attention_patterns``); ablate and
        attribute run on ``subject``."""
        from workbench.attention import attention_patterns, head_scores
        from workbench.attention.scores import KINDS

        kinds = list(kinds or [k for k in KINDS if subject.causal or k != "induction"])
        scores = head_scores(subject, prompts, kinds=kinds, n_boot=n_boot, seed=seed)
        return cls(scores, attention_patterns(subject, prompts), subject=subject, seed=seed, **kwargs)

    # ------------------------------------------------------------------ traits

    @traitlets.validate("kind")
    def _valid_kind(self, proposal):
        return member(proposal, self.scores.coord("kind"), "score kind")

    @traitlets.validate("layer")
    def _valid_layer(self, proposal):
        return member(proposal, self.patterns.coord("layer"), "layer")

    @traitlets.validate("head")
    def _valid_head(self, proposal):
        return member(proposal, self.patterns.coord("head"), "head")

    @traitlets.validate("prompt")
    def _valid_prompt(self, proposal):
        return member(proposal, list(range(len(self.patterns.coord("prompt")))), "prompt")

    @traitlets.validate("query")
    def _valid_query(self, proposal):
        return member(proposal, list(range(int(self.patterns["lengths"][self.prompt]))), "query")

    @property
    def selected(self) -> tuple[int, int]:
        return self.layer, self.head

    def select(self, layer: int, head: int) -> None:
        """Show ``layer``/``head`` (what clicking its grid cell does)."""
        with self.hold_trait_notifications():
            self.layer, self.head = int(layer), int(head)

    # ------------------------------------------------------------------ callbacks

    def _on_cell(self, trace, points, state) -> None:
        if points.xs:
            self.select(points.ys[0], points.xs[0])

    def _on_row(self, trace, points, state) -> None:
        if points.ys:
            self.query = int(str(points.ys[0]).split(":", 1)[0])

    def _on_kind(self, _change=None) -> None:
        update_in_place(self.grid, score_grid(self.scores, self.kind, self.selected))

    def _on_head(self, _change=None) -> None:
        update_in_place(self.grid, score_grid(self.scores, self.kind, self.selected))
        self._redraw_pattern()

    def _on_prompt(self, _change=None) -> None:
        n = int(self.patterns["lengths"][self.prompt])
        self.query_slider.max = max(self.query_slider.max, n - 1)
        self.query = n - 1
        self.query_slider.max = n - 1
        self._redraw_pattern()

    def _redraw_pattern(self) -> None:
        update_in_place(self.heatmap, pattern_heatmap(self.patterns, self.prompt, self.layer, self.head))
        self._retoken()

    def _retoken(self) -> None:
        self.tokens.value = attention_tokens_html(self.patterns, self.prompt, self.layer, self.head, self.query)

    # ------------------------------------------------------------------ actions (need the model)

    def _offline(self, status: W.HTML, what: str) -> bool:
        if self.subject is None:
            status.value = reason_html(f"{what} needs {NO_MODEL}")
            return True
        return False

    def attribute(self):
        """Integrated-gradients attribution of the prediction at the chosen prompt's end."""
        from workbench.attention import token_attribution

        if self._offline(self.attribution_html, "attribute"):
            return None
        prompts = self.patterns.attrs.get("prompts")
        if not prompts:
            self.attribution_html.value = "<i>attribution needs text prompts</i>"
            return None
        self.attribution = token_attribution(self.subject, prompts[self.prompt])
        self.attribution_html.value = attribution_html(self.attribution)
        return self.attribution

    def ablate(self):
        """Ablate the selected head on ``ablation_prompts`` (default: the patterns' prompts)
        beside random heads; returns the ``HeadAblation``."""
        from workbench.attention import ablate_heads

        if self._offline(self.ablate_status, "ablate"):
            return None
        self.ablate_status.value = "<i>running...</i>"
        try:
            self.ablation = ablate_heads(self.subject, self.ablation_prompts, [self.selected], metric=self.metric,
                                         replacement=self.replacement, n_random=self.n_random, seed=self.seed)
        except Exception as e:  # shown, not raised: the widget stays usable
            self.ablate_status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            raise
        update_in_place(self.bars, ablation_bars(self.ablation))
        self.ablate_status.value = ablation_text(self.ablation)
        return self.ablation
