"""TaskVectorLab: merge task vectors with live per-task accuracy, and build function vectors
head by head.

Weight side: one coefficient slider per task vector, a method selector with its
parameters (lam, TIES density, DARE p and seed); every move re-merges and re-scores
through a cached :class:`~workbench.taskvec.finetune.MergeEvaluator` and updates the
per-task accuracy bars in place. The cosine heatmap of the task vectors sits beside.

Activation side: for the chosen task, the heads' indirect-effect heatmap (click a head to
add it to or remove it from the function vector; selected heads are marked), a top-k
slider that selects the k strongest heads, and the layer sweep: zero-shot accuracy with
the vector added at each layer, against the unpatched baseline.
"""

from __future__ import annotations

import html
import time
from typing import Mapping

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go

from workbench.taskvec import METHODS, TaskVector, diagnose


def merge_bars(tasks, merged, finetuned=None, title="merged model: zero-shot accuracy per task") -> go.Figure:
    """Per-task accuracy bars of a merge (and of each fine-tuned model, when given)."""
    labels = [html.escape(t) for t in tasks]
    data = [go.Bar(x=labels, y=list(merged), name="merged", marker_color="#1f77b4")]
    if finetuned is not None:
        data.append(go.Bar(x=labels, y=list(finetuned), name="fine-tuned", marker_color="#c7c7c7"))
    fig = go.Figure(data)
    fig.update_layout(title=title, yaxis_range=[0, 1.05], barmode="group", height=340,
                      margin=dict(l=10, r=10, t=40, b=10), yaxis_title="accuracy")
    return fig


