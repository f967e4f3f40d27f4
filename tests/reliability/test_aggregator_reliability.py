"""Hostile inputs to the aggregators: each case asserts a WorkbenchError whose message names
the culprit and what is accepted (or, for the degenerate-but-valid inputs, a finite answer);
a Hypothesis sweep puts a NaN or an inf anywhere in a Jacobian or a Gramian."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from workbench import WorkbenchError
from workbench.mtl import GradNorm, UncertaintyWeighting, aggregate
from workbench.mtl.aggregators import STATELESS, cagrad_weights, gramian_weights, nash_weights, pcgrad_weights

J = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.0, -1.0], [0.0, 2.0, 1.0]], dtype=torch.float64)
G = (J @ J.T).numpy()


def with_value(i: int, j: int, v: float) -> torch.Tensor:
    out = J.clone()
    out[i, j] = v
    return out


CASES = [
    # --- the Jacobian
    ("NaN in task 1", lambda: aggregate(with_value(1, 2, float("nan")), "mgda"), r"NaN or infinite entries in the rows of task\(s\) \[1\]"),
    ("inf in task 0", lambda: aggregate(with_value(0, 0, float("inf")), "pcgrad"), r"NaN or infinite entries in the rows of task\(s\) \[0\]"),
    ("-inf in task 2", lambda: aggregate(with_value(2, 1, -float("inf")), "equal"), r"rows of task\(s\) \[2\]"),
    ("one task", lambda: aggregate(J[:1], "mgda"), r"at least two tasks .*got shape \(1, 3\) \(one task: nothing to aggregate"),
    ("1-d Jacobian", lambda: aggregate(J[0], "mean"), r"\[tasks, params\] Jacobian .*got shape \(3,\)"),
    ("3-d Jacobian", lambda: aggregate(J[None], "mean"), r"\[tasks, params\] Jacobian .*got shape \(1, 3, 3\)"),
    ("no parameters", lambda: aggregate(torch.zeros(2, 0), "mean"), r"at least two tasks and one parameter, got shape \(2, 0\)"),
    ("integer Jacobian", lambda: aggregate(torch.ones(2, 3, dtype=torch.int64), "mean"), r"floating-point tensor, got dtype torch.int64"),
    ("a list", lambda: aggregate([[1.0, 2.0], [3.0, 4.0]], "mean"), r"must be a \[tasks, params\] tensor, got list"),
    ("None", lambda: aggregate(None, "mean"), r"must be a \[tasks, params\] tensor, got NoneType"),
    # --- the method and its parameters
    ("unknown method", lambda: aggregate(J, "sgd"), r"unknown aggregator 'sgd'; valid: equal, mean, pcgrad, mgda"),
    ("method None", lambda: aggregate(J, None), r"unknown aggregator None; valid"),
    ("method an int", lambda: aggregate(J, 3), r"unknown aggregator 3; valid"),
    ("method in capitals", lambda: aggregate(J, "MGDA"), r"unknown aggregator 'MGDA'"),
    ("stateful uncertainty", lambda: aggregate(J, "uncertainty"), r"'uncertainty' keeps state .*UncertaintyWeighting\(n_tasks\)"),
    ("stateful gradnorm", lambda: aggregate(J, "gradnorm"), r"'gradnorm' keeps state .*GradNorm\(n_tasks\)"),
    ("pcgrad with c", lambda: aggregate(J, "pcgrad", c=1), r"aggregator 'pcgrad' takes no parameter\(s\) \['c'\]; it accepts \['seed'\]"),
    ("mgda with iters", lambda: aggregate(J, "mgda", iters=3), r"aggregator 'mgda' takes no parameter\(s\) \['iters'\]; it accepts none"),
    ("mean with seed", lambda: aggregate(J, "mean", seed=1), r"aggregator 'mean' takes no parameter\(s\) \['seed'\]"),
    ("cagrad c < 0", lambda: aggregate(J, "cagrad", c=-0.5), r"cagrad: c must be a finite number >= 0 .*got -0.5"),
    ("cagrad c NaN", lambda: aggregate(J, "cagrad", c=float("nan")), r"cagrad: c must be a finite number >= 0 .*got nan"),
    ("cagrad c inf", lambda: aggregate(J, "cagrad", c=float("inf")), r"cagrad: c must be a finite number >= 0 .*got inf"),
    ("cagrad c a string", lambda: aggregate(J, "cagrad", c="0.5"), r"cagrad: c must be a finite number >= 0 .*got '0.5'"),
    ("cagrad c True", lambda: aggregate(J, "cagrad", c=True), r"cagrad: c must be a finite number >= 0 .*got True"),
    ("nash iters 0", lambda: aggregate(J, "nash_mtl", iters=0), r"nash_mtl: iters must be an integer >= 1 .*got 0"),
    ("nash iters 2.5", lambda: aggregate(J, "nash_mtl", iters=2.5), r"nash_mtl: iters must be an integer >= 1 .*got 2.5"),
    ("pcgrad seed a string", lambda: aggregate(J, "pcgrad", seed="a"), r"pcgrad: seed must be an integer, got 'a'"),
    ("pcgrad seed a float", lambda: aggregate(J, "pcgrad", seed=1.5), r"pcgrad: seed must be an integer, got 1.5"),
    # --- a precomputed Gramian
    ("gramian of the wrong size", lambda: aggregate(J, "mgda", gramian=np.eye(2)),
     r"gramian must be \[3, 3\] \(J @ J.T for the 3 tasks of the Jacobian\), got shape \(2, 2\)"),
    ("gramian with NaN", lambda: aggregate(J, "mgda", gramian=np.where(np.eye(3) > 0, np.nan, G)), r"gramian has NaN or infinite entries"),
    ("gramian not symmetric", lambda: aggregate(J, "mgda", gramian=G + np.triu(np.ones((3, 3)), 1)), r"gramian is not a Gramian: it must be symmetric"),
    ("gramian negative diagonal", lambda: aggregate(J, "mgda", gramian=-G), r"gramian is not a Gramian: .*non-negative diagonal"),
    ("gramian a string", lambda: aggregate(J, "mgda", gramian="G"), r"gramian must be a \[tasks, tasks\] float array .*got str"),
    ("gramian_weights 1 task", lambda: gramian_weights(np.eye(1), "mgda"), r"at least two tasks, got shape \(1, 1\)"),
    ("gramian_weights not square", lambda: gramian_weights(np.ones((2, 3)), "mgda"), r"square \[tasks, tasks\] matrix .*got shape \(2, 3\)"),
    ("gramian_weights unknown method", lambda: gramian_weights(G, "adam"), r"unknown aggregator 'adam'"),
    ("gramian_weights bad parameter", lambda: gramian_weights(G, "cagrad", alpha=1), r"aggregator 'cagrad' takes no parameter\(s\) \['alpha'\]; it accepts \['c'\]"),
    # --- no solution, overflow
    ("nash on opposite gradients", lambda: aggregate(torch.tensor([[1.0, 2.0], [-3.0, -6.0]]), "nash_mtl"),
     r"nash_mtl: the task gradients are Pareto-stationary \(0 lies in their convex hull.*use 'mgda' or 'cagrad'"),
    ("nash with a zero task gradient", lambda: aggregate(with_value(1, 0, 0.0) * torch.tensor([[1.0], [0.0], [1.0]], dtype=torch.float64), "nash_mtl"),
     r"nash_mtl: task\(s\) \[1\] have a zero gradient"),
    ("nash on all-zero gradients", lambda: aggregate(torch.zeros(3, 4), "nash_mtl"), r"nash_mtl: task\(s\) \[0, 1, 2\] have a zero gradient"),
    ("nash from a Gramian with a zero task", lambda: nash_weights(np.diag([1.0, 0.0])), r"task\(s\) \[1\] have a zero gradient"),
    ("nash iters too few", lambda: aggregate(torch.as_tensor(np.random.default_rng(0).normal(size=(6, 8))), "nash_mtl", iters=1),
     r"nash_mtl: Newton did not reach the certificate in 1 steps .*raise iters"),
    ("float32 overflow of the sum", lambda: aggregate(torch.full((3, 4), 3e38), "equal"),
     r"aggregator 'equal' produced a non-finite update: .*overflows torch.float32; rescale the losses"),
    ("float16 overflow of the sum", lambda: aggregate(torch.full((2, 4), 6e4, dtype=torch.float16), "equal"), r"overflows torch.float16"),
    ("cagrad_weights c negative", lambda: cagrad_weights(G, -1), r"cagrad: c must be a finite number >= 0 .*got -1"),
    ("uncertainty with NaN", lambda: UncertaintyWeighting(3)(with_value(0, 1, float("nan")), [1, 1, 1]), r"rows of task\(s\) \[0\]"),
    ("gradnorm with one task", lambda: GradNorm(1)(J[:1], [1.0]), r"at least two tasks"),
]


@pytest.mark.parametrize("name,call,pattern", CASES, ids=[c[0] for c in CASES])
def test_hostile_input_gets_a_clear_error(name, call, pattern):
    with pytest.raises(WorkbenchError, match=pattern):
        call()


DEGENERATE = {
    "zero row": torch.tensor([[1.0, 2.0, 0.0], [0.0, 0.0, 0.0], [0.5, -1.0, 3.0]]),
    "duplicate rows": torch.tensor([[1.0, 2.0, 0.0], [1.0, 2.0, 0.0], [0.5, -1.0, 3.0]]),
    "all zero": torch.zeros(3, 5),
    "tiny 1e-30": torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 1.0]]) * 1e-30,
    "huge 1e30": torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 1.0]]) * 1e30,
    "mixed 1e-30 and 1e30 rows": torch.tensor([[1e-30, 2e-30, 0.0], [-1e30, 0.5e30, 1e30]]),
    "one parameter": torch.tensor([[1.0], [-2.0], [3.0]]),
    "more tasks than parameters": torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.5]]),
    "float64 at 1e150": torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64) * 1e150,
    "float64 at 1e-300": torch.tensor([[1.0, 2.0], [-1.0, 0.5]], dtype=torch.float64) * 1e-300,
}


@pytest.mark.parametrize("name", list(DEGENERATE))
@pytest.mark.parametrize("method", STATELESS)
def test_degenerate_inputs_are_finite_or_refused(name, method):
    """Every method on every degenerate input: a finite update and weights, or (Nash-MTL
    where it has no solution) a WorkbenchError saying why."""
    j = DEGENERATE[name]
    try:
        upd, w = aggregate(j, method)
    except WorkbenchError as e:
        assert method == "nash_mtl" and ("zero gradient" in str(e) or "Pareto-stationary" in str(e)), str(e)
        return
    assert torch.isfinite(upd).all() and np.isfinite(w).all() and upd.dtype == j.dtype
    if name == "all zero":
        assert (upd == 0).all()


def test_pcgrad_orders_are_used_as_given():
    """A zero gradient is never divided by: the projection on it is skipped (its dot is 0)."""
    g = np.array([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.2]]) @ np.array([[1.0, 0.0], [0.0, 1.0]])
    w = pcgrad_weights(g @ g.T, orders=[[1, 2, 0], [0, 1, 2], [0, 1, 2]])
    assert np.isfinite(w).all() and w[1] == 1.0


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(2, 5), st.integers(1, 6), st.data(), st.sampled_from([float("nan"), float("inf"), -float("inf")]),
       st.sampled_from(STATELESS))
def test_a_non_finite_entry_anywhere_is_named(T, P, data, bad, method):
    j = torch.randn(T, P, generator=torch.Generator().manual_seed(T * 10 + P), dtype=torch.float64)
    i = data.draw(st.integers(0, T - 1))
    k = data.draw(st.integers(0, P - 1))
    j[i, k] = bad
    with pytest.raises(WorkbenchError, match=rf"rows of task\(s\) \[{i}\]"):
        aggregate(j, method)
    g = (torch.nan_to_num(j) @ torch.nan_to_num(j).T).numpy()
    g[i, i] = bad
    if method not in ("equal", "mean"):
        with pytest.raises(WorkbenchError, match="gramian has NaN or infinite entries"):
            aggregate(torch.nan_to_num(j), method, gramian=g)
