"""TaskAtlas: the task-relatedness atlas as a view one can click through.

A view of one ``workbench.atlas.TaskAtlas`` result (saved or fresh): the chosen lens
measure against the chosen ground truth over pairs (the Spearman and its interval in the
title), clicking a pair shows what every lens says of it (every measure, shared heads,
shared circuit nodes) and where in the depth it shares or conflicts; the grouping the
measure recommends, scored on the measured ground truth beside random splits and the
exhaustive best; the agreement of every lens with every truth; every measure's pair
matrix. Built live with :meth:`TaskAtlas.from_subject` (which runs
:func:`workbench.atlas.task_atlas`, showing its progress).

The selection is held in traits (``measure``, ``truth``, ``pair``, ``group_size``) that
link both ways with the dropdowns and with other widgets. Bootstrap intervals of the
agreement are computed in the background when not given (the view opens at once with
the point Spearmans and says so). :meth:`TaskAtlas.export_html` writes the current view
as one standalone HTML file.
"""

from __future__ import annotations

import html
import threading
import time

import ipywidgets as W
import numpy as np
import traitlets

from widgets.common import (
    controls_row, full_label, member, reason_html, responsive_figure, update_in_place, wrap_box,
)
from widgets.export import export_controls
from widgets.export import export_html as write_html
from widgets.figures.atlas import (
    agreement_heatmap, agreement_labels, atlas_blocks, atlas_matrices, atlas_scatter, grouping_html, measure_label,
    pair_details_html, pair_label,
)
from workbench import atlas as core
from workbench.errors import WorkbenchError

GROUP_SIZES = (2, 4)


