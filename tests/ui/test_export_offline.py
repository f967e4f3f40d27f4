"""Every widget's export opens offline in Chromium and shows the same view: each widget is
built headless, exported to one HTML file, and the file is opened from disk in headless
Chromium with every network request refused. Every figure of the widget is drawn there
(as many plotly plots as the widget has figures, each with its title), the token text is
there, and the page made no request beyond the file itself and logged no error."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch

from tests.ui.lab import browser_page, require_chromium

pytestmark = [pytest.mark.ui]


def _figures(widget) -> list[go.FigureWidget]:
    """The figures a widget shows, in the order they appear (walking its boxes)."""
    out, todo = [], [widget]
    while todo:
        w = todo.pop(0)
        if isinstance(w, go.FigureWidget):
            out.append(w)
        todo = list(getattr(w, "children", ())) + todo
    return out


def _attention(tasklm):
    from widgets import AttentionExplorer, AttentionView

    ex = AttentionExplorer.from_subject(tasklm, ["hot -> cold ; big -> small ; tall ->", "x y z x y z"],
                                        n_boot=20, n_random=2)
    return {"attention_explorer": ex, "attention_view": AttentionView(ex.patterns)}


def _atlas():
    from widgets import TaskAtlas
    from workbench.atlas import shipped_atlas

    return {"task_atlas": TaskAtlas(shipped_atlas(), background=False, n_boot=50)}


def _monitor():
    from widgets import ConflictMonitor
    from workbench.mtl.trainer import MultiTaskTrainer
    from workbench.mtl.workloads import MultiDigitsNet, batch_sampler, digit_losses, multidigits_tensors

    torch.manual_seed(0)
    tr = MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(multidigits_tensors("train", n=200), 32),
                          monitor_every=5, affinity=True)
    tr.fit(20, progress=False)
    return {"conflict_monitor": ConflictMonitor.from_result(tr.history)}


def _task_vectors(tasklm):
    from widgets import TaskVectorLab
    from workbench.taskvec.accuracy import MergeAccuracy, layer_sweep
    from workbench.taskvec.activations import add_vector_accuracy, function_vector, zero_shot_batch

    tasks = ["capitalize", "first_letter"]
    fvs = {t: function_vector(tasklm, t, n_demos=5, n_prompts=8) for t in tasks}
    base = []
    for t in tasks:
        b, answers = zero_shot_batch(tasklm, t, 16)
        base.append(add_vector_accuracy(tasklm, b, answers, torch.zeros(tasklm.d_model), 0))
    merge = MergeAccuracy(dims={"task": tasks}, data={"accuracy": (("task",), torch.tensor(base).numpy())},
                          attrs={"method": "task_arithmetic", "task_vectors": tasks, "weights": [0.0, 0.0]})
    sweeps = [layer_sweep(tasklm, fvs["capitalize"], fvs["capitalize"].top_heads(2), n_prompts=16)]
    return {"task_vector_lab": TaskVectorLab(merge, fvs=fvs, sweeps=sweeps)}


def _circuits(tasklm):
    from widgets import CircuitExplorer
    from workbench.circuits import SAE, collect, find_circuit, train_sae
    from workbench.data import agreement_pairs, agreement_sentences
    from workbench.metrics import logit_diff

    torch.manual_seed(0)
    texts = agreement_sentences(200, seed=0, split="train")
    saes = {}
    for site in ("resid_post.0", "attn_out.1"):
        sae = SAE(tasklm.d_model, 64, kind="topk", k=4, site=site, model="tasklm")
        train_sae(sae, collect(tasklm, site, texts), steps=60, batch_size=256, lr=3e-3, progress=False)
        saes[site] = sae
    pairs = agreement_pairs(8, seed=3, split="test", tokenizer=tasklm.tokenizer)
    good, bad = list(pairs["clean_answer_id"]), list(pairs["corrupted_answer_id"])
    metric = lambda logits, batch: logit_diff(logits, batch, good, bad)  # noqa: E731
    graph = find_circuit(tasklm, saes, list(pairs["clean"]), list(pairs["corrupted"]), metric, node_threshold=0.02,
                         edge_threshold=0.001)
    return {"circuit_explorer": CircuitExplorer(graph, subject=tasklm, saes=saes, clean=list(pairs["clean"]),
                                                metric=metric, texts=texts[:40])}


@pytest.fixture(scope="module")
def widgets(tasklm):
    require_chromium()
    return {**_attention(tasklm), **_atlas(), **_monitor(), **_task_vectors(tasklm), **_circuits(tasklm)}


@pytest.mark.parametrize("name", ["attention_explorer", "attention_view", "task_atlas", "conflict_monitor",
                                  "task_vector_lab", "circuit_explorer"])
def test_export_opens_offline_and_shows_the_view(widgets, tmp_path, name):
    widget = widgets[name]
    path = widget.export_html(tmp_path / f"{name}.html")
    figures = _figures(widget)
    assert figures, name
    requests, errors = [], []
    with browser_page(1024) as page:
        def refuse(route):
            if not route.request.url.startswith(("file://", "data:", "blob:")):
                requests.append(route.request.url)
                return route.abort()
            return route.continue_()

        page.route("**/*", refuse)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(path.resolve().as_uri())
        page.wait_for_function(f"() => document.querySelectorAll('.js-plotly-plot .main-svg').length >= {len(figures)}",
                               timeout=30_000)
        shown = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot')].map(p => "
                              "(p.querySelector('.gtitle') || {textContent: ''}).textContent)")
        text = page.inner_text("body")
    assert requests == [] and errors == [] and not [m for m in page.console_log if m.startswith("error")], \
        (requests, errors)
    assert len(shown) == len(figures), (len(shown), len(figures))
    want = [(f.layout.title.text or "") for f in figures]
    # plotly renders <br> and tags as text: compare the titles' words
    strip = lambda t: " ".join(t.replace("<br>", " ").split())  # noqa: E731
    import re
    for got, title in zip(shown, want):
        assert strip(got) == strip(re.sub(r"<[^>]+>", "", title)).replace("&amp;", "&").replace("&lt;", "<") \
            .replace("&gt;", ">") or not title, (got, title)
    if name.startswith("attention"):  # the token strip is inline
        assert "tall" in text
