"""Aggregator cost beside one backward pass of MiniLM's encoder (22M shared parameters,
batch 32 x 32), for T = 2, 4, 8 tasks (the squared means of T slices of the last hidden
state, as in bench/task_gradients.py).

Per method and T (median of repeated calls):

- ``solve``: the weights from the float64 Gramian (``gramian_weights``), the part the
  optimisation-based methods add, with their certificate checks; on the real Gramian of
  MiniLM's per-task gradients and, for MGDA / CAGrad / Nash-MTL, on a hard synthetic Gramian
  (nearly Pareto-stationary gradients: a convex combination moved to ~0, noise 1e-3, where
  the solvers need the most steps);
- ``aggregate``: ``aggregate(J, method, gramian=G)`` on the real [T, 22M] float32 Jacobian
  (the solve, the update w @ J and its finiteness check), as the trainer calls it on
  monitored steps; beside it ``w @ J`` alone, the weighted sum any Jacobian aggregator
  (TorchJD's included) ends with: memory-bound, it reads the T x 22M matrix once;
- the anchor: one ``backward()`` of the summed loss through the encoder (the forward pass
  not counted).
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from bench.harness import Table, timeit
from bench.task_gradients import minilm_setup

METHODS = ("pcgrad", "mgda", "cagrad", "imtl_g", "nash_mtl", "aligned_mtl")
HARD = ("mgda", "cagrad", "nash_mtl")


def _backward_seconds(model, batch, reps: int = 5) -> float:
    times = []
    for _ in range(reps + 1):
        model.zero_grad(set_to_none=True)
        loss = model(**batch.kwargs()).last_hidden_state.pow(2).mean()
        start = time.perf_counter()
        loss.backward()
        times.append(time.perf_counter() - start)
    model.zero_grad(set_to_none=True)
    return statistics.median(times[1:])


def _hard_gramian(T: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    J = rng.normal(size=(T, 64))
    J = J - rng.dirichlet(np.ones(T)) @ J + 1e-3 * rng.normal(size=(T, 64))
    return J @ J.T


def run() -> Table:
    from workbench.mtl import aggregate, task_gradients
    from workbench.mtl.aggregators import gramian_weights

    model, batch, params = minilm_setup()
    backward = _backward_seconds(model, batch)
    t = Table("Aggregator cost vs one backward pass of MiniLM (22M shared parameters, batch 32 x 32), one CPU thread",
              ["solve (weights from G)", "aggregate(J, gramian=G)", "w @ J alone", "one backward"], unit="ms")
    for T in (2, 4, 8):
        h = model(**batch.kwargs()).last_hidden_state
        tg = task_gradients([c.pow(2).mean() for c in h.chunk(T, dim=-1)], params)
        J, G = tg.jacobian, tg["gramian"]
        for m in METHODS:
            solve = timeit(lambda m=m: gramian_weights(G, m), repeat=5, warmup=1, min_time=0.05)
            agg = timeit(lambda m=m: aggregate(J, m, gramian=G), repeat=3, warmup=1, min_time=0.0)
            w = torch.as_tensor(gramian_weights(G, m), dtype=J.dtype)
            gemv = timeit(lambda w=w: w @ J, repeat=3, warmup=1, min_time=0.0)
            t.add(f"{m} T={T}", solve * 1e3, agg * 1e3, gemv * 1e3, backward * 1e3)
        for m in HARD:
            Gh = _hard_gramian(T)
            solve = timeit(lambda m=m: gramian_weights(Gh, m), repeat=5, warmup=1, min_time=0.05)
            t.add(f"{m} T={T}, hard (nearly stationary)", solve * 1e3, float("nan"), float("nan"), backward * 1e3)
        del J, tg
    t.notes.append("ratios = cost / one backward pass (target: solve << 1x, negligible beside the T backward passes "
                   "a step takes), and aggregate / (w @ J alone) (target ~1x: the solver and the checks add little "
                   "to the weighted sum every Jacobian aggregator ends with)")
    t.notes.append("solve includes each method's certificate check (min-norm KKT, CAGrad's Frank-Wolfe gap, the Nash "
                   "equation); 'hard' rows: a synthetic Gramian of nearly Pareto-stationary gradients")
    return t


RATIOS = [(0, 3, "solve / backward"), (1, 3, "aggregate / backward"), (1, 2, "aggregate / (w @ J)")]
