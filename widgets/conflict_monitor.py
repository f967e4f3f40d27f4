"""ConflictMonitor: watch a multi-task training's gradient conflicts as it runs, or look
at a saved run.

A T x T cosine heatmap of the per-task gradients beside the lookahead affinity matrix
(when the trainer records it); a time series of the conflict fraction, a pair's cosine and
each task's loss; the per-block cosines. The selection (``step``, ``task_pair``,
``block``) is a set of traitlets traits, driven by the controls above the figures; with
``follow`` on, ``step`` moves to each new record. The figures come from the builders of
:mod:`widgets.mtl_figures`, so what is drawn live is what a saved history draws again:

    ConflictMonitor(trainer, steps=200)                  # live: start / stop, next aggregator
    ConflictMonitor.from_result(Result.load("run.safetensors"))   # no model, no trainer

Live, "start" trains in a background thread (the notebook stays responsive) with the
aggregator chosen under "next run", up to "until step"; "stop" ends it after the current
step.
"""

from __future__ import annotations

import html
import itertools
import threading
import time

import ipywidgets as W
import plotly.graph_objects as go
import traitlets

from widgets.mtl_figures import ALL_BLOCKS, block_bars, conflict_matrices, conflict_series
from workbench.errors import WorkbenchError
from workbench.mtl.aggregators import STATEFUL, STATELESS
from workbench.mtl.trainer import TrainingHistory


def _redraw(widget: go.FigureWidget, fig: go.Figure) -> None:
    """Copy ``fig``'s trace data and titles into ``widget`` in place (same traces)."""
    with widget.batch_update():
        for mine, new in zip(widget.data, fig.data):
            spec = new.to_plotly_json()
            spec.pop("type", None)
            spec.pop("uid", None)
            mine.update(spec, overwrite=True)
        layout = fig.layout.to_plotly_json()
        layout.pop("template", None)
        widget.layout.update(layout)