class TaskAtlas(W.VBox):
    """The view of a task-relatedness ``atlas`` (a ``workbench.atlas.TaskAtlas``).

    ``agreement``: its ``AtlasAgreement`` when saved; otherwise the point Spearmans are
    shown at once and the intervals (``n_boot`` bootstrap draws over pairs, ``seed``)
    are computed in the background (``background=False``: before returning).
    ``measure``, ``truth``, ``pair``, ``group_size``: the opening selection (default: the
    first lens measure, ``cotrain``, the pair of highest ground truth, 2). ``top_k``:
    heads compared per task in the pair details (nodes: 4 x top_k)."""

    measure = traitlets.Unicode(help="the lens measure plotted against the ground truth and used for grouping")
    truth = traitlets.Unicode(help="the ground truth the measure is checked against")
    pair = traitlets.Tuple(traitlets.Unicode(), traitlets.Unicode(),
                           help="the selected pair (task, task_b), either order (the dropdown lists task order)")
    group_size = traitlets.Int(2, help="tasks per group in the recommended grouping")

    def __init__(self, atlas, *, agreement=None, n_boot: int = 1000, seed: int = 0, background: bool = True,
                 measure: str | None = None, truth: str | None = None, pair: tuple[str, str] | None = None,
                 group_size: int | None = None, top_k: int = 4) -> None:
        if not isinstance(atlas, core.TaskAtlas):
            raise WorkbenchError(f"TaskAtlas shows a workbench.atlas.TaskAtlas result (from task_atlas or "
                                 f"Result.load of one), got {type(atlas).__name__}")
        if not atlas.lens_measures or not atlas.truths:
            raise WorkbenchError(f"the atlas needs lens measures and ground truths; it has {atlas.coord('measure')}")
        self.atlas, self.top_k, self.n_boot, self.seed = atlas, top_k, n_boot, seed
        tasks = atlas.tasks
        self.T = len(tasks)
        self.pairs = [(tasks[a], tasks[b]) for a in range(self.T) for b in range(a + 1, self.T)]
        self.group_sizes = [s for s in GROUP_SIZES if self.T % s == 0 and self.T > s]
        self._lock = threading.RLock()
        self._groupings: dict[tuple, object] = {}
        self.grouping = None
        self.intervals_done = threading.Event()
        self.interval_thread: threading.Thread | None = None

        measure = measure or next((m for m in atlas.lens_measures if np.isfinite(atlas.matrix(m)).any()),
                                  atlas.lens_measures[0])
        truth = truth or ("cotrain" if "cotrain" in atlas.truths else atlas.truths[0])
        pair = pair or self._top_pair(truth)
        group_size = group_size or (self.group_sizes[0] if self.group_sizes else 2)

        if agreement is not None:
            self.agreement = agreement
            self.intervals_done.set()
        else:
            self.agreement = atlas.agreement(n_boot=0, seed=seed)  # point Spearmans now, intervals below

        # controls (full labels)
        self.measure_select = full_label(W.Dropdown(
            options=[(measure_label(atlas, m), m) for m in atlas.lens_measures], description="lens measure",
            layout=W.Layout(width="auto")))
        self.truth_select = full_label(W.Dropdown(
            options=[(measure_label(atlas, m), m) for m in atlas.truths], description="ground truth",
            layout=W.Layout(width="auto")))
        self.pair_select = full_label(W.Dropdown(
            options=[(pair_label(a, b), (a, b)) for a, b in self.pairs], description="pair",
            layout=W.Layout(width="auto")))
        self.size_select = full_label(W.ToggleButtons(
            options=[(str(s), s) for s in (self.group_sizes or [2])], description="group size",
            tooltips=[f"groups of {s}" for s in (self.group_sizes or [2])]))
        self.size_select.style.button_width = "40px"
        self.status = W.HTML()
        self.header = W.HTML(self._header_html())

        # figures and panels
        self.scatter = responsive_figure(atlas_scatter(atlas, measure, truth, self.agreement, pair=pair))
        self.blocks = responsive_figure(atlas_blocks(atlas, *pair, highlight=measure))
        self.details = W.HTML(pair_details_html(atlas, *pair, top_k=top_k))
        self.grouping_panel = W.HTML()
        self.grouping_reason = W.HTML()
        self.agreement_figure = responsive_figure(agreement_heatmap(self.agreement))
        self.matrices = responsive_figure(atlas_matrices(atlas))

        grouping_box = W.VBox([
            W.HTML("<b>Recommended grouping</b> (by the lens measure, scored on the ground truth above)"),
            self.size_select, self.grouping_reason, self.grouping_panel,
        ])
        details_box = W.VBox([W.HTML("<b>The selected pair through every lens</b>"), self.details])
        self.export_box = export_controls(self, "task_atlas.html")
        children = [
            self.header,
            controls_row([self.measure_select, self.truth_select, self.pair_select]),
            self.status,
            wrap_box([self.scatter, self.blocks]),
            wrap_box([details_box, grouping_box]),
            wrap_box([self.agreement_figure]),
            wrap_box([self.matrices], min_width=600),
            self.export_box,
        ]
        super().__init__(children, measure=measure, truth=truth, pair=tuple(pair), group_size=group_size,
                         layout=W.Layout(width="100%"))
        self.add_class("wb-task-atlas")
        W.link((self, "measure"), (self.measure_select, "value"))
        W.link((self, "truth"), (self.truth_select, "value"))
        W.link((self, "pair"), (self.pair_select, "value"), transform=(self.canonical, tuple))
        W.link((self, "group_size"), (self.size_select, "value"))
        if not self.group_sizes:
            self.size_select.disabled = True
            self.size_select.tooltip = self._no_sizes()
        self.observe(self._on_selection, names=["measure", "truth"])
        self.observe(self._on_pair, names="pair")
        self.observe(lambda _c: self._draw_grouping(), names="group_size")
        self.scatter.data[0].on_click(self._on_point)
        for trace in self.matrices.data:
            trace.on_click(self._on_cell)
        self.agreement_figure.data[0].on_click(self._on_agreement_cell)
        self._draw_grouping()
        if not self.intervals_done.is_set():
            if background:
                self.interval_thread = threading.Thread(target=self.compute_intervals, daemon=True)
                self.interval_thread.start()
            else:
                self.compute_intervals()

    # -------------------------------------------------------------- building

    @classmethod
    def from_result(cls, result, **kwargs) -> "TaskAtlas":
        """The view of a saved atlas (``Result.load(path)``); ``kwargs`` as for the class."""
        return cls(result, **kwargs)

    @classmethod
    def from_subject(cls, subject, tasks=None, config=None, cache_dir=None, **kwargs) -> "TaskAtlas":
        """Compute the atlas of ``tasks`` on ``subject`` (:func:`workbench.atlas.task_atlas`
        with ``config``, stages cached in ``cache_dir`` so an interrupted run resumes),
        showing its progress bars in the notebook while it runs, then view it."""
        status = W.HTML(f"<i>computing the task atlas of {html.escape(subject_name(subject))} "
                        f"(fine-tuning, merging, co-training and every lens; stages cached"
                        f"{' in ' + html.escape(str(cache_dir)) if cache_dir is not None else ' in memory only'})"
                        f"...</i>")
        out = W.Output()
        box = W.VBox([status, out])
        shown = _display(box)
        start = time.perf_counter()
        try:
            with out:
                atlas = core.task_atlas(subject, tasks, config=config, cache_dir=cache_dir, progress=True)
        except Exception as err:
            status.value = f'<span style="color:#b00">the atlas failed: {html.escape(str(err))}</span>'
            raise
        took = time.perf_counter() - start
        if shown:
            out.clear_output()
            status.value = f"task atlas computed in {took:.0f} s"
        view = cls(atlas, **kwargs)
        view.status.value = f"<small>computed live in {took:.0f} s</small>" + view.status.value
        return view

    # -------------------------------------------------------------- traits

    @traitlets.validate("measure")
    def _valid_measure(self, proposal):
        return member(proposal, self.atlas.lens_measures, "lens measure")

    @traitlets.validate("truth")
    def _valid_truth(self, proposal):
        return member(proposal, self.atlas.truths, "ground truth")

    @traitlets.validate("pair")
    def _valid_pair(self, proposal):
        value = tuple(proposal["value"])
        tasks = self.atlas.tasks
        if len(value) != 2 or value[0] == value[1] or any(t not in tasks for t in value):
            raise traitlets.TraitError(f"pair {value!r} is not two different tasks of the atlas; tasks: {tasks}")
        return value

    def canonical(self, pair) -> tuple[str, str]:
        """``pair`` in the atlas's task order (as the pair dropdown lists it)."""
        a, b = sorted(self.atlas.tasks.index(t) for t in pair)
        return (self.atlas.tasks[a], self.atlas.tasks[b])

    @traitlets.validate("group_size")
    def _valid_group_size(self, proposal):
        if proposal["value"] not in self.group_sizes and self.group_sizes:
            raise traitlets.TraitError(f"{self.T} tasks split into groups of {self.group_sizes}, "
                                       f"not {proposal['value']}")
        return proposal["value"]

    # -------------------------------------------------------------- drawing

    def _top_pair(self, truth: str) -> tuple[str, str]:
        """The pair of highest ``truth`` (the first pair when it has no value)."""
        m, tasks = self.atlas.matrix(truth), self.atlas.tasks
        values = [float(m[tasks.index(a), tasks.index(b)]) for a, b in self.pairs]
        finite = [v if np.isfinite(v) else -np.inf for v in values]
        return self.pairs[int(np.argmax(finite))]

    def _header_html(self) -> str:
        a = self.atlas
        lenses = sorted({a.attrs["kind"][m] for m in a.lens_measures})
        model = a.provenance.get("model")
        return (f"<b>Task-relatedness atlas</b>{' of ' + html.escape(str(model)) if model else ''}: "
                f"{self.T} tasks ({html.escape(', '.join(a.tasks))}), {len(self.pairs)} pairs; "
                f"{len(a.lens_measures)} measures from {len(lenses)} lenses ({html.escape(', '.join(lenses))}) "
                f"checked against {html.escape(', '.join(a.truths))}. Click a pair (in the scatter or any matrix) "
                f"to see it through every lens.")

    def _draw_scatter(self) -> None:
        with self._lock:
            update_in_place(self.scatter, atlas_scatter(self.atlas, self.measure, self.truth, self.agreement,
                                                        pair=self.pair))

    def _draw_pair(self) -> None:
        with self._lock:
            update_in_place(self.blocks, atlas_blocks(self.atlas, *self.pair, highlight=self.measure))
            self.details.value = pair_details_html(self.atlas, *self.pair, top_k=self.top_k)

    def _no_sizes(self) -> str:
        return f"{self.T} tasks do not split into groups of {' or '.join(map(str, GROUP_SIZES))}"

    def recommend(self):
        """The ``Grouping`` of the current selection (:func:`workbench.atlas.recommend_groups`;
        None when the tasks do not split into groups of the chosen size)."""
        if self.group_size not in self.group_sizes:
            return None
        key = (self.measure, self.truth, self.group_size)
        if key not in self._groupings:
            self._groupings[key] = core.recommend_groups(self.atlas, self.measure, truth=self.truth,
                                                         group_size=self.group_size)
        return self._groupings[key]

    def _draw_grouping(self) -> None:
        with self._lock:
            try:
                self.grouping = self.recommend()
            except (ValueError, WorkbenchError) as err:  # e.g. a measure with no finite pair
                self.grouping = None
                self.grouping_panel.value = ""
                self.grouping_reason.value = reason_html(f"no grouping from {self.measure}: {err}")
                return
            if self.grouping is None:
                self.grouping_panel.value = ""
                self.grouping_reason.value = reason_html(self._no_sizes())
            else:
                self.grouping_reason.value = ""
                self.grouping_panel.value = grouping_html(self.grouping)

    def compute_intervals(self) -> None:
        """Bootstrap intervals of the agreement (``n_boot`` draws over pairs), then redraw
        the scatter's title and the agreement heatmap (run in the background by default)."""
        self.status.value = (f"<i>computing 95% intervals of the agreement ({self.n_boot} bootstrap draws over "
                             f"pairs); the point Spearmans are shown meanwhile...</i>")
        start = time.perf_counter()
        try:
            agreement = self.atlas.agreement(n_boot=self.n_boot, seed=self.seed)
        except Exception as err:  # shown, not raised: the view stays usable
            self.status.value = reason_html(f"the agreement intervals failed: {err}")
            self.intervals_done.set()
            return
        with self._lock:
            self.agreement = agreement
            update_in_place(self.agreement_figure, agreement_heatmap(agreement))
            self._draw_scatter()
        self.status.value = f"<small>agreement intervals computed in {time.perf_counter() - start:.1f} s</small>"
        self.intervals_done.set()

    # -------------------------------------------------------------- events

    def _on_selection(self, _change=None) -> None:
        self._draw_scatter()
        self._draw_pair()  # the per-block view highlights the measure
        self._draw_grouping()

    def _on_pair(self, _change=None) -> None:
        self._draw_scatter()
        self._draw_pair()

    def _on_point(self, trace, points, state) -> None:
        if points.point_inds:
            a, b = (int(i) for i in trace.customdata[points.point_inds[0]])
            self.pair = (self.atlas.tasks[a], self.atlas.tasks[b])

    def _on_cell(self, trace, points, state) -> None:
        if points.xs and points.ys:
            names = {html.escape(t): t for t in self.atlas.tasks}
            a, b = names.get(points.ys[0]), names.get(points.xs[0])
            if a is not None and b is not None and a != b:
                self.pair = (a, b)

    def _on_agreement_cell(self, trace, points, state) -> None:
        if points.xs and points.ys:
            truths = {html.escape(t): t for t in self.atlas.truths}
            measures = dict(zip(agreement_labels(self.agreement), self.agreement.coord("measure")))
            m, t = measures.get(points.ys[0]), truths.get(points.xs[0])
            if m in self.atlas.lens_measures and t is not None:
                with self.hold_trait_notifications():
                    self.measure, self.truth = m, t

    def export_html(self, path):
        """Write the current view (figures with plotly.js inlined, the pair and grouping
        panels inline, the selection as text) to one standalone HTML file."""
        return write_html(self, path, title="TaskAtlas")


def subject_name(subject) -> str:
    return str(getattr(subject, "name", None) or type(subject).__name__)


def _display(box) -> bool:
    """Show ``box`` in the running notebook (False outside one)."""
    try:
        from IPython import get_ipython
        from IPython.display import display
    except ImportError:
        return False
    if get_ipython() is None:
        return False
    display(box)
    return True


__all__ = ["TaskAtlas"]
