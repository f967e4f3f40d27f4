"""A multi-task trainer that shows its gradient conflicts as it goes.

A model with a shared trunk and one head per task (any ``nn.Module``: ``forward(batch)``
returns one output per task) is trained with any aggregator. Every ``monitor_every``
steps the per-task gradients on the shared parameters are taken exactly (one backward
per task) and a record is kept: losses, norms, pairwise cosines and conflict fractions
overall and per block, the aggregator's task weights and, optionally, the lookahead task
affinity of TAG ("Efficiently Identifying Task Groupings for Multi-Task Learning").
Between monitored steps an equal-weight run takes one plain backward.

``trainer.history`` is the run so far as a :class:`TrainingHistory` result (dims
``step`` (the monitored steps), ``task``, ``task_b``, ``block``), which saves and loads
exactly and draws the ConflictMonitor again without a model. Blocks are the names of
:mod:`workbench.blocks`: ``embed``, ``layer.L``, ``final_norm``, ``unembed`` for an HF
model (its layout is found in the model), module paths (``trunk.1``) otherwise.

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

from workbench.errors import WorkbenchError, one_of
from workbench.layout import Family
from workbench.mtl.aggregators import STATEFUL, STATELESS, GradNorm, UncertaintyWeighting, aggregate
from workbench.mtl.gradients import (
    block_gramians, check_losses, cosines_and_conflicts, family_of_model, jacobian, parameter_blocks,
)
from workbench.results import Result, provenance, register

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


#: the variables of a training history and their dimensions
HISTORY_DIMS: dict[str, tuple[str, ...]] = {
    "loss": ("step", "task"), "norm": ("step", "task"), "weight": ("step", "task"),
    "cosine": ("step", "task", "task_b"), "conflict_fraction": ("step",),
    "block_norm": ("step", "block", "task"), "block_cosine": ("step", "block", "task", "task_b"),
    "block_conflict_fraction": ("step", "block"), "affinity": ("step", "task", "task_b"),
}


@register("mtl_history")
class TrainingHistory(Result):
    """The monitored steps of a multi-task training run.

    Dims: ``step`` (the monitored steps), ``task``, ``task_b``, ``block``. Variables
    (float64): ``loss``, ``norm`` (gradient norm on the shared parameters) and ``weight``
    (the aggregator's task weights) [step, task]; ``cosine`` [step, task, task_b];
    ``conflict_fraction`` [step]; ``block_norm`` [step, block, task]; ``block_cosine``
    [step, block, task, task_b]; ``block_conflict_fraction`` [step, block]; with TAG on,
    ``affinity`` [step, task, task_b] (step on task -> effect on task_b).
    ``attrs["aggregators"]``: the aggregator of each stretch of the run
    (``[{"from_step", "aggregator", "params"}]``); ``attrs["trained_steps"]``: steps taken.
    """

    def aggregator_at(self, step: int) -> str:
        """The aggregator the run used at ``step``."""
        name = self.attrs["aggregators"][0]["aggregator"]
        for seg in self.attrs["aggregators"]:
            if seg["from_step"] <= step:
                name = seg["aggregator"]
        return name

    def to_frame(self, variables: Sequence[str] | None = None):
        """A tidy frame (see :meth:`Result.to_frame`; by default loss, norm and weight per
        step and task), with an ``aggregator`` column beside ``step``."""
        frame = super().to_frame(variables)
        if "step" in frame.columns:
            names = [self.aggregator_at(s) for s in frame["step"]]
            frame.insert(frame.columns.get_loc("step") + 1, "aggregator", names)
        return frame


class _Records:
    """The monitoring records, one row per monitored step, in arrays that double when
    full (appending is amortised O(1), reading is one slice)."""

    def __init__(self) -> None:
        self.n = 0
        self.arrays: dict[str, np.ndarray] = {}

    def append(self, rec: dict) -> None:
        for k, v in rec.items():
            v = np.asarray(v)
            a = self.arrays.get(k)
            if a is None or self.n == len(a):
                grown = np.empty((max(16, 2 * self.n), *v.shape), dtype=v.dtype)
                if a is not None:
                    grown[: self.n] = a[: self.n]
                self.arrays[k] = a = grown
            a[self.n] = v
        self.n += 1  # after the rows are in: a concurrent reader sees whole records only

    def get(self, n: int | None = None) -> dict[str, np.ndarray]:
        n = self.n if n is None else n
        return {k: a[:n].copy() for k, a in self.arrays.items()}

    def state(self) -> dict[str, torch.Tensor]:
        return {k: torch.from_numpy(a) for k, a in self.get().items()}

    @classmethod
    def from_state(cls, state: dict[str, torch.Tensor]) -> "_Records":
        out = cls()
        arrays = {k: t.numpy() for k, t in state.items()}
        out.n = len(next(iter(arrays.values()))) if arrays else 0
        out.arrays = {k: a.copy() for k, a in arrays.items()}
        return out


class MultiTaskTrainer:
    """Train ``model`` on ``tasks`` (name -> loss function of (task output, batch)).

    The shared parameters are those whose name starts with ``shared_prefix``.
    ``aggregator``: a name of :func:`~workbench.mtl.aggregate` or ``"uncertainty"`` /
    ``"gradnorm"`` (``set_aggregator`` changes it for the steps that follow).
    ``family``: how parameters group into blocks: ``"auto"`` finds the layout of an HF
    model inside ``model`` (``embed``, ``layer.L``, ``final_norm``, ``unembed``); a
    family (``subject.family``) or its name forces one; None, or a model with no layout,
    groups by module path (cut after the first layer index, else after ``block_depth``
    name parts).
    """

    def __init__(self, model: torch.nn.Module, tasks: dict[str, LossFn], data: Callable[[int], object], *,
                 shared_prefix: str = "trunk", aggregator: str = "equal", lr: float = 1e-3,
                 monitor_every: int | None = None,
                 affinity: bool = False, seed: int = 0, checkpoint: str | Path | None = None,
                 checkpoint_every: int = 50, aggregator_params: dict | None = None,
                 family: Family | str | None = "auto", block_depth: int = 2) -> None:
        if len(tasks) < 2:
            raise WorkbenchError(f"multi-task training needs at least two tasks, got {list(tasks)}")
        if aggregator not in STATELESS + STATEFUL:
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
        self.lr, self.monitor_every, self.affinity = lr, monitor_every, affinity
        found, prefix = family_of_model(model)
        self.family = found if family == "auto" else family
        hf = model.get_submodule(prefix.rstrip(".")) if found is not None else None
        self._model_name = (getattr(hf.config, "_name_or_path", None) or type(hf).__name__) if hf is not None else None
        self.blocks, self._block_index = parameter_blocks([n for n, _ in self.shared], self.family, depth=block_depth,
                                                          prefix=prefix if self.family is not None else "")
        self._sizes = [p.numel() for _, p in self.shared]
        self.block_depth, self.shared_prefix = block_depth, shared_prefix
        self.seed = seed
        torch.manual_seed(seed)
        random.seed(seed)
        self.opt = torch.optim.Adam(model.parameters(), lr=lr)
        self.step_count = 0
        self._records = _Records()
        self._aggregators: list[dict] = []
        self.aggregator, self.agg_params, self.state_agg = aggregator, {}, None
        self.set_aggregator(aggregator, aggregator_params)
        self.callbacks: list[Callable[["MultiTaskTrainer", dict], None]] = []
        self.checkpoint = Path(checkpoint) if checkpoint else None
        self.checkpoint_every = checkpoint_every
        self._stop = False
        if self.checkpoint and self.checkpoint.exists():
            self.load(self.checkpoint)

    # ------------------------------------------------------------------ pieces

    def set_aggregator(self, aggregator: str, params: dict | None = None) -> None:
        """Train the steps from now on with ``aggregator`` (its state starts afresh); the
        history records from which step each aggregator ran."""
        if aggregator not in STATELESS + STATEFUL:
            raise one_of("aggregator", aggregator, STATELESS + STATEFUL)
        params = dict(params or {})
        if self._aggregators and aggregator == self.aggregator and params == self.agg_params:
            return
        self.aggregator, self.agg_params = aggregator, params
        T = len(self.names)
        self.state_agg = (UncertaintyWeighting(T) if aggregator == "uncertainty"
                          else GradNorm(T) if aggregator == "gradnorm" else None)
        seg = {"from_step": self.step_count, "aggregator": aggregator, "params": params}
        if self._aggregators and self._aggregators[-1]["from_step"] == self.step_count:
            self._aggregators[-1] = seg
        else:
            self._aggregators.append(seg)

    def losses(self, batch) -> list[torch.Tensor]:
        out = self.model(batch)
        return [self.tasks[n](out[n], batch) for n in self.names]

    def stop(self) -> None:
        """Ask a running ``fit`` to stop after the current step (thread-safe)."""
        self._stop = True

    def train_step(self) -> dict | None:
        """One optimisation step; returns the monitoring record (variable name -> array,
        as in the history, plus ``step``) on monitored steps."""
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
            j, extra = jacobian(check_losses(losses), params, extra=self.own)
            for p, g in zip(self.own, extra or ()):
                p.grad = g
            loss_values = np.asarray([float(l.detach()) for l in losses])
            if self.state_agg is not None:
                update, weights = self.state_agg(j, loss_values)
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
                bg = block_gramians(j, self._block_index, self._sizes, len(self.blocks))
                g = np.concatenate([bg.sum(0)[None], bg])
                cos, frac = cosines_and_conflicts(g)
                norms = np.sqrt(np.clip(np.diagonal(g, axis1=1, axis2=2), 0, None))
                record = {
                    "step": step, "loss": loss_values, "norm": norms[0], "weight": np.asarray(weights, np.float64),
                    "cosine": cos[0], "conflict_fraction": frac[0], "block_norm": norms[1:], "block_cosine": cos[1:],
                    "block_conflict_fraction": frac[1:],
                }
                if self.affinity:
                    record["affinity"] = lookahead_affinity(lambda: self.losses(batch), params, j, self.lr)
        self.opt.step()
        self.step_count += 1
        if record is not None:
            self._records.append(record)
            for cb in self.callbacks:
                cb(self, record)
        if self.checkpoint and self.step_count % self.checkpoint_every == 0:
            self.save(self.checkpoint)
        return record

    def fit(self, steps: int, *, progress: bool = True) -> TrainingHistory:
        """Train until ``steps`` steps in all (resumed runs continue), or until ``stop()``;
        returns the history."""
        from tqdm.auto import tqdm

        self._stop = False
        bar = tqdm(total=steps, initial=self.step_count, desc="multi-task", disable=not progress, mininterval=1)
        while self.step_count < steps and not self._stop:
            rec = self.train_step()
            bar.update(1)
            if rec is not None:
                bar.set_postfix(loss=f"{rec['loss'].sum():.3f}", conflict=f"{rec['conflict_fraction']:.2f}")
        bar.close()
        return self.history

    # ------------------------------------------------------------------ the record

    @property
    def n_records(self) -> int:
        """Monitored steps recorded so far."""
        return self._records.n

    def _config(self) -> dict:
        fam = self.family if self.family is None or isinstance(self.family, str) else self.family.name
        return {"tasks": self.names, "aggregators": self._aggregators, "lr": self.lr,
                "monitor_every": self.monitor_every, "affinity": self.affinity, "seed": self.seed,
                "shared_prefix": self.shared_prefix, "family": fam, "block_depth": self.block_depth,
                "n_shared": int(sum(self._sizes)), "model": type(self.model).__name__}

    def result(self) -> TrainingHistory:
        """The run so far as a :class:`TrainingHistory` result (a copy: training on does
        not change it)."""
        n = self._records.n
        arrays = self._records.get(n)
        T, B = len(self.names), len(self.blocks)
        sizes = {"step": n, "task": T, "task_b": T, "block": B}
        data = {}
        for name, dims in HISTORY_DIMS.items():
            if name == "affinity" and not self.affinity:
                continue
            arr = arrays.get(name, np.zeros([sizes[d] for d in dims]))
            data[name] = (dims, arr.astype(np.float64, copy=False))
        config = self._config()
        prov = provenance(None, seed=self.seed, params=config)
        if self._model_name:
            prov["model"] = self._model_name
        return TrainingHistory(
            dims={"step": arrays["step"].tolist() if n else [], "task": self.names, "task_b": self.names,
                  "block": self.blocks},
            data=data, attrs={**config, "trained_steps": self.step_count}, provenance=prov,
        )

    @property
    def history(self) -> TrainingHistory:
        """The run so far as a :class:`TrainingHistory` result (see :meth:`result`)."""
        return self.result()

    # ------------------------------------------------------------------ checkpoints

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {
            "model": self.model.state_dict(), "opt": self.opt.state_dict(), "step": self.step_count,
            "history": self._records.state(), "aggregators": self._aggregators, "torch_rng": torch.get_rng_state(),
            "names": self.names, "aggregator": self.aggregator,
            "agg_state": None if self.state_agg is None else {k: np.asarray(v).tolist() if v is not None else None
                                                              for k, v in vars(self.state_agg).items()},
        }
        tmp = path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(path)  # never half-written

    def load(self, path: str | Path) -> None:
        state = torch.load(path, weights_only=True)  # plain tensors and lists: no pickled code runs
        if not isinstance(state.get("history"), dict) or "aggregators" not in state:
            raise WorkbenchError(f"checkpoint {path} was written by an older version of the trainer; start afresh")
        if state["names"] != self.names or state["aggregator"] != self.aggregator:
            raise WorkbenchError(f"checkpoint {path} is for tasks {state['names']} with {state['aggregator']!r}; "
                                 f"this trainer has {self.names} with {self.aggregator!r}")
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["opt"])
        self.step_count = state["step"]
        self._records = _Records.from_state(state["history"])
        self._aggregators = list(state["aggregators"])
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
