"""MTL lens: per-task gradients equal separate backward passes on every layout family;
their Results round-trip exactly; blocks carry the names every lens uses (and join a
task-vector frame); each aggregator against its paper's definition on hand-built
Jacobians; bad input."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.mtl import (
    ConflictSummary,
    GradNorm,
    TaskGradients,
    UncertaintyWeighting,
    aggregate,
    conflict_summary,
    representation_gradients,
    shared_parameters,
    task_gradients,
)
from workbench.results import Result


def _two_task_losses(subject, batch):
    """Next-token loss on the first half of the positions vs the second half."""
    logits = subject.model(**batch.kwargs()).logits if subject.has_logits else None
    if logits is None:
        h = subject.model(**batch.kwargs()).last_hidden_state
        return [h[:, : h.shape[1] // 2].pow(2).mean(), h[:, h.shape[1] // 2 :].mean()]
    logp = logits[:, :-1].log_softmax(-1)
    nll = -logp.gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    half = nll.shape[1] // 2
    return [nll[:, :half].mean(), nll[:, half:].mean(), nll.mean() * 0.5]


def test_task_gradients_equal_separate_backward_passes(tiny):
    arch, subject = tiny
    model = subject.model
    batch = subject.tokenize(["hot -> cold ; big -> small", "the keys near the cabinet are old ."])
    params = shared_parameters(model)
    tg = task_gradients(_two_task_losses(subject, batch), params, family=subject.family)
    assert isinstance(tg, TaskGradients) and tg.wrt == "parameters"
    for t in range(tg.n_tasks):
        model.zero_grad()
        _two_task_losses(subject, batch)[t].backward()
        ref = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in params])
        assert torch.allclose(tg.jacobian[t], ref, atol=1e-6, rtol=1e-5), (arch, t)
    model.zero_grad()
    j = tg.jacobian.double()
    assert tg["gramian"].dtype == np.float64 and tg["block_gramian"].dtype == np.float64
    assert np.allclose(tg["gramian"], (j @ j.T).numpy())
    assert np.allclose(tg["block_gramian"].sum(0), tg["gramian"])
    assert np.allclose(tg["norm"], j.norm(dim=1).numpy())
    assert tg["block_size"].sum() == j.shape[1]
    # embeddings, each layer (and the final norm where there is one), in depth order
    assert tg.blocks[0] == "embed" and [b for b in tg.blocks if b.startswith("layer.")] == ["layer.0", "layer.1"], tg.blocks
    s = conflict_summary(tg)
    assert isinstance(s, ConflictSummary) and np.allclose(np.diag(s["cosine"]), 1) and 0 <= s.conflict_fraction <= 1
    assert s.block_frame()["block"].tolist() == tg.blocks
    g = task_gradients(_two_task_losses(subject, batch), params, mode="gramian", family=subject.family)
    assert g.jacobian is None and np.allclose(g["gramian"], tg["gramian"], rtol=1e-6)


def test_results_round_trip_exactly(tmp_path, tiny):
    """task_gradients, conflict_summary and representation_gradients results save and
    load bit-exactly; the Jacobian is not saved."""
    arch, subject = tiny
    batch = subject.tokenize(["hot -> cold ; big -> small"])
    tg = task_gradients(dict(zip(["a", "b", "c", "d"], _two_task_losses(subject, batch))), shared_parameters(subject.model),
                        family=subject.family)
    assert tg.coord("task")[:2] == ["a", "b"] and tg.jacobian is not None
    feats = subject.model.get_input_embeddings()(batch.input_ids)
    rg = representation_gradients([feats.pow(2).sum(), feats.sum()], feats)
    for r in (tg, conflict_summary(tg), rg, conflict_summary(rg)):
        back = Result.load(r.save(tmp_path / f"{r.kind}.safetensors"))
        assert type(back) is type(r) and back.equals(r), r
        assert all(back[v].dtype == r[v].dtype for v in r.variables)
    back = Result.load(tg.save(tmp_path / "tg.safetensors"))
    assert back.jacobian is None and back.extra_grads is None
    assert conflict_summary(back).equals(conflict_summary(tg))  # a loaded result summarises the same


def test_representation_gradients_are_named_as_such(tiny):
    arch, subject = tiny
    batch = subject.tokenize(["hot -> cold ; big -> small"])
    feats = subject.model.get_input_embeddings()(batch.input_ids)
    losses = [feats.pow(2).sum(), feats.sum()]
    tg = representation_gradients(losses, feats)
    assert tg.wrt == "representation" and conflict_summary(tg).wrt == "representation"
    assert tg.blocks == ["features"]
    assert torch.allclose(tg.jacobian[1], torch.ones(feats.numel()))


def _tasklm_gradients(tasklm, **kw):
    batch = tasklm.tokenize(["hot -> cold ; big -> small", "the keys near the cabinet are old ."])
    logits = tasklm.model(**batch.kwargs()).logits
    nll = -logits[:, :-1].log_softmax(-1).gather(-1, batch.input_ids[:, 1:, None])[..., 0]
    half = nll.shape[1] // 2
    return task_gradients({"first_half": nll[:, :half].mean(), "second_half": nll[:, half:].mean()},
                          shared_parameters(tasklm.model), **kw)


def test_blocks_of_an_hf_model_are_the_shared_names(tasklm):
    """tasklm (GPT-NeoX, 2 layers, tied unembedding) groups into the blocks every lens
    names, resolved through its layout, and each block's Gramian is its own columns'."""
    tg = _tasklm_gradients(tasklm, family=tasklm.family)
    assert tg.blocks == ["embed", "layer.0", "layer.1", "final_norm"]  # the tied unembedding is the embedding
    assert _tasklm_gradients(tasklm, family="gpt_neox").blocks == tg.blocks
    j = tg.jacobian.double()
    names = [n for n, _ in shared_parameters(tasklm.model)]
    sizes = [p.numel() for _, p in shared_parameters(tasklm.model)]
    cols = np.repeat([tg.blocks.index("layer.1" if ".layers.1." in n else "layer.0" if ".layers.0." in n
                                      else "final_norm" if "final_layer_norm" in n else "embed") for n in names], sizes)
    for b in range(len(tg.blocks)):
        jb = j[:, torch.as_tensor(cols == b)]
        assert np.allclose(tg["block_gramian"][b], (jb @ jb.T).numpy()), tg.blocks[b]
    # without a family: module paths
    assert _tasklm_gradients(tasklm).blocks[:2] == ["gpt_neox.embed_in", "gpt_neox.layers.0"]


def test_per_block_conflicts_join_a_per_block_task_vector_frame(tasklm):
    """The gradient-conflict frame and a task-vector frame (per-block norm of a weight
    difference, blocks named from the state-dict keys as the task-vector lens does)
    share their block names: a plain merge on block keeps every row."""
    import pandas as pd

    from workbench.blocks import block_of, family_of_keys

    tg = _tasklm_gradients(tasklm, family=tasklm.family)
    conflicts = conflict_summary(tg).block_frame()
    base = tasklm.model.state_dict()
    g = torch.Generator().manual_seed(0)
    tuned = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items() if v.is_floating_point()}
    family = family_of_keys(tuned)
    assert family is tasklm.family
    sq: dict[str, float] = {}
    for k, v in tuned.items():
        b = block_of(k, family)
        sq[b] = sq.get(b, 0.0) + float((v - base[k]).double().pow(2).sum())
    tv = pd.DataFrame({"block": list(sq), "tv_norm": np.sqrt(list(sq.values()))})
    joined = pd.merge(conflicts, tv, on=["block"])
    assert len(joined) == len(conflicts) == 4 and joined["block"].tolist() == tg.blocks
    assert joined["tv_norm"].gt(0).all() and joined["conflict_fraction"].between(0, 1).all()
    # a state dict lists the tied unembedding under its own key: the one block gradients lack
    assert set(tv["block"]) - set(conflicts["block"]) == {"unembed"}


def test_bad_input():
    w = torch.nn.Parameter(torch.ones(3))
    v = torch.nn.Parameter(torch.ones(3))
    with pytest.raises(WorkbenchError, match="at least two task losses"):
        task_gradients([w.sum()], [("w", w)])
    with pytest.raises(WorkbenchError, match="not finite"):
        task_gradients([w.sum(), w.sum() * float("nan")], [("w", w)])
    with pytest.raises(WorkbenchError, match="loss 1 does not depend on the shared parameters"):
        task_gradients([w.sum(), v.sum()], [("w", w)])
    with pytest.raises(WorkbenchError, match="unknown aggregator 'sgd'"):
        aggregate(torch.eye(2), "sgd")
    with pytest.raises(WorkbenchError, match="keeps state"):
        aggregate(torch.eye(2), "gradnorm")


J2 = torch.tensor([[1.0, 0.0], [-1.0, 1.0]], dtype=torch.float64)  # conflicting: cos = -0.707


def test_pcgrad_projects_conflicting_pairs():
    upd, _ = aggregate(J2, "pcgrad")
    g1, g2 = J2
    p1 = g1 - (g1 @ g2) / (g2 @ g2) * g2
    p2 = g2 - (g2 @ g1) / (g1 @ g1) * g1
    assert torch.allclose(upd, p1 + p2)
    agree = torch.tensor([[1.0, 0.2], [0.5, 1.0]], dtype=torch.float64)
    assert torch.allclose(aggregate(agree, "pcgrad")[0], agree.sum(0))  # no conflict: plain sum


def test_pcgrad_on_the_gramian_equals_projecting_the_vectors():
    """Four tasks, several conflicts: the projections done on vectors, in the paper's
    sequential random order, give the same update and the weights that reproduce it."""
    g = torch.randn(4, 50, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g[1] -= 1.5 * g[0]
    g[3] = -0.8 * g[2] + 0.3 * g[3]
    rng = np.random.default_rng(7)
    out = g.clone()
    for i in range(4):
        for k in rng.permutation(4):
            if k != i and out[i] @ g[k] < 0:
                out[i] = out[i] - (out[i] @ g[k]) / (g[k] @ g[k]) * g[k]
    upd, w = aggregate(g, "pcgrad", seed=7)
    assert torch.allclose(upd, out.sum(0), atol=1e-12)
    assert np.allclose(torch.as_tensor(w) @ g, out.sum(0), atol=1e-12)
    assert not torch.allclose(upd, g.sum(0))  # there was something to project


def _simplex(T, n=60):
    for c in itertools.product(range(n + 1), repeat=T - 1):
        if sum(c) <= n:
            yield np.array([*c, n - sum(c)]) / n


def test_mgda_is_the_min_norm_point_of_the_hull():
    rng = np.random.default_rng(0)
    for T in (2, 3):
        j = torch.as_tensor(rng.normal(size=(T, 5)))
        upd, w = aggregate(j, "mgda")
        best = min(np.linalg.norm(x @ j.numpy()) for x in _simplex(T))
        assert np.linalg.norm(upd.numpy()) <= best + 1e-6
        assert w.min() >= -1e-12 and w.sum() == pytest.approx(1)
        # optimality: every task gradient has at least the min-norm point's squared norm along it
        d = upd.numpy()
        assert (j.numpy() @ d >= d @ d - 1e-8).all()


def test_cagrad_solves_its_dual():
    rng = np.random.default_rng(1)
    j = torch.as_tensor(rng.normal(size=(3, 6)))
    c = 0.5
    upd, coef = aggregate(j, "cagrad", c=c)
    G = j.numpy() @ j.numpy().T
    g0 = j.numpy().mean(0)
    sqrt_phi = c * np.linalg.norm(g0)
    obj = lambda w: w @ G.mean(1) + sqrt_phi * np.sqrt(w @ G @ w)  # noqa: E731
    w_star = min(_simplex(3, 80), key=obj)
    gw = w_star @ j.numpy()
    d = (g0 + sqrt_phi / np.linalg.norm(gw) * gw) / (1 + c**2)
    assert np.allclose(upd.numpy(), d, atol=0.02 * np.linalg.norm(d))
    # the direction keeps the worst task's improvement within c|g0| of the mean's
    assert (j.numpy() @ upd.numpy() * (1 + c**2)).min() >= g0 @ g0 - sqrt_phi * np.linalg.norm(g0) - 1e-6


def test_imtl_g_equal_projections_and_nash_bargaining():
    rng = np.random.default_rng(2)
    j = torch.as_tensor(rng.normal(size=(3, 7)) * np.array([[1.0], [5.0], [0.2]]))
    upd, w = aggregate(j, "imtl_g")
    u = j / j.norm(dim=1, keepdim=True)
    proj = (u @ upd).numpy()
    assert np.allclose(proj, proj[0]) and w.sum() == pytest.approx(1)
    upd, a = aggregate(j, "nash_mtl")
    G = (j @ j.T).numpy()
    assert (a > 0).all() and np.allclose(a * (G @ a), 1, atol=1e-6)


def test_aligned_mtl_equalises_singular_values():
    rng = np.random.default_rng(3)
    j = torch.as_tensor(rng.normal(size=(3, 8)) * np.array([[1.0], [4.0], [0.5]]))
    upd, w = aggregate(j, "aligned_mtl")
    U, S, Vt = np.linalg.svd(j.numpy(), full_matrices=False)
    aligned = S.min() * U @ Vt
    assert np.allclose(upd.numpy(), aligned.sum(0))
    assert np.allclose(aligned @ aligned.T, S.min() ** 2 * np.eye(3))


def test_stateful_weightings():
    j = torch.tensor([[1.0, 0.0], [0.0, 10.0]], dtype=torch.float64)
    uw = UncertaintyWeighting(2, lr=0.5)
    for _ in range(200):
        _, w = uw(j, [0.5, 4.0])
    assert w == pytest.approx([1 / 0.5, 1 / 4.0], rel=0.05)  # optimum: exp(-s) = 1 / L
    gn = GradNorm(2, alpha=0.0, lr=0.02)
    ws = [gn(j, [1.0, 1.0])[1] for _ in range(400)]
    w = np.mean(ws[-200:], axis=0)  # sign steps oscillate around the balance point
    weighted = w * np.array([1.0, 10.0])
    assert weighted[0] == pytest.approx(weighted[1], rel=0.15) and w.sum() == pytest.approx(2)


def test_gramian_is_float64_accurate_without_a_float64_copy():
    from workbench.mtl.gradients import gram64

    torch.manual_seed(0)
    j = torch.randn(4, 1_000_000) * 1e-3 + 1e-4  # long rows: a plain float32 J J^T drifts
    ref = (j.double() @ j.double().T).numpy()
    err = np.abs(gram64(j) - ref).max() / np.abs(ref).max()
    plain = np.abs((j @ j.T).double().numpy() - ref).max() / np.abs(ref).max()
    assert err < 1e-6 and plain > 10 * err
