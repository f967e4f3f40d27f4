"""The task suite and its dataset builders."""

from __future__ import annotations

import json

import numpy as np
import pytest
from datasets import Dataset

from workbench import WorkbenchError
from workbench.data import (
    agreement_pairs,
    agreement_sentences,
    finetune_data,
    get_task,
    icl_prompts,
    multidigits,
    multitask_data,
    repeated_sequences,
    task_names,
    vocabulary,
    zero_shot_prompts,
)

EXPECTED = {"antonym", "capitalize", "country_capital", "next_letter", "present_past", "singular_plural",
            "lowercase", "first_letter"}


def test_at_least_eight_tasks_each_a_function():
    assert EXPECTED <= set(task_names())
    for name in task_names():
        t = get_task(name)
        assert len(set(t.inputs)) == len(t.inputs) >= 20, name
    assert get_task("antonym").split() and dict(get_task("antonym").pairs)["hot"] == "cold"
    assert dict(get_task("antonym").pairs)["cold"] == "hot"
    assert dict(get_task("country_capital").pairs)["France"] == "Paris"
    assert dict(get_task("next_letter").pairs)["c"] == "d"
    assert dict(get_task("present_past").pairs)["go"] == "went"
    assert dict(get_task("singular_plural").pairs)["mouse"] == "mice"
    assert dict(get_task("capitalize").pairs)["cat"] == "Cat"
    assert dict(get_task("lowercase").pairs)["Cat"] == "cat"
    assert dict(get_task("first_letter").pairs)["Cat"] == "c"


def test_unknown_task_lists_valid_ones():
    with pytest.raises(WorkbenchError, match="valid tasks: antonym, capitalize"):
        get_task("synonym")


def test_splits_are_disjoint_deterministic_and_about_a_fifth():
    for name in task_names():
        t = get_task(name)
        train, test = t.split("train"), t.split("test")
        assert set(train).isdisjoint(test) and len(train) + len(test) == len(t.pairs)
        assert 0.05 < len(test) / len(t.pairs) < 0.4
        assert test == get_task(name).split("test")
    with pytest.raises(WorkbenchError, match="unknown split"):
        get_task("antonym").split("dev")


def test_bare_queries_are_ambiguous_across_tasks():
    """Most inputs belong to two or more tasks, so zero-shot prompts cannot name the task."""
    owners: dict[str, set] = {}
    for name in task_names():
        for x in get_task(name).inputs:
            owners.setdefault(x, set()).add(name)
    shared = np.mean([len(v) >= 2 for v in owners.values()])
    assert shared > 0.9


def test_icl_prompts_format_and_no_query_in_demos():
    ds = icl_prompts(["antonym", "next_letter"], 3, 5, seed=1)
    assert isinstance(ds, Dataset) and len(ds) == 10
    assert set(ds.column_names) >= {"task", "n_demos", "prompt", "query", "answer", "demos"}
    for row in ds:
        assert row["prompt"].endswith(f"{row['query']} ->")
        assert row["prompt"].count(" -> ") == 3 and row["prompt"].count(" ; ") == 3
        assert row["query"] not in [d[0] for d in row["demos"]]
        t = dict(get_task(row["task"]).pairs)
        assert t[row["query"]] == row["answer"]
        assert all(t[x] == y for x, y in row["demos"])
    assert icl_prompts("antonym", 3, 5, seed=1)["prompt"] == ds["prompt"][:5]
    assert icl_prompts("antonym", 3, 5, seed=2)["prompt"] != ds["prompt"][:5]


def test_shuffled_labels_break_the_mapping_but_keep_outputs():
    ds = icl_prompts("present_past", 6, 40, seed=0, shuffle_labels=True)
    mapping = dict(get_task("present_past").pairs)
    right = [mapping[x] == y for row in ds["demos"] for x, y in row]
    assert np.mean(right) < 0.5
    assert all(y in mapping.values() for row in ds["demos"] for _, y in row)


def test_zero_shot_and_finetune_data():
    z = zero_shot_prompts("country_capital", 4)
    assert all(p == f"{q} ->" for p, q in zip(z["prompt"], z["query"]))
    ft = finetune_data("singular_plural", split="train")
    assert len(ft) == len(get_task("singular_plural").split("train"))
    mt = multitask_data(["antonym", "capitalize"], n_per_task=8)
    assert sorted(set(mt["task"])) == ["antonym", "capitalize"] and len(mt) == 16


