"""Hostile inputs to the task suite and its dataset builders. Each case asserts the exact
outcome: a WorkbenchError whose message names the culprit and what is accepted, or the
right value. An answer a tokenizer would score as something else (``Win`` read as ``win``
by an uncased tokenizer, a word outside the vocabulary read as ``<unk>``) is never scored:
the row is dropped with a warning that says why, or refused."""

from __future__ import annotations

import json
import re
import warnings
from functools import lru_cache

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workbench import WorkbenchError
from workbench import data as D
from workbench.data import PromptFormat, Task


@lru_cache(maxsize=1)
def words():
    """The case-sensitive word tokenizer of the suite (every word one token)."""
    from workbench.zoo.tokenizer import build_word_tokenizer

    return build_word_tokenizer(D.vocabulary())


@lru_cache(maxsize=4)
def words_without(*missing: str):
    from workbench.zoo.tokenizer import build_word_tokenizer

    return build_word_tokenizer([w for w in D.vocabulary() if w not in missing])


@lru_cache(maxsize=1)
def uncased():
    """MiniLM's WordPiece tokenizer: uncased (it reads ``Win`` as ``win``)."""
    from transformers import AutoTokenizer

    from workbench.zoo import get

    return AutoTokenizer.from_pretrained(get("minilm").path())


