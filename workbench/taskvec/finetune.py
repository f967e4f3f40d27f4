"""Per-task fine-tuning, zero-shot evaluation of merges, coefficient sweeps and aTLAS.

``finetune(subject, task)`` trains a copy of a zoo model on one task's zero-shot
examples (``x -> y``; cross-entropy on the answer token only), seeded, in seconds to
minutes on a CPU, and returns the fine-tuned state dict: a real checkpoint to take a
task vector from.

:class:`MergeEvaluator` holds everything a merge's evaluation can reuse: the base
parameters, each task vector as dense tensors, TIES-trimmed and DARE-dropped versions
per setting, and the tokenized zero-shot prompts of every task. ``evaluator.accuracy(
"ties", weights, density=0.2)`` merges and scores per-task top-1 accuracy without
touching the model's own weights (``torch.func.functional_call``), fast enough for a
slider. ``normalized_accuracy`` divides by each fine-tuned model's own accuracy.

:func:`learn_coefficients` is aTLAS ("Knowledge Composition using Task Vectors with
Learned Anisotropic Scaling"): one coefficient per (block, task vector), trained by
gradient descent on a small validation set of every task; the result plugs into
``merge(..., weights=result.weights_by_tensor(keys))``.
"""

from __future__ import annotations

import copy
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from workbench.data import finetune_data, get_task, zero_shot_prompts
from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register
from workbench.taskvec.weights import (
    METHODS, TaskVector, _key_seed, _weights_for, block_of, _block_order, dare_drop, elect_and_mean, trim_topk,
)


def _answer_loss(logits: torch.Tensor, last: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0])
    return torch.nn.functional.cross_entropy(logits[rows, last].float(), answers)


