"""AttentionExplorer: which heads do what, and do they matter?

A view of a ``HeadScores`` result and an ``AttentionPatterns`` result (saved or fresh): a
layer x head grid of the chosen score kind (hover: its 95% interval and the control);
clicking a cell shows that head's pattern on the chosen prompt as a heatmap (in a causal
model the masked keys are grey, not zero) and as tokens shaded by attention from the
chosen query (click a row or a token to pick it); below, every head's pattern on the
prompt as thumbnails (click one to select it). The selection is held in traits
(``kind``, ``layer``, ``head``, ``prompt``, ``query``) that other widgets can link to.
Choosing a score kind moves the selection to that kind's top head.

With a Subject, "ablate" measures the change of the metric (named on screen; default
``loss``, the mean next-token loss) on the selected prompt from ablating the selected
head, beside random heads, and "attribute" shades the selected prompt's tokens by
integrated gradients of the model's prediction (captum); both say "working..." while
they run. Their results describe one selection: when the prompt (or, for the ablation,
the head) changes they leave the screen, and come back when that selection does.
Without a model both are off and say why, and a saved ``HeadAblation`` /
``TokenAttribution`` of the opening selection can be shown instead. Figures update in
place; :meth:`AttentionExplorer.export_html` writes the view as one standalone HTML file.
"""

from __future__ import annotations

import html

import ipywidgets as W
import traitlets

from widgets.common import (
    TokenStrip, controls_row, full_label, member, needs, reason_html, responsive_figure, run_busy, update_in_place,
    wrap_box,
)
from widgets.attention_view import HeadSelection
from widgets.export import export_controls
from widgets.export import export_html as write_html
from widgets.figures.attention import (
    ablation_bars, ablation_text, attention_tokens_html, attribution_html, heads_overview, overview_head, overview_outline,
    pattern_heatmap, score_grid,
)

NO_MODEL = "a model: build the explorer with subject=... (or AttentionExplorer.from_subject)"


def metric_name(metric) -> str:
    """How a metric is named on screen: its string, else its function's name."""
    if isinstance(metric, str):
        return metric
    inner = getattr(metric, "func", metric)  # functools.partial
    return str(getattr(inner, "__name__", type(metric).__name__))


