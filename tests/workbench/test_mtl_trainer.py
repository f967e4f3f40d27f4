"""The multi-task trainer: it learns MultiDigits, monitors conflicts every k steps into a
history Result that round-trips exactly, resumes bit-identically (weights and history),
switches aggregator mid-run, stops on a non-finite loss; TAG affinity and task groups."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.mtl.trainer import (
    MultiTaskTrainer, TrainingHistory, TrainingStopped, lookahead_affinity, task_groups, transfer,
)
from workbench.results import Result
from workbench.mtl.workloads import MultiDigitsNet, accuracy, batch_sampler, digit_losses, multidigits_tensors


@pytest.fixture(scope="module")
def digits():
    return multidigits_tensors("train", n=1200), multidigits_tensors("test", n=300)


@pytest.mark.parametrize("agg", ["equal", "pcgrad", "mgda", "cagrad", "nash_mtl", "uncertainty"])
def test_trainer_learns_both_digits_and_records_conflicts(digits, agg):
    train, test = digits
    tr = MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(train, 64), aggregator=agg, lr=3e-3,
                          monitor_every=20)
    hist = tr.fit(300, progress=False)
    acc = accuracy(tr.model, test)
    assert acc["left"] > 0.8 and acc["right"] > 0.8, (agg, acc)
    assert isinstance(hist, TrainingHistory) and hist.coord("step") == list(range(0, 300, 20))
    assert hist.coord("block") == ["trunk.1", "trunk.3"]  # no layout: module paths
    assert np.allclose(np.diagonal(hist["cosine"], axis1=1, axis2=2), 1)
    assert hist["block_cosine"].shape == (15, 2, 2, 2) and hist["weight"].shape == (15, 2)
    assert ((0 <= hist["conflict_fraction"]) & (hist["conflict_fraction"] <= 1)).all()
    assert np.allclose(np.sqrt((hist["block_norm"] ** 2).sum(1)), hist["norm"])
    assert hist.attrs["aggregators"] == [{"from_step": 0, "aggregator": agg, "params": {}}]


def test_resume_is_exact(tmp_path, digits):
    train, _ = digits

    def make(ck=None):
        return MultiTaskTrainer(MultiDigitsNet(seed=1), digit_losses(), batch_sampler(train, 32, seed=2),
                                aggregator="gradnorm", monitor_every=5, checkpoint=ck, checkpoint_every=10)

    a = make()
    a.fit(30, progress=False)
    b = make(tmp_path / "ck.pt")
    b.fit(20, progress=False)
    c = make(tmp_path / "ck.pt")  # picks the checkpoint up
    assert c.step_count == 20
    c.fit(30, progress=False)
    for (n, p), (_, q) in zip(a.model.named_parameters(), c.model.named_parameters()):
        assert torch.equal(p, q), n
    ha, hc = a.history, c.history
    assert hc.coord("step") == ha.coord("step") == list(range(0, 30, 5))
    assert hc.variables == ha.variables and hc.attrs == ha.attrs
    for v in ha.variables:  # the history too, bit for bit
        assert np.array_equal(hc[v], ha[v], equal_nan=True), v


def test_history_round_trips_exactly(tmp_path, digits):
    train, _ = digits
    tr = MultiTaskTrainer(MultiDigitsNet(seed=2), digit_losses(), batch_sampler(train, 16), monitor_every=3, affinity=True)
    empty = tr.history
    assert empty.coord("step") == [] and empty["block_cosine"].shape == (0, 2, 2, 2)
    assert Result.load(empty.save(tmp_path / "empty.safetensors")).equals(empty)
    tr.fit(10, progress=False)
    h = tr.history
    back = Result.load(h.save(tmp_path / "h.safetensors"))
    assert isinstance(back, TrainingHistory) and back.equals(h)
    assert back["affinity"].shape == (4, 2, 2) and back.attrs["trained_steps"] == 10
    assert back.provenance["seed"] == 0 and "versions" in back.provenance
    frame = back.to_frame()
    assert list(frame.columns[:3]) == ["step", "aggregator", "task"] and len(frame) == 8
    tr.fit(13, progress=False)
    assert h.coord("step") == [0, 3, 6, 9] and tr.history.coord("step") == [0, 3, 6, 9, 12]  # a copy


def test_aggregator_changes_mid_run_are_recorded(digits):
    train, _ = digits
    tr = MultiTaskTrainer(MultiDigitsNet(seed=4), digit_losses(), batch_sampler(train, 16), monitor_every=2)
    tr.fit(4, progress=False)
    tr.set_aggregator("mgda")
    tr.fit(8, progress=False)
    h = tr.history
    assert h.attrs["aggregators"] == [{"from_step": 0, "aggregator": "equal", "params": {}},
                                      {"from_step": 4, "aggregator": "mgda", "params": {}}]
    assert [h.aggregator_at(s) for s in h.coord("step")] == ["equal", "equal", "mgda", "mgda"]
    assert np.allclose(h["weight"][:2], 1) and np.allclose(h["weight"][2:].sum(1), 1)  # MGDA: weights on the simplex
    with pytest.raises(WorkbenchError, match="unknown aggregator 'sgd'"):
        tr.set_aggregator("sgd")


def test_non_finite_loss_stops_with_a_message(tmp_path, digits):
    train, _ = digits
    losses = digit_losses()
    losses["right"] = lambda out, b: out.sum() * float("nan")
    tr = MultiTaskTrainer(MultiDigitsNet(), losses, batch_sampler(train, 8), checkpoint=tmp_path / "ck.pt")
    with pytest.raises(TrainingStopped, match="task 'right' has a non-finite loss.*step 0"):
        tr.fit(5, progress=False)
    assert not (tmp_path / "ck.pt").exists()


def test_bad_setup(digits):
    train, _ = digits
    with pytest.raises(WorkbenchError, match="at least two tasks"):
        MultiTaskTrainer(MultiDigitsNet(), {"left": digit_losses()["left"]}, batch_sampler(train, 8))
    with pytest.raises(WorkbenchError, match="no parameters start with 'body'"):
        MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(train, 8), shared_prefix="body")
    with pytest.raises(WorkbenchError, match="unknown aggregator"):
        MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(train, 8), aggregator="adam")


def test_lookahead_affinity_on_a_quadratic():
    """Two tasks pulling one weight apart: a step on one raises the other's loss."""
    w = torch.nn.Parameter(torch.tensor([0.0]))
    losses = lambda: [(w - 1).pow(2).sum() + 1, (w + 1).pow(2).sum() + 1]  # noqa: E731
    j = torch.stack([torch.tensor([-2.0]), torch.tensor([2.0])])  # gradients at w = 0
    z = lookahead_affinity(losses, [w], j, lr=0.1)
    # step on task 0: w = 0.2 -> L0 = 1.64 (from 2), L1 = 2.44 (from 2)
    assert z == pytest.approx(np.array([[1 - 1.64 / 2, 1 - 2.44 / 2], [1 - 2.44 / 2, 1 - 1.64 / 2]]))
    assert float(w.detach()) == 0.0  # restored


