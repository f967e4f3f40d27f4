"""mergekit recipes for workbench merges (``mergekit-yaml recipe.yml out/``).

The recipe names mergekit 0.1.5's method and parameters such that mergekit computes the
same merge as :func:`workbench.taskvec.merge` (``tests/conformance/test_mergekit.py``
runs both): same weights, ``lambda``, ``density`` and ``normalize``. Two translations:

- DARE: mergekit's ``rescale: true`` rescales each dropped delta to its own L1 norm,
  not by 1/(1-p). The recipe sets ``rescale: false`` and multiplies ``lambda`` by
  1/(1-p), which is the workbench's rescale (the factor is common to every task vector
  and every entry, so it commutes with the sign election and the disjoint sum). The
  drop masks themselves are random in both and cannot match bit for bit.
- A scaled or combined task vector (``-b``, ``2 * a``, ``a - b``) becomes one model
  entry per fine-tuned checkpoint with its coefficient folded into the weight. That is
  the same merge only where the method is linear in each delta: always for task
  arithmetic; for a single scaled checkpoint also for DARE and, without ``normalize``,
  for the TIES methods. Other cases (TIES normalizes by the agreeing weights, which
  the folded coefficient would enter; the trim or drop of a sum differs from the sum of
  trims) are refused with a WorkbenchError rather than written as a different merge.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

from workbench.errors import WorkbenchError
from workbench.taskvec.checkpoint import Checkpoint
from workbench.taskvec.merging import DARE_METHODS, METHODS, TIES_METHODS, default_normalize
from workbench.taskvec.vectors import TaskVector

MERGEKIT_METHOD = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear", "dare_ties": "dare_ties"}


def to_mergekit_yaml(
    base: Any,
    task_vectors: Sequence[TaskVector],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | None = None,
    lam: float = 1.0,
    density: float = 1.0,
    p: float = 0.0,
    normalize: bool | None = None,
    dtype: str = "float32",
    out_dtype: str | None = None,
    paths: Mapping[str, str] | None = None,
) -> str:
    """A mergekit YAML recipe for the same merge (``mergekit-yaml recipe.yml out/``).

    Every checkpoint must live on disk: give the base as a path and each task vector's
    fine-tuned checkpoint as a path (or map checkpoint names to paths with ``paths``).
    ``dtype``: what mergekit computes in (float32, as the workbench); ``out_dtype``: what
    it writes (default: ``dtype``; the workbench keeps the base's dtype). Per-tensor
    weights (aTLAS) cannot be written as a mergekit recipe. See the module docstring for
    DARE's rescale and for scaled or combined task vectors.
    """
    import yaml

    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    for what, x in (("lam", lam), ("density", density), ("p", p)):
        if not isinstance(x, (int, float)) or not math.isfinite(x):
            raise WorkbenchError(f"{what} must be a finite number, got {x!r}")
    if not 0.0 <= p < 1.0:
        raise WorkbenchError(f"DARE drop probability p must be in [0, 1), got {p}")
    if not 0.0 <= density <= 1.0:
        raise WorkbenchError(f"TIES density must be in [0, 1], got {density}")
    paths = dict(paths or {})

    def where(ck: Checkpoint | Any, what: str) -> str:
        ck = ck if isinstance(ck, Checkpoint) else Checkpoint(ck)
        p_ = paths.get(ck.name) or ck.path
        if not p_:
            raise WorkbenchError(
                f"{what} {ck.name!r} is not on disk; mergekit reads checkpoints from paths. Save it "
                "(model.save_pretrained(dir)) and build the task vector from the directory, or pass paths={name: dir}"
            )
        return os.path.abspath(p_) if os.path.exists(p_) else p_

    if isinstance(weights, Mapping):
        raise WorkbenchError("per-tensor weights (aTLAS) cannot be written as a mergekit recipe; pass one weight per task vector")
    tvs = list(task_vectors)
    weights = [1.0] * len(tvs) if weights is None else [float(w) for w in weights]
    if len(weights) != len(tvs):
        raise WorkbenchError(f"need one weight per task vector ({len(tvs)}), got {len(weights)}")
    bad = [w for w in weights if not math.isfinite(w)]
    if bad:
        raise WorkbenchError(f"weights must be finite, got {bad}")
    if normalize is None:
        normalize = default_normalize(method)
    base_path = where(base, "base")
    models = []
    for tv, w in zip(tvs, weights):
        if method != "task_arithmetic" and len(tv.terms) > 1:
            raise WorkbenchError(
                f"task vector {tv.name!r} combines {len(tv.terms)} checkpoints; mergekit would {method}-merge each "
                "separately, which is a different merge than the workbench's (it trims or drops the combination). "
                "Use task_arithmetic, or pass the fine-tuned checkpoints as separate task vectors"
            )
        for coef, ft, b in tv.terms:
            if b is None:
                raise WorkbenchError(f"task vector {tv.name!r} was given as raw deltas; mergekit needs its fine-tuned checkpoint")
            if where(b, "base") != base_path:
                raise WorkbenchError(f"task vector {tv.name!r} was made from base {b.name!r}, not {base_path!r}")
            if coef != 1.0 and method in TIES_METHODS and normalize:
                raise WorkbenchError(
                    f"task vector {tv.name!r} is scaled by {coef:g}; with normalize, {method} divides by the agreeing "
                    "weights, which in mergekit would include that scale. Pass the unscaled task vector with the scale "
                    "in its weight (weights=[..., -1.0]), or normalize=False"
                )
            par: dict[str, Any] = {"weight": float(coef * w)}
            if method == "ties":
                par["density"] = float(density)
            elif method in DARE_METHODS:
                par["density"] = float(1.0 - p)
            models.append({"model": where(ft, "fine-tuned checkpoint"), "parameters": par})
    recipe: dict[str, Any] = {
        "merge_method": MERGEKIT_METHOD[method],
        "base_model": base_path,
        "models": models,
        "parameters": {"normalize": bool(normalize), "lambda": float(lam)},
        "dtype": dtype,
    }
    if out_dtype is not None:
        recipe["out_dtype"] = out_dtype
    if method in DARE_METHODS:
        recipe["parameters"]["rescale"] = False
        recipe["parameters"]["lambda"] = float(lam) / (1.0 - float(p))
    return yaml.safe_dump(recipe, sort_keys=False)


__all__ = ["MERGEKIT_METHOD", "to_mergekit_yaml"]
