"""Memory budgets (``max_bytes``) of the lenses that hold whole-model state: per-task
gradients, SAE training and merges estimate what they will hold and refuse a request over
the budget up front, with the estimate, before any work."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from workbench import WorkbenchError
from workbench.memory import check_budget, fmt_bytes


def test_check_budget():
    check_budget(10, None, "x", "y")
    check_budget(10, 10, "x", "y")
    with pytest.raises(WorkbenchError, match=r"the thing needs about 2.0 KB, over the budget max_bytes=1.0 KB; shrink it"):
        check_budget(2048, 1024, "the thing", "shrink it")
    for bad in (0, -5, 1.5, True, "1GB"):
        with pytest.raises(WorkbenchError, match="max_bytes must be a positive integer"):
            check_budget(1, bad, "x", "y")


def _losses(tasklm):
    from workbench.data import agreement_sentences
    from workbench.metrics import next_token_loss

    batch = tasklm.tokenize(agreement_sentences(6, seed=0))
    nll = next_token_loss(tasklm.model(**batch.kwargs()).logits, batch)
    return [nll[i::3].mean() for i in range(3)]


def test_task_gradients_budget(tasklm):
    from workbench.mtl import shared_parameters, task_gradients
    from workbench.mtl.gradients import jacobian_bytes

    params = shared_parameters(tasklm.model)
    P = sum(p.numel() for _, p in params)
    est = jacobian_bytes(3, [p for _, p in params])
    assert est == 4 * 3 * P + 4 * P
    losses = _losses(tasklm)
    with pytest.raises(WorkbenchError, match=re.escape(f"needs about {fmt_bytes(est)}, over the budget")):
        task_gradients(losses, params, max_bytes=est - 1)
    # refused before any backward pass: no gradient anywhere and the graph still whole
    assert all(p.grad is None for _, p in params)
    res = task_gradients(losses, params, max_bytes=est)
    assert res.jacobian.shape == (3, P) and res.jacobian.numel() * res.jacobian.element_size() < est
    tasklm.model.zero_grad(set_to_none=True)


def test_gramian_mode_under_a_budget_takes_the_products_in_groups(tasklm):
    """A budget a quarter of the Jacobian's: mode='gramian' cuts the parameters into groups
    that fit and gives the unbounded Gramians; mode='jacobian' refuses."""
    from workbench.mtl import shared_parameters, task_gradients
    from workbench.mtl.gradients import jacobian_bytes, parameter_groups

    params = shared_parameters(tasklm.model)
    tensors = [p for _, p in params]
    budget = jacobian_bytes(3, tensors) // 4
    groups = parameter_groups(3, tensors, budget)
    assert len(groups) >= 4 and sorted(i for g in groups for i in g) == list(range(len(tensors)))
    assert all(jacobian_bytes(3, [tensors[i] for i in g]) <= budget for g in groups)
    full = task_gradients(_losses(tasklm), params, family=tasklm.family, mode="gramian")
    parts = task_gradients(_losses(tasklm), params, family=tasklm.family, mode="gramian", max_bytes=budget)
    assert parts.attrs["parameter_groups"] == len(groups) and full.attrs["parameter_groups"] == 1
    assert parts.jacobian is None
    np.testing.assert_allclose(parts["block_gramian"], full["block_gramian"], rtol=1e-5, atol=1e-8)  # float32 gradients
    np.testing.assert_allclose(parts["cosine"], full["cosine"], rtol=1e-5)
    with pytest.raises(WorkbenchError, match="use mode='gramian'"):
        task_gradients(_losses(tasklm), params, mode="jacobian", max_bytes=budget)
    biggest = max(jacobian_bytes(3, [t]) for t in tensors)
    with pytest.raises(WorkbenchError, match=r"the per-task gradients of one parameter \(\(934, 128\), 3 tasks\)"):
        task_gradients(_losses(tasklm), params, mode="gramian", max_bytes=biggest - 1)
    tasklm.model.zero_grad(set_to_none=True)


def test_train_sae_budget():
    from workbench.circuits import SAE, train_sae
    from workbench.circuits.sae import training_bytes

    sae = SAE(32, 512, kind="topk", k=4, seed=0)
    est = training_bytes(sae, 64)
    n_params = sum(p.numel() for p in sae.parameters())
    assert est >= 4 * 4 * n_params + 64 * 4 * 512 * 4  # weights, grads, Adam moments; dense [batch, d_sae] x 4
    assert training_bytes(sae, 128) - est == 64 * 4 * (4 * 512 + 4 * 32)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    data = torch.randn(256, 32, generator=torch.Generator().manual_seed(0))
    with pytest.raises(WorkbenchError, match=re.escape(f"training this SAE (32 x 512) on batches of 64 needs about "
                                                       f"{fmt_bytes(est)}")):
        train_sae(sae, data, steps=3, batch_size=64, max_bytes=est - 1, progress=False)
    assert all(torch.equal(v, sae.state_dict()[k]) for k, v in before.items())  # not one step taken
    log = train_sae(sae, data, steps=3, batch_size=64, max_bytes=est, progress=False)
    assert len(log["loss"]) == 3 and not torch.equal(before["W_enc"], sae.W_enc.detach())


def test_merge_budget(tmp_path):
    from workbench.taskvec import Checkpoint, TaskVector, merge
    from workbench.taskvec.merging import merge_bytes

    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(300, 500, generator=g), "b": torch.randn(500, generator=g).to(torch.bfloat16),
            "step": torch.tensor([3])}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g).to(v.dtype)) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(3)]
    est = merge_bytes(Checkpoint(base), 3)
    held = 300 * 500 * 4 + 500 * 2 + 8
    assert est == held + 2 * 150_000 * 4 + 4 * (2 * 150_000 + 150_000 * 6)
    out = tmp_path / "merged.safetensors"
    with pytest.raises(WorkbenchError, match=re.escape(f"merging 3 task vectors into base needs about {fmt_bytes(est)}")):
        merge(base, [TaskVector(base, f) for f in fts], "ties", density=0.5, out=out, max_bytes=est - 1)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    merged = merge(base, [TaskVector(base, f) for f in fts], "ties", density=0.5, out=out, max_bytes=est)
    assert out.exists() and sum(v.numel() * v.element_size() for v in merged.values()) == held


@pytest.mark.parametrize("out_name", ["merged.safetensors", "merged_folder"])
def test_streamed_merge_writes_what_the_kept_merge_returns(tmp_path, out_name):
    """keep=False makes each merged tensor as it is written and keeps none; the file holds
    exactly the kept merge's tensors, and its budget is one tensor's, not the model's."""
    from workbench.taskvec import Checkpoint, TaskVector, merge
    from workbench.taskvec.merging import merge_bytes

    g = torch.Generator().manual_seed(1)
    base = {f"layer{i}.w": torch.randn(200, 300, generator=g).to(torch.bfloat16) for i in range(6)}
    base["step"] = torch.tensor([7])
    fts = [{k: (v.float() + 0.05 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(3)]
    kept = merge(base, [TaskVector(base, f) for f in fts], "ties", density=0.3)
    streamed_budget = merge_bytes(Checkpoint(base), 3, keep=False)
    assert streamed_budget < merge_bytes(Checkpoint(base), 3) - 4 * 200 * 300 * 2  # five tensors fewer held
    with pytest.raises(WorkbenchError, match="needs about"):
        merge(base, [TaskVector(base, f) for f in fts], "ties", density=0.3, max_bytes=streamed_budget)
    out = tmp_path / out_name
    ck = merge(base, [TaskVector(base, f) for f in fts], "ties", density=0.3, out=out, keep=False,
               max_bytes=streamed_budget)
    assert isinstance(ck, Checkpoint) and sorted(ck.all_keys()) == sorted(kept)
    for k, v in kept.items():
        assert ck.dtype(k) == v.dtype and torch.equal(ck.get(k), v), k
    with pytest.raises(WorkbenchError, match="keep=False writes each merged tensor to out"):
        merge(base, [TaskVector(base, f) for f in fts], "ties", keep=False)


def test_streamed_merge_failing_part_way_leaves_nothing(tmp_path):
    from workbench.taskvec import TaskVector, merge

    base = {"a": torch.zeros(10, 10), "b": torch.ones(10, 10)}
    ft = {"a": torch.ones(10, 10), "b": torch.full((10, 10), float("inf"))}  # the second tensor overflows
    out = tmp_path / "m.safetensors"
    with pytest.raises(WorkbenchError, match="not finite|non-finite|NaN|inf"):
        merge(base, [TaskVector(base, ft)], "task_arithmetic", out=out, keep=False)
    assert list(tmp_path.iterdir()) == []
