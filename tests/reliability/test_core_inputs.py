"""Hostile inputs at the front door: loading, the Subject's inputs, sites and patches, and
the task suite. Each case asserts the exact outcome: a WorkbenchError whose message names
the culprit and what is accepted, or the right value."""

from __future__ import annotations

import json
import re

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench
from workbench import WorkbenchError
from workbench import data as D
from workbench.layout import LAYER_KINDS, SITE_KINDS


@pytest.fixture(scope="module")
def lm():
    return workbench.load("tasklm")


def ids(*rows):
    return torch.tensor(rows)


# (name, call(lm, tmp_path), regex the WorkbenchError message must match)
ERRORS = [
    # --- loading
    ("load None", lambda lm, t: workbench.load(None), r"needs a zoo name, a local path or a hub id, got None"),
    ("load empty string", lambda lm, t: workbench.load("  "), r"needs a zoo name"),
    ("load int", lambda lm, t: workbench.load(3), r"got 3"),
    ("load unknown name", lambda lm, t: workbench.load("no such model ~"), r"unknown model .*Zoo names .*tasklm"),
    ("load empty folder", lambda lm, t: workbench.load(str(t)), r"holds no usable Hugging Face config.json"),
    ("load bad dtype", lambda lm, t: workbench.load("tasklm", dtype="float99"), r"unknown dtype 'float99'; use 'auto'"),
    ("load bad device", lambda lm, t: workbench.load("tasklm", device="tpu"), r"unknown device 'tpu'; use 'auto', 'cpu'"),
    ("load cuda without gpu", lambda lm, t: workbench.load("tasklm", device="cuda")
     if not torch.cuda.is_available() else (_ for _ in ()).throw(WorkbenchError("torch sees no CUDA GPU (skipped)")),
     r"torch sees no CUDA GPU"),
    ("load folder without tokenizer", lambda lm, t: _folder_without_tokenizer(lm, t), r"has no tokenizer files"),
    ("load unsupported architecture", lambda lm, t: _gptj_folder(t), r"no layout for model type 'gptj'"),
    ("load cut config.json", lambda lm, t: _cut_config(t), r"config.json"),
    # --- inputs
    ("ids beyond vocabulary", lambda lm, t: lm.logits(ids([1, lm.d_vocab + 5])), r"token id \d+ is outside .*vocabulary \(ids 0\.\.933\)"),
    ("negative ids", lambda lm, t: lm.logits(ids([1, -3])), r"token id -3 is outside"),
    ("float ids", lambda lm, t: lm.logits(torch.tensor([[1.5, 2.0]])), r"token ids must be integers, got dtype torch.float32"),
    ("bool ids", lambda lm, t: lm.logits(torch.tensor([[True, False]])), r"token ids must be integers"),
    ("3-d ids", lambda lm, t: lm.logits(torch.ones(1, 2, 3, dtype=torch.long)), r"must be \[batch, pos\].*got shape \(1, 1, 2, 3\)"),
    ("mask shape mismatch", lambda lm, t: lm.logits({"input_ids": ids([1, 2, 3]), "attention_mask": ids([1, 1])}),
     r"attention_mask has shape \(1, 2\) but input_ids has \(1, 3\)"),
    ("mask not 0/1", lambda lm, t: lm.logits({"input_ids": ids([1, 2]), "attention_mask": ids([1, 2])}), r"only 0 and 1"),
    ("all-zero mask", lambda lm, t: lm.logits({"input_ids": ids([1, 2]), "attention_mask": ids([0, 0])}),
     r"prompt 0 has no real tokens"),
    ("left padding", lambda lm, t: lm.logits({"input_ids": ids([1, 2], [3, 4]), "attention_mask": ids([1, 1], [0, 1])}),
     r"prompt 1 is not right-padded"),
    ("empty prompt list", lambda lm, t: lm.logits([]), r"empty prompt list"),
    ("None prompts", lambda lm, t: lm.logits(None), r"cannot use NoneType as model input"),
    ("list of ints", lambda lm, t: lm.logits([1, 2]), r"cannot use list as model input"),
    ("mixed prompt types", lambda lm, t: lm.logits(["a", 3]), r"prompts must be strings, got a int"),
    ("prompt beyond context", lambda lm, t: lm.logits(torch.ones(1, 10_000, dtype=torch.long)), r"context holds \d+ positions"),
    ("empty tensor", lambda lm, t: lm.logits(torch.zeros(1, 0, dtype=torch.long)), r"empty input"),
    ("batches of size 0", lambda lm, t: list(lm.batches(["a"], 0)), r"batch_size must be >= 1, got 0"),
    # --- sites and patches
    ("unknown site kind", lambda lm, t: lm.cache(["hot"], ["zz.1"]), r"unknown site kind 'zz'; valid: embed"),
    ("unparsable site", lambda lm, t: lm.cache(["hot"], ["z.x"]), r"cannot parse site 'z.x'"),
    ("site layer out of range", lambda lm, t: lm.cache(["hot"], ["z.7"]), r"layer 7 out of range .*layers 0\.\.1"),
    ("site without layer", lambda lm, t: lm.cache(["hot"], ["z"]), r"needs a layer: 'z.0'"),
    ("layer on embed", lambda lm, t: lm.cache(["hot"], ["embed.0"]), r"site 'embed' has no layer"),
    ("patch of wrong shape", lambda lm, t: lm.logits(["hot -> cold"], patch={"resid_pre.1": torch.zeros(1, 2, 3)}),
     r"patch for site 'resid_pre.1' has shape \(1, 2, 3\), but the activation there is \(1, \d+, 128\)"),
    ("patch function returns wrong shape", lambda lm, t: lm.logits(["hot"], patch={"z.0": lambda z: z[..., :2]}),
     r"patch for site 'z.0' has shape"),
    ("patch function returns a number", lambda lm, t: lm.logits(["hot"], patch={"z.0": lambda z: 0.0}),
     r"patch for site 'z.0' gave a float, not a tensor"),
    ("patch an unknown site", lambda lm, t: lm.logits(["hot"], patch={"attn.0": torch.zeros(1)}), r"unknown site kind 'attn'"),
    # --- task suite
    ("unknown task", lambda lm, t: D.icl_prompts("antonymz", 2, 4), r"unknown task 'antonymz'; valid tasks: antonym"),
    ("task given as int", lambda lm, t: D.get_task(3), r"unknown task 3; valid tasks"),
    ("negative demonstrations", lambda lm, t: D.icl_prompts("antonym", -1, 4), r"demonstrations .*got n_demos=-1"),
    ("zero prompts", lambda lm, t: D.icl_prompts("antonym", 2, 0), r"n_prompts >= 1 prompts"),
    ("unknown split", lambda lm, t: D.icl_prompts("antonym", 2, 4, split="val"), r"unknown split 'val'; use 'train', 'test' or 'all'"),
    ("more demonstrations than pairs", lambda lm, t: D.icl_prompts("antonym", 10_000, 4), r"n_demos=10000 demonstrations need at least"),
    ("negative zero-shot count", lambda lm, t: D.zero_shot_prompts("antonym", -5), r"n_prompts >= 1 prompts"),
    ("repeated sequences of length 0", lambda lm, t: D.repeated_sequences(lm.tokenizer, 4, 0), r"length >= 2"),
    ("no repeated sequences", lambda lm, t: D.repeated_sequences(lm.tokenizer, 0, 5), r"n >= 1"),
    ("one repeat", lambda lm, t: D.repeated_sequences(lm.tokenizer, 3, 5, repeats=1), r"repeats >= 2"),
    ("negative agreement pairs", lambda lm, t: D.agreement_pairs(-1), r"n >= 1 pairs, got -1"),
    ("unknown MultiDigits split", lambda lm, t: D.multidigits("dev"), r"unknown split 'dev'"),
    ("fine-tuning data of unknown task", lambda lm, t: D.finetune_data("nope"), r"unknown task 'nope'"),
    ("multitask data of no task", lambda lm, t: D.multitask_data([]), r"no tasks given"),
    # --- threads
    ("thread count 0", lambda lm, t: workbench.set_threads(0), r"positive integer, got 0"),
]