def test_task_groups_and_transfer():
    z = np.array([[0, .5, -.2, -.1], [.4, 0, -.3, 0], [-.2, -.1, 0, .6], [0, -.2, .5, 0]])
    assert task_groups(z, list("abcd")) == [["a", "b"], ["c", "d"]]
    t = transfer({"a": 0.5, "b": 0.4}, {"a": 0.4, "b": 0.5})
    assert t["a"] == pytest.approx(0.2) and t["b"] == pytest.approx(-0.25)


def test_monitored_equal_steps_train_as_plain_steps(digits):
    """Monitoring reuses the per-task gradients for the update (heads included): an
    equal-weight run monitored at every step ends where an unmonitored run does."""
    train, _ = digits

    def run(k):
        tr = MultiTaskTrainer(MultiDigitsNet(seed=3), digit_losses(), batch_sampler(train, 32, seed=4), monitor_every=k)
        tr.fit(25, progress=False)
        return tr

    a, b = run(1), run(10_000)
    assert a.n_records == 25 and b.history.coord("step") == [0]
    for (n, p), (_, q) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), n
    assert not torch.equal(a.model.trunk[1].weight, MultiDigitsNet(seed=3).trunk[1].weight)


def test_head_gradients_come_from_the_same_backward_passes(digits):
    from workbench.mtl import task_gradients

    train, _ = digits
    model = MultiDigitsNet(seed=5)
    batch = batch_sampler(train, 16)(0)
    fns = digit_losses()
    heads = [p for n, p in model.named_parameters() if n.startswith("heads")]
    out = model(batch)
    tg = task_gradients([fns[t](out[t], batch) for t in ("left", "right")],
                        [(n, p) for n, p in model.named_parameters() if n.startswith("trunk")], extra=heads)
    out = model(batch)
    ref = torch.autograd.grad(sum(fns[t](out[t], batch) for t in ("left", "right")), heads)
    assert len(tg.extra_grads) == len(heads) and tg.jacobian.shape == (2, tg["block_size"].sum())
    for g, r in zip(tg.extra_grads, ref):
        assert torch.allclose(g, r, atol=1e-7)


def test_history_records_what_conflict_summary_computes(digits):
    """The trainer's lean per-step conflict numbers equal conflict_summary's, on the same
    weights and batch; a zero gradient in a block is left out of its conflict fraction."""
    from workbench.mtl import conflict_summary, cosines_and_conflicts, task_gradients

    train, _ = digits
    sample = batch_sampler(train, 16, seed=5)
    tr = MultiTaskTrainer(MultiDigitsNet(seed=6), digit_losses(), sample, monitor_every=1)
    tr.fit(1, progress=False)
    h = tr.history
    model = MultiDigitsNet(seed=6)
    batch = sample(0)
    out = model(batch)
    fns = digit_losses()
    tg = task_gradients({t: fns[t](out[t], batch) for t in ("left", "right")},
                        [(n, p) for n, p in model.named_parameters() if n.startswith("trunk")])
    s = conflict_summary(tg)
    assert tg.blocks == h.coord("block") and tg.coord("task") == h.coord("task")
    assert np.allclose(h["cosine"][0], s["cosine"]) and h["conflict_fraction"][0] == s.conflict_fraction
    assert np.allclose(h["block_cosine"][0], s["block_cosine"])
    assert np.array_equal(h["block_conflict_fraction"][0], s["block_conflict_fraction"])
    assert np.allclose(h["loss"][0], tg["loss"]) and np.allclose(h["block_norm"][0], tg["block_norm"])
    g = np.concatenate([tg["gramian"][None], tg["block_gramian"]])
    g[-1, 0, 0] = g[-1, 0, 1] = g[-1, 1, 0] = 0  # a block where task 0 has no gradient
    tg["block_gramian"][-1] = g[-1]
    s = conflict_summary(tg)
    cos, frac = cosines_and_conflicts(g)
    assert np.allclose(cos[0], s["cosine"]) and frac[0] == s.conflict_fraction
    assert np.allclose(cos[1:], s["block_cosine"], equal_nan=True)
    assert np.array_equal(frac[1:], s["block_conflict_fraction"]) and frac[-1] == 0 and np.isnan(cos[-1, 0, 1])
    g3 = np.array([[[1.0, -0.5, 0.2], [-0.5, 1.0, -0.1], [0.2, -0.1, 1.0]]])
    assert cosines_and_conflicts(g3)[1].tolist() == [2 / 3]