class AttentionExplorer(HeadSelection, W.VBox):
    kind = traitlets.Unicode(help="the score kind on the grid")

    def __init__(self, scores, patterns, *, subject=None, ablation=None, attribution=None, metric="loss",
                 replacement: str = "zero", n_random: int = 10, seed: int = 0, kind: str | None = None,
                 layer: int | None = None, head: int | None = None, prompt: int = 0) -> None:
        self.scores, self.patterns = scores, patterns
        self.subject, self.metric, self.replacement = subject, metric, replacement
        self.n_random, self.seed = n_random, seed
        self.texts = patterns.attrs.get("prompts") or [str(i) for i in patterns.coord("prompt")]
        kinds = scores.coord("kind")
        kind = kinds[0] if kind is None else kind
        if layer is None or head is None:
            layer, head = scores.best(kind)
        # results by the selection they describe: ablations by (prompt, layer, head), attributions by prompt
        self._ablations: dict[tuple[int, int, int], object] = {}
        self._bars_shown = None  # (the ablation drawn, where) on the bars now
        self._attributions: dict[int, object] = {}
        if ablation is not None:
            l0, h0 = ablation.attrs["heads"][0]
            self._ablations[(prompt, int(l0), int(h0))] = ablation
        if attribution is not None:
            text = attribution.attrs.get("prompt")
            self._attributions[self.texts.index(text) if text in self.texts else prompt] = attribution
        n = int(patterns["lengths"][prompt])
        self.kind_select = full_label(W.Dropdown(options=kinds, description="score", layout=W.Layout(width="auto")))
        self.prompt_select = full_label(W.Dropdown(
            options=[(f"{i}: {str(p)[:80]}", i) for i, p in enumerate(self.texts)], description="prompt",
            layout=W.Layout(width="auto", max_width="100%")))
        self.query_slider = full_label(W.IntSlider(min=0, max=n - 1, description="query position",
                                                   layout=W.Layout(width="auto", min_width="320px")))
        self.grid = responsive_figure(score_grid(scores, kind, (layer, head)))
        self.heatmap = responsive_figure(pattern_heatmap(patterns, prompt, layer, head))
        self.overview = responsive_figure(heads_overview(patterns, prompt, (layer, head)))
        self.tokens = TokenStrip(layout=W.Layout(width="100%", max_width="100%"))
        self.ablate_button = W.Button(description="ablate", tooltip="ablate the selected head beside random heads",
                                      layout=W.Layout(width="auto"))
        self.ablate_status = W.HTML()
        # built with what it shows first (an update sent before the front end has loaded plotly's widget
        # code is lost there): the saved ablation of the opening selection, if any
        self.bars = responsive_figure(ablation_bars(self._ablations.get((prompt, layer, head)),
                                                    metric=metric_name(metric), where=f"prompt {prompt}"))
        self.attribute_button = W.Button(description="attribute", layout=W.Layout(width="auto"),
                                         tooltip="integrated gradients of the prediction at the prompt's end")
        self.attribution_html = W.HTML(layout=W.Layout(width="100%"))
        self.reason = W.HTML()
        self.export_box = export_controls(self, "attention_explorer.html")
        super().__init__([
            controls_row([self.kind_select, self.prompt_select]),
            wrap_box([self.grid, self.heatmap]),
            self.query_slider, self.tokens,
            controls_row([self.attribute_button]), self.attribution_html,
            controls_row([self.ablate_button, self.ablate_status]), wrap_box([self.bars]), self.reason,
            wrap_box([self.overview], min_width=600),
            self.export_box,
        ], kind=kind, layer=layer, head=head, prompt=prompt, query=n - 1, layout=W.Layout(width="100%"))
        self.add_class("wb-attention-explorer")  # a stable handle for page tests and styles
        W.link((self, "kind"), (self.kind_select, "value"))
        W.link((self, "prompt"), (self.prompt_select, "value"))
        W.link((self, "query"), (self.query_slider, "value"))
        W.link((self, "query"), (self.tokens, "selected"))
        self.grid.data[0].on_click(self._on_cell)
        self.heatmap.data[0].on_click(self._on_row)
        self.overview.data[0].on_click(self._on_thumbnail)
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
        self._retoken()
        self._show_results(draw=False)

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

    @property
    def selected(self) -> tuple[int, int]:
        return self.layer, self.head

    def select(self, layer: int, head: int) -> None:
        """Show ``layer``/``head`` (what clicking its grid cell does)."""
        with self.hold_trait_notifications():
            self.layer, self.head = int(layer), int(head)

    @property
    def ablation(self):
        """The ``HeadAblation`` of the selected head on the selected prompt (None before
        "ablate" has run on this selection)."""
        return self._ablations.get((self.prompt, self.layer, self.head))

    @property
    def attribution(self):
        """The ``TokenAttribution`` of the selected prompt (None before "attribute")."""
        return self._attributions.get(self.prompt)

    # ------------------------------------------------------------------ callbacks

    def _on_cell(self, trace, points, state) -> None:
        if points.xs:
            self.select(points.ys[0], points.xs[0])

    def _on_thumbnail(self, trace, points, state) -> None:
        if points.xs:
            hit = overview_head(self.patterns, self.prompt, points.xs[0], points.ys[0])
            if hit is not None:
                self.select(*hit)

    def _on_row(self, trace, points, state) -> None:
        if points.ys:
            self.query = int(str(points.ys[0]).split(":", 1)[0])

    def _on_kind(self, _change=None) -> None:
        best = self.scores.best(self.kind)
        if best != self.selected:
            self.select(*best)  # redraws the grid (and the pattern) for the new kind
        else:
            update_in_place(self.grid, score_grid(self.scores, self.kind, self.selected))

    def _on_head(self, _change=None) -> None:
        update_in_place(self.grid, score_grid(self.scores, self.kind, self.selected))
        update_in_place(self.heatmap, pattern_heatmap(self.patterns, self.prompt, self.layer, self.head))
        # only the outline moves on the overview (its thumbnails stay)
        self.overview.layout.shapes = overview_outline(self.patterns, self.prompt, self.selected)
        self._retoken()
        self._show_results()

    def _on_prompt(self, _change=None) -> None:
        n = int(self.patterns["lengths"][self.prompt])
        self.query_slider.max = max(self.query_slider.max, n - 1)
        self.query = n - 1
        self.query_slider.max = n - 1
        self._redraw_pattern()
        update_in_place(self.overview, heads_overview(self.patterns, self.prompt, self.selected))
        self._show_results()

    def _redraw_pattern(self) -> None:
        update_in_place(self.heatmap, pattern_heatmap(self.patterns, self.prompt, self.layer, self.head))
        self._retoken()

    def _retoken(self) -> None:
        self.tokens.value = attention_tokens_html(self.patterns, self.prompt, self.layer, self.head, self.query)

    def _where(self) -> str:
        return f"prompt {self.prompt}"

    def _show_results(self, draw: bool = True) -> None:
        """Show the ablation and attribution of the current selection, or say how to get them
        (a result of another selection never stays on screen); ``draw``: redraw the bars."""
        name = metric_name(self.metric)
        where = self._where()
        self.ablate_button.description = f"ablate L{self.layer}H{self.head} on {where}"
        self.attribute_button.description = f"attribute {where}"
        ablation = self.ablation
        shown = (id(ablation) if ablation is not None else None, where)
        if draw and shown != self._bars_shown:  # only when it would draw something else
            update_in_place(self.bars, ablation_bars(ablation, metric=name, where=where))
        self._bars_shown = shown
        if ablation is not None:
            self.ablate_status.value = ablation_text(ablation, metric=name, where=where)
        elif self.subject is not None:
            self.ablate_status.value = (f"<small>metric: <b>{html.escape(name)}</b>; press ablate to measure "
                                        f"L{self.layer}H{self.head} on {where} beside {self.n_random} random heads"
                                        "</small>")
        else:
            self.ablate_status.value = f"<small>metric: <b>{html.escape(name)}</b></small>"
        attribution = self.attribution
        self.attribution_html.value = attribution_html(attribution) if attribution is not None else ""

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
            self.attribution_html.value = reason_html("attribution needs text prompts")
            return None
        prompt = self.prompt
        self._attributions[prompt] = run_busy(self.attribution_html, self.attribute_button,
                                              f"integrated gradients of prompt {prompt}",
                                              lambda: token_attribution(self.subject, prompts[prompt]))
        self._show_results()
        return self._attributions[prompt]

    def ablate(self):
        """Ablate the selected head on the selected prompt beside ``n_random`` random heads,
        measuring ``metric``; returns the ``HeadAblation``."""
        from workbench.attention import ablate_heads

        if self._offline(self.ablate_status, "ablate"):
            return None
        key = (self.prompt, self.layer, self.head)
        prompts = self.patterns.attrs.get("prompts")
        if not prompts:
            self.ablate_status.value = reason_html("ablation needs text prompts")
            return None
        self._ablations[key] = run_busy(
            self.ablate_status, self.ablate_button, f"L{self.layer}H{self.head} and {self.n_random} random draws",
            lambda: ablate_heads(self.subject, [prompts[self.prompt]], [self.selected], metric=self.metric,
                                 replacement=self.replacement, n_random=self.n_random, seed=self.seed))
        self._show_results()
        return self._ablations[key]

    def export_html(self, path):
        """Write the current view (figures with plotly.js inlined, tokens inline, the
        selection as text) to one standalone HTML file."""
        return write_html(self, path, title="AttentionExplorer")