def quiet(fn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn()


class FakeSubject:
    tokenizer = None


# (name, call(), regex the WorkbenchError message must match)
ERRORS = [
    # --- icl_prompts / zero_shot_prompts / multitask_data / finetune_data
    ("fractional demonstrations", lambda: D.icl_prompts("antonym", 2.5, 3), r"need integers n_demos >= 0 and n_prompts >= 1, got n_demos=2.5"),
    ("fractional prompt count", lambda: D.icl_prompts("antonym", 2, 2.5), r"got n_prompts=2.5"),
    ("True demonstrations", lambda: D.icl_prompts("antonym", True, 2), r"got n_demos=True"),
    ("demonstrations as a string", lambda: D.icl_prompts("antonym", "2", 2), r"got n_demos='2'"),
    ("tasks None", lambda: D.icl_prompts(None, 2, 2), r"tasks must be a task name, a Task or a list of them, got NoneType"),
    ("tasks an int", lambda: D.icl_prompts(3, 2, 2), r"tasks must be a task name, a Task or a list of them, got int"),
    ("a task listed twice", lambda: D.icl_prompts(["antonym", "next_letter", "antonym"], 2, 2),
     r"task\(s\) \['antonym'\] are listed more than once; list each task once"),
    ("a task given by name and as a Task", lambda: D.icl_prompts(["antonym", D.get_task("antonym")], 2, 2),
     r"\['antonym'\] are listed more than once"),
    ("an unknown task in a list", lambda: D.icl_prompts(["antonym", "synonym"], 2, 2), r"unknown task 'synonym'; valid tasks: antonym"),
    ("seed None", lambda: D.icl_prompts("antonym", 2, 2, seed=None), r"seed must be an integer, got None"),
    ("seed a string", lambda: D.icl_prompts("antonym", 2, 2, seed="7"), r"seed must be an integer, got '7'"),
    ("seed a float", lambda: D.icl_prompts("antonym", 2, 2, seed=1.5), r"seed must be an integer, got 1.5"),
    ("fmt a string", lambda: D.icl_prompts("antonym", 2, 2, fmt=" -> "), r"fmt must be a PromptFormat .*got str"),
    ("a format with a number as separator", lambda: PromptFormat(io_sep=3), r"PromptFormat.io_sep must be a string with a visible separator .*got 3"),
    ("a format with a blank separator", lambda: PromptFormat(demo_sep="  "), r"PromptFormat.demo_sep must be a string .*got '  '"),
    ("tokenizer a string", lambda: D.icl_prompts("antonym", 2, 2, tokenizer="gpt2"),
     r"tokenizer must be a Hugging Face tokenizer \(e.g. subject.tokenizer\), got str"),
    ("a Subject as the tokenizer", lambda: D.icl_prompts("antonym", 2, 2, tokenizer=FakeSubject()),
     r"got FakeSubject; pass subject.tokenizer"),
    ("an unknown split with a tokenizer", lambda: D.icl_prompts("antonym", 2, 2, split="valid", tokenizer=words()),
     r"unknown split 'valid'; use 'train', 'test' or 'all'"),
    ("an unknown answer policy", lambda: D.icl_prompts("antonym", 2, 2, tokenizer=words(), answer_policy="skip"),
     r"unknown answer_policy 'skip'; valid: drop, first_token, error"),
    ("more demonstrations than test pairs", lambda: D.icl_prompts("next_letter", 8, 2, split="test"),
     r"task 'next_letter' has \d+ pairs in split 'test'; n_demos=8 demonstrations need at least 9"),
    ("zero-shot prompts with demonstrations", lambda: D.zero_shot_prompts("antonym", 2, n_demos=3),
     r"zero-shot prompts have no demonstrations, got n_demos=3; use icl_prompts"),
    ("zero-shot prompts of none", lambda: D.zero_shot_prompts("antonym", -2), r"n_prompts >= 1 prompts, got n_demos=0, n_prompts=-2"),
    ("multitask data per task 0", lambda: D.multitask_data(["antonym"], n_per_task=0), r"n_prompts >= 1 prompts, got n_demos=0, n_prompts=0"),
    ("multitask data of a task twice", lambda: D.multitask_data(["antonym", "antonym"]), r"listed more than once"),
    ("multitask data of None", lambda: D.multitask_data(None), r"tasks must be a task name, a Task or a list of them"),
    ("fine-tuning data of an unknown split", lambda: D.finetune_data("antonym", split="dev"), r"unknown split 'dev'"),
    ("fine-tuning data of None", lambda: D.finetune_data(None), r"unknown task None; valid tasks"),
    ("fine-tuning data with a bad fmt", lambda: D.finetune_data("antonym", fmt={"io_sep": ":"}), r"fmt must be a PromptFormat"),
    ("fine-tuning data with a bad tokenizer", lambda: D.finetune_data("antonym", tokenizer=len), r"tokenizer must be a Hugging Face tokenizer"),
    # --- answers a tokenizer cannot score
    ("uncased capitals, drop", lambda: quiet(lambda: D.icl_prompts("capitalize", 1, 20, tokenizer=uncased())),
     r"no row can be scored with this tokenizer \(answer_policy='drop'\): 20 answers cannot be scored "
     r"\('\w+' comes back as '\w+': the tokenizer is uncased"),
    ("uncased capitals, first token", lambda: quiet(lambda: D.icl_prompts("capitalize", 1, 20, tokenizer=uncased(),
                                                                          answer_policy="first_token")),
     r"no row can be scored .*answer_policy='first_token'.*the tokenizer is uncased"),
    ("uncased capitals, error", lambda: D.icl_prompts("capitalize", 1, 20, tokenizer=uncased(), answer_policy="error"),
     r"answers are not one known token for this tokenizer .*comes back as .*the tokenizer is uncased"),
    ("uncased Win, one answer", lambda: D.answer_token_ids(uncased(), ["win ->"], ["Win"]),
     r"1 of 1 answers cannot be scored with this tokenizer: 'Win' comes back as 'win': the tokenizer is uncased"),
    ("uncased country capitals", lambda: quiet(lambda: D.zero_shot_prompts("country_capital", 30, tokenizer=uncased())),
     r"no row can be scored .*the tokenizer is uncased"),
    ("an answer outside the vocabulary", lambda: D.answer_token_ids(words_without("cold"), ["hot ->"], ["cold"]),
     r"1 of 1 answers cannot be scored with this tokenizer: 'cold' is not in the vocabulary \(it becomes '<unk>'\)"),
    ("answers outside the vocabulary, error policy", lambda: D.finetune_data("antonym", tokenizer=words_without("cold", "hot"),
                                                                            answer_policy="error"),
     r"is not in the vocabulary \(it becomes '<unk>'\)"),
    ("every answer outside the vocabulary", lambda: quiet(lambda: D.icl_prompts("next_letter", 1, 5, tokenizer=words_without(
        *"abcdefghijklmnopqrstuvwxyz"))),
     r"no row can be scored with this tokenizer .*not in the vocabulary"),
    ("an empty answer", lambda: D.answer_token_ids(words(), ["hot ->"], [""]), r"'' gives no token"),
    ("fewer answers than prompts", lambda: D.answer_token_ids(words(), ["hot ->", "big ->"], ["cold"]),
     r"got 2 prompts but 1 answers; give one answer per prompt"),
    ("answers as one string", lambda: D.answer_token_ids(words(), ["hot ->"], "cold"),
     r"prompts and answers must be lists of strings .*got a single string"),
    ("a number as an answer", lambda: D.answer_token_ids(words(), ["hot ->"], [3]), r"answers\[0\] is a int, not a string"),
    ("a None prompt", lambda: D.answer_token_ids(words(), [None], ["cold"]), r"prompts\[0\] is a NoneType, not a string"),
    ("answer ids with no tokenizer", lambda: D.answer_token_ids(None, ["hot ->"], ["cold"]), r"tokenizer must be a Hugging Face tokenizer"),
    # --- agreement
    ("agreement pairs of 2.5", lambda: D.agreement_pairs(2.5), r"need n >= 1 pairs, got 2.5"),
    ("agreement pairs of True", lambda: D.agreement_pairs(True), r"need n >= 1 pairs, got True"),
    ("agreement pairs with seed None", lambda: D.agreement_pairs(2, seed=None), r"seed must be an integer, got None"),
    ("agreement pairs with a bad tokenizer", lambda: D.agreement_pairs(2, tokenizer="gpt2"), r"tokenizer must be a Hugging Face tokenizer"),
    ("agreement verbs outside the vocabulary", lambda: quiet(lambda: D.agreement_pairs(
        10, tokenizer=words_without("is", "are", "was", "were", "has", "have"))),
     r"no agreement pair can be scored with this tokenizer: .*verbs that cannot be scored: '\w+' is not in the vocabulary"),
    ("agreement sentences of 0 (once an empty list)", lambda: D.agreement_sentences(0), r"n must be an integer >= 1, got 0"),
    ("agreement sentences of -3 (once an empty list)", lambda: D.agreement_sentences(-3), r"n must be an integer >= 1, got -3"),
    ("agreement sentences of an unknown split", lambda: D.agreement_sentences(4, split="dev"), r"unknown split 'dev'"),
    ("agreement nouns of an unknown split (once the train nouns)", lambda: D.agreement_nouns("dev"),
     r"unknown split 'dev'; use 'train', 'test' or 'all'"),
    # --- repeated sequences
    ("repeated sequences without a tokenizer", lambda: D.repeated_sequences(None, 2, 4), r"tokenizer must be a Hugging Face tokenizer \(e.g. subject.tokenizer\), got NoneType"),
    ("repeated sequences of 2.5", lambda: D.repeated_sequences(words(), 2.5, 4), r"need integers n >= 1, length >= 2 and repeats >= 2, got n=2.5"),
    ("repeated sequences of length 4.5", lambda: D.repeated_sequences(words(), 2, 4.5), r"length=4.5"),
    ("repeated sequences repeated '2' times", lambda: D.repeated_sequences(words(), 2, 4, repeats="2"), r"repeats='2'"),
    ("repeated sequences of negative length", lambda: D.repeated_sequences(words(), 2, -4), r"length >= 2 .*got n=2, length=-4"),
    ("repeated sequences with seed None", lambda: D.repeated_sequences(words(), 2, 4, seed=None), r"seed must be an integer, got None"),
    # --- MultiDigits
    ("multidigits of -1 (once a numpy error)", lambda: D.multidigits("train", n=-1), r"n must be an integer >= 1, got -1"),
    ("multidigits of 0 (once an empty dataset)", lambda: D.multidigits("train", n=0), r"n must be an integer >= 1, got 0"),
    ("multidigits of 2.5", lambda: D.multidigits("train", n=2.5), r"n must be an integer >= 1, got 2.5"),
    ("multidigits with seed a string", lambda: D.multidigits("train", n=2, seed="0"), r"seed must be an integer, got '0'"),
    # --- tasks
    ("a task named ''", lambda: D.get_task(""), r"unknown task ''; valid tasks"),
    ("a task named by a list", lambda: D.get_task(["antonym"]), r"unknown task \['antonym'\]; valid tasks"),
    ("a Task mapping to a number", lambda: Task("t", (("a", 1),), "d"),
     r"task 't': pair 0 must be \(input, output\), two non-empty strings, got \('a', 1\)"),
    ("a Task with an empty input", lambda: Task("t", (("", "b"),), "d"), r"pair 0 must be \(input, output\).*got \('', 'b'\)"),
    ("a Task with a blank output", lambda: Task("t", (("a", "b"), ("c", "  ")), "d"), r"pair 1 must be .*got \('c', '  '\)"),
    ("a Task of triples", lambda: Task("t", (("a", "b", "c"),), "d"), r"pair 0 must be \(input, output\)"),
    ("a Task without a name", lambda: Task("", (("a", "b"),), "d"), r"a task's name must be a non-empty string, got ''"),
    ("a Task that is not a function", lambda: Task("t", (("a", "b"), ("a", "c")), "d"), r"task 't' maps \['a'\] to more than one output"),
    ("a Task's unknown split", lambda: Task("t", (("a", "b"),), "d").split("val"), r"unknown split 'val'"),
]


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_gets_a_clear_error(name, call, match):
    with pytest.raises(WorkbenchError) as info:
        call()
    assert re.search(match, str(info.value)), f"{name}: message {str(info.value)!r} does not match {match!r}"


def dropped_with_warning(fn):
    """(dataset, warning messages) of ``fn()``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = fn()
    return ds, [str(w.message) for w in caught]


# (name, call(), check(result)) -- odd but valid inputs get the right answer
VALUES = [
    ("one task as a string in multitask data", lambda: D.multitask_data("antonym", n_per_task=4),
     lambda r: set(r["task"]) == {"antonym"} and len(r) == 4),
    ("a Task object as the task", lambda: D.icl_prompts(D.get_task("next_letter"), 1, 3), lambda r: set(r["task"]) == {"next_letter"}),
    ("a numpy integer seed", lambda: (D.icl_prompts("antonym", 2, 3, seed=__import__("numpy").int64(4)), D.icl_prompts("antonym", 2, 3, seed=4)),
     lambda r: r[0]["prompt"] == r[1]["prompt"]),
    ("more prompts than pairs cycle through the queries", lambda: D.icl_prompts("next_letter", 1, 60),
     lambda r: len(r) == 60 and len(set(r["query"])) == 25),
    ("zero demonstrations are zero-shot prompts", lambda: (D.icl_prompts("antonym", 0, 4), D.zero_shot_prompts("antonym", 4)),
     lambda r: r[0]["prompt"] == r[1]["prompt"] and all(p.endswith(" ->") and ";" not in p for p in r[0]["prompt"])),
    ("a custom format", lambda: D.icl_prompts("antonym", 1, 2, fmt=PromptFormat(io_sep=" = ", demo_sep=" | ")),
     lambda r: all(p.count(" = ") == 1 and p.count(" | ") == 1 and p.endswith(" =") for p in r["prompt"])),
    ("every answer of the word tokenizer decodes back", lambda: D.icl_prompts(D.task_names(), 2, 10, tokenizer=words(), answer_policy="error"),
     lambda r: all(words().decode([i]) == a for i, a in zip(r["answer_id"], r["answer"]))
     and json.loads(r.info.description)["dropped"] == 0),
    ("answers outside the vocabulary are dropped, with the reason",
     lambda: dropped_with_warning(lambda: D.zero_shot_prompts("present_past", 82, tokenizer=words_without("went"))),
     lambda r: "went" not in r[0]["answer"] and len(r[0]) == 81
     and r[1] == ["answer_policy='drop': dropped 1 of 82 rows: 1 answers cannot be scored ('went' is not in the vocabulary "
                  "(it becomes '<unk>'))"]
     and json.loads(r[0].info.description)["reasons"] == {"cannot be scored": 1}),
    ("prompts outside the vocabulary are dropped", lambda: dropped_with_warning(lambda: D.zero_shot_prompts(
        "present_past", 82, tokenizer=words_without("go"))),
     lambda r: "go" not in r[0]["query"] and len(r[0]) == 81
     and r[1] == ["answer_policy='drop': dropped 1 of 82 rows: 1 prompts hold unknown tokens"]
     and json.loads(r[0].info.description)["reasons"] == {"prompt holds an unknown token": 1}),
    ("the uncased tokenizer scores lowercase answers", lambda: quiet(lambda: D.zero_shot_prompts("present_past", 82, tokenizer=uncased())),
     lambda r: len(r) == 82 and all(uncased().decode([i]) == a for i, a in zip(r["answer_id"], r["answer"]))),
    ("the uncased tokenizer keeps the lowercase first letters", lambda: dropped_with_warning(
        lambda: D.zero_shot_prompts("first_letter", 40, tokenizer=uncased())),
     lambda r: len(r[0]) == 40 and not r[1]),
    ("answer ids of a multi-token answer", lambda: D.answer_token_ids(uncased(), ["brave ->"], ["cowardly"]),
     lambda r: len(r[0]) > 1 and uncased().decode(r[0]) == "cowardly"),
    ("answer ids of a tuple of prompts", lambda: D.answer_token_ids(words(), ("hot ->", "big ->"), ("cold", "small")),
     lambda r: r == [[words().convert_tokens_to_ids("cold")], [words().convert_tokens_to_ids("small")]]),
    ("answer ids of nothing", lambda: D.answer_token_ids(words(), [], []), lambda r: r == []),
    ("agreement pairs drop only the pairs of a missing verb", lambda: quiet(lambda: D.agreement_pairs(40, tokenizer=words_without("is"))),
     lambda r: len(r) > 0 and "is" not in list(r["clean_answer"]) + list(r["corrupted_answer"])),
    ("agreement sentences of one", lambda: D.agreement_sentences(1), lambda r: len(r) == 1 and r[0].endswith(" .")),
    ("repeated sequences longer than the vocabulary draw with replacement", lambda: D.repeated_sequences(words(), 1, 2000),
     lambda r: len(r[0]["input_ids"]) == 1 + 2 * 2000 and r[0]["input_ids"][1:2001] == r[0]["input_ids"][2001:]),
    ("multidigits of one image", lambda: D.multidigits("test", n=1), lambda r: len(r) == 1 and len(r[0]["image"][0]) == 16),
    ("a Task built by hand works everywhere", lambda: D.icl_prompts(Task("swap", tuple((a, b) for a, b in
                                                                                       [("x1", "y1"), ("x2", "y2"), ("x3", "y3")]), "d"), 1, 3),
     lambda r: len(r) == 3 and all(q.replace("x", "y") == a for q, a in zip(r["query"], r["answer"]))),
]


@pytest.mark.parametrize("name,call,check", VALUES, ids=[c[0] for c in VALUES])
def test_odd_but_valid_input_gets_the_right_answer(name, call, check):
    assert check(call()), name


FAST = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])


@FAST
@given(st.integers(-2, 9), st.integers(-1, 6), st.lists(st.sampled_from(D.task_names()), min_size=1, max_size=3),
       st.sampled_from(["train", "test", "all"]))
def test_icl_prompts_over_its_space(k, n, tasks, split):
    """Any (k, n, tasks, split): an error naming what is wrong, or n prompts per task, each
    with k demonstrations of its own task, none of them its own query."""
    try:
        ds = D.icl_prompts(tasks, k, n, split=split, seed=k + n)
    except WorkbenchError as err:
        msg = str(err)
        dup = len(set(tasks)) < len(tasks)
        assert (k < 0 or n < 1) and "n_demos >= 0 demonstrations and n_prompts >= 1" in msg or dup and "listed more than once" in msg \
            or "demonstrations need at least" in msg, msg
        return
    assert len(ds) == n * len(tasks) and set(ds["task"]) == set(tasks)
    for row in ds:
        mapping = dict(D.get_task(row["task"]).split(split))
        assert len(row["demos"]) == k and all(mapping[x] == y for x, y in row["demos"])
        assert row["query"] not in [x for x, _ in row["demos"]] and mapping[row["query"]] == row["answer"]


vocab_words = st.sampled_from(sorted({y for t in D.task_names() for _, y in D.get_task(t).pairs if " " not in y})[:300])


@settings(max_examples=25, deadline=None, derandomize=True)
@given(st.lists(vocab_words, min_size=1, max_size=6, unique=True), st.lists(vocab_words, max_size=3, unique=True))
def test_answer_ids_refuse_exactly_the_missing_words(answers, missing):
    """With some words removed from the vocabulary, answer_token_ids refuses exactly when an
    answer is one of them (naming it), and otherwise returns one id that decodes to it."""
    tok = words_without(*sorted(missing))
    prompts = [f"x{i} ->" for i in range(len(answers))]
    gone = [a for a in answers if a in missing]
    if gone:
        with pytest.raises(WorkbenchError, match=rf"{len(gone)} of {len(answers)} answers cannot be scored.*"
                                                 rf"'{re.escape(gone[0])}' is not in the vocabulary"):
            D.answer_token_ids(tok, prompts, answers)
        return
    ids = D.answer_token_ids(tok, prompts, answers)
    assert [tok.decode(i) for i in ids] == answers


pair_text = st.text(st.sampled_from("ab \t"), max_size=3)


@FAST
@given(st.lists(st.tuples(pair_text, pair_text), max_size=4))
def test_task_pairs_over_their_space(pairs):
    """A Task is built exactly when every pair is two non-blank strings and the inputs are
    unique; otherwise the error names the first bad pair or the repeated inputs."""
    blank = [i for i, (x, y) in enumerate(pairs) if not x.strip() or not y.strip()]
    inputs = [x for x, _ in pairs]
    try:
        t = Task("t", tuple(pairs), "d")
    except WorkbenchError as err:
        if blank:
            assert f"pair {blank[0]} must be (input, output)" in str(err)
        else:
            assert len(set(inputs)) < len(inputs) and "to more than one output" in str(err)
        return
    assert not blank and len(set(inputs)) == len(inputs) and t.split("all") == list(pairs)
