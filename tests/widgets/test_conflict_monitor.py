"""ConflictMonitor headless: figures follow the trainer's records in place; a history
saved mid-run and loaded draws the same figures with no trainer; the selection is a set
of traits; the "next run" aggregator is used on start, and start at the last step says
so; no NaN goes to the front end; training runs in a background thread and stops on
request; errors show in the widget."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from plotly.io.json import to_json_plotly

from widgets import ConflictMonitor
from widgets.mtl_figures import block_bars, conflict_matrices, conflict_series, masked
from workbench.errors import WorkbenchError
from workbench.mtl.trainer import MultiTaskTrainer
from workbench.mtl.workloads import MultiDigitsNet, batch_sampler, digit_losses, multidigits_tensors
from workbench.results import Result


@pytest.fixture(scope="module")
def train_data():
    return multidigits_tensors("train", n=400)


def _trainer(data, **kw):
    return MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(data, 32), monitor_every=5, **kw)


def _drawn(mon) -> list[str]:
    """What the monitor's figures hold, as JSON (trace ids left out)."""
    out = []
    for fw in (mon.matrices, mon.series, mon.blocks):
        d = fw.to_dict()
        for tr in d["data"]:
            tr.pop("uid", None)
        d["layout"].pop("template", None)
        out.append(to_json_plotly(d))
    return out


def test_figures_follow_the_records_in_place(train_data):
    tr = _trainer(train_data, affinity=True)
    mon = ConflictMonitor(tr, steps=20)
    heat, line = mon.matrices.data[0], mon.series.data[0]
    assert mon.step is None and "no record" in mon.step_label.value
    mon.start(background=False)
    assert mon.matrices.data[0] is heat and mon.series.data[0] is line
    h = tr.history
    assert mon.step == 15 and mon.follow
    assert np.allclose(np.asarray(heat.z, float), h["cosine"][-1])
    assert np.allclose(np.asarray(mon.matrices.data[1].z, float), h["affinity"][-1])
    assert list(line.x) == [0, 5, 10, 15] and list(line.y) == h["conflict_fraction"].tolist()
    assert list(mon.series.data[3].y) == h["loss"][:, 1].tolist()
    assert list(mon.blocks.data[0].x) == h.coord("block") == ["trunk.1", "trunk.3"]
    assert "step 20/20" in mon.status.value


def test_selection_is_traits_and_redraws(train_data):
    tr = _trainer(train_data)
    mon = ConflictMonitor(tr, steps=20)
    mon.start(background=False)
    h = tr.history
    mon.block = "trunk.3"
    mon.step = 5
    assert not mon.follow and mon.step_slider.value == 1
    assert np.allclose(np.asarray(mon.matrices.data[0].z, float), h["block_cosine"][1, 1])
    assert "trunk.3, step 5" in mon.matrices.layout.annotations[0].text
    assert list(mon.series.data[0].y) == h["block_conflict_fraction"][:, 1].tolist()
    mon.task_pair = ("right", "left")
    assert mon.task_pair == ("left", "right") and mon.pair_select.value == ("left", "right")
    assert list(mon.blocks.data[0].y) == h["block_cosine"][1, :, 0, 1].tolist()
    assert mon.series.data[1].name == "cosine left vs right"
    mon.step_slider.value = 3  # the slider drives the step; the latest record follows new ones again
    assert mon.step == 15 and mon.follow
    with pytest.raises(Exception, match="step 7 was not recorded"):
        mon.step = 7
    with pytest.raises(Exception, match="two different tasks"):
        mon.task_pair = ("left", "left")


def test_saved_history_draws_the_same_figures(tmp_path, train_data):
    """Mid-run: save the history, load it, and a monitor with no trainer draws exactly what
    the live one shows, for the same selection."""
    tr = _trainer(train_data, affinity=True)
    live = ConflictMonitor(tr, steps=40)
    live.redraw_every = 0.0  # redraw at every record
    tr.fit(12, progress=False)  # stop mid-run ...
    path = tr.history.save(tmp_path / "run.safetensors")
    saved = ConflictMonitor.from_result(Result.load(path))  # ... no model, no trainer
    assert saved.trainer is None and saved.history.coord("step") == [0, 5, 10]
    assert _drawn(saved) == _drawn(live)
    for mon in (live, saved):
        mon.task_pair, mon.block, mon.step = ("left", "right"), "trunk.1", 5
    assert _drawn(saved) == _drawn(live)
    assert "saved run: 3 monitored steps up to step 10, 12 steps trained (equal from step 0)" in saved.status.value
    with pytest.raises(WorkbenchError, match="no trainer"):
        saved.start()
    tr.fit(40, progress=False)  # training on changes the live view only
    assert _drawn(saved) != _drawn(live)


