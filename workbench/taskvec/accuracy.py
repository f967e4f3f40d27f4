"""Accuracy readouts of the task-vector lens as Results, so that what a view shows can be
saved, reloaded and drawn without the model.

- :func:`merge_accuracy`: per-task zero-shot accuracy of one merge (method, coefficients
  and parameters in ``attrs``), scored by a :class:`~workbench.taskvec.finetune.MergeEvaluator`;
- :func:`finetuned_accuracy`: each task scored on its own fine-tuned model (the reference
  a merge is compared with);
- :func:`layer_sweep`: zero-shot accuracy of a task with the function vector of a chosen
  set of heads added at the last token of the residual entering each layer, beside the
  unpatched baseline (:func:`~workbench.taskvec.activations.fv_accuracy` does the same
  for the top-k heads over several k).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register
from workbench.taskvec.activations import FunctionVector, add_vector_accuracy, zero_shot_batch


@register("merge_accuracy")
class MergeAccuracy(Result):
    """Zero-shot accuracy [task] of one merge; ``attrs``: ``method``, ``weights`` (one
    coefficient per task vector, named in ``task_vectors``) and the method's parameters
    (``lam``, ``density``, ``p``, ``seed``). ``method == "finetuned"``: each task scored
    on its own fine-tuned model (NaN for a task without a task vector of its name)."""

    def as_dict(self) -> dict[str, float]:
        return {t: float(a) for t, a in zip(self.coord("task"), self["accuracy"])}

    @property
    def mean(self) -> float:
        return float(np.nanmean(self["accuracy"]))


def _merge_result(evaluator, acc: dict[str, float], attrs: dict) -> MergeAccuracy:
    tasks = list(evaluator.tasks)
    params = {**attrs, "task_vectors": list(evaluator.names), "n": evaluator.n, "split": evaluator.split}
    return MergeAccuracy(
        dims={"task": tasks},
        data={"accuracy": (("task",), np.asarray([acc.get(t, np.nan) for t in tasks], dtype=np.float64))},
        attrs=params, provenance=provenance(evaluator.subject, seed=evaluator.seed, params=params),
    )


def merge_accuracy(evaluator, method: str = "task_arithmetic", weights: Sequence[float] | None = None, *,
                   lam: float = 1.0, density: float = 1.0, p: float = 0.0, seed: int = 0) -> MergeAccuracy:
    """Per-task zero-shot accuracy of ``base + lam * merge(weights x task vectors)``
    (``evaluator.accuracy``; ``density`` is used by TIES, ``p`` and ``seed`` by DARE)."""
    weights = [1.0] * len(evaluator.names) if weights is None else [float(w) for w in weights]
    if len(weights) != len(evaluator.names):
        raise WorkbenchError(f"need one weight per task vector ({evaluator.names}), got {len(weights)}")
    acc = evaluator.accuracy(method, weights, lam=lam, density=density, p=p, seed=seed)
    return _merge_result(evaluator, acc, {"method": method, "weights": weights, "lam": lam, "density": density,
                                          "p": p, "seed": seed})


def finetuned_accuracy(evaluator) -> MergeAccuracy:
    """Each task's accuracy on its own fine-tuned model (base + its task vector); NaN for a
    scored task without a task vector of the same name."""
    acc = {n: evaluator.single(n)[n] for n in evaluator.names if n in evaluator.tasks}
    return _merge_result(evaluator, acc, {"method": "finetuned"})


@register("layer_sweep")
class LayerSweep(Result):
    """Zero-shot accuracy [layer] of ``attrs['task']`` with the function vector of
    ``attrs['heads']`` added at the last token of ``resid_pre.layer``, and the unpatched
    ``zero_shot`` baseline []."""

    @property
    def task(self) -> str:
        return self.attrs["task"]

    @property
    def heads(self) -> list[tuple[int, int]]:
        return [(int(l), int(h)) for l, h in self.attrs["heads"]]


@torch.no_grad()
def layer_sweep(subject, fv: FunctionVector, heads: Sequence[tuple[int, int]] | None = None, *, top_k: int = 10,
                layers: Sequence[int] | None = None, n_prompts: int = 64, split: str = "test", seed: int = 0,
                scale: float = 1.0) -> LayerSweep:
    """Accuracy on held-out zero-shot queries of ``fv.task`` with ``scale`` x the summed
    projected mean outputs of ``heads`` (default: the ``top_k`` heads by indirect effect;
    an empty list adds nothing) added at each layer in ``layers`` (default: all)."""
    heads = fv.top_heads(top_k) if heads is None else [(int(l), int(h)) for l, h in heads]
    layers = list(range(subject.n_layers)) if layers is None else [subject.site(f"resid_pre.{l}").layer for l in layers]
    vector = fv.vector(heads=heads)
    b, answers = zero_shot_batch(subject, fv.task, n_prompts, split=split, seed=seed)
    base = add_vector_accuracy(subject, b, answers, torch.zeros_like(vector), layers[0])
    acc = [add_vector_accuracy(subject, b, answers, vector, l, scale) for l in layers]
    params = {"task": fv.task, "heads": heads, "layers": layers, "n_prompts": n_prompts, "split": split, "scale": scale}
    return LayerSweep(
        dims={"layer": layers},
        data={"accuracy": (("layer",), np.asarray(acc, dtype=np.float64)), "zero_shot": ((), np.asarray(base))},
        attrs=params, provenance=provenance(subject, seed=seed, params=params),
    )
