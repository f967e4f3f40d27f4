"""TaskVectorLab: merge task vectors with live per-task accuracy, and build function vectors
head by head.

A view of results (saved or fresh): a ``MergeAccuracy`` (and the fine-tuned reference),
the ``TaskVectorDiagnostics`` of the task vectors, ``FunctionVector`` results and
``LayerSweep`` results. Built with :meth:`TaskVectorLab.from_evaluator`, its controls
recompute them live.

Weight side: one coefficient slider per task vector, a method selector with its
parameters (lam, TIES density, DARE p and seed); with a
:class:`~workbench.taskvec.finetune.MergeEvaluator`, every move re-merges and re-scores
(:func:`~workbench.taskvec.accuracy.merge_accuracy`) and updates the per-task accuracy
bars in place; without one the controls show the saved merge and say why they are off.
The cosine heatmap of the task vectors sits beside.

Activation side: for the chosen task, the heads' indirect-effect heatmap (click a head to
add it to or remove it from the function vector; selected heads are marked), a top-k
slider that always shows how many heads the vector holds (moving it replaces them with
the k strongest; a line under it says whether the vector is the top k or a clicked
selection), and the layer sweep
(:func:`~workbench.taskvec.accuracy.layer_sweep`): zero-shot accuracy with the vector
added at each layer, against the unpatched baseline. Without a model the sweep of a head
set is shown when a saved one matches it.

The selection is held in traits (``task``, ``heads``, ``top_k``, ``method``). Figures are
responsive (they fit the notebook's width and wrap below each other when narrow);
:meth:`TaskVectorLab.export_html` writes the view as one standalone HTML file.
"""

from __future__ import annotations

import contextlib
import html
import time
from typing import Mapping, Sequence

import ipywidgets as W
import traitlets

from widgets.common import (
    controls_row, full_label, member, reason_html, responsive_figure, update_in_place, working, wrap_box,
)
from widgets.export import export_controls
from widgets.export import export_html as write_html
from widgets.figures.taskvec import cosine_heatmap, ie_heatmap, merge_bars, sweep_figure
from workbench.taskvec import METHODS

NO_EVALUATOR = "re-merging needs a model: build the lab with TaskVectorLab.from_evaluator(evaluator, ...)"
NO_SUBJECT = "sweeping a new head set needs a model: pass subject= (or build the lab from an evaluator)"