def cosine_heatmap(diag) -> go.Figure:
    """Whole-model cosine between task vectors (a TaskVectorDiagnostics result)."""
    names = [html.escape(t) for t in diag.coord("task")]
    fig = go.Figure(go.Heatmap(z=diag["cosine"], x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu",
                               hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>"))
    fig.update_layout(title="task-vector cosine", height=340, margin=dict(l=10, r=10, t=40, b=10),
                      yaxis_autorange="reversed")
    return fig


def ie_heatmap(fv, selected=()) -> go.Figure:
    """Indirect effect of each head [layer, head], selected heads marked."""
    ie = fv["indirect_effect"]
    lim = float(np.abs(ie).max()) or 1.0
    fig = go.Figure([
        go.Heatmap(z=ie, x=fv.coord("head"), y=fv.coord("layer"), zmin=-lim, zmax=lim, colorscale="RdBu",
                   hovertemplate="L%{y}H%{x}: %{z:.4f}<extra></extra>"),
        go.Scatter(x=[h for _, h in selected], y=[l for l, _ in selected], mode="markers",
                   marker=dict(symbol="x", size=14, color="black"), name="in vector", hoverinfo="skip"),
    ])
    fig.update_layout(title=f"indirect effect per head ({html.escape(fv.task)})", xaxis_title="head",
                      yaxis_title="layer", height=340, margin=dict(l=10, r=10, t=40, b=10), showlegend=False)
    return fig


class TaskVectorLab(W.VBox):
    """Live task-vector lab. ``evaluator``: a MergeEvaluator; ``fvs``: {task: FunctionVector}
    (optional; enables the activation side)."""

    def __init__(self, evaluator, fvs: Mapping[str, object] | None = None, *, diagnostics=None,
                 coefficient: float = 0.3, n_sweep: int = 64) -> None:
        self.ev = evaluator
        self.fvs = dict(fvs or {})
        names = evaluator.names
        self.sliders = {n: W.FloatSlider(value=coefficient, min=-1.5, max=1.5, step=0.05, description=n[:14],
                                         continuous_update=False) for n in names}
        self.method = W.Dropdown(options=list(METHODS), value="task_arithmetic", description="method")
        self.lam = W.FloatSlider(value=1.0, min=0.0, max=2.0, step=0.05, description="lam", continuous_update=False)
        self.density = W.FloatSlider(value=0.2, min=0.01, max=1.0, step=0.01, description="density",
                                     continuous_update=False)
        self.p = W.FloatSlider(value=0.5, min=0.0, max=0.95, step=0.05, description="DARE p", continuous_update=False)
        self.seed = W.IntText(value=0, description="seed")
        self.status = W.HTML()
        self.finetuned = {n: evaluator.single(n)[n] if n in evaluator.tasks else None for n in names}
        ft = [self.finetuned.get(t) for t in evaluator.tasks]
        self.bars = go.FigureWidget(merge_bars(evaluator.tasks, [0.0] * len(evaluator.tasks),
                                               ft if all(v is not None for v in ft) else None))
        if diagnostics is None:
            tvs = [TaskVector.from_deltas(evaluator.dense[n], name=n) for n in names]
            diagnostics = diagnose(tvs, names=names, densities=(0.2,))
        self.diagnostics = diagnostics
        self.cosine = go.FigureWidget(cosine_heatmap(diagnostics))
        self.last_update_s = 0.0
        for w in [*self.sliders.values(), self.method, self.lam, self.density, self.p, self.seed]:
            w.observe(self._remerge, names="value")
        weight_side = W.VBox([
            W.HTML("<b>Weight space</b>: coefficients per task vector"),
            W.HBox([W.VBox(list(self.sliders.values())),
                    W.VBox([self.method, self.lam, self.density, self.p, self.seed, self.status])]),
            W.HBox([self.bars, self.cosine]),
        ])
        children = [weight_side]
        if self.fvs:
            tasks = list(self.fvs)
            first = self.fvs[tasks[0]]
            n_heads = len(first.coord("layer")) * len(first.coord("head"))
            self.task = W.Dropdown(options=tasks, value=tasks[0], description="task")
            self.topk = W.IntSlider(value=min(2, n_heads), min=0, max=n_heads, description="top k",
                                    continuous_update=False)
            self.heads_label = W.HTML()
            self.selected: list[tuple[int, int]] = list(first.top_heads(self.topk.value))
            self.heatmap = go.FigureWidget(ie_heatmap(first, self.selected))
            self.heatmap.data[0].on_click(self._on_head_click)
            self.sweep = go.FigureWidget(go.Figure([
                go.Bar(x=[], y=[], name="with vector", marker_color="#2ca02c"),
                go.Scatter(x=[], y=[], mode="lines", name="zero-shot", line=dict(dash="dash", color="black")),
            ]))
            self.sweep.update_layout(title="layer sweep", xaxis_title="layer (vector added to resid_pre)",
                                     yaxis_title="accuracy", yaxis_range=[0, 1.05], height=340,
                                     margin=dict(l=10, r=10, t=40, b=10))
            self._batches = {}
            self.n_sweep = n_sweep
            self.task.observe(self._new_task, names="value")
            self.topk.observe(self._topk, names="value")
            children.append(W.VBox([
                W.HTML("<b>Activation space</b>: function vector from selected heads (click a head to toggle it)"),
                W.HBox([self.task, self.topk]), self.heads_label, W.HBox([self.heatmap, self.sweep]),
            ]))
            self._resweep()
        super().__init__(children)
        self._remerge()

    # -------------------------------------------------------------- weight side

    def coefficients(self) -> list[float]:
        return [self.sliders[n].value for n in self.ev.names]

    def current_accuracy(self) -> dict[str, float]:
        kw = dict(lam=self.lam.value)
        if self.method.value == "ties":
            kw["density"] = self.density.value
        if self.method.value in ("dare", "dare_ties"):
            kw.update(p=self.p.value, seed=int(self.seed.value))
        return self.ev.accuracy(self.method.value, self.coefficients(), **kw)

    def _remerge(self, _change=None) -> None:
        start = time.perf_counter()
        self.density.disabled = self.method.value != "ties"
        self.p.disabled = self.seed.disabled = self.method.value not in ("dare", "dare_ties")
        acc = self.current_accuracy()
        with self.bars.batch_update():
            self.bars.data[0].y = [acc[t] for t in self.ev.tasks]
            self.bars.layout.title.text = (f"{self.method.value} merge: mean zero-shot accuracy "
                                           f"{np.mean(list(acc.values())):.2f}")
        self.last_update_s = time.perf_counter() - start
        self.status.value = f"<small>re-merged and scored in {self.last_update_s * 1000:.0f} ms</small>"

    # -------------------------------------------------------------- activation side

    @property
    def fv(self):
        return self.fvs[self.task.value]

    def _zero_shot(self):
        from workbench.taskvec.activations import zero_shot_batch

        t = self.task.value
        if t not in self._batches:
            self._batches[t] = zero_shot_batch(self.ev.subject, t, self.n_sweep)
        return self._batches[t]

    def layer_accuracy(self) -> tuple[list[float], float]:
        """Accuracy with the selected heads' vector added at each layer, and the baseline."""
        import torch

        from workbench.taskvec.activations import add_vector_accuracy

        b, answers = self._zero_shot()
        subject = self.ev.subject
        vec = self.fv.vector(heads=self.selected) if self.selected else torch.zeros(subject.d_model)
        base = add_vector_accuracy(subject, b, answers, torch.zeros(subject.d_model), 0)
        return [add_vector_accuracy(subject, b, answers, vec, l) for l in range(subject.n_layers)], base

    def _resweep(self) -> None:
        acc, base = self.layer_accuracy()
        layers = list(range(len(acc)))
        with self.heatmap.batch_update():
            self.heatmap.data[1].x = [h for _, h in self.selected]
            self.heatmap.data[1].y = [l for l, _ in self.selected]
        with self.sweep.batch_update():
            self.sweep.data[0].x = layers
            self.sweep.data[0].y = acc
            self.sweep.data[1].x = [-0.5, len(layers) - 0.5]
            self.sweep.data[1].y = [base, base]
            self.sweep.layout.title.text = f"layer sweep: {len(self.selected)} heads ({html.escape(self.task.value)})"
        self.heads_label.value = "heads in vector: " + (", ".join(f"L{l}H{h}" for l, h in self.selected) or "none")

    def toggle_head(self, layer: int, head: int) -> None:
        key = (int(layer), int(head))
        self.selected = [x for x in self.selected if x != key] if key in self.selected else self.selected + [key]
        self._resweep()

    def _on_head_click(self, trace, points, state) -> None:
        if points.xs:
            self.toggle_head(points.ys[0], points.xs[0])

    def _topk(self, _change=None) -> None:
        self.selected = list(self.fv.top_heads(self.topk.value))
        self._resweep()

    def _new_task(self, _change=None) -> None:
        fv = self.fv
        with self.heatmap.batch_update():
            self.heatmap.data[0].z = fv["indirect_effect"]
            lim = float(np.abs(fv["indirect_effect"]).max()) or 1.0
            self.heatmap.data[0].zmin, self.heatmap.data[0].zmax = -lim, lim
            self.heatmap.layout.title.text = f"indirect effect per head ({html.escape(fv.task)})"
        self._topk()
