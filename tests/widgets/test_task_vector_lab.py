"""TaskVectorLab headless: sliders and method re-merge in place and fast; head clicks and
top-k rebuild the function vector and its layer sweep."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from widgets import TaskVectorLab, merge_bars
from workbench.taskvec.activations import add_vector_accuracy, function_vector, zero_shot_batch
from workbench.taskvec.finetune import MergeEvaluator, finetune

TASKS = ["capitalize", "first_letter", "antonym"]


@pytest.fixture(scope="module")
def lab(tasklm):
    fts = {t: finetune(tasklm, t, steps=30, lr=1e-4, seed=0) for t in TASKS}
    ev = MergeEvaluator(tasklm, fts, n=32)
    fvs = {t: function_vector(tasklm, t, k=5, n=16) for t in ("capitalize", "first_letter")}
    return TaskVectorLab(ev, fvs, n_sweep=32)


def test_sliders_and_method_update_the_bars_in_place(lab):
    fig, bar = lab.bars, lab.bars.data[0]
    lab.sliders["capitalize"].value = 1.0
    assert lab.bars is fig and lab.bars.data[0] is bar
    want = lab.ev.accuracy("task_arithmetic", [1.0, 0.3, 0.3], lam=1.0)
    assert list(bar.y) == [want[t] for t in TASKS]
    lab.method.value = "ties"
    lab.density.value = 0.1
    want = lab.ev.accuracy("ties", [1.0, 0.3, 0.3], lam=1.0, density=0.1)
    assert list(lab.bars.data[0].y) == [want[t] for t in TASKS]
    assert lab.p.disabled and not lab.density.disabled
    assert lab.bars.layout.title.text.startswith("ties merge")
    lab.method.value = "dare"
    assert lab.density.disabled and not lab.p.disabled
    assert lab.last_update_s > 0  # the time of the last update is recorded (its speed is a bench matter)
    # the fine-tuned reference bars and the cosine heatmap
    assert list(lab.bars.data[1].y) == [lab.finetuned[t] for t in TASKS]
    assert np.allclose(np.diag(np.asarray(lab.cosine.data[0].z)), 1.0)


def test_head_click_toggles_and_topk_selects(lab, tasklm):
    lab.task.value = "first_letter"
    lab.topk.value = 2
    fv = lab.fvs["first_letter"]
    assert lab.selected == fv.top_heads(2)
    heat = lab.heatmap.data[0]

    class Points:
        xs = [3]
        ys = [1]

    had = (1, 3) in lab.selected
    lab._on_head_click(heat, Points(), None)
    assert ((1, 3) in lab.selected) != had
    assert list(lab.heatmap.data[1].x) == [h for _, h in lab.selected]
    b, answers = zero_shot_batch(tasklm, "first_letter", 32)
    want = [add_vector_accuracy(tasklm, b, answers, fv.vector(heads=lab.selected), l) for l in range(tasklm.n_layers)]
    assert list(lab.sweep.data[0].y) == want
    assert "L1H3" in lab.heads_label.value or had
    lab.topk.value = 0
    assert lab.selected == [] and lab.heads_label.value.endswith("none")
    base = add_vector_accuracy(tasklm, b, answers, torch.zeros(tasklm.d_model), 0)
    assert list(lab.sweep.data[0].y) == [base] * tasklm.n_layers


def test_task_names_are_escaped():
    fig = merge_bars(["<b>x</b>"], [0.5])
    assert list(fig.data[0].x) == ["&lt;b&gt;x&lt;/b&gt;"]
