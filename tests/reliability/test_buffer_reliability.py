"""Hostile inputs to the SAE activation buffer (``ActivationBuffer``, ``collect``) and to
``evaluate_sae``. Each case asserts the exact outcome: a WorkbenchError whose message names
the culprit and what is accepted, or the right value; a stream state of another stream or a
damaged one is refused and leaves the buffer as it was; no input makes the stream hang."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import workbench
from workbench import WorkbenchError
from workbench.circuits import SAE, ActivationBuffer, collect, evaluate_sae

TEXTS = ["the key near the cabinets is old", "the keys are on the table", "the cat was there", "a b c d"]


@pytest.fixture(scope="module")
def lm():
    return workbench.load("tasklm")


def buf(lm, texts=TEXTS, **kw):
    return ActivationBuffer(lm, "resid_post.0", texts, **{"batch_size": 4, "capacity": 16, "prompt_batch_size": 2, **kw})


def sae(**kw):
    return SAE(128, 64, **{"kind": "topk", "k": 4, "site": "resid_post.0", **kw})


def state_with(lm, **changes):
    s = buf(lm).state_dict()
    s.update(changes)
    return s


def nan_sae():
    s = sae()
    with torch.no_grad():
        s.W_dec[3, 5] = float("nan")
    return s


# (name, call(lm), regex the WorkbenchError message must match)
ERRORS = [
    # --- ActivationBuffer: construction
    ("no texts", lambda lm: buf(lm, []), r"an ActivationBuffer needs at least one text"),
    ("texts None", lambda lm: buf(lm, None), r"texts must be a list of strings \(or one string\), got NoneType"),
    ("texts a tensor", lambda lm: buf(lm, torch.ones(3)), r"texts must be a list of strings .*got Tensor"),
    ("a None among the texts", lambda lm: buf(lm, ["a b", None]), r"texts\[1\] is a NoneType, not a string"),
    ("ints as texts", lambda lm: buf(lm, [1, 2]), r"texts\[0\] is a int, not a string"),
    ("unknown site", lambda lm: ActivationBuffer(lm, "zz.0", TEXTS), r"unknown site kind 'zz'; valid: embed"),
    ("a site of no vectors", lambda lm: ActivationBuffer(lm, "pattern.0", TEXTS),
     r"site 'pattern.0' does not hold one vector per token, so no SAE feature or neuron is defined on it; valid sites: embed, "
     r"resid_pre.0..1, z.0..1"),
    ("a layer out of range", lambda lm: ActivationBuffer(lm, "resid_post.5", TEXTS), r"layer 5 out of range"),
    ("batch_size 0", lambda lm: buf(lm, batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    ("batch_size 1.5", lambda lm: buf(lm, batch_size=1.5), r"batch_size must be an integer >= 1, got 1.5"),
    ("batch_size True", lambda lm: buf(lm, batch_size=True), r"batch_size must be an integer >= 1, got True"),
    ("capacity below two batches", lambda lm: buf(lm, batch_size=4, capacity=6),
     r"need batch_size >= 1 and capacity >= 2 \* batch_size, got batch_size=4, capacity=6"),
    ("capacity negative", lambda lm: buf(lm, capacity=-16), r"capacity must be an integer >= 1, got -16"),
    ("prompt_batch_size 0", lambda lm: buf(lm, prompt_batch_size=0), r"prompt_batch_size must be an integer >= 1, got 0"),
    ("epochs 0", lambda lm: buf(lm, epochs=0), r"epochs must be an integer >= 1, got 0"),
    ("epochs -1", lambda lm: buf(lm, epochs=-1), r"epochs must be an integer >= 1, got -1"),
    ("epochs 1.5", lambda lm: buf(lm, epochs=1.5), r"epochs must be an integer >= 1, got 1.5"),
    ("a budget of 0 bytes", lambda lm: buf(lm, max_bytes=0), r"max_bytes must be an integer >= 1, got 0"),
    ("a budget too small", lambda lm: buf(lm, max_bytes=1000),
     r"a buffer of 16 rows x 128 would take 8.0 KB \(budget 1000 B\); lower capacity or raise max_bytes"),
    ("dtype a string", lambda lm: buf(lm, dtype="float16"), r"dtype must be a floating torch dtype .*got 'float16'"),
    ("an integer dtype", lambda lm: buf(lm, dtype=torch.int64), r"dtype must be a floating torch dtype .*got torch.int64"),
    ("seed a string", lambda lm: buf(lm, seed="s"), r"seed must be an integer >= 0, got 's'"),
    ("skip_first None", lambda lm: buf(lm, skip_first=None), r"skip_first must be True or False, got None"),
    # --- ActivationBuffer: streams that would hang or run dry
    ("empty texts (once hung forever)", lambda lm: buf(lm, ["", ""]).next_batch(),
     r"none of the 2 texts holds a token at resid_post.0 after position 0 \(skip_first=True drops it\); "
     r"pass texts of at least two tokens"),
    ("empty texts, one epoch", lambda lm: buf(lm, [""], epochs=1).next_batch(), r"none of the 1 texts holds a token"),
    ("empty texts while iterating", lambda lm: list(buf(lm, ["", "", ""], epochs=3)), r"none of the 3 texts holds a token"),
    # --- ActivationBuffer: resume from a stream state
    ("a state of another width", lambda lm: buf(lm).load_state_dict(state_with(lm, rows=torch.zeros(3, 5))),
     r"buffer state has rows \(3, 5\); this buffer holds width 128"),
    ("a state lacking keys", lambda lm: buf(lm).load_state_dict({"rows": torch.zeros(3, 128)}),
     r"the saved stream state lacks \['counters', 'order', 'rng'\]: it is not an ActivationBuffer's"),
    ("a state that is a list", lambda lm: buf(lm).load_state_dict([1, 2]), r"lacks \['counters', 'order', 'rng', 'rows'\]"),
    ("a state of a TensorStream", lambda lm: buf(lm).load_state_dict({"perm": torch.arange(3), "pos": torch.tensor([0]),
                                                                       "rng": torch.Generator().get_state()}),
     r"lacks \['counters', 'order', 'rows'\]"),
    ("a state of other texts", lambda lm: buf(lm, ["a b c d e"] * 4).load_state_dict(buf(lm).state_dict()),
     r"the saved stream state is of other texts, another site or skip_first than this buffer's \(4 texts at resid_post.0\)"),
    ("a state of another site", lambda lm: ActivationBuffer(lm, "resid_pre.1", TEXTS, batch_size=4, capacity=16)
     .load_state_dict(buf(lm).state_dict()), r"is of other texts, another site or skip_first"),
    ("a state of another skip_first", lambda lm: buf(lm, skip_first=False).load_state_dict(buf(lm).state_dict()),
     r"is of other texts, another site or skip_first"),
    ("a state of fewer texts (no fingerprint)", lambda lm: buf(lm).load_state_dict(
        {k: v for k, v in buf(lm, TEXTS[:3]).state_dict().items() if k != "fingerprint"}),
     r"the saved stream state is for 3 texts; this buffer has 4: resume with the same texts"),
    ("an order that is no permutation", lambda lm: buf(lm).load_state_dict(state_with(lm, order=torch.tensor([0, 0, 1, 2]))),
     r"the saved stream state's text order is not a permutation of the 4 texts; the state is damaged"),
    ("counters of the wrong shape", lambda lm: buf(lm).load_state_dict(state_with(lm, counters=torch.tensor([1]))),
     r"counters have shape \(1,\), expected \(4,\) .*the state is damaged"),
    ("a cursor past the texts", lambda lm: buf(lm).load_state_dict(state_with(lm, counters=torch.tensor([9, 0, 0, 0]))),
     r"counters \[9, 0, 0, 0\] are out of range for 4 texts"),
    ("a random state of the wrong size", lambda lm: buf(lm).load_state_dict(state_with(lm, rng=torch.zeros(3, dtype=torch.uint8))),
     r"the saved stream state's random state is not a CPU generator's"),
    ("NaN rows in a state", lambda lm: buf(lm).load_state_dict(state_with(lm, rows=torch.full((3, 128), float("nan")))),
     r"holds NaN or inf activation rows; the state is damaged"),
    ("a state of lists", lambda lm: buf(lm).load_state_dict(state_with(lm, rows=[[0.0] * 128])),
     r"the saved stream state must hold tensors"),
    # --- collect
    ("collect of no texts", lambda lm: collect(lm, "resid_post.0", []), r"no texts to collect activations from"),
    ("collect of None", lambda lm: collect(lm, "resid_post.0", None), r"texts must be a list of strings .*got NoneType"),
    ("collect of an int text", lambda lm: collect(lm, "resid_post.0", ["a", 3]), r"texts\[1\] is a int, not a string"),
    ("collect at a pattern", lambda lm: collect(lm, "pattern.1", TEXTS), r"site 'pattern.1' does not hold one vector per token"),
    ("collect in batches of 0", lambda lm: collect(lm, "resid_post.0", TEXTS, batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    ("collect max_rows -1 (once dropped a row)", lambda lm: collect(lm, "resid_post.0", TEXTS, max_rows=-1),
     r"max_rows must be an integer >= 0, got -1"),
    ("collect max_rows 2.5", lambda lm: collect(lm, "resid_post.0", TEXTS, max_rows=2.5), r"max_rows must be an integer >= 0, got 2.5"),
    ("collect over budget", lambda lm: collect(lm, "resid_post.0", TEXTS, max_bytes=100),
     r"collecting resid_post.0 over 4 texts would take more than 100 B; use an ActivationBuffer"),
    ("collect with a budget of -1", lambda lm: collect(lm, "resid_post.0", TEXTS, max_bytes=-1), r"max_bytes must be an integer >= 1"),
    # --- evaluate_sae
    ("evaluate on no texts", lambda lm: evaluate_sae(lm, sae(), []), r"no texts to evaluate on"),
    ("evaluate on None", lambda lm: evaluate_sae(lm, sae(), None), r"texts must be a list of strings .*got NoneType"),
    ("evaluate on a None text", lambda lm: evaluate_sae(lm, sae(), ["the cat", None]), r"texts\[1\] is a NoneType, not a string"),
    ("evaluate an nn.Linear", lambda lm: evaluate_sae(lm, nn.Linear(128, 128), TEXTS, site="resid_post.0"),
     r"expected a workbench SAE \(SAE\(\.\.\.\) or SAE.load\(path\)\), got Linear \(it has no encode, decode, d_in\)"),
    ("evaluate a path", lambda lm: evaluate_sae(lm, "sae/", TEXTS), r"expected a workbench SAE .*got str"),
    ("an SAE of another width", lambda lm: evaluate_sae(lm, SAE(12, 20, k=2, site="resid_post.0"), TEXTS),
     r"SAE width mismatch: site 'resid_post.0' of tasklm has width 128 .*this SAE takes d_in=12"),
    ("an SAE without a site", lambda lm: evaluate_sae(lm, SAE(128, 64, k=4), TEXTS),
     r"this SAE does not record its site; pass site='resid_post.0'"),
    ("an SAE at a pattern", lambda lm: evaluate_sae(lm, sae(), TEXTS, site="pattern.0"), r"does not hold one vector per token"),
    ("an SAE with a NaN weight", lambda lm: evaluate_sae(lm, nan_sae(), TEXTS), r"the SAE's W_dec hold NaN or inf: its weights are damaged"),
    ("evaluate in batches of 0", lambda lm: evaluate_sae(lm, sae(), TEXTS, batch_size=0), r"batch_size must be an integer >= 1, got 0"),
    ("dense_threshold NaN", lambda lm: evaluate_sae(lm, sae(), TEXTS, dense_threshold=float("nan")),
     r"dense_threshold must be a share of tokens in \[0, 1\), got nan"),
    ("dense_threshold 2", lambda lm: evaluate_sae(lm, sae(), TEXTS, dense_threshold=2), r"dense_threshold must be a share .*got 2"),
    ("dense_threshold -0.1", lambda lm: evaluate_sae(lm, sae(), TEXTS, dense_threshold=-0.1), r"got -0.1"),
    ("texts without tokens", lambda lm: evaluate_sae(lm, sae(), ["", ""]),
     r"the texts hold no tokens to evaluate \(after dropping position 0\)"),
    ("texts without a next token", lambda lm: evaluate_sae(lm, sae(skip_first=False), ["", ""]),
     r"no text has two real tokens, so there is no next-token loss to compare"),
]


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_input_gets_a_clear_error(lm, name, call, match):
    with pytest.raises(WorkbenchError) as info:
        call(lm)
    assert re.search(match, str(info.value)), f"{name}: message {str(info.value)!r} does not match {match!r}"


def n_rows(lm, texts, skip_first=True):
    """Real-token rows of ``texts`` (position 0 dropped when ``skip_first``)."""
    return sum(len(lm.tokenizer(t).input_ids) - int(skip_first) for t in texts)


def drain(b):
    return torch.cat(list(b))


# (name, call(lm), check(result)) -- odd but valid inputs get the right answer
VALUES = [
    ("one string is one text", lambda lm: buf(lm, TEXTS[0]), lambda r: r.texts == [TEXTS[0]]),
    ("a tuple of texts", lambda lm: buf(lm, tuple(TEXTS)), lambda r: r.texts == TEXTS),
    ("a generator of texts", lambda lm: buf(lm, (t for t in TEXTS)), lambda r: r.texts == TEXTS),
    ("one-word texts give their word's row", lambda lm: drain(buf(lm, ["the", "cat"], epochs=1)),
     lambda r: r.shape == (2, 128)),
    ("one epoch yields every row once", lambda lm: (drain(buf(lm, epochs=1)), collect(lm, "resid_post.0", TEXTS)),
     lambda r: r[0].shape == r[1].shape and torch.allclose(r[0].sum(0), r[1].sum(0), atol=1e-4)),
    ("some empty texts among real ones", lambda lm: drain(buf(lm, ["", TEXTS[2], ""], epochs=2)),
     lambda r: r.shape == (2 * 4, 128)),
    ("skip_first=False keeps position 0", lambda lm: drain(buf(lm, ["", ""], skip_first=False, epochs=1)),
     lambda r: r.shape == (2, 128)),
    ("a used-up stream stays used up", lambda lm: (lambda b: (drain(b), b.next_batch(), b.next_batch()))(buf(lm, epochs=1)),
     lambda r: r[1] is None and r[2] is None),
    ("a bfloat16 buffer", lambda lm: buf(lm, dtype=torch.bfloat16).next_batch(), lambda r: r.dtype == torch.bfloat16),
    ("capacity of exactly two batches", lambda lm: buf(lm, batch_size=4, capacity=8).next_batch(), lambda r: r.shape == (4, 128)),
    ("a state round trip continues the stream exactly",
     lambda lm: _resume(lm), lambda r: all(torch.equal(a, b) for a, b in zip(*r))),
    ("a state of an older version (3 counters, no fingerprint) is read",
     lambda lm: _resume(lm, old=True), lambda r: all(torch.equal(a, b) for a, b in zip(*r))),
    ("a refused state leaves the buffer as it was", lambda lm: _refused(lm), lambda r: r),
    ("collect of one string", lambda lm: collect(lm, "resid_post.0", TEXTS[2]), lambda r: r.shape == (4, 128)),
    ("collect max_rows 0", lambda lm: collect(lm, "resid_post.0", TEXTS, max_rows=0), lambda r: r.shape == (0, 128)),
    ("collect of texts without tokens is empty", lambda lm: collect(lm, "resid_post.0", [""]), lambda r: r.shape == (0, 128)),
    ("collect at z concatenates the heads", lambda lm: (collect(lm, "z.1", TEXTS[:1]), (n_rows(lm, TEXTS[:1]), lm.n_heads * lm.d_head)),
     lambda r: r[0].shape == r[1] and r[1][1] == 128),
    ("evaluate one string as one text", lambda lm: evaluate_sae(lm, sae(), TEXTS[0]), lambda r: r.attrs["n_texts"] == 1),
    ("evaluate: every metric finite, L0 <= k", lambda lm: (evaluate_sae(lm, sae(), TEXTS), n_rows(lm, TEXTS)),
     lambda r: all(np.isfinite(v) for v in r[0].metrics.values()) and r[0].l0 <= 4 and r[0].attrs["tokens"] == r[1]),
    ("evaluate with dense_threshold 0", lambda lm: evaluate_sae(lm, sae(), TEXTS, dense_threshold=0.0),
     lambda r: r.dense_fraction == float((r["frequency"] > 0).mean())),
    ("a perfect SAE recovers all the loss", lambda lm: evaluate_sae(lm, _identity_sae(), TEXTS),
     lambda r: abs(r.loss_recovered_zero - 1) < 1e-4 and r.fvu < 1e-8 and r.loss_sae == pytest.approx(r.loss_clean, abs=1e-5)),
]


def _resume(lm, old=False):
    a = buf(lm, seed=3)
    a.next_batch()
    state = a.state_dict()
    if old:
        state = {k: v for k, v in state.items() if k != "fingerprint"}
        state["counters"] = state["counters"][:3]
    want = [a.next_batch() for _ in range(5)]
    b = buf(lm, seed=99)
    b.load_state_dict(state)
    return want, [b.next_batch() for _ in range(5)]


def _refused(lm):
    b = buf(lm, seed=1)
    b.next_batch()
    before = {k: v.clone() for k, v in b.state_dict().items()}
    bad = dict(before, order=torch.tensor([3, 3, 1, 0]))
    with pytest.raises(WorkbenchError):
        b.load_state_dict(bad)
    after = b.state_dict()
    return all(torch.equal(before[k], after[k]) for k in before)


def _identity_sae():
    """A ReLU SAE that reconstructs exactly: features are x and -x, decoded as f+ - f-."""
    s = SAE(128, 256, kind="relu", site="resid_post.0", apply_b_dec_to_input=False)
    eye = torch.eye(128)
    with torch.no_grad():
        s.W_enc.copy_(torch.cat([eye, -eye], 1))
        s.W_dec.copy_(torch.cat([eye, -eye], 0))
        s.b_enc.zero_()
        s.b_dec.zero_()
    return s


@pytest.mark.parametrize("name,call,check", VALUES, ids=[c[0] for c in VALUES])
def test_odd_but_valid_input_gets_the_right_answer(lm, name, call, check):
    assert check(call(lm)), name


words = st.sampled_from(["the", "key", "keys", "is", "are", "old", "near", "cat", "", "a b"])


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.lists(words, max_size=5).map(" ".join), min_size=1, max_size=6), st.integers(1, 5), st.integers(0, 4),
       st.integers(1, 3), st.booleans())
def test_any_finite_stream_yields_every_row_once(lm, texts, batch_size, extra, prompt_batch_size, skip_first):
    """Over one epoch the stream yields each real-token row exactly once, in batches of
    ``batch_size`` (the last may be short), for any texts (empty ones too) and sizes; when no
    text holds a row it says so instead of looping."""
    b = ActivationBuffer(lm, "resid_post.0", texts, batch_size=batch_size, capacity=2 * batch_size + extra,
                         prompt_batch_size=prompt_batch_size, skip_first=skip_first, epochs=1)
    want = n_rows(lm, texts, skip_first)
    if want == 0:
        with pytest.raises(WorkbenchError, match="none of the .* texts holds a token"):
            b.next_batch()
        return
    got = list(b)
    assert sum(len(x) for x in got) == want == b.tokens_seen
    assert all(len(x) == batch_size for x in got[:-1]) and 1 <= len(got[-1]) <= batch_size
    ref = collect(lm, "resid_post.0", texts, skip_first=skip_first)
    assert torch.allclose(torch.cat(got).sum(0), ref.sum(0), atol=1e-3)