def finetune(
    subject,
    task: str,
    *,
    steps: int = 50,
    lr: float = 1e-4,
    batch_size: int = 32,
    seed: int = 0,
    split: str = "train",
    weight_decay: float = 0.0,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """Fine-tune a copy of ``subject``'s model on ``task`` (all parameters, AdamW,
    answer-token cross-entropy on zero-shot prompts of ``split``); return its state dict.

    Seeded: the same seed gives the same weights on the CPU. The subject's own model is
    not changed.
    """
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise WorkbenchError(f"need steps >= 1, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    get_task(task)
    ds = finetune_data(task, split=split, tokenizer=subject.tokenizer)
    if len(ds) == 0:
        raise WorkbenchError(f"task {task!r} has no examples in split {split!r} that this tokenizer can score")
    batch = subject.tokenize(ds["prompt"])
    answers = torch.tensor(ds["answer_id"], device=batch.input_ids.device)
    model = copy.deepcopy(subject.model)
    model.train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    it = range(steps)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"fine-tune {task}")
    n = len(ds)
    for _ in it:
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen)
        out = model(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx])
        loss = _answer_loss(out.logits, batch.last[idx], answers[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def finetune_all(subject, tasks: Sequence[str], **kwargs) -> dict[str, dict[str, torch.Tensor]]:
    """``finetune`` for each task (same settings and seed): ``{task: state dict}``."""
    return {t: finetune(subject, t, **kwargs) for t in tasks}


# ---------------------------------------------------------------------- evaluation


class MergeEvaluator:
    """Zero-shot per-task accuracy of ``base + merge(task vectors)``, with caches.

    ``subject``: the base model. ``task_vectors``: {name: TaskVector} (or fine-tuned
    state dicts, differenced against the subject). ``tasks``: the tasks to score (default:
    the task-vector names). ``n``: prompts per task from ``split`` (default ``"test"``;
    each test pair once, up to ``n``).
    """

    def __init__(self, subject, task_vectors: Mapping[str, Any], *, tasks: Sequence[str] | None = None,
                 n: int = 64, split: str = "test", seed: int = 0) -> None:
        if not task_vectors:
            raise WorkbenchError("MergeEvaluator needs at least one task vector")
        self.subject = subject
        self.model = subject.model
        self.names = list(task_vectors)
        self.base = {k: v.detach() for k, v in self.model.state_dict().items()}
        # tied tensors (GPT-2's lm_head / wte) appear once here, as functional_call wants
        self._call_keys = set(dict(self.model.named_parameters())) | set(dict(self.model.named_buffers()))
        tvs = {name: tv if isinstance(tv, TaskVector) else TaskVector(self.base, tv, name=name)
               for name, tv in task_vectors.items()}
        self.keys = [k for k in tvs[self.names[0]].keys() if k in self.base]
        missing = [k for k in tvs[self.names[0]].keys() if k not in self.base]
        if missing:
            raise WorkbenchError(f"task vector tensors {missing[:5]} are not parameters of {subject.name!r}")
        self.dense = {name: {k: tvs[name][k] for k in self.keys} for name in self.names}
        self.tasks = list(tasks) if tasks is not None else list(self.names)
        for t in self.tasks:
            get_task(t)
        self._batches = {}
        for t in self.tasks:
            size = min(n, len(get_task(t).split(split)))
            ds = zero_shot_prompts(t, size, split=split, seed=seed, tokenizer=subject.tokenizer)
            b = subject.tokenize(ds["prompt"])
            self._batches[t] = (b, torch.tensor(ds["answer_id"], device=b.input_ids.device))
        self._trimmed: dict[tuple, dict[str, torch.Tensor]] = {}
        self._dropped: dict[tuple, dict[str, torch.Tensor]] = {}
        self.split, self.n, self.seed = split, n, seed

    # -------------------------------------------------------------- merging

    def _deltas(self, name: str, method: str, density: float, p: float, seed: int) -> dict[str, torch.Tensor]:
        if method == "ties" and density < 1.0:
            key = (name, density)
            if key not in self._trimmed:
                self._trimmed[key] = {k: trim_topk(d, density) for k, d in self.dense[name].items()}
            return self._trimmed[key]
        if method in ("dare", "dare_ties") and p > 0.0:
            key = (name, p, seed)
            if key not in self._dropped:
                t = self.names.index(name)
                self._dropped[key] = {k: dare_drop(d, p, torch.Generator().manual_seed(_key_seed(seed, k, t)))
                                      for k, d in self.dense[name].items()}
            return self._dropped[key]
        return self.dense[name]

    def merged(self, method: str = "task_arithmetic", weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
               *, lam: float = 1.0, density: float = 1.0, p: float = 0.0, seed: int = 0,
               normalize: bool | None = None) -> dict[str, torch.Tensor]:
        """The merged parameters (same definitions as :func:`workbench.taskvec.merge`)."""
        if method not in METHODS:
            raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
        n = len(self.names)
        weights = [1.0] * n if weights is None else weights
        deltas = {name: self._deltas(name, method, density, p, seed) for name in self.names}
        out = dict(self.base)
        for k in self.keys:
            w = torch.tensor(_weights_for(weights, k, n))
            ds = [deltas[name][k] for name in self.names]
            if method in ("ties", "dare_ties"):
                weighted = torch.stack(ds) * w.view(-1, *([1] * ds[0].ndim))
                mixed = elect_and_mean(weighted, w, normalize=True if normalize is None else normalize)
            else:
                mixed = sum(d * float(wi) for d, wi in zip(ds, w) if float(wi) != 0.0)
                if isinstance(mixed, int):
                    mixed = torch.zeros_like(self.base[k])
                if normalize:
                    s = float(w.sum())
                    mixed = mixed / (s if abs(s) >= 1e-8 else 1.0)
            out[k] = self.base[k] + lam * mixed
        return out

    def call_params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` restricted to the names ``functional_call`` takes (one of each tied group)."""
        return {k: v for k, v in params.items() if k in self._call_keys}

    @torch.no_grad()
    def accuracy_of(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Per-task zero-shot top-1 accuracy of the model with ``params`` (default: the base)."""
        from torch.func import functional_call

        out = {}
        for t, (b, answers) in self._batches.items():
            kwargs = b.kwargs()
            logits = (self.model(**kwargs) if params is None else functional_call(self.model, self.call_params(params), (), kwargs)).logits
            pred = logits[torch.arange(len(b)), b.last].argmax(-1)
            out[t] = float((pred == answers).float().mean())
        return out

    def accuracy(self, method: str = "task_arithmetic", weights=None, **kwargs) -> dict[str, float]:
        """Per-task accuracy of a merge: ``accuracy_of(merged(method, weights, **kwargs))``."""
        return self.accuracy_of(self.merged(method, weights, **kwargs))

    def single(self, name: str, coef: float = 1.0) -> dict[str, float]:
        """Accuracy of ``base + coef * task_vector[name]`` (``coef=1``: the fine-tuned model)."""
        w = [coef if n == name else 0.0 for n in self.names]
        return self.accuracy("task_arithmetic", w)

    # -------------------------------------------------------------- sweeps

    def sweep(self, lams: Sequence[float], method: str = "task_arithmetic", weights=None, **kwargs) -> "MergeSweep":
        """Per-task accuracy against the scaling coefficient ``lam``."""
        acc = np.array([[self.accuracy(method, weights, lam=float(l), **kwargs)[t] for t in self.tasks] for l in lams])
        params = {"method": method, "lams": list(map(float, lams)), "task_vectors": self.names, **_plain(kwargs)}
        return MergeSweep(
            dims={"lam": list(map(float, lams)), "task": self.tasks},
            data={"accuracy": (("lam", "task"), acc), "mean": (("lam",), acc.mean(1))},
            attrs=params, provenance=provenance(self.subject, seed=self.seed, params=params),
        )


def _plain(d: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in d.items() if isinstance(v, (int, float, str, bool, type(None)))}


@register("merge_sweep")
class MergeSweep(Result):
    """Per-task accuracy [lam, task] and its mean [lam] over a coefficient sweep."""

    def best(self) -> float:
        return float(self.coord("lam")[int(np.argmax(self["mean"]))])


def normalized_accuracy(merged: Mapping[str, float], finetuned: Mapping[str, float]) -> dict[str, float]:
    """Merged accuracy on each task divided by its own fine-tuned model's accuracy."""
    return {t: (merged[t] / finetuned[t] if finetuned[t] > 0 else float("nan")) for t in merged}


# ---------------------------------------------------------------------- aTLAS


@register("atlas_coefficients")
class AtlasCoefficients(Result):
    """Learned coefficients [block, task_vector] (aTLAS) and the training loss [step]."""

    def weights_by_tensor(self, keys: Sequence[str]) -> dict[str, list[float]]:
        """Per-tensor weights for ``merge(..., weights=...)``."""
        blocks = self.coord("block")
        coef = self["coefficient"]
        return {k: coef[blocks.index(block_of(k))].tolist() for k in keys}


def learn_coefficients(
    evaluator: MergeEvaluator,
    *,
    n_val: int = 8,
    steps: int = 100,
    lr: float = 0.05,
    init: float = 0.3,
    seed: int = 0,
    split: str = "train",
) -> AtlasCoefficients:
    """aTLAS: learn one coefficient per (block, task vector) by gradient descent.

    The merged model is ``base + sum_t c[block(k), t] * tau_t[k]`` for each tensor k
    (blocks: embeddings, each layer, the rest). The coefficients start at ``init`` and
    are trained with Adam on the answer-token cross-entropy of ``n_val`` zero-shot
    prompts per task from ``split`` (a small validation set, disjoint from the test
    prompts the evaluator scores). Seeded.
    """
    from torch.func import functional_call

    ev = evaluator
    blocks = _block_order(block_of(k) for k in ev.keys)
    bidx = {b: i for i, b in enumerate(blocks)}
    torch.manual_seed(seed)
    coef = torch.full((len(blocks), len(ev.names)), float(init), requires_grad=True)
    prompts, answers = [], []
    for t in ev.tasks:
        ds = zero_shot_prompts(t, min(n_val, len(get_task(t).split(split))), split=split, seed=seed,
                               tokenizer=ev.subject.tokenizer)
        prompts += ds["prompt"]
        answers += ds["answer_id"]
    batch = ev.subject.tokenize(prompts)
    ans = torch.tensor(answers, device=batch.input_ids.device)
    stacked = {k: torch.stack([ev.dense[n][k] for n in ev.names]) for k in ev.keys}
    opt = torch.optim.Adam([coef], lr=lr)
    losses = []
    for _ in range(steps):
        params = dict(ev.base)
        for k in ev.keys:
            c = coef[bidx[block_of(k)]]
            params[k] = ev.base[k] + torch.tensordot(c, stacked[k], dims=1)
        logits = functional_call(ev.model, ev.call_params(params), (), batch.kwargs()).logits
        loss = _answer_loss(logits, batch.last, ans)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    params = {"n_val": n_val, "steps": steps, "lr": lr, "init": init, "split": split, "task_vectors": ev.names}
    return AtlasCoefficients(
        dims={"block": blocks, "task_vector": ev.names, "step": list(range(steps))},
        data={"coefficient": (("block", "task_vector"), coef.detach().numpy()), "loss": (("step",), np.array(losses))},
        attrs=params, provenance=provenance(ev.subject, seed=seed, params=params),
    )


__all__ = ["AtlasCoefficients", "MergeEvaluator", "MergeSweep", "finetune", "finetune_all", "learn_coefficients",
           "normalized_accuracy"]
