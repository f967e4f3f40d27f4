"""ConflictMonitor: watch a multi-task training's gradient conflicts as it runs, or look
at a saved run.

The T x T cosine heatmap of the per-task gradients beside the lookahead affinity matrix
(when the trainer records it), both at the recorded step picked with the "record" slider
(any record, not only the latest); titled panels of the conflict fraction, a pair's cosine
and each task's loss over the steps (raw and smoothed, TensorBoard-style); the per-block
cosine of every task pair (one bar per pair, so the conflicting pair shows); with
``runs=``, several saved runs (one per aggregator, say) overlaid. The selection (``step``,
``task_pair``, ``block``, ``smoothing``) is a set of traitlets traits, driven by the
controls above the figures; with ``follow`` on, ``step`` moves to each new record. The
figures come from the builders of :mod:`widgets.figures.mtl`, so what is drawn live is
what a saved history draws again:

    ConflictMonitor(trainer, steps=200)                  # live: start / stop, next aggregator
    ConflictMonitor.from_result(Result.load("run.safetensors"), runs={"pcgrad": other})

Live, "start" trains in a background thread (the notebook stays responsive) with the
aggregator chosen under "next run", up to "until step"; when the run is already there,
"start" raises "until step" by the run's first length and trains on (the status says
so). "stop" ends it after the current step. "export" writes the current view as one
standalone HTML file.
"""

from __future__ import annotations

import html
import threading
import time
from typing import Mapping

import ipywidgets as W
import traitlets

from widgets.common import controls_row, full_label, responsive_figure, update_in_place, wrap_box
from widgets.export import export_controls
from widgets.export import export_html as write_html
from widgets.figures.mtl import (
    ALL_BLOCKS, affinity_matrix, block_bars, conflict_series, cosine_matrix, runs_overlay, task_pairs,
)
from workbench.errors import WorkbenchError
from workbench.mtl.trainer import MultiTaskTrainer, TrainingHistory


FIGURES = ("cosines", "affinity", "series", "blocks", "overlay")
#: the figures each selection trait changes (a view-only change redraws only those)
DEPENDS = {"task_pair": ("series", "blocks"), "block": ("cosines", "series", "overlay"),
           "smoothing": ("series", "overlay")}


def aggregator_names() -> list[str]:
    """The aggregators a trainer accepts (asked of the trainer's module, so the list follows it)."""
    from workbench.mtl import trainer as trainer_module

    names = [*trainer_module.STATELESS, *trainer_module.STATEFUL]
    return list(dict.fromkeys(names))