def test_figure_builders_send_no_nan():
    """A block where one task has no gradient gives NaN cosines: they go out as None, and
    every figure's state is valid JSON."""
    from workbench.mtl.trainer import TrainingHistory

    T, B, S = 2, 2, 3
    cos = np.ones((S, B, T, T))
    cos[:, 1, 0, 1] = cos[:, 1, 1, 0] = cos[:, 1, 0, 0] = np.nan
    h = TrainingHistory(
        dims={"step": [0, 1, 2], "task": ["a", "b"], "task_b": ["a", "b"], "block": ["x", "y"]},
        data={"loss": (("step", "task"), np.ones((S, T))), "cosine": (("step", "task", "task_b"), np.ones((S, T, T))),
              "conflict_fraction": (("step",), np.zeros(S)), "block_cosine": (("step", "block", "task", "task_b"), cos),
              "block_conflict_fraction": (("step", "block"), np.zeros((S, B)))},
        attrs={"aggregators": [{"from_step": 0, "aggregator": "equal", "params": {}}], "trained_steps": 3})
    figs = [conflict_matrices(h, block="y"), conflict_series(h, block="y", task_pair=("a", "b")), block_bars(h)]
    for fig in figs:
        json.dumps(fig.to_plotly_json()["data"], allow_nan=False, default=list)
    assert list(figs[0].data[0].z[0]) == [None, None] and list(figs[2].data[0].y) == [1.0, None]
    assert masked([[1.0, np.nan], [np.inf, -2.0]]) == [[1.0, None], [None, -2.0]]
    mon = ConflictMonitor.from_result(h)
    mon.block = "y"
    for fw in (mon.matrices, mon.series, mon.blocks):
        json.dumps(fw.get_state()["_widget_data"], allow_nan=False)  # what the front end receives
    with pytest.raises(WorkbenchError, match="no block 'z'"):
        conflict_matrices(h, block="z")


def test_next_run_aggregator_and_the_last_step(train_data):
    tr = _trainer(train_data)
    mon = ConflictMonitor(tr, steps=10)
    mon.start(background=False)
    mon.next_aggregator.value = "mgda"
    mon.start(background=False)  # at the last step: nothing trains, and the status says so
    assert tr.step_count == 10 and tr.aggregator == "equal"
    assert "step 10/10 (idle)" in mon.status.value and "reached step 10 of 10" in mon.status.value
    mon.until.value = 20
    mon.start(background=False)  # the chosen aggregator runs the next steps
    assert tr.step_count == 20 and tr.aggregator == "mgda"
    assert tr.history.attrs["aggregators"][-1] == {"from_step": 10, "aggregator": "mgda", "params": {}}
    assert "mgda from step 10" in mon.status.value
    assert np.allclose(tr.history["weight"][-1].sum(), 1)


def test_background_training_stops_on_request(train_data):
    tr = _trainer(train_data)
    mon = ConflictMonitor(tr, steps=100_000)
    mon.start_button.click()
    deadline = time.time() + 30
    while tr.step_count < 3 and time.time() < deadline:
        time.sleep(0.05)
    mon.stop_button.click()
    mon.wait(30)
    assert not mon.thread.is_alive() and 3 <= tr.step_count < 100_000
    assert "idle" in mon.status.value


def test_errors_show_in_the_widget(train_data):
    losses = digit_losses()
    losses["left"] = lambda out, b: out.sum() * float("nan")
    tr = MultiTaskTrainer(MultiDigitsNet(), losses, batch_sampler(train_data, 8))
    mon = ConflictMonitor(tr, steps=10)
    mon.start(background=False)
    assert "non-finite loss" in mon.status.value and "&#x27;left&#x27;" in mon.status.value
    with pytest.raises(WorkbenchError, match="a trainer .* or result="):
        ConflictMonitor()