class ConflictMonitor(W.VBox):
    """Live view of a :class:`~workbench.mtl.MultiTaskTrainer`, or of a saved
    :class:`~workbench.mtl.TrainingHistory` (``from_result``)."""

    #: the recorded step shown in the matrices and block bars (None before any record)
    step = traitlets.Int(None, allow_none=True)
    #: move ``step`` to each new record
    follow = traitlets.Bool(True)
    #: two task names (kept in the order of the tasks), or () for the mean over pairs
    task_pair = traitlets.Tuple()
    #: a block name, or "" for the whole shared trunk
    block = traitlets.Unicode(ALL_BLOCKS)

    #: seconds between redraws while training (each redraw rebuilds the figures: about
    #: 0.1-0.2 s, more than many steps of a small model); the end of a run always redraws
    redraw_every: float = 0.5

    def __init__(self, trainer=None, steps: int | None = None, *, result: TrainingHistory | None = None) -> None:
        if (trainer is None) == (result is None):
            raise WorkbenchError("ConflictMonitor takes a trainer (live) or result= (a saved training history), "
                                 "one of them")
        if result is not None and not isinstance(result, TrainingHistory):
            raise WorkbenchError(f"result must be a training history (kind 'mtl_history'), got {result!r}")
        if trainer is not None and steps is None:
            raise WorkbenchError("a live ConflictMonitor needs steps: the step to train up to")
        self.trainer, self.steps, self._result = trainer, steps, result
        self.thread: threading.Thread | None = None
        self.error: Exception | None = None
        self._note = ""
        self._busy = False
        self._last_draw = 0.0
        hist = self.history
        tasks, blocks = hist.coord("task"), hist.coord("block")
        self.matrices = go.FigureWidget(conflict_matrices(hist))
        self.series = go.FigureWidget(conflict_series(hist))
        self.blocks = go.FigureWidget(block_bars(hist))
        n = len(hist.coord("step"))
        self.step_slider = W.IntSlider(value=max(n - 1, 0), min=0, max=max(n - 1, 0), description="record",
                                       continuous_update=False, readout=False)
        self.step_label = W.Label()
        self.pair_select = W.Dropdown(
            options=[("mean over pairs", ())] + [(f"{a} vs {b}", (a, b)) for a, b in itertools.combinations(tasks, 2)],
            value=(), description="tasks")
        self.block_select = W.Dropdown(options=[("all blocks", ALL_BLOCKS)] + [(b, b) for b in blocks],
                                       value=ALL_BLOCKS, description="block")
        self.status = W.HTML()
        controls = [W.HBox([self.step_slider, self.step_label, self.pair_select, self.block_select])]
        if trainer is not None:
            self.next_aggregator = W.Dropdown(options=list(STATELESS + STATEFUL), value=trainer.aggregator,
                                              description="next run")
            self.until = W.IntText(value=steps, description="until step")
            self.until.observe(lambda c: setattr(self, "steps", int(c["new"])), "value")
            self.start_button = W.Button(description="start", button_style="success")
            self.stop_button = W.Button(description="stop", button_style="warning")
            self.start_button.on_click(lambda _b: self.start())
            self.stop_button.on_click(lambda _b: self.stop())
            controls.insert(0, W.HBox([self.start_button, self.stop_button, self.next_aggregator, self.until,
                                       self.status]))
            trainer.callbacks.append(self._on_record)
        else:
            controls.insert(0, self.status)
        super().__init__([*controls, self.matrices, self.series, self.blocks])
        self._hist = hist
        traitlets.link((self.pair_select, "value"), (self, "task_pair"))
        traitlets.link((self.block_select, "value"), (self, "block"))
        self.step_slider.observe(self._on_slider, "value")
        self.observe(self._on_step, "step")
        self.observe(lambda _c: self._draw(), ["task_pair", "block"])
        self._refresh()

    @classmethod
    def from_result(cls, result: TrainingHistory) -> "ConflictMonitor":
        """A monitor of a saved run (``Result.load(path)``): the same figures, no model."""
        return cls(result=result)

    @property
    def history(self) -> TrainingHistory:
        """What is drawn: the trainer's history so far, or the saved one."""
        return self.trainer.history if self.trainer is not None else self._result

    # ------------------------------------------------------------------ running

    def start(self, background: bool = True) -> None:
        """Train up to ``steps`` (in a background thread unless ``background=False``) with
        the aggregator chosen under "next run"."""
        if self.trainer is None:
            raise WorkbenchError("this monitor shows a saved history; there is no trainer to start")
        if self.thread is not None and self.thread.is_alive():
            return
        self.error, self._note = None, ""
        tr = self.trainer
        if tr.step_count >= self.steps:
            self._note = (f"the run has reached step {tr.step_count} of {self.steps}: raise 'until step' to train on")
            self._status()
            return
        if self.next_aggregator.value != tr.aggregator:
            tr.set_aggregator(self.next_aggregator.value)
            self._note = f"{tr.aggregator} from step {tr.step_count}"

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
        else:
            work()
        self._status()

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
        else:
            if running is None:
                running = self.thread is not None and self.thread.is_alive()
            text = f"step {self.trainer.step_count}/{self.steps} ({'running' if running else 'idle'})"
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
        self._draw()

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

    def _draw(self, hist: TrainingHistory | None = None) -> None:
        if self._busy:
            return
        self._hist = hist = self.history if hist is None else hist
        if self.step is not None:
            self._busy = True
            try:
                self.step_slider.value = hist.coord("step").index(self.step)
            finally:
                self._busy = False
        self.step_label.value = "no record yet" if self.step is None else f"step {self.step}"
        _redraw(self.matrices, conflict_matrices(hist, step=self.step, block=self.block))
        _redraw(self.series, conflict_series(hist, task_pair=self.task_pair, block=self.block))
        _redraw(self.blocks, block_bars(hist, step=self.step, task_pair=self.task_pair))
        self._last_draw = time.monotonic()
        self._status()
