"""ConflictMonitor: watch a multi-task training's gradient conflicts as it runs.

A T x T cosine heatmap of the per-task gradients (updated in place at every monitored
step), beside the lookahead affinity matrix when the trainer records it; a time series of
the conflict fraction and each task's loss; a per-block view (mean pairwise cosine of each
parameter block at the latest record); start / stop buttons (training runs in a
background thread, so the notebook stays responsive) and an aggregator selector for the
next run.
"""

from __future__ import annotations

import html
import threading

import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.mtl.aggregators import STATEFUL, STATELESS


def _pairs_mean(c: np.ndarray) -> float:
    iu = np.triu_indices(len(c), 1)
    return float(np.nanmean(np.asarray(c, float)[iu]))


class ConflictMonitor(W.VBox):
    def __init__(self, trainer, steps: int) -> None:
        self.trainer, self.steps = trainer, steps
        names = trainer.names
        self.thread: threading.Thread | None = None
        self.error: Exception | None = None
        self.matrices = go.FigureWidget(make_subplots(rows=1, cols=2, subplot_titles=("gradient cosine", "lookahead affinity")))
        nan = np.full((len(names), len(names)), np.nan)
        self.matrices.add_heatmap(z=nan, x=names, y=names, zmin=-1, zmax=1, colorscale="RdBu", row=1, col=1,
                                  hovertemplate="%{y} vs %{x}: %{z:.3f}<extra></extra>", colorbar=dict(x=0.45))
        self.matrices.add_heatmap(z=nan, x=names, y=names, colorscale="RdBu", zmid=0, row=1, col=2,
                                  hovertemplate="step on %{y} -> %{x}: %{z:.3f}<extra></extra>")
        self.matrices.update_layout(height=330, margin=dict(l=10, r=10, t=40, b=10))
        self.series = go.FigureWidget(make_subplots(specs=[[{"secondary_y": True}]]))
        self.series.add_scatter(x=[], y=[], name="conflict fraction", mode="lines+markers", secondary_y=False)
        for n in names:
            self.series.add_scatter(x=[], y=[], name=f"loss {n}", mode="lines", secondary_y=True)
        self.series.update_layout(height=280, margin=dict(l=10, r=10, t=30, b=10), title="conflicts and losses",
                                  xaxis_title="step")
        self.blocks = go.FigureWidget(go.Bar(x=[], y=[]))
        self.blocks.update_layout(height=260, margin=dict(l=10, r=10, t=30, b=10), title="mean pairwise cosine per block",
                                  yaxis_range=[-1, 1])
        self.aggregator = W.Dropdown(options=list(STATELESS + STATEFUL), value=trainer.aggregator,
                                     description="next run")
        self.start_button = W.Button(description="start", button_style="success")
        self.stop_button = W.Button(description="stop", button_style="warning")
        self.status = W.HTML()
        self.start_button.on_click(lambda _b: self.start())
        self.stop_button.on_click(lambda _b: self.stop())
        trainer.callbacks.append(self._on_record)
        for rec in trainer.history:
            self._on_record(trainer, rec)
        super().__init__([W.HBox([self.start_button, self.stop_button, self.aggregator, self.status]),
                          self.matrices, self.series, self.blocks])
        self._status()

    # ------------------------------------------------------------------ running

    def start(self, background: bool = True) -> None:
        """Train up to ``steps`` (in a background thread unless ``background=False``)."""
        if self.thread is not None and self.thread.is_alive():
            return
        self.error = None

        def work():
            try:
                self.trainer.fit(self.steps, progress=False)
            except Exception as e:  # shown in the widget; the notebook keeps running
                self.error = e
            self._status(running=False)

        if background:
            self.thread = threading.Thread(target=work, daemon=True)
            self.thread.start()
        else:
            work()
        self._status()

    def stop(self) -> None:
        self.trainer.stop()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def _status(self, running: bool | None = None) -> None:
        if running is None:
            running = self.thread is not None and self.thread.is_alive()
        text = f"step {self.trainer.step_count}/{self.steps} ({'running' if running else 'idle'})"
        if self.error is not None:
            text += f' <span style="color:#b00">{html.escape(str(self.error))}</span>'
        self.status.value = text

    # ------------------------------------------------------------------ drawing

    def _on_record(self, trainer, rec: dict) -> None:
        steps = [r["step"] for r in trainer.history]
        with self.matrices.batch_update():
            self.matrices.data[0].z = np.asarray(rec["cosine"], float)
            if "affinity" in rec:
                self.matrices.data[1].z = np.asarray(rec["affinity"], float)
        with self.series.batch_update():
            self.series.data[0].x, self.series.data[0].y = steps, [r["conflict_fraction"] for r in trainer.history]
            for t in range(len(trainer.names)):
                self.series.data[1 + t].x = steps
                self.series.data[1 + t].y = [r["losses"][t] for r in trainer.history]
        with self.blocks.batch_update():
            self.blocks.data[0].x = list(rec["blocks"])
            self.blocks.data[0].y = [_pairs_mean(np.asarray(c)) for c in rec["block_cosine"]]
        self._status()