class ConflictMonitor(W.VBox):
    """Live view of a :class:`~workbench.mtl.MultiTaskTrainer`, or of a saved
    :class:`~workbench.mtl.TrainingHistory` (``from_result``). ``runs``: other saved
    histories ({name: TrainingHistory}) overlaid in a panel of their own."""

    #: the recorded step shown in the matrices and block bars (None before any record)
    step = traitlets.Int(None, allow_none=True)
    #: move ``step`` to each new record
    follow = traitlets.Bool(True)
    #: two task names (kept in the order of the tasks), or () for the mean over pairs
    task_pair = traitlets.Tuple()
    #: a block name, or "" for the whole shared trunk
    block = traitlets.Unicode(ALL_BLOCKS)
    #: TensorBoard smoothing weight of the series, in [0, 1) (0: raw)
    smoothing = traitlets.Float(0.0)

    #: seconds between redraws while training (each redraw rebuilds the figures: about
    #: 0.1-0.2 s, more than many steps of a small model); the end of a run always redraws
    redraw_every: float = 0.5

    def __init__(self, trainer: MultiTaskTrainer | None = None, steps: int | None = None, *,
                 result: TrainingHistory | None = None, runs: Mapping[str, TrainingHistory] | None = None) -> None:
        if (trainer is None) == (result is None):
            raise WorkbenchError("ConflictMonitor takes a trainer (live) or result= (a saved training history), "
                                 "one of them")
        if result is not None and not isinstance(result, TrainingHistory):
            raise WorkbenchError(f"result must be a training history (kind 'mtl_history'), got {result!r}")
        if trainer is not None and steps is None:
            raise WorkbenchError("a live ConflictMonitor needs steps: the step to train up to")
        runs = dict(runs or {})
        for name, h in runs.items():
            if not isinstance(h, TrainingHistory):
                raise WorkbenchError(f"runs must map names to training histories; {name!r} is a {type(h).__name__}")
        self.trainer, self.steps, self._result, self.runs = trainer, steps, result, runs
        self.chunk = int(steps) if steps else 0  # how far "start" trains on once the run has reached "until step"
        self.thread: threading.Thread | None = None
        self.error: Exception | None = None
        self._note = ""
        self._busy = False
        self._last_draw = 0.0
        self._lock = threading.RLock()
        hist = self._hist = self.history
        tasks, blocks = hist.coord("task"), hist.coord("block")
        self.cosines = responsive_figure(cosine_matrix(hist))
        self.affinity = responsive_figure(affinity_matrix(hist))
        self.series = responsive_figure(conflict_series(hist))
        self.blocks = responsive_figure(block_bars(hist))
        self.overlay = responsive_figure(runs_overlay(runs)) if runs else None
        n = len(hist.coord("step"))
        self.step_slider = full_label(W.IntSlider(value=max(n - 1, 0), min=0, max=max(n - 1, 0), description="record",
                                                  continuous_update=False, readout=False,
                                                  tooltip="pick any recorded step to look back at"))
        self.step_label = W.Label()
        self.pair_select = full_label(W.Dropdown(
            options=[("mean over pairs", ())] + [(f"{a} vs {b}", (a, b)) for a, b in task_pairs(hist)],
            value=(), description="tasks", layout=W.Layout(width="auto")))
        self.block_select = full_label(W.Dropdown(options=[("all blocks", ALL_BLOCKS)] + [(b, b) for b in blocks],
                                                  value=ALL_BLOCKS, description="block", layout=W.Layout(width="auto")))
        self.smooth_slider = full_label(W.FloatSlider(value=0.0, min=0.0, max=0.95, step=0.05, description="smoothing",
                                                      continuous_update=False, readout_format=".2f"))
        self.status = W.HTML()
        rows = []
        if trainer is not None:
            self.next_aggregator = full_label(W.Dropdown(options=aggregator_names(), value=trainer.aggregator,
                                                         description="next run", layout=W.Layout(width="auto")))
            self.until = full_label(W.IntText(value=steps, description="until step", layout=W.Layout(width="170px")))
            self.until.observe(lambda c: setattr(self, "steps", int(c["new"])), "value")
            self.start_button = W.Button(description="start", button_style="success", icon="play",
                                         tooltip="train up to 'until step' with the 'next run' aggregator")
            self.stop_button = W.Button(description="stop", button_style="warning", icon="stop",
                                        tooltip="stop after the current step")
            self.start_button.on_click(lambda _b: self.start())
            self.stop_button.on_click(lambda _b: self.stop())
            rows.append(controls_row([self.start_button, self.stop_button, self.next_aggregator, self.until]))
            trainer.callbacks.append(self._on_record)
        rows += [self.status,
                 controls_row([self.step_slider, self.step_label, self.pair_select, self.block_select,
                               self.smooth_slider])]
        figures = [wrap_box([self.cosines, self.affinity], min_width=360), wrap_box([self.series], min_width=600),
                   wrap_box([self.blocks], min_width=400)]
        if self.overlay is not None:
            figures.append(wrap_box([self.overlay], min_width=600))
        self.export_box = export_controls(self, "conflict_monitor.html")
        super().__init__([*rows, *figures, self.export_box], layout=W.Layout(width="100%"))
        self.add_class("wb-conflict-monitor")
        traitlets.link((self.pair_select, "value"), (self, "task_pair"))
        traitlets.link((self.block_select, "value"), (self, "block"))
        traitlets.link((self.smooth_slider, "value"), (self, "smoothing"))
        self.step_slider.observe(self._on_slider, "value")
        self.observe(self._on_step, "step")
        self.observe(lambda c: self._draw(parts=DEPENDS[c["name"]]), list(DEPENDS))
        self._refresh()

    @classmethod
    def from_result(cls, result: TrainingHistory, runs: Mapping[str, TrainingHistory] | None = None
                    ) -> "ConflictMonitor":
        """A monitor of a saved run (``Result.load(path)``): the same figures, no model;
        ``runs``: more saved runs to overlay."""
        return cls(result=result, runs=runs)

    @property
    def history(self) -> TrainingHistory:
        """What is drawn: the trainer's history so far, or the saved one."""
        return self.trainer.history if self.trainer is not None else self._result

    # ------------------------------------------------------------------ running

    def start(self, background: bool = True) -> None:
        """Train up to ``steps`` (in a background thread unless ``background=False``) with
        the aggregator chosen under "next run". A run already at ``steps`` goes on for as
        many steps as its first stretch (``until step`` moves; the status says so)."""
        if self.trainer is None:
            raise WorkbenchError("this monitor shows a saved history; there is no trainer to start")
        if self.thread is not None and self.thread.is_alive():
            self._note = "already training: press stop first to change the aggregator"
            self._status()
            return
        self.error, notes = None, []
        tr = self.trainer
        if tr.step_count >= self.steps:
            more = max(self.chunk, tr.monitor_every, 1)
            notes.append(f"the run had reached step {tr.step_count} of {self.steps}; training on to step "
                         f"{tr.step_count + more}")
            self.until.value = tr.step_count + more  # sets self.steps
        chosen = self.next_aggregator.value
        if chosen != tr.aggregator:
            tr.set_aggregator(chosen)
        notes.append(f"{tr.aggregator} from step {tr.step_count}")
        self._note = "; ".join(notes)

        def work():
            try:
                tr.fit(self.steps, progress=False)
            except Exception as e:  # shown in the widget; the notebook keeps running
                self.error = e
            self._refresh()
            self._status(running=False)

        if background:
            self.thread = threading.Thread(target=work, daemon=True)
            self.thread.start()
            self._status(running=True)
        else:
            self._status(running=True)
            work()

    def stop(self) -> None:
        if self.trainer is not None:
            self.trainer.stop()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def _status(self, running: bool | None = None) -> None:
        if self.trainer is None:
            h = self._result
            steps = h.coord("step")
            runs = ", ".join(f"{a['aggregator']} from step {a['from_step']}" for a in h.attrs.get("aggregators", []))
            text = (f"saved run: {len(steps)} monitored steps" + (f" up to step {steps[-1]}" if steps else "")
                    + f", {h.attrs.get('trained_steps', '?')} steps trained ({html.escape(runs)})")
            if self.runs:
                text += f"; {len(self.runs)} runs overlaid below ({html.escape(', '.join(map(str, self.runs)))})"
        else:
            if running is None:
                running = self.thread is not None and self.thread.is_alive()
            state = "<b>working...</b> training" if running else "idle"
            text = f"step {self.trainer.step_count}/{self.steps} ({state})"
            if self._note:
                text += f": {html.escape(self._note)}"
            if self.error is not None:
                text += f' <span style="color:#b00">{html.escape(str(self.error))}</span>'
        self.status.value = text

    # ------------------------------------------------------------------ drawing

    def _on_record(self, trainer, rec: dict) -> None:
        if time.monotonic() - self._last_draw >= self.redraw_every:
            self._refresh()

    def _refresh(self) -> None:
        """Take in new records: the slider's range and, with ``follow``, the shown step."""
        with self._lock:
            self._hist = hist = self.history
            steps = hist.coord("step")
            self._busy = True
            try:
                self.step_slider.max = max(len(steps) - 1, 0)
                if steps and (self.follow or self.step is None):
                    self.step = steps[-1]
                if self.step is not None:
                    self.step_slider.value = steps.index(self.step)
            finally:
                self._busy = False
            self._draw(hist)

    def _on_slider(self, change) -> None:
        if self._busy:
            return
        steps = self._hist.coord("step")
        if steps:
            self.step = steps[min(int(change["new"]), len(steps) - 1)]

    def _on_step(self, change) -> None:
        if self._busy:
            return
        steps = self._hist.coord("step")
        self.follow = bool(steps) and change["new"] == steps[-1]  # picking the latest record follows new ones
        self._draw(parts=("cosines", "affinity", "blocks"))

    @traitlets.validate("step")
    def _valid_step(self, proposal):
        step = proposal["value"]
        if step is not None and step not in self._hist.coord("step"):
            raise traitlets.TraitError(f"step {step} was not recorded")
        return step

    @traitlets.validate("task_pair")
    def _valid_pair(self, proposal):
        pair = tuple(proposal["value"])
        tasks = self._hist.coord("task")
        if pair and (len(pair) != 2 or pair[0] == pair[1] or any(t not in tasks for t in pair)):
            raise traitlets.TraitError(f"task_pair must be two different tasks of {tasks}, or ()")
        return tuple(sorted(pair, key=tasks.index))  # cosines are symmetric: one order, the tasks'

    @traitlets.validate("smoothing")
    def _valid_smoothing(self, proposal):
        value = float(proposal["value"])
        if not 0.0 <= value < 1.0:
            raise traitlets.TraitError(f"smoothing must be in [0, 1), got {value}")
        return value

    def _draw(self, hist: TrainingHistory | None = None, parts=FIGURES) -> None:
        """Redraw the figures named in ``parts`` (all of them by default: new records)."""
        if self._busy:
            return
        with self._lock:
            self._hist = hist = self.history if hist is None else hist
            if self.step is not None:
                self._busy = True
                try:
                    self.step_slider.value = hist.coord("step").index(self.step)
                finally:
                    self._busy = False
            self.step_label.value = "no record yet" if self.step is None else f"step {self.step}"
            if "cosines" in parts:
                update_in_place(self.cosines, cosine_matrix(hist, step=self.step, block=self.block))
            if "affinity" in parts:
                update_in_place(self.affinity, affinity_matrix(hist, step=self.step))
            if "series" in parts:
                update_in_place(self.series, conflict_series(hist, task_pair=self.task_pair, block=self.block,
                                                           smoothing=self.smoothing))
            if "blocks" in parts:
                update_in_place(self.blocks, block_bars(hist, step=self.step, task_pair=self.task_pair))
            if self.overlay is not None and "overlay" in parts:
                block = self.block if all(self.block in h.coord("block") for h in self.runs.values()) else ALL_BLOCKS
                update_in_place(self.overlay, runs_overlay(self.runs, smoothing=self.smoothing, block=block))
            self._last_draw = time.monotonic()
            self._status()

    def export_html(self, path):
        """Write the current view (every figure, plotly.js inlined, the selection as text)
        to one standalone HTML file that opens offline."""
        return write_html(self, path, title="ConflictMonitor")


__all__ = ["ConflictMonitor", "aggregator_names"]
