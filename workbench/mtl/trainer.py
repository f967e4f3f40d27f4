"""A multi-task trainer that shows its gradient conflicts as it goes.

A model with a shared trunk and one head per task (any ``nn.Module``: ``forward(batch)``
returns one output per task) is trained with any aggregator. Every ``monitor_every``
steps the per-task gradients on the shared parameters are taken exactly (one backward
per task) and a record goes to ``history``: losses, pairwise cosines overall and per
block, norms, the conflict fraction, the aggregator's task weights and, optionally, the
lookahead task affinity of TAG ("Efficiently Identifying Task Groupings for Multi-Task
Learning"). Between monitored steps an equal-weight run takes one plain backward.

Data comes from ``data(step) -> batch``, a function of the step, so that a run resumed
from a checkpoint sees the same batches and ends with the same weights. A non-finite
loss stops training with a message; the last checkpoint stays as it was.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.mtl.aggregators import STATEFUL, STATELESS, GradNorm, UncertaintyWeighting, aggregate
from workbench.mtl.gradients import _cosines_and_conflicts, task_gradients

LossFn = Callable[[object, object], torch.Tensor]  # (task output, batch) -> scalar


class TrainingStopped(WorkbenchError):
    """Training stopped on a non-finite loss; the message names the task and the step."""


def lookahead_affinity(losses_at: Callable[[], Sequence[torch.Tensor]], params: Sequence[torch.nn.Parameter],
                       jacobian: torch.Tensor, lr: float) -> np.ndarray:
    """TAG affinity Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta) on the same batch:
    how much a step on task i alone lowers task j's loss (positive: i helps j)."""
    with torch.no_grad():
        base = np.asarray([float(l) for l in losses_at()])
        T = jacobian.shape[0]
        z = np.zeros((T, T))
        saved = [p.detach().clone() for p in params]
        for i in range(T):
            off = 0
            for p in params:
                n = p.numel()
                p.sub_(lr * jacobian[i, off : off + n].view_as(p).to(p.dtype))
                off += n
            after = np.asarray([float(l) for l in losses_at()])
            z[i] = 1 - after / base
            for p, s in zip(params, saved):
                p.copy_(s)
    return z


def default_monitor_every(n_tasks: int) -> int:
    """The default monitoring interval, ``20 * (T - 1)`` steps. Exact monitoring takes one
    backward pass per task instead of one in all: T - 1 extra backward passes, about
    2 (T - 1) / 3 of a plain step (a backward costs about two forwards), so every
    20 (T - 1) steps it adds about 3% of compute plus the bookkeeping, under the 10% the
    benchmarks check (``bench/task_gradients.py``)."""
    return 20 * max(1, n_tasks - 1)


