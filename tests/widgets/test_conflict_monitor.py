"""ConflictMonitor headless: figures follow the trainer's records in place; training runs
in a background thread and stops on request; errors show in the widget."""

from __future__ import annotations

import time

import numpy as np
import pytest

from widgets import ConflictMonitor
from workbench.mtl.trainer import MultiTaskTrainer
from workbench.mtl.workloads import MultiDigitsNet, batch_sampler, digit_losses, multidigits_tensors


@pytest.fixture(scope="module")
def train_data():
    return multidigits_tensors("train", n=400)


def _trainer(data, **kw):
    return MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(data, 32), monitor_every=5, **kw)


def test_figures_follow_the_records_in_place(train_data):
    tr = _trainer(train_data, affinity=True)
    mon = ConflictMonitor(tr, steps=20)
    heat, line = mon.matrices.data[0], mon.series.data[0]
    mon.start(background=False)
    assert mon.matrices.data[0] is heat and mon.series.data[0] is line
    last = tr.history[-1]
    assert np.allclose(np.asarray(heat.z, float), last["cosine"])
    assert np.allclose(np.asarray(mon.matrices.data[1].z, float), last["affinity"])
    assert list(line.x) == [0, 5, 10, 15] and list(line.y) == [r["conflict_fraction"] for r in tr.history]
    assert list(mon.series.data[2].y) == [r["losses"][1] for r in tr.history]
    assert list(mon.blocks.data[0].x) == last["blocks"]
    assert "step 20/20" in mon.status.value


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
