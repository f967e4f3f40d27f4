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
loss or gradient stops training with a message before the update; the weights and the last
checkpoint stay as they were.

``checkpoint`` names a folder: every ``checkpoint_every`` steps the whole training state
(weights, optimizer, history, aggregator state, random state) goes there as a JSON manifest
plus one safetensors file (:func:`workbench.storage.commit`: an interruption at any
point leaves the previous checkpoint whole; files the trainer did not write are never
touched; no pickle). A trainer built on a folder holding a checkpoint resumes from it, and
refuses one written with other settings (tasks, aggregator, lr, seed, ...) or damaged.
"""

from __future__ import annotations

import inspect
import json
import math
import numbers
import random
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from workbench import storage
from workbench.errors import WorkbenchError, one_of
from workbench.layout import Family
from workbench.mtl.aggregators import STATEFUL, STATELESS, GradNorm, UncertaintyWeighting, aggregate
from workbench.mtl.gradients import (
    block_gramians, check_depth, check_losses, cosines_and_conflicts, family_of_model, host_values, jacobian,
    parameter_blocks,
)
from workbench.results import Result, provenance, register

LossFn = Callable[[object, object], torch.Tensor]  # (task output, batch) -> scalar


class TrainingStopped(WorkbenchError):
    """Training stopped on a non-finite loss; the message names the task and the step."""


def lookahead_affinity(losses_at: Callable[[], Sequence[torch.Tensor]], params: Sequence[torch.nn.Parameter],
                       jacobian: torch.Tensor, lr: float) -> np.ndarray:
    """TAG affinity Z[i, j] = 1 - L_j(theta - lr g_i) / L_j(theta) on the same batch:
    how much a step on task i alone lowers task j's loss (positive: i helps j). NaN in
    column j when L_j(theta) is 0 (no relative change is defined)."""
    params = list(params)
    width = sum(p.numel() for p in params)
    if not isinstance(jacobian, torch.Tensor) or jacobian.ndim != 2 or jacobian.shape[1] != width:
        raise WorkbenchError(f"jacobian must be [tasks, {width}] (one row per task over the {len(params)} parameters), "
                             f"got {tuple(jacobian.shape) if isinstance(jacobian, torch.Tensor) else type(jacobian).__name__}")
    if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
        raise WorkbenchError(f"lr must be a finite number > 0, got {lr!r}")
    with torch.no_grad():
        base = np.asarray([float(l) for l in losses_at()])
        T = jacobian.shape[0]
        if len(base) != T:
            raise WorkbenchError(f"losses_at() gives {len(base)} losses for a Jacobian of {T} tasks")
        z = np.zeros((T, T))
        saved = [p.detach().clone() for p in params]
        for i in range(T):
            off = 0
            for p in params:
                n = p.numel()
                p.sub_(lr * jacobian[i, off : off + n].view_as(p).to(p.dtype))
                off += n
            after = np.asarray([float(l) for l in losses_at()])
            with np.errstate(divide="ignore", invalid="ignore"):
                z[i] = np.where(base != 0, 1 - after / np.where(base != 0, base, 1), np.nan)
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
        if not isinstance(model, torch.nn.Module):
            raise WorkbenchError(f"model must be a torch.nn.Module whose forward(batch) returns one output per task, "
                                 f"got {type(model).__name__}")
        if not isinstance(tasks, Mapping):
            raise WorkbenchError(f"tasks must be a dict task name -> loss function(output, batch), got "
                                 f"{type(tasks).__name__}")
        if len(tasks) < 2:
            raise WorkbenchError(f"multi-task training needs at least two tasks, got {list(tasks)}")
        for name, fn in tasks.items():
            if not isinstance(name, str) or not name:
                raise WorkbenchError(f"task names must be non-empty strings, got {name!r}")
            if not callable(fn):
                raise WorkbenchError(f"the loss of task {name!r} must be a function (output, batch) -> scalar tensor, "
                                     f"got {type(fn).__name__}")
        if not callable(data):
            raise WorkbenchError(f"data must be a function step -> batch (so a resumed run sees the same batches), "
                                 f"got {type(data).__name__}; e.g. workloads.batch_sampler(tensors, batch_size)")
        if aggregator not in STATELESS + STATEFUL:
            raise one_of("aggregator", aggregator, STATELESS + STATEFUL)
        if not isinstance(shared_prefix, str):
            raise WorkbenchError(f"shared_prefix must be a string, got {shared_prefix!r}")
        if isinstance(lr, bool) or not isinstance(lr, numbers.Real) or not math.isfinite(lr) or lr <= 0:
            raise WorkbenchError(f"lr must be a finite number > 0, got {lr!r}")
        if monitor_every is None:
            monitor_every = default_monitor_every(len(tasks))
        check_count(monitor_every, "monitor_every")
        check_count(checkpoint_every, "checkpoint_every")
        if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
            raise WorkbenchError(f"seed must be an integer, got {seed!r}")
        if not isinstance(affinity, bool):
            raise WorkbenchError(f"affinity must be True or False, got {affinity!r}")
        check_depth(block_depth)
        lr, monitor_every, seed = float(lr), int(monitor_every), int(seed)
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
        self.checkpoint_every = int(checkpoint_every)
        self._stop = False
        if self.checkpoint is not None:
            if self.checkpoint.exists() and not self.checkpoint.is_dir():
                raise WorkbenchError(f"checkpoint {str(self.checkpoint)!r} is a file; pass a folder (the trainer "
                                     "writes its state there and never touches other files)")
            if (self.checkpoint / CHECKPOINT_MANIFEST).exists():
                self.load(self.checkpoint)

    # ------------------------------------------------------------------ pieces

    def set_aggregator(self, aggregator: str, params: dict | None = None) -> None:
        """Train the steps from now on with ``aggregator`` (its state starts afresh); the
        history records from which step each aggregator ran."""
        if aggregator not in STATELESS + STATEFUL:
            raise one_of("aggregator", aggregator, STATELESS + STATEFUL)
        if params is not None and not isinstance(params, Mapping):
            raise WorkbenchError(f"aggregator_params must be a dict of keyword arguments, got {type(params).__name__}")
        params = dict(params or {})
        if self._aggregators and aggregator == self.aggregator and params == self.agg_params:
            return
        T = len(self.names)
        state_agg = build_aggregator(aggregator, params, T)
        self.aggregator, self.agg_params, self.state_agg = aggregator, params, state_agg
        seg = {"from_step": self.step_count, "aggregator": aggregator, "params": params}
        if self._aggregators and self._aggregators[-1]["from_step"] == self.step_count:
            self._aggregators[-1] = seg
        else:
            self._aggregators.append(seg)

    def losses(self, batch) -> list[torch.Tensor]:
        """One loss per task on ``batch`` (each checked: a scalar tensor; what the model or a
        loss function returned otherwise is named in a WorkbenchError)."""
        out = self.model(batch)
        if not isinstance(out, Mapping):
            raise WorkbenchError(f"the model's forward(batch) must return a dict task -> output, got {type(out).__name__}")
        missing = [n for n in self.names if n not in out]
        if missing:
            raise WorkbenchError(f"the model's output has no entry for task(s) {missing}; it has {list(out)}")
        losses = []
        for n in self.names:
            l = self.tasks[n](out[n], batch)
            if not isinstance(l, torch.Tensor) or l.numel() != 1:
                got = f"a tensor of shape {tuple(l.shape)}" if isinstance(l, torch.Tensor) else type(l).__name__
                raise WorkbenchError(f"the loss function of task {n!r} must return a scalar tensor, got {got}")
            losses.append(l.reshape(()))
        return losses

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
        values = host_values(losses)  # every task's loss in one read from the device
        for name, l, v in zip(self.names, losses, values):
            if not math.isfinite(v):
                raise TrainingStopped(f"task {name!r} has a non-finite loss ({v}) at step {step}; "
                                      "training stopped, the last checkpoint is unchanged")
            if not l.requires_grad:
                raise WorkbenchError(f"the loss of task {name!r} does not depend on any trainable parameter (no graph)")
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
            lo, hi = torch.stack(torch.aminmax(j)).tolist()  # NaN propagates; one fast pass, unlike isfinite(j).all()
            if not (math.isfinite(lo) and math.isfinite(hi)):
                bad = [n for n, row in zip(self.names, j) if not torch.isfinite(row).all()]
                raise TrainingStopped(f"task(s) {bad} have non-finite gradients at step {step}; training stopped "
                                      "before the update, the weights and the last checkpoint are unchanged")
            for p, g in zip(self.own, extra or ()):
                p.grad = g
            loss_values = np.asarray(values)
            # monitored steps take the Gramians anyway: the aggregator reuses the overall one
            bg = block_gramians(j, self._block_index, self._sizes, len(self.blocks)) if monitored else None
            if self.state_agg is not None:
                update, weights = self.state_agg(j, loss_values)
            elif self.aggregator == "equal":  # the plain summed gradient, as an unmonitored step takes it
                update, weights = j.sum(0), np.ones(len(losses))
            else:
                update, weights = aggregate(j, self.aggregator, gramian=None if bg is None else bg.sum(0),
                                            **self.agg_params)
            off = 0
            for p in params:
                n = p.numel()
                p.grad = update[off : off + n].view_as(p).to(p.dtype, copy=True)
                off += n
            if monitored:
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
        self.check_gradients(step)
        self.opt.step()
        self.step_count += 1
        if record is not None:
            self._records.append(record)
            for cb in self.callbacks:
                cb(self, record)
        if self.checkpoint and self.step_count % self.checkpoint_every == 0:
            self.save(self.checkpoint)
        return record

    def check_gradients(self, step: int) -> None:
        """Stop before the update when a gradient is NaN or inf (a loss can be finite while
        its gradient is not, e.g. sqrt at 0): the weights and the checkpoint stay as they were."""
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()):
            bad = [n for n, p in self.model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
            raise TrainingStopped(f"non-finite gradients at step {step} in {bad[:5]}{' ...' if len(bad) > 5 else ''}; "
                                  "training stopped before the update, the weights and the last checkpoint are "
                                  "unchanged (lower the learning rate or check the losses)")

    def fit(self, steps: int, *, progress: bool = True) -> TrainingHistory:
        """Train until ``steps`` steps in all (resumed runs continue), or until ``stop()``;
        returns the history."""
        from tqdm.auto import tqdm

        if isinstance(steps, bool) or not isinstance(steps, numbers.Integral) or steps < 0:
            raise WorkbenchError(f"steps must be an integer >= 0 (the total number of steps), got {steps!r}")
        steps = int(steps)
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
        """Write the whole training state into the folder ``path``: JSON manifest
        (``mtl_state.json``, the commit point) plus one safetensors file, as
        :func:`workbench.storage.commit` writes them: an interruption at any point
        leaves the previous checkpoint whole, and no file the trainer did not write is touched."""
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise WorkbenchError(f"checkpoint {str(path)!r} is a file; pass a folder")
        tensors = {f"model.{k}": v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        opt = self.opt.state_dict()
        for idx, st in opt["state"].items():
            for key, v in st.items():
                tensors[f"opt.{idx}.{key}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().clone()
        tensors.update({f"history.{k}": t.contiguous() for k, t in self._records.state().items()})
        tensors["rng.torch"] = torch.get_rng_state()
        agg_json = {}
        if self.state_agg is not None:
            for k, v in vars(self.state_agg).items():
                if isinstance(v, np.ndarray):
                    tensors[f"agg.{k}"] = torch.from_numpy(v.copy())
                elif torch.is_tensor(v):
                    tensors[f"aggt.{k}"] = v.detach().cpu().clone()
                else:
                    agg_json[k] = v.item() if isinstance(v, np.generic) else v
        groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in opt["param_groups"]]
        manifest = {"format": CHECKPOINT_FORMAT, "version": 1, "step": self.step_count, "config": self._config(),
                    "aggregator": self.aggregator, "aggregator_params": self.agg_params,
                    "aggregator_state": agg_json, "param_groups": groups}
        try:
            json.dumps(manifest, allow_nan=False)
        except (TypeError, ValueError) as e:
            raise WorkbenchError(f"the training state cannot be written as JSON ({e}); aggregator_params and the "
                                 "optimizer settings must be plain numbers, strings and lists") from None
        storage.commit(path, CHECKPOINT_MANIFEST, manifest, tensors, prefix=CHECKPOINT_PREFIX)

    def load(self, path: str | Path) -> None:
        """Resume from the checkpoint folder ``path``: refused (nothing changed) when it is
        damaged, not a trainer checkpoint, or was written with other settings."""
        path = Path(path)
        mpath = path / CHECKPOINT_MANIFEST
        meta = storage.read_json(mpath, "MTL training checkpoint")
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise WorkbenchError(f"{str(mpath)!r} is not a workbench MTL training checkpoint (written by an older "
                                 "version, or by something else); use another folder")
        storage.require_keys(meta, ("step", "config", "aggregator", "aggregator_params", "aggregator_state",
                                    "param_groups", "tensors"), mpath)
        if meta["aggregator"] != self.aggregator or meta["aggregator_params"] != self.agg_params:
            raise WorkbenchError(f"checkpoint {str(path)!r} was training with {meta['aggregator']!r} "
                                 f"{meta['aggregator_params']}; this trainer has {self.aggregator!r} {self.agg_params}: "
                                 "resume with the same aggregator, or train into another folder")
        saved, mine = meta["config"], self._config()
        keys = [k for k in mine if k != "aggregators"]
        diff = [f"{k}: checkpoint {saved.get(k)!r}, this trainer {mine[k]!r}" for k in keys if saved.get(k) != mine[k]]
        if diff:
            raise WorkbenchError(f"checkpoint {str(path)!r} was written with other settings ({'; '.join(diff)}); "
                                 "resume with the same ones, or train into another folder")
        t = storage.read_committed(path, CHECKPOINT_MANIFEST, "MTL training checkpoint", manifest=meta)
        wpath = path / meta["tensors"]["file"]
        sd = {k[len("model."):]: v for k, v in t.items() if k.startswith("model.")}
        storage.check_tensors(sd, {k: tuple(v.shape) for k, v in self.model.state_dict().items()}, wpath)
        if "rng.torch" not in t:
            raise WorkbenchError(f"{str(wpath)!r} lacks the random state (rng.torch); the checkpoint is damaged")
        opt_state: dict[int, dict] = {}
        for k, v in t.items():
            if k.startswith("opt."):
                _, idx, key = k.split(".", 2)
                opt_state.setdefault(int(idx), {})[key] = v
        history = {k[len("history."):]: v for k, v in t.items() if k.startswith("history.")}
        if len({len(v) for v in history.values()}) > 1:
            raise WorkbenchError(f"{str(wpath)!r}: the history arrays have different lengths; the checkpoint is damaged")
        try:  # the optimizer first: it can refuse; the model's names and shapes are checked above
            self.opt.load_state_dict({"state": opt_state, "param_groups": meta["param_groups"]})
            self.model.load_state_dict(sd)
        except (RuntimeError, ValueError, KeyError, TypeError) as e:
            raise WorkbenchError(f"cannot resume from {str(path)!r}: {e}") from None
        self.step_count = int(meta["step"])
        self._records = _Records.from_state(history)
        self._aggregators = list(meta["config"]["aggregators"])
        torch.set_rng_state(t["rng.torch"])
        if self.state_agg is not None:
            for k, v in meta["aggregator_state"].items():
                setattr(self.state_agg, k, v)
            for k, v in t.items():
                if k.startswith("agg."):
                    setattr(self.state_agg, k[len("agg."):], v.numpy().copy())
                elif k.startswith("aggt."):
                    setattr(self.state_agg, k[len("aggt."):], v.clone())


CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX = "mtl_state.json", "mtl_state"
CHECKPOINT_FORMAT = "workbench-mtl-checkpoint"


def check_count(value, name: str) -> int:
    """An integer >= 1 (not a bool), or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise WorkbenchError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def aggregator_keywords(aggregator: str) -> list[str]:
    """The keyword parameters ``aggregator`` accepts (``aggregator_params``)."""
    from workbench.mtl import aggregators

    fn = {"uncertainty": UncertaintyWeighting, "gradnorm": GradNorm}.get(aggregator) or getattr(aggregators, aggregator,
                                                                                                  None)
    if not callable(fn):
        return []
    params = [p.name for p in inspect.signature(fn).parameters.values()
              if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    return params[1:]  # the first is the Jacobian (stateless) or n_tasks (stateful), given by the trainer


def build_aggregator(aggregator: str, params: dict, n_tasks: int):
    """Check ``params`` against what ``aggregator`` accepts (unknown names and values it
    refuses are a WorkbenchError now, not at the first step) and build the state of a
    stateful one (None for a stateless one)."""
    accepted = aggregator_keywords(aggregator)
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise WorkbenchError(f"aggregator {aggregator!r} takes no parameter(s) {unknown}; it accepts "
                             f"{accepted if accepted else 'none'}")
    try:
        if aggregator == "uncertainty":
            return UncertaintyWeighting(n_tasks, **params)
        if aggregator == "gradnorm":
            return GradNorm(n_tasks, **params)
        aggregate(torch.eye(n_tasks, n_tasks + 1), aggregator, **params)  # a trial on a tiny Jacobian
    except WorkbenchError:
        raise
    except (TypeError, ValueError, ArithmeticError) as e:
        raise WorkbenchError(f"aggregator_params {params} are not valid for {aggregator!r}: {e}") from None
    return None


def transfer(single: dict[str, float], multi: dict[str, float], *, lower_is_better: bool = True) -> dict[str, float]:
    """Relative transfer per task against its single-task baseline: positive means the
    multi-task run did better (negative transfer shows as < 0). Both dicts must name the
    same tasks; a baseline of 0 or a non-finite value has no relative transfer (an error)."""
    if not isinstance(single, Mapping) or not isinstance(multi, Mapping):
        raise WorkbenchError("transfer takes two dicts task -> metric (single-task baselines, multi-task results)")
    if set(single) != set(multi):
        raise WorkbenchError(f"single and multi must name the same tasks; only in single: "
                             f"{sorted(set(single) - set(multi), key=str)}, only in multi: "
                             f"{sorted(set(multi) - set(single), key=str)}")
    out = {}
    for t, s in single.items():
        m = multi[t]
        try:
            s, m = float(s), float(m)
        except (TypeError, ValueError):
            raise WorkbenchError(f"task {t!r}: baseline {s!r} and multi-task {m!r} must be numbers") from None
        if not (math.isfinite(s) and math.isfinite(m)) or s == 0:
            raise WorkbenchError(f"task {t!r}: baseline {s} and multi-task {m} give no transfer value "
                                 "(relative transfer needs finite values and a non-zero baseline)")
        out[t] = (s - m) / abs(s) if lower_is_better else (m - s) / abs(s)
    return out


MAX_GROUPINGS = 1_000_000


def task_groups(affinity: np.ndarray, names: Sequence[str], n_groups: int = 2) -> list[list[str]]:
    """Split tasks into ``n_groups`` groups maximising the summed within-group mutual
    affinity (Z[i, j] + Z[j, i]), by exhaustive search (fine for up to ~10 tasks)."""
    import itertools

    z = np.asarray(affinity, dtype=np.float64)
    names = list(names)
    T = len(names)
    if z.shape != (T, T):
        raise WorkbenchError(f"affinity is {z.shape}, expected ({T}, {T})")
    if isinstance(n_groups, bool) or not isinstance(n_groups, numbers.Integral) or not 1 <= n_groups <= T:
        raise WorkbenchError(f"n_groups must be an integer from 1 to the number of tasks ({T}), got {n_groups!r}")
    if not np.isfinite(z).all():
        raise WorkbenchError("affinity holds NaN or inf; pass finite affinities (e.g. a history's mean over steps "
                             "with np.nanmean)")
    if n_groups ** T > MAX_GROUPINGS:
        raise WorkbenchError(f"exhaustive search over {n_groups}^{T} groupings of {T} tasks is too slow "
                             f"(limit {MAX_GROUPINGS:,}); use fewer tasks or groups")
    best, best_val = None, -np.inf
    for labels in itertools.product(range(n_groups), repeat=T):
        if labels[0] != 0 or len(set(labels)) != n_groups:
            continue
        val = sum(z[i, j] + z[j, i] for i in range(T) for j in range(i + 1, T) if labels[i] == labels[j])
        if val > best_val:
            best, best_val = labels, val
    return [[names[i] for i in range(T) if best[i] == g] for g in range(n_groups)]
