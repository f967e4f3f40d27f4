"""TaskVectorLab headless: sliders and method re-merge in place; head clicks and the top-k
trait rebuild the function vector and its layer sweep; the selection is traits that link
both ways; built from saved results it draws what the live lab draws, with re-merging
off and saying why."""

from __future__ import annotations

import ipywidgets as W
import numpy as np
import pytest
import torch

from tests.widgets.compare import assert_same_figure
from widgets import TaskVectorLab, merge_bars
from workbench.results import Result
from workbench.taskvec.accuracy import MergeAccuracy, layer_sweep
from workbench.taskvec.activations import add_vector_accuracy, function_vector, zero_shot_batch
from workbench.taskvec.finetune import MergeEvaluator, finetune

TASKS = ["capitalize", "first_letter", "antonym"]


@pytest.fixture(scope="module")
def lab(tasklm):
    fts = {t: finetune(tasklm, t, steps=30, lr=1e-4, seed=0) for t in TASKS}
    ev = MergeEvaluator(tasklm, fts, n=32)
    fvs = {t: function_vector(tasklm, t, n_demos=5, n_prompts=16) for t in ("capitalize", "first_letter")}
    return TaskVectorLab.from_evaluator(ev, fvs, n_sweep=32)


def test_sliders_and_method_update_the_bars_in_place(lab):
    fig, bar = lab.bars, lab.bars.data[0]
    lab.sliders["capitalize"].value = 1.0
    assert lab.bars is fig and lab.bars.data[0] is bar
    want = lab.ev.accuracy("task_arithmetic", [1.0, 0.3, 0.3], lam=1.0)
    assert list(bar.y) == [want[t] for t in TASKS] and lab.merge.as_dict() == want
    lab.method_select.value = "ties"
    assert lab.method == "ties"
    lab.density.value = 0.1
    want = lab.ev.accuracy("ties", [1.0, 0.3, 0.3], lam=1.0, density=0.1)
    assert list(lab.bars.data[0].y) == [want[t] for t in TASKS]
    assert lab.merge.attrs["method"] == "ties" and lab.merge.attrs["density"] == 0.1
    assert lab.p.disabled and not lab.density.disabled
    assert lab.bars.layout.title.text.startswith("ties merge")
    lab.method = "dare"  # the trait moves the selector and re-merges
    assert lab.method_select.value == "dare" and lab.bars.layout.title.text.startswith("dare merge")
    assert lab.density.disabled and not lab.p.disabled
    assert lab.last_update_s > 0  # the time of the last update is recorded (its speed is a bench matter)
    # the fine-tuned reference bars and the cosine heatmap
    ft = lab.finetuned.as_dict()
    assert list(lab.bars.data[1].y) == [ft[t] for t in TASKS]
    assert ft["antonym"] == lab.ev.single("antonym")["antonym"]
    assert np.allclose(np.diag(np.asarray(lab.cosine.data[0].z)), 1.0)


def test_head_click_toggles_and_topk_selects(lab, tasklm):
    lab.task = "first_letter"
    assert lab.task_select.value == "first_letter"
    lab.top_k = 2
    fv = lab.fvs["first_letter"]
    assert lab.heads == fv.top_heads(2) and lab.topk_slider.value == 2
    heat = lab.heatmap.data[0]

    class Points:
        xs = [3]
        ys = [1]

    had = (1, 3) in lab.heads
    lab._on_head_click(heat, Points(), None)
    assert ((1, 3) in lab.heads) != had
    assert list(lab.heatmap.data[1].x) == [h for _, h in lab.heads]
    b, answers = zero_shot_batch(tasklm, "first_letter", 32)
    want = [add_vector_accuracy(tasklm, b, answers, fv.vector(heads=lab.heads), l) for l in range(tasklm.n_layers)]
    assert list(lab.sweep.data[0].y) == want
    assert lab.sweep_result.heads == lab.heads and list(lab.sweep_result["accuracy"]) == want
    assert "L1H3" in lab.heads_label.value or had
    # the slider shows how many heads the vector holds, and the line says they were clicked
    assert lab.top_k == len(lab.heads) == lab.topk_slider.value == (3 if not had else 1)
    assert f"heads in vector ({len(lab.heads)})" in lab.heads_label.value
    assert "chosen by clicking" in lab.heads_label.value or set(lab.heads) == set(fv.top_heads(len(lab.heads)))
    lab._on_head_click(heat, Points(), None)  # toggled back: the top 2 again
    assert lab.heads == fv.top_heads(2) and lab.topk_slider.value == 2
    assert "the top 2 by indirect effect" in lab.heads_label.value
    lab.topk_slider.value = 3  # moving the slider replaces the set with the k strongest
    assert lab.heads == fv.top_heads(3) and "the top 3" in lab.heads_label.value
    lab.topk_slider.value = 0
    assert lab.top_k == 0 and lab.heads == [] and "none" in lab.heads_label.value
    base = add_vector_accuracy(tasklm, b, answers, torch.zeros(tasklm.d_model), 0)
    assert list(lab.sweep.data[0].y) == [base] * tasklm.n_layers
    assert float(lab.sweep_result["zero_shot"]) == base


def test_heads_trait_links_both_ways(lab):
    lab.task = "capitalize"
    mirror = W.Text()
    link = W.dlink((lab, "heads"), (mirror, "value"), transform=lambda hs: ",".join(f"L{l}H{h}" for l, h in hs))
    sweep_notes = []
    lab.sweep_reason.observe(lambda c: sweep_notes.append(c["new"]), names="value")
    try:
        lab.heads = [(0, 1), (1, 2)]
        assert sweep_notes and sweep_notes[0].startswith("<i>working...")  # a live sweep says it is working
        assert lab.top_k == 2 and lab.topk_slider.value == 2
        assert mirror.value == "L0H1,L1H2" and list(lab.heatmap.data[1].x) == [1, 2]
        assert lab.sweep.layout.title.text == "layer sweep: 2 heads (capitalize)"
    finally:
        link.unlink()
    with pytest.raises(Exception, match="no head L9H0"):
        lab.heads = [(9, 0)]


