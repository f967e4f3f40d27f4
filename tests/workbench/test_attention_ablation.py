"""Head ablation with controls, the batched scan against one-at-a-time ablation, the
attribution estimate, pruning, and the zoo model's known heads."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from workbench import metrics
from workbench.attention.ablation import ablate_heads, prune_curve, scan_heads
from workbench.errors import WorkbenchError

SAME_LEN = ["hot -> cold ; big -> small", "cat -> Cat ; dog -> Dog", "go -> went ; see -> saw"]


def _manual(subject, batch, patch):
    return float(metrics.next_token_loss(subject.logits(batch, patch=patch), batch).mean())


@pytest.mark.parametrize("replacement", ["zero", "mean", "resample"])
def test_ablation_equals_a_hand_written_patch_and_controls_draw_other_heads(tiny, replacement):
    arch, subject = tiny
    batch = subject.tokenize(SAME_LEN)
    r = ablate_heads(subject, batch, [(1, 2)], replacement=replacement, n_random=5, seed=3)
    z = subject.cache(batch, ["z.1"])["z.1"]
    if replacement == "zero":
        repl = torch.zeros_like(z[:, :, 2])
    elif replacement == "mean":
        m = batch.attention_mask[..., None].float()
        repl = ((z[:, :, 2] * m).sum((0, 1)) / m.sum((0, 1))).expand_as(z[:, :, 2])
    else:
        repl = None  # checked against the scan below
    if repl is not None:
        def fn(zz):
            zz = zz.clone()
            zz[:, :, 2] = repl
            return zz
        want = _manual(subject, batch, {"z.1": fn})
        assert r.summary["ablated"] == pytest.approx(want, abs=1e-5), arch
    assert r.summary["base"] == pytest.approx(_manual(subject, batch, None), abs=1e-5)
    assert len(r["control_effect"]) == 5
    assert all(len(d) == 1 and tuple(d[0]) != (1, 2) for d in r.attrs["control_heads"])


@pytest.mark.parametrize("replacement", ["zero", "resample"])
def test_batched_scan_equals_ablating_each_head_alone(tiny, replacement):
    arch, subject = tiny
    if not subject.has_logits:
        pytest.skip("no language-model head")
    batch = subject.tokenize(SAME_LEN)
    scan = scan_heads(subject, batch, replacement=replacement, seed=1, max_bytes=1)  # one head per pass
    scan_all = scan_heads(subject, batch, replacement=replacement, seed=1)  # every head in one pass
    for layer in range(subject.n_layers):
        for head in range(subject.n_heads):
            one = ablate_heads(subject, batch, [(layer, head)], replacement=replacement, n_random=0, seed=1)
            assert scan["effect"][layer, head] == pytest.approx(one.summary["effect"], abs=1e-5), (arch, layer, head)
    assert np.allclose(scan["effect"], scan_all["effect"], atol=1e-5)
    assert scan["attribution"].shape == (subject.n_layers, subject.n_heads)


def test_attribution_is_the_first_order_term_of_the_ablation(tiny):
    """Scaling the ablation toward zero, the exact effect divided by the scale tends to the
    attribution estimate (which is the directional derivative)."""
    from tests.conftest import make_tiny
    from workbench import from_model

    arch, small = tiny
    subject = from_model(make_tiny(arch, small.tokenizer).double(), small.tokenizer)  # float64: a clean derivative
    batch = subject.tokenize(SAME_LEN)
    scan = scan_heads(subject, batch, replacement="zero")
    eps = 1e-2

    def scaled(c):
        def fn(z):
            z = z.clone()
            z[:, :, 1] = z[:, :, 1] * c
            return z
        return {"z.0": fn}

    # central difference along the ablation direction (-z): error O(eps^2); some
    # families keep parts (rotary tables) in float32, hence the tolerance
    fd = (_manual(subject, batch, scaled(1 - eps)) - _manual(subject, batch, scaled(1 + eps))) / (2 * eps)
    assert fd == pytest.approx(scan["attribution"][0, 1], rel=0.03, abs=1e-6), arch
    assert abs(scan["attribution"][0, 1]) > 1e-6


def test_known_heads_matter_far_more_than_random_heads(tasklm):
    """The previous-token heads (every induction head depends on them; the induction
    heads themselves are redundant) matter far more than random pairs of other heads."""
    from workbench.attention import head_scores
    from workbench.data import repeated_sequences

    ds = repeated_sequences(tasklm.tokenizer, 48, 20, seed=1)
    ids = torch.tensor(ds["input_ids"])
    scores = head_scores(tasklm, {"input_ids": ids}, kinds=["previous_token"], n_boot=0, control=False)
    prev = [(l, h) for l in range(tasklm.n_layers) for h in range(tasklm.n_heads) if scores["score"][0, l, h] > 0.5]
    assert 1 <= len(prev) <= 3
    r = ablate_heads(tasklm, ids, prev, n_random=15)
    s = r.summary
    assert s["effect"] > 2.0 and s["control_p"] <= 0.1 and s["effect"] > 2 * s["control_mean"], s
    scan = scan_heads(tasklm, ids, ig_steps=4)
    top = np.argsort(scan["effect"], axis=None)[::-1][: len(prev)]
    assert {(int(i // tasklm.n_heads), int(i % tasklm.n_heads)) for i in top} == set(prev)
    assert scan.attrs["spearman"] > 0.5  # integrated gradients; the clean gradient saturates here
    curve = prune_curve(tasklm, ids, step=2)
    last = tasklm.n_layers * tasklm.n_heads - 1  # one head always stays
    assert list(curve["heads_removed"]) == sorted(set(range(0, last, 2)) | {last})
    assert curve["metric"][-1] > curve["metric"][0] + 1.0
    # by exact importance, the last two heads standing are a previous-token and an induction head
    exact = prune_curve(tasklm, ids, importance="exact")
    ind = head_scores(tasklm, {"input_ids": ids}, kinds=["induction"], n_boot=0, control=False)["score"][0]
    (l1, h1), (l2, h2) = [tuple(h) for h in exact.attrs["order"][-2:]]
    assert {(l1, h1), (l2, h2)} & set(prev) and max(ind[l1, h1], ind[l2, h2]) > 0.5
    with pytest.raises(WorkbenchError, match="importance must be"):
        prune_curve(tasklm, ids, importance="random")


def test_task_accuracy_metric(tasklm):
    from workbench.data import icl_prompts

    ds = icl_prompts("antonym", 4, 32, seed=5, tokenizer=tasklm.tokenizer)
    acc = functools.partial(metrics.correct, answers=list(ds["answer_id"]))
    r = ablate_heads(tasklm, list(ds["prompt"]), [(1, 0)], metric=lambda lg, b: acc(lg, b).float(), n_random=3)
    assert r.summary["base"] >= 0.9  # the card's in-context accuracy
    assert 0.0 <= r.summary["ablated"] <= 1.0
    # per-prompt answers line up in the batched scan too
    scan = scan_heads(tasklm, list(ds["prompt"]), metric=lambda lg, b: acc(lg, b).float(), attribution=False)
    one = ablate_heads(tasklm, list(ds["prompt"]), [(1, 0)], metric=lambda lg, b: acc(lg, b).float(), n_random=0)
    assert scan["effect"][1, 0] == pytest.approx(one.summary["effect"])


def test_bad_input(tiny):
    arch, subject = tiny
    with pytest.raises(WorkbenchError, match="layer 9 out of range"):
        ablate_heads(subject, SAME_LEN, [(9, 0)])
    with pytest.raises(WorkbenchError, match="head 7 out of range"):
        ablate_heads(subject, SAME_LEN, [(0, 7)])
    with pytest.raises(WorkbenchError, match="unknown ablation replacement 'noise'.*zero"):
        ablate_heads(subject, SAME_LEN, [(0, 0)], replacement="noise")
    with pytest.raises(WorkbenchError, match="equal lengths"):
        ablate_heads(subject, ["a b", "a b c d"], [(0, 0)], replacement="resample")
    with pytest.raises(WorkbenchError, match="unknown metric"):
        ablate_heads(subject, SAME_LEN, [(0, 0)], metric="accuracy")
