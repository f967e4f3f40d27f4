"""Activation-space task vectors: shapes on every family, batched indirect effects equal
the sequential loop, function vectors recover a task on tasklm."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.data import icl_prompts
from workbench.errors import WorkbenchError
from workbench.taskvec.activations import (
    fv_accuracy, fv_cosines, function_vector, icl_task_vectors, indirect_effects, learn_head_weights,
    mean_head_outputs,
)


def test_function_vector_shapes_and_batched_equals_sequential(tiny):
    arch, subject = tiny
    fv = function_vector(subject, "antonym", n_demos=2, n_prompts=6)
    L, H = subject.n_layers, subject.n_heads
    assert fv["mean_z"].shape == (L, H, subject.d_head)
    assert fv["head_out"].shape == (L, H, subject.d_model)
    assert fv["indirect_effect"].shape == (L, H)
    seq = function_vector(subject, "antonym", n_demos=2, n_prompts=6, batched=False)
    assert np.allclose(fv["indirect_effect"], seq["indirect_effect"], atol=1e-5), arch
    # head_out is mean_z through W_O
    want = torch.einsum("d,dm->m", torch.tensor(fv["mean_z"][1, 2]), subject.W_O(1)[2].detach())
    assert np.allclose(fv["head_out"][1, 2], want.numpy(), atol=1e-5)
    assert fv.vector(heads=[(0, 1), (1, 2)]).shape == (subject.d_model,)
    assert len(fv.top_heads(3)) == 3
    acc = fv_accuracy(subject, fv, top_ks=[0, 2], n_prompts=4)
    assert acc["accuracy"].shape == (2, L)
    icl = icl_task_vectors(subject, ["antonym"], n_demos=2, n_prompts=4)
    assert icl["accuracy"].shape == (1, L) and icl["theta"].shape == (1, L, subject.d_model)


def test_indirect_effect_chunks_agree(tasklm):
    ds = icl_prompts("capitalize", 3, 8, seed=1, shuffle_labels=True, tokenizer=tasklm.tokenizer)
    b = tasklm.tokenize(ds["prompt"])
    answers = torch.tensor(ds["answer_id"])
    mz = mean_head_outputs(tasklm, tasklm.tokenize(icl_prompts("capitalize", 3, 8, tokenizer=tasklm.tokenizer)["prompt"]))
    full, p0 = indirect_effects(tasklm, b, answers, mz)
    tiny_budget, p1 = indirect_effects(tasklm, b, answers, mz, max_bytes=1)  # one head per forward
    seq, _ = indirect_effects(tasklm, b, answers, mz, batched=False)
    assert torch.allclose(full, tiny_budget, atol=1e-6) and torch.allclose(full, seq, atol=1e-6) and p0 == p1
    # the k=0 vector is zero, so it changes nothing
    assert 0.0 <= p0 <= 1.0


@pytest.fixture(scope="module")
def fvs(tasklm):
    return {t: function_vector(tasklm, t, n_demos=5, n_prompts=32) for t in ("capitalize", "first_letter")}


def test_function_vector_recovers_a_task_on_tasklm(tasklm, fvs):
    gains = {}
    for t, fv in fvs.items():
        acc = fv_accuracy(tasklm, fv, top_ks=[1, 2, 4], n_prompts=64)
        k, layer, best = acc.best()
        gains[t] = best - float(acc["zero_shot"])
        assert acc["accuracy"][acc.coord("top_k").index(k), acc.coord("layer").index(layer)] == best
    # these tasks are ambiguous zero-shot; the vector alone tells the model which task is meant
    assert max(gains.values()) >= 0.4, gains


def test_learned_head_weights_lower_the_loss(tasklm, fvs):
    fv = fvs["capitalize"]
    res = learn_head_weights(tasklm, fv, layer=1, n_prompts=32, steps=25, lr=0.1)
    assert res["weight"].shape == (tasklm.n_layers, tasklm.n_heads)
    assert res["loss"][-1] < res["loss"][0] - 0.5
    from workbench.taskvec.activations import add_vector_accuracy, zero_shot_batch

    b, answers = zero_shot_batch(tasklm, "capitalize", 64)  # held-out test queries
    learned = add_vector_accuracy(tasklm, b, answers, torch.tensor(res["vector"]), 1)
    base = add_vector_accuracy(tasklm, b, answers, torch.zeros(tasklm.d_model), 1)
    assert learned >= base + 0.4, (learned, base)


def test_cosines_and_icl_comparison(tasklm, fvs):
    icl = icl_task_vectors(tasklm, list(fvs), n_demos=5, n_prompts=16, mode="add")
    cos = fv_cosines(fvs, top_k=2, icl=icl, layer=1)
    m = cos["fv_cosine"]
    assert m.shape == (2, 2) and np.allclose(np.diag(m), 1.0) and np.allclose(m, m.T)
    assert cos["fv_vs_icl"].shape == (2,) and np.all(np.abs(cos["fv_vs_icl"]) <= 1 + 1e-6)
    with pytest.raises(WorkbenchError, match="give the layer"):
        fv_cosines(fvs, icl=icl)


def test_prompts_from_another_tokenizer_are_refused(tasklm):
    from workbench.data import vocabulary
    from workbench.zoo.tokenizer import build_word_tokenizer

    other = build_word_tokenizer(list(reversed(vocabulary())))
    ds = icl_prompts("antonym", 2, 4, tokenizer=other)
    with pytest.raises(WorkbenchError, match="different tokenizer"):
        function_vector(tasklm, "antonym", prompts=ds)
    with pytest.raises(WorkbenchError, match="unknown mode"):
        icl_task_vectors(tasklm, ["antonym"], mode="swap")