def test_built_from_saved_results_draws_the_same(lab, tasklm, tmp_path):
    lab.task, lab.heads = "capitalize", [(1, 0), (0, 3)]
    lab.sliders["antonym"].value = -0.5

    def reload(result, name):
        return Result.load(result.save(tmp_path / f"{name}.safetensors"))

    fvs = {t: reload(fv, t) for t, fv in lab.fvs.items()}
    offline = TaskVectorLab(reload(lab.merge, "merge"), reload(lab.diagnostics, "diag"),
                            finetuned=reload(lab.finetuned, "ft"), fvs=fvs,
                            sweeps=[reload(lab.sweep_result, "sweep")])
    assert offline.task == "capitalize" and offline.heads == [(1, 0), (0, 3)]
    assert offline.method == lab.method and offline.sliders["antonym"].value == -0.5
    for fig in ("bars", "cosine", "heatmap", "sweep"):
        assert_same_figure(getattr(offline, fig), getattr(lab, fig))
    # re-merging needs the evaluator: the controls are off and say why
    assert all(s.disabled and "from_evaluator" in s.tooltip for s in offline.sliders.values())
    assert offline.method_select.disabled and "re-merging needs a model" in offline.weight_reason.value
    with pytest.raises(Exception, match="re-merging needs a model"):
        offline.method = "ties" if offline.method != "ties" else "dare"
    # a head click still moves the selection; a head set with no saved sweep says why it shows none
    heat = offline.heatmap.data[0]

    class Points:
        xs = [2]
        ys = [0]

    offline._on_head_click(heat, Points(), None)
    assert offline.heads == [(1, 0), (0, 3), (0, 2)] and list(offline.heatmap.data[1].x) == [0, 3, 2]
    assert offline.sweep_result is None and len(offline.sweep.data[0].y) == 0
    assert "sweeping a new head set needs a model" in offline.sweep_reason.value
    offline._on_head_click(heat, Points(), None)
    assert offline.sweep_result is not None
    assert_same_figure(offline.sweep, lab.sweep)
    # with a subject (no evaluator) new head sets are swept live, as the core computes them
    half = TaskVectorLab(offline.merge, fvs=fvs, subject=tasklm, n_sweep=32)
    half.heads = [(0, 2)]
    ref = layer_sweep(tasklm, fvs["capitalize"], [(0, 2)], n_prompts=32)
    assert list(half.sweep.data[0].y) == list(ref["accuracy"]) and half.sliders["antonym"].disabled


def test_merge_bars_are_pure_and_escape_task_names():
    r = MergeAccuracy(dims={"task": ["<b>x</b>", "y"]}, data={"accuracy": (("task",), np.array([0.5, 0.25]))},
                      attrs={"method": "ties"})
    fig = merge_bars(r)
    assert list(fig.data[0].x) == ["&lt;b&gt;x&lt;/b&gt;", "y"] and list(fig.data[0].y) == [0.5, 0.25]
    assert fig.layout.title.text == "ties merge: mean zero-shot accuracy 0.38"


def test_layer_axes_have_integer_ticks_and_plots_fit(lab):
    for fig in (lab.heatmap, lab.sweep):
        assert fig.layout.xaxis.dtick == 1 and fig.layout.xaxis.tick0 == 0
    assert lab.heatmap.layout.yaxis.dtick == 1
    for fig in (lab.bars, lab.cosine, lab.heatmap, lab.sweep):
        # sized by their container (responsive figures send their data in the first message)
        assert fig.layout.width is None and fig.layout.autosize
        assert fig._config.get("responsive") and len(fig.data[0].to_plotly_json()) > 2
    # whole slider labels, no "country_c..." truncation
    assert all(s.description == n and s.style.description_width == "initial" for n, s in lab.sliders.items())


def test_remerge_says_working_first(lab):
    notes = []
    lab.status.observe(lambda c: notes.append(c["new"]), names="value")
    lab.sliders["first_letter"].value = 0.5
    assert notes[0].startswith("<i>working...") and "re-merged and scored" in notes[-1]


def test_export_writes_the_view(lab, tmp_path):
    out = lab.export_html(tmp_path / "lab.html")
    text = out.read_text()
    assert "merge: mean zero-shot accuracy" in text and "indirect effect per head" in text
    assert "capitalize: " in text  # the coefficients, as text


def test_every_plot_opens_with_what_it_shows(lab, tasklm):
    # no figure is updated between its construction and its first draw: the state the front end
    # opens with is the one shown (an update that lands before plotly's widget code loads is lost).
    # The saved sweep is the one of the selection a new lab opens on (not of whatever the shared
    # ``lab`` shows after the tests before this one moved it).
    first = TaskVectorLab(lab.merge, lab.diagnostics, finetuned=lab.finetuned, fvs=lab.fvs)
    sweep = layer_sweep(tasklm, lab.fvs[first.task], first.heads, n_prompts=32)
    again = TaskVectorLab(lab.merge, lab.diagnostics, finetuned=lab.finetuned, fvs=lab.fvs, sweeps=[sweep])
    for fig in (again.bars, again.cosine, again.heatmap, again.sweep):
        assert fig._last_trace_edit_id == 0 and fig._last_layout_edit_id == 0
    assert again.sweep._widget_data[0]["y"] == list(sweep["accuracy"])
