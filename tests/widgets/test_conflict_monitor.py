"""ConflictMonitor headless: figures follow the trainer's records in place; a history
saved mid-run and loaded draws the same figures with no trainer; the selection is a set
of traits; the "next run" aggregator is used on start, and start at the last step trains
on (saying so); no NaN goes to the front end; training runs in a background thread and
stops on request; errors show in the widget; smoothing, per-pair block bars, overlaid
runs and the export."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from plotly.io.json import to_json_plotly

from widgets import ConflictMonitor
from widgets.figures.mtl import (
    affinity_matrix, block_bars, conflict_series, cosine_matrix, masked, runs_overlay, smooth,
)
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
    for fw in (mon.cosines, mon.affinity, mon.series, mon.blocks):
        d = fw.to_dict()
        for tr in d["data"]:
            tr.pop("uid", None)
        d["layout"].pop("template", None)
        out.append(to_json_plotly(d))
    return out


def test_figures_follow_the_records_in_place(train_data):
    tr = _trainer(train_data, affinity=True)
    mon = ConflictMonitor(tr, steps=20)
    heat, line = mon.cosines.data[0], mon.series.data[0]
    assert mon.step is None and "no record" in mon.step_label.value
    mon.start(background=False)
    assert mon.cosines.data[0] is heat and mon.series.data[0] is line
    h = tr.history
    assert mon.step == 15 and mon.follow
    assert np.allclose(np.asarray(heat.z, float), h["cosine"][-1])
    # trained before it was shown (the notebook's cell): a view created now draws the run
    state = mon.cosines.get_state()["_widget_data"][0]["z"]
    assert np.allclose(np.asarray(state, float), h["cosine"][-1])
    assert list(mon.series.get_state()["_widget_data"][0]["x"]) == [0, 5, 10, 15]
    assert np.allclose(np.asarray(mon.affinity.data[0].z, float), h["affinity"][-1])
    assert list(line.x) == [0, 5, 10, 15] and list(line.y) == h["conflict_fraction"].tolist()
    assert list(mon.series.data[6].y) == h["loss"][:, 1].tolist()  # (raw, smoothed) x (fraction, cosine, 2 losses)
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
    assert np.allclose(np.asarray(mon.cosines.data[0].z, float), h["block_cosine"][1, 1])
    assert "trunk.3, step 5" in mon.cosines.layout.title.text
    assert list(mon.series.data[0].y) == h["block_conflict_fraction"][:, 1].tolist()
    mon.task_pair = ("right", "left")
    assert mon.task_pair == ("left", "right") and mon.pair_select.value == ("left", "right")
    assert list(mon.blocks.data[0].y) == h["block_cosine"][1, :, 0, 1].tolist()
    assert mon.series.data[2].name == "cosine left vs right"
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
    figs = [cosine_matrix(h, block="y"), conflict_series(h, block="y", task_pair=("a", "b"), smoothing=0.5),
            block_bars(h), affinity_matrix(h), runs_overlay({"one": h, "two": h}, block="y")]
    for fig in figs:
        json.dumps(fig.to_plotly_json()["data"], allow_nan=False, default=list)
    assert list(figs[0].data[0].z[0]) == [None, None] and list(figs[2].data[0].y) == [1.0, None]
    assert "not recorded" in figs[3].layout.title.text
    assert masked([[1.0, np.nan], [np.inf, -2.0]]) == [[1.0, None], [None, -2.0]]
    mon = ConflictMonitor.from_result(h)
    mon.block = "y"
    for fw in (mon.cosines, mon.affinity, mon.series, mon.blocks):
        json.dumps(fw.get_state()["_widget_data"], allow_nan=False)  # what the front end receives
    with pytest.raises(WorkbenchError, match="no block 'z'"):
        cosine_matrix(h, block="z")


def test_next_run_aggregator_and_the_last_step(train_data):
    """After the run (the notebook's state), "start" trains on with the aggregator chosen
    under "next run", and the status says how far and with what."""
    tr = _trainer(train_data)
    mon = ConflictMonitor(tr, steps=10)
    mon.start(background=False)
    assert tr.step_count == 10 and "step 10/10 (idle)" in mon.status.value
    mon.next_aggregator.value = "mgda"
    mon.start_button.click()  # at the last step: trains 10 more steps with mgda (in the background)
    mon.wait(60)
    assert tr.step_count == 20 and tr.aggregator == "mgda" and mon.until.value == 20
    assert tr.history.attrs["aggregators"][-1] == {"from_step": 10, "aggregator": "mgda", "params": {}}
    assert "step 20/20 (idle)" in mon.status.value
    assert "reached step 10 of 10; training on to step 20" in mon.status.value and "mgda from step 10" in mon.status.value
    w = tr.history["weight"]
    assert np.allclose(w[-1].sum(), 1) and np.allclose(w[1], 1.0)  # equal weights before, mgda's after
    mon.next_aggregator.value = "pcgrad"
    mon.until.value = 25
    mon.start(background=False)  # a raised "until step" is honoured as it is
    assert tr.step_count == 25 and tr.aggregator == "pcgrad" and "pcgrad from step 20" in mon.status.value


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


def _history(T=3, S=4, B=2, seed=0):
    from workbench.mtl.trainer import TrainingHistory

    rng = np.random.default_rng(seed)
    tasks = [f"t{i}" for i in range(T)]
    cos = rng.uniform(-1, 1, (S, T, T))
    cos = (cos + cos.transpose(0, 2, 1)) / 2
    bcos = rng.uniform(-1, 1, (S, B, T, T))
    bcos = (bcos + bcos.transpose(0, 1, 3, 2)) / 2
    return TrainingHistory(
        dims={"step": [0, 10, 20, 30][:S], "task": tasks, "task_b": tasks, "block": [f"layer.{b}" for b in range(B)]},
        data={"loss": (("step", "task"), rng.uniform(0, 2, (S, T))), "cosine": (("step", "task", "task_b"), cos),
              "conflict_fraction": (("step",), rng.uniform(0, 1, S)),
              "block_cosine": (("step", "block", "task", "task_b"), bcos),
              "block_conflict_fraction": (("step", "block"), rng.uniform(0, 1, (S, B)))},
        attrs={"aggregators": [{"from_step": 0, "aggregator": "equal", "params": {}}], "trained_steps": S * 10})


def test_block_bars_show_every_pair_and_the_step_slider_looks_back():
    h = _history()
    mon = ConflictMonitor.from_result(h)
    assert [t.name for t in mon.blocks.data] == ["t0 vs t1", "t0 vs t2", "t1 vs t2"]
    assert np.allclose(mon.blocks.data[2].y, h["block_cosine"][-1][:, 1, 2])
    assert all(t.opacity == 1.0 for t in mon.blocks.data)
    mon.task_pair = ("t2", "t0")  # the chosen pair solid, the others faint
    assert [t.opacity for t in mon.blocks.data] == [0.25, 1.0, 0.25]
    mon.step_slider.value = 1  # look back at record 1: matrices and bars move there
    assert mon.step == 10 and not mon.follow
    assert np.allclose(np.asarray(mon.cosines.data[0].z, float), h["cosine"][1])
    assert np.allclose(mon.blocks.data[0].y, h["block_cosine"][1][:, 0, 1])
    assert "step 10" in mon.blocks.layout.title.text and mon.step_label.value == "step 10"


def test_smoothing_is_tensorboards_and_redraws_the_series():
    assert np.allclose(smooth([1.0, 2.0, 3.0], 0.0), [1, 2, 3])
    s = smooth([1.0, np.nan, 3.0], 0.5)  # debiased EMA, NaN skipped
    assert s[0] == 1.0 and np.isnan(s[1]) and s[2] == pytest.approx((0.25 * 1 + 0.5 * 3) / 0.75)
    with pytest.raises(WorkbenchError, match="smoothing"):
        smooth([1.0], 1.0)
    h = _history()
    mon = ConflictMonitor.from_result(h)
    raw, smoothed = mon.series.data[0], mon.series.data[1]
    assert smoothed.visible is False and raw.opacity == 1.0
    mon.smooth_slider.value = 0.6
    assert mon.smoothing == 0.6 and mon.series.data[1] is smoothed and smoothed.visible is True
    assert np.allclose(smoothed.y, smooth(h["conflict_fraction"], 0.6)) and raw.opacity == 0.3
    assert np.allclose(raw.y, h["conflict_fraction"])
    with pytest.raises(Exception, match="smoothing"):
        mon.smoothing = 1.5


def test_runs_overlay_and_export(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the export button writes its default file name here
    runs = {"equal": _history(seed=1), "pcgrad": _history(seed=2), "mgda": _history(seed=3)}
    mon = ConflictMonitor.from_result(runs["equal"], runs=runs)
    names = [t.name for t in mon.overlay.data]
    assert names == [n for n in runs for _ in range(3)]  # three panels per run
    from workbench.mtl.gradients import mean_pair_cosine

    assert np.allclose(mon.overlay.data[4].y, mean_pair_cosine(runs["pcgrad"]["cosine"]))
    mon.block = "layer.1"
    assert np.allclose(mon.overlay.data[3].y, runs["pcgrad"]["block_conflict_fraction"][:, 1])
    assert "3 runs overlaid" in mon.status.value
    mon.export_box.run()
    assert "wrote" in mon.export_box.children[2].value
    out = mon.export_html(tmp_path / "monitor.html")
    text = out.read_text()
    assert text.count('class="plotly-graph-div"') == 5 and "block: layer.1" in text
    with pytest.raises(WorkbenchError, match="runs must map"):
        ConflictMonitor.from_result(runs["equal"], runs={"x": 3})


def test_no_update_message_reaches_a_figure_with_no_view(monkeypatch, train_data):
    """A monitor trained before it is shown sends each figure's change as state (what a
    view created later draws), never as plotly's update message, which a front-end model
    still starting drops (and breaks on); once a view is on screen, updates go as usual."""
    import ipywidgets as W

    sent = []
    original = W.Widget._send

    def record(self, msg, buffers=None):
        sent.append((self, msg.get("state", {})))
        return original(self, msg, buffers)

    monkeypatch.setattr(W.Widget, "_send", record)
    tr = _trainer(train_data, affinity=True)
    mon = ConflictMonitor(tr, steps=10)
    figures = (mon.cosines, mon.affinity, mon.series, mon.blocks)
    sent.clear()
    mon.start(background=False)
    mine = [state for w, state in sent if any(w is f for f in figures)]
    assert mine and not any(state.get("_py2js_update") for state in mine)
    assert any("_widget_data" in state for state in mine)
    for f in figures:
        f._view_count = 1  # the front end says a view is on screen
    sent.clear()
    mon.step = 0
    assert any(state.get("_py2js_update") for w, state in sent if w is mon.cosines)