class MultiTaskTrainer:
    """Train ``model`` on ``tasks`` (name -> loss function of (task output, batch)).

    ``shared``: the shared parameters as (name, parameter) pairs (default: every
    parameter whose name starts with ``shared_prefix``). ``aggregator``: a name of
    :func:`~workbench.mtl.aggregate` or ``"uncertainty"`` / ``"gradnorm"``.
    ``block_depth``: name parts that make a block when a name has no layer index
    (``trunk.gpt_neox.embed_in`` needs 3).
    """

    def __init__(self, model: torch.nn.Module, tasks: dict[str, LossFn], data: Callable[[int], object], *,
                 shared_prefix: str = "trunk", aggregator: str = "equal", lr: float = 1e-3,
                 monitor_every: int | None = None,
                 affinity: bool = False, seed: int = 0, checkpoint: str | Path | None = None,
                 checkpoint_every: int = 50, aggregator_params: dict | None = None, block_depth: int = 2) -> None:
        if len(tasks) < 2:
            raise WorkbenchError(f"multi-task training needs at least two tasks, got {list(tasks)}")
        if aggregator not in STATELESS + STATEFUL:
            from workbench.errors import one_of

            raise one_of("aggregator", aggregator, STATELESS + STATEFUL)
        if monitor_every is None:
            monitor_every = default_monitor_every(len(tasks))
        if monitor_every < 1:
            raise WorkbenchError(f"monitor_every must be >= 1, got {monitor_every}")
        self.model, self.tasks, self.data = model, dict(tasks), data
        self.names = list(tasks)
        self.shared = [(n, p) for n, p in model.named_parameters() if n.startswith(shared_prefix) and p.requires_grad]
        if not self.shared:
            raise WorkbenchError(f"no parameters start with {shared_prefix!r}; name the shared trunk's prefix")
        shared_ids = {id(p) for _, p in self.shared}
        self.own = [p for p in model.parameters() if id(p) not in shared_ids and p.requires_grad]
        self.aggregator, self.lr, self.monitor_every, self.affinity = aggregator, lr, monitor_every, affinity
        self.agg_params = dict(aggregator_params or {})
        self.block_depth = block_depth  # how parameter names group into blocks (see gradients.block_of)
        self.state_agg = (UncertaintyWeighting(len(tasks)) if aggregator == "uncertainty"
                          else GradNorm(len(tasks)) if aggregator == "gradnorm" else None)
        self.seed = seed
        torch.manual_seed(seed)
        random.seed(seed)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.step_count = 0
        self.history: list[dict] = []
        self.callbacks: list[Callable[["MultiTaskTrainer", dict], None]] = []
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.checkpoint_every = checkpoint_every
        self._stop = False
        if self.checkpoint and self.checkpoint.exists():
            self.load(self.checkpoint)

    # ------------------------------------------------------------------ pieces

    def losses(self, batch) -> list[torch.Tensor]:
        out = self.model(batch)
        return [self.tasks[n](out[n], batch) for n in self.names]

    def stop(self) -> None:
        """Ask a running ``fit`` to stop after the current step (thread-safe)."""
        self._stop = True

    def train_step(self) -> dict | None:
        """One optimisation step; returns the monitoring record on monitored steps."""
        step = self.step_count
        batch = self.data(step)
        self.model.train()
        losses = self.losses(batch)
        for name, l in zip(self.names, losses):
            if not torch.isfinite(l).all():
                raise TrainingStopped(f"task {name!r} has a non-finite loss ({float(l.detach())}) at step {step}; "
                                      "training stopped, the last checkpoint is unchanged")
        monitored = step % self.monitor_every == 0
        needs_jacobian = monitored or self.aggregator != "equal"
        self.opt.zero_grad(set_to_none=True)
        record = None
        if not needs_jacobian:
            torch.stack(losses).sum().backward()
        else:
            params = [p for _, p in self.shared]
            # task heads get the gradient of the summed loss, from the same T backward passes
            tg = task_gradients(losses, self.shared, block_depth=self.block_depth, extra=self.own)
            for p, g in zip(self.own, tg.extra_grads or ()):
                p.grad = g
            j = tg.jacobian
            if self.state_agg is not None:
                update, weights = self.state_agg(j, tg.losses)
            elif self.aggregator == "equal":  # the plain summed gradient, as an unmonitored step takes it
                update, weights = j.sum(0), np.ones(len(losses))
            else:
                update, weights = aggregate(j, self.aggregator, **self.agg_params)
            off = 0
            for p in params:
                n = p.numel()
                p.grad = update[off : off + n].view_as(p).to(p.dtype, copy=True)
                off += n
            if monitored:
                cos, frac = _cosines_and_conflicts(np.concatenate([tg.gramian[None], tg.block_gramians]))
                record = {
                    "step": step, "losses": tg.losses.tolist(), "norms": tg.norms.tolist(),
                    "cosine": cos[0].tolist(), "conflict_fraction": frac[0],
                    "blocks": tg.blocks,
                    "block_cosine": cos[1:].tolist(),
                    "block_conflict_fraction": frac[1:],
                    "weights": np.asarray(weights, float).tolist(), "aggregator": self.aggregator,
                }
                if self.affinity:
                    record["affinity"] = lookahead_affinity(lambda: self.losses(batch), params, j, self.lr).tolist()
        self.opt.step()
        self.step_count += 1
        if record is not None:
            self.history.append(record)
            for cb in self.callbacks:
                cb(self, record)
        if self.checkpoint and self.step_count % self.checkpoint_every == 0:
            self.save(self.checkpoint)
        return record

    def fit(self, steps: int, *, progress: bool = True) -> list[dict]:
        """Train until ``steps`` steps in all (resumed runs continue), or until ``stop()``."""
        from tqdm.auto import tqdm

        self._stop = False
        bar = tqdm(total=steps, initial=self.step_count, desc="multi-task", disable=not progress, mininterval=1)
        while self.step_count < steps and not self._stop:
            rec = self.train_step()
            bar.update(1)
            if rec is not None:
                bar.set_postfix(loss=f"{sum(rec['losses']):.3f}", conflict=f"{rec['conflict_fraction']:.2f}")
        bar.close()
        return self.history

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step_count,
            "history": self.history, "torch_rng": torch.get_rng_state(), "names": self.names,
            "aggregator": self.aggregator,
            "agg_state": None if self.state_agg is None else {k: np.asarray(v).tolist() if v is not None else None
                                                              for k, v in vars(self.state_agg).items()},
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # never half-written

    def load(self, path: str | Path) -> None:
        state = torch.load(path, weights_only=True)  # plain tensors and lists: no pickled code runs
        if state["names"] != self.names or state["aggregator"] != self.aggregator:
            raise WorkbenchError(f"checkpoint {path} is for tasks {state['names']} with {state['aggregator']!r}; "
                                 f"this trainer has {self.names} with {self.aggregator!r}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step_count, self.history = state["step"], state["history"]
        torch.set_rng_state(state["torch_rng"])
        if self.state_agg is not None and state["agg_state"]:
            for k, v in state["agg_state"].items():
                setattr(self.state_agg, k, None if v is None else (np.asarray(v) if isinstance(v, list) else v))


def transfer(single: dict[str, float], multi: dict[str, float], *, lower_is_better: bool = True) -> dict[str, float]:
    """Relative transfer per task against its single-task baseline: positive means the
    multi-task run did better (negative transfer shows as < 0)."""
    out = {}
    for t, s in single.items():
        m = multi[t]
        out[t] = (s - m) / abs(s) if lower_is_better else (m - s) / abs(s)
        if math.isnan(out[t]):
            raise WorkbenchError(f"task {t!r}: baseline {s} and multi-task {m} give no transfer value")
    return out


def task_groups(affinity: np.ndarray, names: Sequence[str], n_groups: int = 2) -> list[list[str]]:
    """Split tasks into ``n_groups`` groups maximising the summed within-group mutual
    affinity (Z[i, j] + Z[j, i]), by exhaustive search (fine for up to ~10 tasks)."""
    import itertools

    z = np.asarray(affinity)
    T = len(names)
    if z.shape != (T, T):
        raise WorkbenchError(f"affinity is {z.shape}, expected ({T}, {T})")
    best, best_val = None, -np.inf
    for labels in itertools.product(range(n_groups), repeat=T):
        if labels[0] != 0 or len(set(labels)) != n_groups:
            continue
        val = sum(z[i, j] + z[j, i] for i in range(T) for j in range(i + 1, T) if labels[i] == labels[j])
        if val > best_val:
            best, best_val = labels, val
    return [[names[i] for i in range(T) if best[i] == g] for g in range(n_groups)]