def test_word_tokenizer_covers_the_suite(word_tokenizer):
    ds = icl_prompts(task_names(), 4, 20, seed=0, tokenizer=word_tokenizer, answer_policy="error")
    assert json.loads(ds.info.description)["dropped"] == 0
    assert all(word_tokenizer.decode([a]) == ans for a, ans in zip(ds["answer_id"], ds["answer"]))
    assert len(vocabulary()) == len(set(vocabulary()))


def test_answer_policies_on_a_subword_tokenizer(minilm):
    """MiniLM's WordPiece splits rarer plurals (spoons, desks) into pieces: each policy does
    what it says. It is uncased too, so capitalized answers (Paris) cannot be scored at all."""
    tok = minilm.tokenizer
    n = len(get_task("singular_plural").pairs)
    with pytest.warns(UserWarning, match="dropped"):
        dropped = icl_prompts("singular_plural", 0, n, tokenizer=tok, answer_policy="drop")
    info = json.loads(dropped.info.description)
    assert info["dropped"] > 0 and len(dropped) == n - info["dropped"]
    assert all(len(ids) == 1 for ids in dropped["answer_ids"])
    first = icl_prompts("singular_plural", 0, n, tokenizer=tok, answer_policy="first_token")
    assert len(first) == n and any(len(ids) > 1 for ids in first["answer_ids"])
    assert all(ids[0] == a for ids, a in zip(first["answer_ids"], first["answer_id"]))
    with pytest.raises(WorkbenchError, match="not one known token"):
        icl_prompts("singular_plural", 0, n, tokenizer=tok, answer_policy="error")
    with pytest.raises(WorkbenchError, match="unknown answer_policy"):
        icl_prompts("singular_plural", 0, 2, tokenizer=tok, answer_policy="maybe")
    with pytest.raises(WorkbenchError, match=r"72 answers cannot be scored \('Amsterdam' comes back as 'amsterdam': the tokenizer is uncased"):
        icl_prompts("country_capital", 0, 72, tokenizer=tok, answer_policy="first_token")


def test_bad_builder_arguments():
    with pytest.raises(WorkbenchError, match="n_demos=30 demonstrations need at least 31"):
        icl_prompts("next_letter", 30, 2)
    with pytest.raises(WorkbenchError, match="n_prompts >= 1"):
        icl_prompts("antonym", 2, 0)
    with pytest.raises(WorkbenchError, match="no tasks"):
        icl_prompts([], 2, 2)


def test_agreement_pairs_flip_only_the_subject(word_tokenizer):
    ds = agreement_pairs(200, seed=0, tokenizer=word_tokenizer)
    assert len(ds) == 200
    for row in ds:
        c, x = row["clean"].split(), row["corrupted"].split()
        assert len(c) == len(x) and sum(a != b for a, b in zip(c, x)) == 1
        assert {row["clean_answer"], row["corrupted_answer"]} in ({"is", "are"}, {"was", "were"}, {"has", "have"})
        plural_verb = row["clean_answer"] in ("are", "were", "have")
        assert plural_verb == row["subject_plural"]
    assert 0.3 < np.mean(ds["attractor"]) < 0.7
    train = agreement_pairs(300, split="train")
    test = agreement_pairs(300, split="test")
    key = lambda r: (r["subject"], r["preposition"], r["distractor_noun"])  # noqa: E731
    assert {key(r) for r in train}.isdisjoint({key(r) for r in test})
    s = agreement_sentences(10)
    assert all(t.endswith(" .") for t in s)


def test_repeated_sequences(word_tokenizer):
    ds = repeated_sequences(word_tokenizer, 5, 12, seed=3)
    ids = np.array(ds["input_ids"])
    assert ids.shape == (5, 25) and (ids[:, 0] == word_tokenizer.bos_token_id).all()
    assert (ids[:, 1:13] == ids[:, 13:]).all()
    assert not set(ids[:, 1:].ravel()) & set(word_tokenizer.all_special_ids)


def test_multidigits_are_real_digit_pairs():
    tr = multidigits("train", n=64, seed=0)
    te = multidigits("test", n=64, seed=0)
    img = np.array(tr["image"])
    assert img.shape == (64, 8, 16) and 0.0 <= img.min() and img.max() <= 1.0
    assert set(tr["left"]) <= set(range(10)) and len(set(tr["left"])) > 5
    from sklearn.datasets import load_digits

    d = load_digits()
    first_left = np.array(tr["image"][0])[:, :8] * 16
    assert any(np.array_equal(first_left, im) for im in d.images[d.target == tr["left"][0]])
    assert len(te) == 64
