"""AttentionExplorer: which heads do what, and do they matter?

A layer x head grid of the chosen score kind (hover: its 95% interval and the control);
clicking a cell shows that head's pattern on the chosen prompt as a heatmap and as
tokens shaded by attention from the chosen query; "ablate" measures the metric change
from ablating the selected head beside random heads; "attribute" shades the prompt's
tokens by integrated gradients of the model's prediction (captum), under the attention
tokens for comparison. Figures update in place.
"""

from __future__ import annotations

import html

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from widgets.figures import _labels, ablation_bars, pattern_heatmap, score_grid, tokens_html, update_ablation_bars


class AttentionExplorer(W.VBox):
    def __init__(self, subject, prompts, *, kinds=None, metric="loss", ablation_inputs=None, method="zero",
                 n_random: int = 10, n_boot: int = 500, seed: int = 0) -> None:
        from workbench.attention import attention_patterns, head_scores
        from workbench.attention.scores import KINDS

        kinds = list(kinds or [k for k in KINDS if subject.causal or k != "induction"])
        self.subject, self.metric, self.method, self.n_random, self.seed = subject, metric, method, n_random, seed
        self.ablation_inputs = ablation_inputs if ablation_inputs is not None else prompts
        self.scores = head_scores(subject, prompts, kinds=kinds, n_boot=n_boot, seed=seed)
        self.patterns = attention_patterns(subject, prompts)
        self.ablation = None
        layer, head = self.scores.best(kinds[0])
        self.sel = {"layer": layer, "head": head}

        prompts_text = self.patterns.attrs.get("prompts") or [str(i) for i in self.patterns.coord("prompt")]
        self.kind = W.Dropdown(options=kinds, value=kinds[0], description="score")
        self.prompt = W.Dropdown(options=[(f"{i}: {str(p)[:60]}", i) for i, p in enumerate(prompts_text)], value=0,
                                 description="prompt")
        n = int(self.patterns["lengths"][0])
        self.query = W.IntSlider(value=n - 1, min=0, max=n - 1, description="query")
        self.grid = go.FigureWidget(score_grid(self.scores, kinds[0]))
        self.grid.add_scatter(x=[head], y=[layer], mode="markers", marker=dict(symbol="square-open", size=22,
                              color="red", line=dict(width=3)), hoverinfo="skip", showlegend=False)
        self.heatmap = go.FigureWidget(pattern_heatmap(self.patterns, 0, layer, head))
        self.tokens = W.HTML()
        self.ablate_button = W.Button(description="ablate", tooltip="ablate the selected head beside random heads")
        self.ablate_status = W.HTML()
        self.bars = go.FigureWidget(ablation_bars())
        self.attribution = None
        self.attribute_button = W.Button(description="attribute", tooltip="integrated gradients of the prediction")
        self.attribution_html = W.HTML()

        self.grid.data[0].on_click(self._on_cell)
        self.heatmap.data[0].on_click(self._on_row)
        self.kind.observe(self._on_kind, names="value")
        self.prompt.observe(self._on_prompt, names="value")
        self.query.observe(lambda _c: self._retoken(), names="value")
        self.ablate_button.on_click(lambda _b: self.ablate())
        self.attribute_button.on_click(lambda _b: self.attribute())
        super().__init__([
            W.HBox([self.kind, self.prompt]),
            W.HBox([self.grid, self.heatmap]),
            self.query, self.tokens,
            W.HBox([self.attribute_button, self.attribution_html]),
            W.HBox([self.ablate_button, self.ablate_status]), self.bars,
        ])
        self._retoken()

    # ------------------------------------------------------------------ state

    @property
    def selected(self) -> tuple[int, int]:
        return self.sel["layer"], self.sel["head"]

    def select(self, layer: int, head: int) -> None:
        """Show ``layer``/``head`` (what clicking its grid cell does)."""
        self.sel.update(layer=int(layer), head=int(head))
        with self.grid.batch_update():
            self.grid.data[1].x, self.grid.data[1].y = [int(head)], [int(layer)]
        self._redraw_pattern()

    # ------------------------------------------------------------------ callbacks

    def _on_cell(self, trace, points, state) -> None:
        if points.xs:
            self.select(points.ys[0], points.xs[0])

    def _on_row(self, trace, points, state) -> None:
        if points.ys:
            self.query.value = int(str(points.ys[0]).split(":", 1)[0])

    def _on_kind(self, change) -> None:
        kind = change["new"]
        k = self.scores.coord("kind").index(kind)
        with self.grid.batch_update():
            self.grid.data[0].z = self.scores["score"][k]
            self.grid.data[0].customdata = np.stack(
                [self.scores["ci_low"][k], self.scores["ci_high"][k], self.scores["control"][k]], axis=-1)
            self.grid.layout.title.text = f"{kind} score per head"

    def _on_prompt(self, change) -> None:
        n = int(self.patterns["lengths"][change["new"]])
        self.query.max = n - 1
        self.query.value = n - 1
        self._redraw_pattern()

    def _redraw_pattern(self) -> None:
        p, (l, h) = self.prompt.value, self.selected
        labels = _labels(self.patterns.tokens(p))
        with self.heatmap.batch_update():
            self.heatmap.data[0].z = self.patterns.pattern(p, l, h)
            self.heatmap.data[0].x = labels
            self.heatmap.data[0].y = labels
            self.heatmap.layout.title.text = f"L{l}H{h} attention, prompt {p}"
        self._retoken()

    def _retoken(self) -> None:
        p, (l, h), q = self.prompt.value, self.selected, self.query.value
        self.tokens.value = tokens_html(self.patterns.tokens(p), self.patterns.pattern(p, l, h)[q], focus=q)

    def attribute(self):
        """Integrated-gradients attribution of the prediction at the chosen prompt's end."""
        from workbench.attention import token_attribution
        from workbench.attention.attribution import normalised

        prompts = self.patterns.attrs.get("prompts")
        if not prompts:
            self.attribution_html.value = "<i>attribution needs text prompts</i>"
            return None
        self.attribution = token_attribution(self.subject, prompts[self.prompt.value])
        a = self.attribution
        self.attribution_html.value = (
            f"<div>attribution of <b>{html.escape(a.attrs['target'])}</b> "
            f"(log p {a.attrs['logprob']:.2f}, IG delta {a.attrs['delta']:.3f})</div>"
            + tokens_html(a.attrs["tokens"], normalised(a))
        )
        return a

    def ablate(self):
        """Ablate the selected head on ``ablation_inputs`` beside random heads; returns the result."""
        from workbench.attention import ablate_heads

        self.ablate_status.value = "<i>running...</i>"
        try:
            self.ablation = ablate_heads(self.subject, self.ablation_inputs, [self.selected], metric=self.metric,
                                         replacement=self.method, n_random=self.n_random, seed=self.seed)
        except Exception as e:  # shown, not raised: the widget stays usable
            self.ablate_status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            raise
        s = self.ablation.summary
        with self.bars.batch_update():
            update_ablation_bars(self.bars, self.ablation)
        self.ablate_status.value = (
            f"L{self.selected[0]}H{self.selected[1]}: metric {s['base']:.3f} &rarr; {s['ablated']:.3f} "
            f"({s['effect']:+.3f}); random heads {s['control_mean']:+.3f} &plusmn; {s['control_std']:.3f}"
        )
        return self.ablation