def _folder_without_tokenizer(lm, t):
    lm.model.save_pretrained(t)
    return workbench.load(str(t))


def _gptj_folder(t):
    from transformers import GPTJConfig

    GPTJConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=20).save_pretrained(t)
    return workbench.load(str(t))


def _cut_config(t):
    (t / "config.json").write_text('{"model_type": "gpt2", "n_layer": ')
    return workbench.load(str(t))


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_gets_a_clear_error(lm, tmp_path, name, call, match):
    with pytest.raises(WorkbenchError) as info:
        call(lm, tmp_path)
    assert re.search(match, str(info.value)), f"{name}: message {str(info.value)!r} does not match {match!r}"


# (name, call(lm), check(result)) -- inputs that are odd but valid get the right answer
VALUES = [
    ("one prompt as a string equals a list of one", lambda lm: (lm.logits("hot -> cold"), lm.logits(["hot -> cold"])),
     lambda r: torch.equal(*r)),
    ("1-d ids are one prompt", lambda lm: (lm.logits(torch.tensor([5, 6, 7])), lm.logits(torch.tensor([[5, 6, 7]]))),
     lambda r: torch.equal(*r)),
    ("int32 ids are accepted", lambda lm: (lm.logits(torch.tensor([[5, 6]], dtype=torch.int32)), lm.logits(torch.tensor([[5, 6]]))),
     lambda r: torch.equal(*r)),
    ("right padding does not change a prompt's logits",
     lambda lm: (lm.logits(["hot -> cold", "a b c d e f"])[0, :4], lm.logits(["hot -> cold"])[0, :4]),
     lambda r: torch.allclose(*r, atol=1e-5)),
    ("a broadcast patch equals the expanded one",
     lambda lm: (lm.logits(["hot -> cold"], patch={"resid_pre.1": torch.ones(128)}),
                 lm.logits(["hot -> cold"], patch={"resid_pre.1": lambda x: torch.ones_like(x)})),
     lambda r: torch.allclose(*r)),
    ("negative layers count from the end", lambda lm: (lm.site("z.-1").name,), lambda r: r[0] == "z.1"),
]


@pytest.mark.parametrize("name,call,check", VALUES, ids=[c[0] for c in VALUES])
def test_odd_but_valid_input_gets_the_right_answer(lm, name, call, check):
    assert check(call(lm)), name


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.-0123456789 ", max_size=14))
def test_any_site_name_parses_or_is_refused_clearly(lm, name):
    """Every string is either a valid site (and round-trips) or a WorkbenchError naming it."""
    try:
        s = lm.site(name)
    except WorkbenchError as err:
        msg = str(err)
        assert any(w in msg for w in ("site", "layer")), msg
        return
    assert s.kind in SITE_KINDS
    assert (s.layer is None) == (s.kind not in LAYER_KINDS)
    assert lm.site(s.name) == s
