"""The text-task multi-task workload on the zoo decoder: the deliberately conflicting
pair's trunk gradients point against each other, the compatible pair's do not, and the
per-task gradients equal separate backward passes on this trunk."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.mtl import conflict_summary, task_gradients
from workbench.mtl.workloads import COMPATIBLE_PAIR, CONFLICTING_PAIR, TEXT_TASKS, TextTasks


@pytest.fixture(scope="module")
def tt():
    return TextTasks()


def _losses(tt, model, batch):
    out = model(batch)
    fns = tt.losses()
    return [fns[t](out[t], batch) for t in tt.names]


def test_batches_put_the_conflicting_pair_on_identical_prompts(tt):
    b = tt.sampler(8, seed=3)(5)
    i, j = (tt.names.index(t) for t in CONFLICTING_PAIR)
    assert torch.equal(b["input_ids"][b["task"] == i], b["input_ids"][b["task"] == j])
    assert not torch.equal(b["answer"][b["task"] == i], b["answer"][b["task"] == j])  # Cat vs c
    assert torch.equal(tt.sampler(8, seed=3)(5)["input_ids"], b["input_ids"])  # a function of the step
    for t in TEXT_TASKS:
        assert not set(tt.words[t]["train"]) & set(tt.words[t]["test"]), t
        assert len(tt.words[t]["test"]) >= 10
    for t in CONFLICTING_PAIR:  # a held-out word is held out for both tasks of the pair
        assert not set(tt.words[t]["test"]) & set().union(*(tt.words[u]["train"] for u in CONFLICTING_PAIR))


def test_conflicting_pair_has_negative_cosine_and_compatible_pair_positive(tt):
    model = tt.model()
    shared = [(n, p) for n, p in model.named_parameters() if n.startswith("trunk")]
    assert len(shared) == len(list(model.parameters()))  # the whole decoder is the shared trunk
    i, j = (tt.names.index(t) for t in CONFLICTING_PAIR)
    k, m = (tt.names.index(t) for t in COMPATIBLE_PAIR)
    bad, good = [], []
    for step in range(4):
        tg = task_gradients(_losses(tt, model, tt.sampler(32)(step)), shared, mode="gramian", family=tt.family)
        c = tg["cosine"]
        bad.append(c[i, j])
        good.append(c[k, m])
        s = conflict_summary(tg)
        assert s.coord("block") == ["embed", "layer.0", "layer.1", "final_norm"]  # the names every lens uses
        assert (s["block_cosine"][:, i, j] < 0).all(), step  # conflict in every block
    # measured at the pretrained weights, batch 32 per task: about -0.6 and +0.58
    assert max(bad) < -0.4, bad
    assert min(good) > 0.3, good


def test_trainer_finds_the_layout_inside_the_wrapper(tt):
    """The trainer names the blocks of the decoder inside TextTasksNet (``trunk.gpt_neox...``)
    through its layout, with no family passed; the history carries the family."""
    from workbench.mtl import MultiTaskTrainer

    tr = MultiTaskTrainer(tt.model(), tt.losses(), tt.sampler(2))
    assert tr.family is tt.family and tr.blocks == ["embed", "layer.0", "layer.1", "final_norm"]
    h = tr.history
    assert h.attrs["family"] == "gpt_neox" and h.provenance["model"] == tt.model().trunk.config._name_or_path
    plain = MultiTaskTrainer(tt.model(), tt.losses(), tt.sampler(2), family=None, block_depth=3)  # module paths
    assert plain.blocks[:2] == ["trunk.gpt_neox.embed_in", "trunk.gpt_neox.layers.0"]


def test_per_task_gradients_equal_separate_backward_passes_on_the_decoder(tt):
    model = tt.model()
    params = list(model.named_parameters())
    batch = tt.sampler(6)(0)
    tg = task_gradients(_losses(tt, model, batch), params, family=tt.family)
    for t in range(len(tt.names)):
        model.zero_grad()
        _losses(tt, model, batch)[t].backward()
        ref = torch.cat([p.grad.reshape(-1) for _, p in params])
        assert torch.allclose(tg.jacobian[t], ref, atol=1e-6, rtol=1e-5), tt.names[t]
    model.zero_grad()


def test_model_copies_are_fresh_and_accuracy_is_per_task(tt):
    a, b = tt.model(), tt.model()
    with torch.no_grad():
        next(a.parameters()).add_(1.0)
    assert not torch.equal(next(a.parameters()), next(b.parameters()))
    acc = tt.accuracy(b)
    assert set(acc) == set(TEXT_TASKS) and all(0 <= v <= 1 for v in acc.values())
    assert tt.accuracy(b) == acc


def test_text_tasks_bad_input():
    with pytest.raises(WorkbenchError, match="unknown task"):
        TextTasks(("capitalize", "no_such_task"), same_prompts=())
    with pytest.raises(WorkbenchError, match="same_prompts"):
        TextTasks(("capitalize", "antonym"), same_prompts=("capitalize", "first_letter"))
    with pytest.raises(WorkbenchError, match="at least two"):
        TextTasks(("capitalize",), same_prompts=())
    with pytest.raises(WorkbenchError, match="LM head"):
        TextTasks(("capitalize", "antonym"), same_prompts=(), model="minilm")
