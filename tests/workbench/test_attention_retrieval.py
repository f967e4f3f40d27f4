"""Retrieval heads, head overlap between tasks, and integrated-gradients token attribution."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.attention.attribution import normalised, token_attribution
from workbench.attention.retrieval import head_overlap, needle_prompts, retrieval_scores
from workbench.errors import WorkbenchError


def test_needle_prompts_hide_the_needle_and_end_with_its_cue(word_tokenizer):
    items = needle_prompts(word_tokenizer, 5, needle_len=6, haystack_len=20, cue=2, seed=1)
    for it in items:
        ids, s, needle = it["input_ids"], it["needle_start"], it["needle"]
        assert ids[0] == word_tokenizer.bos_token_id and len(ids) == 1 + 20 + 6 + 2
        assert ids[s : s + 6] == needle and ids[-2:] == needle[:2]
        assert len(set(ids[1:-2])) == 26  # no token repeats except the cue


def test_retrieval_heads_of_the_zoo_model_are_its_induction_heads(tasklm):
    from workbench.zoo import checks

    r = retrieval_scores(tasklm, needle_prompts(tasklm.tokenizer, 16, seed=2))
    assert r["copy_accuracy"].mean() > 0.8
    layer, head = r.best()
    assert checks.induction(tasklm)["induction_scores"][layer][head] > 0.5  # one of the induction heads
    assert r["score"].max() > 0.8


def test_retrieval_needs_a_decoder(minilm):
    with pytest.raises(WorkbenchError, match="causal"):
        retrieval_scores(minilm, [{"input_ids": [1, 2], "needle_start": 0, "needle": [1, 2], "cue": 1}])


def test_head_overlap_exact():
    a = np.array([[5.0, 0.1, -4.0], [0.0, 3.0, 0.2]])
    b = np.array([[0.0, 0.1, 6.0], [2.0, 0.0, 0.2], ])
    out = head_overlap(a, b, top_k=2)  # a: (0,0),(0,2); b: (0,2),(1,0)
    assert out["shared"] == [(0, 2)] and out["jaccard"] == pytest.approx(1 / 3)
    assert out["chance"] == pytest.approx(4 / 6)
    with pytest.raises(WorkbenchError, match="differ in shape"):
        head_overlap(a, b[:1], 2)


@pytest.mark.parametrize("which", ["tiny-gpt2", "tasklm"])
def test_integrated_gradients_are_complete(which, tasklm, word_tokenizer):
    from tests.conftest import make_tiny
    from workbench import from_model

    subject = tasklm if which == "tasklm" else from_model(make_tiny("gpt2", word_tokenizer), word_tokenizer)
    r = token_attribution(subject, "hot -> cold ; big -> small ; tall ->", target="short", ig_steps=64)
    assert r.attrs["tokens"][:2] == ["<bos>", "hot"] and r.attrs["target"] == "short"
    total = float(r["attribution"].sum())
    assert total == pytest.approx(r.attrs["logprob"] - r.attrs["baseline_logprob"], abs=0.05 * abs(total) + 1e-3)
    w = normalised(r)
    assert w.max() == pytest.approx(1.0) and (w >= 0).all()
    with pytest.raises(WorkbenchError, match="single-token"):
        token_attribution(subject, "hot ->", target="cold hot")
