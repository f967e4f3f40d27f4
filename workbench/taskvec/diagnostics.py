"""Interference diagnostics of task vectors, in one pass over their tensors.

Cosine similarity between task vectors over the whole model and per block (the shared
block names of :mod:`workbench.blocks`: ``embed``, ``layer.L``, ``final_norm``,
``unembed``, ``other``; a zero task vector has no direction, so its cosines are NaN),
the pairwise sign-conflict rate (of the entries where both are non-zero, the share
whose signs differ), and the top-k mass (the share of a task vector's L1 mass that
TIES's per-tensor trim keeps at density k).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workbench.blocks import block_of, block_order, family_of_keys
from workbench.errors import WorkbenchError
from workbench.layout import Family
from workbench.results import Result, provenance, register
from workbench.stats import cosine_from_gramian
from workbench.taskvec.merging import trim_topk
from workbench.taskvec.vectors import TaskVector


@register("task_vector_diagnostics")
class TaskVectorDiagnostics(Result):
    """Interference diagnostics of a set of task vectors.

    Variables: ``cosine`` [task, task_b]; ``cosine_by_block`` [block, task, task_b];
    ``sign_conflict`` [task, task_b] (share of co-non-zero entries with opposite signs);
    ``sign_conflict_all`` [] (share of entries non-zero in >= 2 task vectors whose
    signs are not all equal); ``topk_mass`` [task, density]; ``norm`` [task].
    """


def diagnose(task_vectors: Sequence[TaskVector], *, names: Sequence[str] | None = None,
             densities: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5),
             family: Family | str | None = None) -> TaskVectorDiagnostics:
    """Cosines (whole and per block), sign-conflict rates and top-k mass, in one pass.

    ``family``: the layout family that names the blocks (a Subject's ``family``, or its
    name); by default the one whose layer path the tensor names use
    (:func:`workbench.blocks.family_of_keys`)."""
    tvs = list(task_vectors)
    if len(tvs) < 1:
        raise WorkbenchError("diagnose needs at least one task vector")
    for tv in tvs[1:]:
        tvs[0].check_same(tv)
    names = list(names) if names is not None else [tv.name for tv in tvs]
    if len(names) != len(tvs):
        raise WorkbenchError(f"need one name per task vector ({len(tvs)}), got {len(names)}")
    if len(set(names)) != len(names):
        raise WorkbenchError(f"task vector names must be unique, got {names}")
    densities = [float(d) for d in densities]
    bad = [d for d in densities if not 0.0 <= d <= 1.0]
    if bad:
        raise WorkbenchError(f"densities must be in [0, 1], got {bad}")
    n = len(tvs)
    keys = tvs[0].keys()
    fam = family if family is not None else family_of_keys(keys)
    block = {k: block_of(k, fam) for k in keys}
    blocks = block_order(block.values())
    bi = {b: i for i, b in enumerate(blocks)}
    acc = None  # the sums, on the task vectors' device (made at the first tensor), read once at the end
    for key in keys:
        ds = torch.stack([tv[key].reshape(-1) for tv in tvs]).double()
        if acc is None:
            z = {"dtype": torch.float64, "device": ds.device}
            acc = (torch.zeros(len(blocks), n, n, **z), torch.zeros(n, n, **z), torch.zeros(n, n, **z),
                   torch.zeros((), **z), torch.zeros((), **z), torch.zeros(n, len(densities), **z),
                   torch.zeros(n, **z))
            gram, both, opposite, multi, mixed_sign, mass, total = acc
        gram[bi[block[key]]] += ds @ ds.T
        s = ds.sign()
        nz = (s != 0).double()
        both += nz @ nz.T
        pos, neg = (s > 0).double(), (s < 0).double()
        opposite += pos @ neg.T + neg @ pos.T
        cnt = nz.sum(0)
        multi += (cnt >= 2).sum()
        mixed_sign += ((pos.sum(0) > 0) & (neg.sum(0) > 0)).sum()
        a = ds.abs()
        total += a.sum(1)
        for j, dens in enumerate(densities):
            for t in range(n):
                mass[t, j] += trim_topk(a[t], dens).sum()
    if acc is None:
        raise WorkbenchError("the task vectors hold no tensors to diagnose")
    gram, both, opposite, mass, total = (t.cpu() for t in (gram, both, opposite, mass, total))
    multi, mixed_sign = torch.stack([multi, mixed_sign]).tolist()
    whole = gram.sum(0)
    cosine = cosine_from_gramian(whole.numpy())
    by_block = cosine_from_gramian(gram.numpy())
    conflict = torch.where(both > 0, opposite / both.clamp(min=1), torch.zeros_like(both))
    topk = torch.where(total[:, None] > 0, mass / total[:, None].clamp(min=1e-300), torch.zeros_like(mass))
    params = {"names": names, "densities": densities, "family": getattr(fam, "name", fam)}
    return TaskVectorDiagnostics(
        dims={"task": names, "task_b": names, "block": blocks, "density": densities},
        data={
            "cosine": (("task", "task_b"), cosine),
            "cosine_by_block": (("block", "task", "task_b"), by_block),
            "sign_conflict": (("task", "task_b"), conflict.numpy()),
            "sign_conflict_all": ((), np.asarray(mixed_sign / multi if multi else 0.0)),
            "topk_mass": (("task", "density"), topk.numpy()),
            "norm": (("task",), whole.diagonal().sqrt().numpy()),
        },
        attrs=params,
        provenance=provenance(params=params),
    )


def cosine_similarity(a: TaskVector, b: TaskVector) -> float:
    """Cosine between two task vectors over all their tensors (NaN when either is zero)."""
    return float(diagnose([a, b], names=["a", "b"], densities=())["cosine"][0, 1])


__all__ = ["TaskVectorDiagnostics", "cosine_similarity", "diagnose"]