class TaskVectorLab(W.VBox):
    """Live task-vector lab over ``merge`` (a MergeAccuracy) and ``diagnostics`` (a
    TaskVectorDiagnostics, optional). ``finetuned``: the fine-tuned reference (a
    MergeAccuracy of method "finetuned"); ``fvs``: {task: FunctionVector} (enables the
    activation side); ``sweeps``: saved LayerSweep results; ``evaluator``: a
    MergeEvaluator, for live re-merging; ``subject``: for live layer sweeps (default:
    the evaluator's)."""

    task = traitlets.Unicode(help="the task of the function vector shown")
    heads = traitlets.List(help="the (layer, head) pairs in the function vector")
    top_k = traitlets.Int(2, help="how many heads the vector holds; setting it selects the k heads of largest "
                                  "indirect effect (clicking heads moves it to their count)")
    method = traitlets.Unicode(help="the merge method")

    def __init__(self, merge, diagnostics=None, *, finetuned=None, fvs: Mapping[str, object] | None = None,
                 sweeps: Sequence = (), evaluator=None, subject=None, n_sweep: int = 64, top_k: int = 2) -> None:
        self.ev, self.merge, self.finetuned, self.diagnostics = evaluator, merge, finetuned, diagnostics
        self.subject = subject if subject is not None else getattr(evaluator, "subject", None)
        self.fvs = dict(fvs or {})
        self.n_sweep = n_sweep
        self.last_update_s = 0.0
        self._syncing = False
        a = merge.attrs
        names = a.get("task_vectors", [])
        weights = a.get("weights", [0.0] * len(names))
        self.sliders = {n: full_label(W.FloatSlider(value=w, min=-1.5, max=1.5, step=0.05, description=n,
                                                    continuous_update=False, layout=W.Layout(width="auto")))
                        for n, w in zip(names, weights)}
        method = a.get("method", "task_arithmetic")
        self.method_select = W.Dropdown(options=list(METHODS), description="method")
        self.lam = W.FloatSlider(value=a.get("lam", 1.0), min=0.0, max=2.0, step=0.05, description="lam",
                                 continuous_update=False)
        self.density = W.FloatSlider(value=a["density"] if method == "ties" else 0.2, min=0.01, max=1.0, step=0.01,
                                     description="density", continuous_update=False)
        self.p = W.FloatSlider(value=a["p"] if method in ("dare", "dare_ties") else 0.5, min=0.0, max=0.95, step=0.05,
                               description="DARE p", continuous_update=False)
        self.seed = W.IntText(value=a.get("seed", 0), description="seed")
        self.status = W.HTML()
        for w in (self.method_select, self.lam, self.density, self.p, self.seed):
            full_label(w)
        self.bars = responsive_figure(merge_bars(merge, finetuned))
        plots = [self.bars]
        if diagnostics is not None:
            self.cosine = responsive_figure(cosine_heatmap(diagnostics))
            plots.append(self.cosine)
        self.weight_reason = W.HTML(reason_html(None if evaluator is not None else NO_EVALUATOR))
        weight_side = W.VBox([
            W.HTML("<b>Weight space</b>: coefficients per task vector"),
            wrap_box([W.VBox(list(self.sliders.values())),
                      W.VBox([self.method_select, self.lam, self.density, self.p, self.seed, self.status])],
                     min_width=320),
            self.weight_reason, wrap_box(plots),
        ], layout=W.Layout(width="100%"))
        children = [weight_side]
        self._sweeps: dict[tuple, object] = {}
        for s in sweeps:
            self._sweeps[(s.task, tuple(s.heads))] = s
        self.sweep_result = None
        if self.fvs:
            tasks = list(self.fvs)
            first = self.fvs[tasks[0]]
            n_heads = len(first.coord("layer")) * len(first.coord("head"))
            saved = [s for s in sweeps if s.task == tasks[0]]
            heads = saved[0].heads if saved and self.subject is None else first.top_heads(top_k)
            self.task_select = full_label(W.Dropdown(options=tasks, description="task", layout=W.Layout(width="auto")))
            self.topk_slider = full_label(W.IntSlider(min=0, max=n_heads, description="top k (heads in vector)",
                                                      continuous_update=False, layout=W.Layout(width="auto")))
            self.heads_label = W.HTML()
            self.sweep_reason = W.HTML()
            # every figure is built with what it shows first: an update sent before the front end has
            # loaded plotly's widget code is lost there (the plot would come up as empty axes)
            heads = [(int(l), int(h)) for l, h in heads]
            self.sweep_result = self._sweep_for(tasks[0], heads)
            self.heatmap = responsive_figure(ie_heatmap(first, heads))
            self.sweep = responsive_figure(sweep_figure(self.sweep_result, note=html.escape(self._sweep_note())))
            children.append(W.VBox([
                W.HTML("<b>Activation space</b>: function vector from selected heads (click a head to toggle it)"),
                controls_row([self.task_select, self.topk_slider]), self.heads_label,
                wrap_box([self.heatmap, self.sweep]), self.sweep_reason,
            ], layout=W.Layout(width="100%")))
            self.export_box = export_controls(self, "task_vector_lab.html")
            children.append(self.export_box)
            super().__init__(children, method=method, task=tasks[0], top_k=len(heads), heads=heads,
                             layout=W.Layout(width="100%"))
            W.link((self, "task"), (self.task_select, "value"))
            W.link((self, "top_k"), (self.topk_slider, "value"))
            self.heatmap.data[0].on_click(self._on_head_click)
            self.observe(self._new_task, names="task")
            self.observe(self._topk, names="top_k")
            self.observe(self._on_heads, names="heads")
            self._resweep(draw=False)
        else:
            self.export_box = export_controls(self, "task_vector_lab.html")
            children.append(self.export_box)
            super().__init__(children, method=method, layout=W.Layout(width="100%"))
        self.add_class("wb-task-vector-lab")  # a stable handle for page tests and styles
        W.link((self, "method"), (self.method_select, "value"))
        self._enable_params()
        if evaluator is None:
            for w in [*self.sliders.values(), self.method_select, self.lam, self.density, self.p, self.seed]:
                w.disabled = True
                w.tooltip = NO_EVALUATOR
        else:
            for w in [*self.sliders.values(), self.lam, self.density, self.p, self.seed]:
                w.observe(self._remerge, names="value")
            self.observe(self._remerge, names="method")

    @classmethod
    def from_evaluator(cls, evaluator, fvs: Mapping[str, object] | None = None, *, diagnostics=None,
                       coefficient: float = 0.3, **kwargs) -> "TaskVectorLab":
        """A live lab: the merge with every coefficient at ``coefficient``, each task's
        fine-tuned accuracy and (unless given) the task vectors' diagnostics, all computed
        with ``evaluator``."""
        from workbench.taskvec.accuracy import finetuned_accuracy, merge_accuracy
        from workbench.taskvec import TaskVector, diagnose

        merge = merge_accuracy(evaluator, "task_arithmetic", [coefficient] * len(evaluator.names))
        if diagnostics is None:
            tvs = [TaskVector.from_deltas(evaluator.dense[n], name=n) for n in evaluator.names]
            diagnostics = diagnose(tvs, names=evaluator.names, densities=(0.2,))
        return cls(merge, diagnostics, finetuned=finetuned_accuracy(evaluator), fvs=fvs, evaluator=evaluator, **kwargs)

    # -------------------------------------------------------------- traits

    @traitlets.validate("method")
    def _valid_method(self, proposal):
        if self.ev is None and proposal["value"] != self.merge.attrs.get("method"):
            raise traitlets.TraitError(f"the saved merge is {self.merge.attrs.get('method')!r}; {NO_EVALUATOR}")
        return member(proposal, list(METHODS), "merge method")

    @traitlets.validate("task")
    def _valid_task(self, proposal):
        return member(proposal, list(self.fvs), "task")

    @traitlets.validate("heads")
    def _valid_heads(self, proposal):
        fv = self.fvs[self.task] if self.task else next(iter(self.fvs.values()))
        layers, hs = fv.coord("layer"), fv.coord("head")
        out = []
        for pair in proposal["value"]:
            l, h = (int(x) for x in pair)
            if l not in layers or h not in hs:
                raise traitlets.TraitError(f"no head L{l}H{h}: layers {layers}, heads {hs}")
            out.append((l, h))
        return out

    # -------------------------------------------------------------- weight side

    def coefficients(self) -> list[float]:
        return [s.value for s in self.sliders.values()]

    def _enable_params(self) -> None:
        if self.ev is None:
            return
        self.density.disabled = self.method != "ties"
        self.p.disabled = self.seed.disabled = self.method not in ("dare", "dare_ties")

    def current_accuracy(self) -> dict[str, float]:
        return self.merge.as_dict()

    def _remerge(self, _change=None) -> None:
        from workbench.taskvec.accuracy import merge_accuracy

        start = time.perf_counter()
        self._enable_params()
        self.status.value = working("re-merging and scoring every task")
        dare = self.method in ("dare", "dare_ties")
        self.merge = merge_accuracy(self.ev, self.method, self.coefficients(), lam=self.lam.value,
                                    density=self.density.value if self.method == "ties" else 1.0,
                                    p=self.p.value if dare else 0.0, seed=int(self.seed.value) if dare else 0)
        update_in_place(self.bars, merge_bars(self.merge, self.finetuned))
        self.last_update_s = time.perf_counter() - start
        self.status.value = f"<small>re-merged and scored in {self.last_update_s * 1000:.0f} ms</small>"

    # -------------------------------------------------------------- activation side

    @property
    def fv(self):
        return self.fvs[self.task]

    def layer_sweep(self):
        """The ``LayerSweep`` of the selected heads: computed with the subject, else a saved
        one of the same task and head set (None when there is none)."""
        return self._sweep_for(self.task, self.heads)

    def _sweep_for(self, task: str, heads):
        key = (task, tuple(heads))
        if key not in self._sweeps:
            if self.subject is not None:
                from workbench.taskvec.accuracy import layer_sweep

                fv = self.fvs[task]
                self.sweep_reason.value = working(f"layer sweep of {len(heads)} heads over "
                                                  f"{len(fv.coord('layer'))} layers")
                self._sweeps[key] = layer_sweep(self.subject, fv, list(heads), n_prompts=self.n_sweep)
            else:
                same = [s for (t, hs), s in self._sweeps.items() if t == task and set(hs) == set(heads)]
                return same[0] if same else None
        return self._sweeps[key]

    def _sweep_note(self) -> str:
        return "" if self.sweep_result is not None else f"no saved layer sweep of these heads; {NO_SUBJECT}"

    def _resweep(self, draw: bool = True) -> None:
        if draw:
            update_in_place(self.heatmap, ie_heatmap(self.fv, self.heads))
            self.sweep_result = self.layer_sweep()
            update_in_place(self.sweep, sweep_figure(self.sweep_result, note=html.escape(self._sweep_note())))
        self.sweep_reason.value = reason_html(self._sweep_note() or None)
        self.heads_label.value = self._heads_text()

    def _heads_text(self) -> str:
        """Which heads the vector holds, and whether they are the top k or a clicked set."""
        k = len(self.heads)
        names = ", ".join(f"L{l}H{h}" for l, h in self.heads) or "none"
        if k == 0:
            how = "no heads: the vector is zero"
        elif set(self.heads) == set(self.fv.top_heads(k)):
            how = f"the top {k} by indirect effect"
        else:
            how = (f"chosen by clicking, not the top {k}; moving <i>top k</i> replaces them with the k strongest")
        return f"heads in vector ({k}): {names} <small>({how})</small>"

    def toggle_head(self, layer: int, head: int) -> None:
        key = (int(layer), int(head))
        self.heads = [x for x in self.heads if x != key] if key in self.heads else [*self.heads, key]

    def _on_head_click(self, trace, points, state) -> None:
        if points.xs:
            self.toggle_head(points.ys[0], points.xs[0])

    @contextlib.contextmanager
    def _quiet_topk(self):
        self._syncing = True
        try:
            yield
        finally:
            self._syncing = False

    def _on_heads(self, _change=None) -> None:
        with self._quiet_topk():  # the slider shows how many heads the vector holds
            self.top_k = len(self.heads)
        self._resweep()

    def _topk(self, _change=None) -> None:
        if self._syncing:
            return
        heads = [(int(l), int(h)) for l, h in self.fv.top_heads(self.top_k)]
        if heads == self.heads:
            self._resweep()
        self.heads = heads

    def _new_task(self, _change=None) -> None:
        self._topk()

    def export_html(self, path):
        """Write the current view (figures with plotly.js inlined, the selection and the
        coefficients as text) to one standalone HTML file."""
        return write_html(self, path, title="TaskVectorLab")
