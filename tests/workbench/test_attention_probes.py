"""Probes: the cross-validation on synthetic data with known answers, the control task,
every layout family, and real probes on the zoo model."""

from __future__ import annotations

import numpy as np
import pytest

from workbench.attention.probes import control_labels, fit_probe, probe
from workbench.errors import WorkbenchError


def test_probe_accuracy_on_separable_and_on_random_labels():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 8))
    y = (x[:, 0] + 0.5 * x[:, 3] > 0).astype(int)
    acc, _ = fit_probe(x, y)
    assert acc > 0.95
    noise, _ = fit_probe(x, rng.integers(0, 2, size=300))
    assert 0.35 < noise < 0.65


def test_control_labels_are_a_function_of_word_type_with_the_label_distribution():
    rng = np.random.default_rng(1)
    types = rng.integers(0, 200, size=5000)
    y = rng.choice(["a", "b", "c"], p=[0.6, 0.3, 0.1], size=5000)
    ctrl = control_labels(types, y, seed=0)
    for t in np.unique(types):
        assert len(set(ctrl[types == t])) == 1
    per_type = {t: ctrl[types == t][0] for t in np.unique(types)}
    share = np.mean([v == "a" for v in per_type.values()])
    assert 0.5 < share < 0.7


def test_probe_shapes_on_every_family(tiny):
    arch, subject = tiny
    prompts = ["hot -> cold", "big -> small", "cat -> Cat", "dog -> Dog"] * 3
    labels = ["antonym", "antonym", "capitalize", "capitalize"] * 3
    r = probe(subject, prompts, labels, folds=3)
    frame = r.to_frame()
    assert len(frame) == subject.n_layers * subject.n_heads + subject.n_layers
    assert {"component", "layer", "head", "accuracy", "control", "selectivity"} <= set(frame.columns)
    assert frame.accuracy.between(0, 1).all()


def test_zoo_residual_decodes_the_in_context_task_and_beats_its_control(tasklm):
    """The last layer's residual at the query's arrow tells which task the demonstrations
    set. Every prompt ends in "->", one word type: the control task is a constant label,
    trivially learnt, so selectivity is judged against the majority baseline instead."""
    from workbench.data import icl_prompts

    tasks = ["antonym", "capitalize", "present_past", "singular_plural"]
    ds = icl_prompts(tasks, 3, 40, seed=11)
    r = probe(tasklm, list(ds["prompt"]), list(ds["task"]), components="resid")
    last = r.coord("component").index(f"resid.{tasklm.n_layers - 1}")
    assert r["accuracy"][last] > 0.9 and r.attrs["majority"] < 0.3
    assert r["control"][last] == 1.0


def test_zoo_per_token_probe_finds_the_repeat(tasklm):
    """Per token: is this token inside the repeated copy? The induction head's output knows."""
    import torch

    from workbench.data import repeated_sequences
    from workbench.zoo import checks

    ds = repeated_sequences(tasklm.tokenizer, 60, 12, seed=3)
    ids = torch.tensor(ds["input_ids"])
    labels = [[None] + ["first"] * 12 + ["repeat"] * 12 for _ in range(len(ids))]
    r = probe(tasklm, ids, labels, per="token", components="heads")
    il, ih = checks.induction(tasklm)["induction_head"]
    i = r.coord("component").index(f"L{il}H{ih}")
    assert r["accuracy"][i] > 0.9 and r["selectivity"][i] > 0.3


def test_bad_input(tasklm):
    with pytest.raises(WorkbenchError, match="2 labels for 3 prompts"):
        probe(tasklm, ["a", "b", "c"], ["x", "y"])
    with pytest.raises(WorkbenchError, match="at least two label values"):
        probe(tasklm, ["hot -> cold"] * 4, ["x"] * 4)
    with pytest.raises(WorkbenchError, match="per must be"):
        probe(tasklm, ["a"], ["x"], per="word")
    with pytest.raises(WorkbenchError, match="components must be"):
        probe(tasklm, ["a", "b"], ["x", "y"], components="mlp")
