"""Per-task fine-tuning, zero-shot evaluation of merges, coefficient sweeps and aTLAS.

``finetune(subject, task)`` trains a copy of a zoo model on one task's zero-shot
examples (``x -> y``; cross-entropy on the answer token only), seeded, in seconds to
minutes on a CPU, and returns the fine-tuned state dict: a real checkpoint to take a
task vector from.

:class:`MergeEvaluator` holds everything a merge's evaluation can reuse: the base
parameters, each task vector as dense tensors, TIES trim thresholds and DARE drop
masks per setting, and the tokenized zero-shot prompts of every task. ``evaluator.accuracy(
"ties", weights, density=0.2)`` merges and scores per-task top-1 accuracy without
touching the model's own weights (``torch.func.functional_call``), fast enough for a
slider. The merge is :func:`workbench.taskvec.merge`'s own arithmetic
(:func:`~workbench.taskvec.merging.merge_tensor`), so the model a slider shows is the
one ``merge`` writes, entry for entry. ``normalized_accuracy`` divides by each fine-tuned model's own accuracy.

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

from workbench.blocks import block_of, block_order
from workbench.data import finetune_data, get_task, zero_shot_prompts
from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register
from workbench.taskvec.merging import (
    DARE_METHODS, check_merge_params, dare_keep, default_normalize, merge_tensor, trim_threshold, weights_for,
)
from workbench.taskvec.vectors import TaskVector


def _answer_loss(logits: torch.Tensor, last: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(logits.shape[0], device=logits.device)
    return torch.nn.functional.cross_entropy(logits[rows, last.to(logits.device)].float(), answers.to(logits.device))


def finetune(
    subject,
    task: str | Sequence[str],
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

    ``task`` may be a list of tasks: co-training, with batches alternating between the
    tasks and ``steps`` steps on *each* (``len(task) * steps`` in all), so every task gets
    exactly the updates it gets alone. Seeded: the same seed gives the same weights on the
    CPU. The subject's own model is not changed. A half-precision model (bf16, fp16) is
    trained on a float32 copy (Adam's moments and small updates vanish in half precision;
    fp16 rounds Adam's eps to 0 and diverges) and its state returned in the model's dtypes.
    """
    subject.require_local("finetune (it trains a copy of the weights)")
    if steps < 1 or batch_size < 1 or not lr > 0:
        raise WorkbenchError(f"need steps >= 1, batch_size >= 1 and lr > 0, got {steps}, {batch_size}, {lr}")
    tasks = [task] if isinstance(task, str) else list(task)
    if not tasks:
        raise WorkbenchError("no task to fine-tune on; pass a task name or a list of them")
    if len(set(tasks)) != len(tasks):
        raise WorkbenchError(f"tasks must be distinct, got {tasks}")
    data = []
    for t in tasks:
        get_task(t)
        ds = finetune_data(t, split=split, tokenizer=subject.tokenizer)
        if len(ds) == 0:
            raise WorkbenchError(f"task {t!r} has no examples in split {split!r} that this tokenizer can score")
        batch = subject.tokenize(ds["prompt"])
        data.append((batch, torch.tensor(ds["answer_id"], device=batch.input_ids.device)))
    model = copy.deepcopy(subject.model)
    dtypes = {k: v.dtype for k, v in model.state_dict().items()}
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in model.parameters()):
        model.float()  # float32 master weights for a half-precision model
    model.train()
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    it = range(steps * len(tasks))
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"fine-tune {'+'.join(tasks)}")
    for i in it:
        batch, answers = data[i % len(tasks)]
        n = len(batch)
        idx = torch.randint(0, n, (min(batch_size, n),), generator=gen).to(batch.input_ids.device)
        out = model(input_ids=batch.input_ids[idx], attention_mask=batch.attention_mask[idx])
        loss = _answer_loss(out.logits, batch.last[idx], answers[idx])
        if not torch.isfinite(loss):
            raise WorkbenchError(f"fine-tuning loss became {float(loss)} at step {i} (task {tasks[i % len(tasks)]!r}); "
                                 "lower lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    return {k: v.detach().to(dtypes[k]).clone() for k, v in model.state_dict().items()}


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
        subject.require_local("MergeEvaluator (it runs the merged weights)")
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
        self._threshold_cache: dict[tuple, dict[str, float | None]] = {}
        self._keep_cache: dict[tuple, dict[str, torch.Tensor]] = {}
        self.split, self.n, self.seed = split, n, seed

    # -------------------------------------------------------------- merging

    def _thresholds(self, name: str, density: float) -> dict[str, float | None]:
        """TIES trim thresholds of one task vector (cached per density: the selection is
        the costly part of a trim)."""
        key = (name, density)
        if key not in self._threshold_cache:
            self._threshold_cache[key] = {k: trim_threshold(d, density) for k, d in self.dense[name].items()}
        return self._threshold_cache[key]

    def _keeps(self, name: str, p: float, seed: int) -> dict[str, torch.Tensor]:
        """DARE keep masks of one task vector (cached per p and seed): the same masks
        ``merge`` draws for the task vector at this position."""
        key = (name, p, seed)
        if key not in self._keep_cache:
            t = self.names.index(name)
            self._keep_cache[key] = {k: dare_keep(d.numel(), p, seed=seed, key=k, t=t) for k, d in self.dense[name].items()}
        return self._keep_cache[key]

    def merged(self, method: str = "task_arithmetic", weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
               *, lam: float = 1.0, density: float = 1.0, p: float = 0.0, seed: int = 0,
               normalize: bool | None = None) -> dict[str, torch.Tensor]:
        """The merged parameters: ``merge(base, task vectors, method, ...)`` entry for entry
        (both call :func:`workbench.taskvec.merging.merge_tensor` with the same trim
        thresholds and drop masks), from cached deltas, thresholds and masks."""
        n = len(self.names)
        weights, lam = check_merge_params(method, n=n, weights=weights, lam=lam, density=density, p=p, seed=seed,
                                          keys=self.keys)
        density, p = float(density), float(p)
        norm = default_normalize(method) if normalize is None else bool(normalize)
        thresholds = {name: self._thresholds(name, density) for name in self.names} if method == "ties" else None
        keeps = ({name: self._keeps(name, p, seed) for name in self.names}
                 if method in DARE_METHODS and p > 0.0 else None)
        out = dict(self.base)
        for k in self.keys:
            out[k] = merge_tensor(
                self.base[k], [self.dense[name][k] for name in self.names], weights_for(weights, k, n), method=method,
                density=density, p=p, lam=lam, normalize=norm,
                thresholds=[thresholds[name][k] for name in self.names] if thresholds is not None else None,
                keeps=[keeps[name][k] for name in self.names] if keeps is not None else None,
            )
        return out

    def call_params(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``params`` restricted to the names ``functional_call`` takes (one of each tied group)."""
        return {k: v for k, v in params.items() if k in self._call_keys}

    @torch.no_grad()
    def correct_of(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, np.ndarray]:
        """Per-task, per-prompt top-1 correctness [prompts] (bool) of the model with
        ``params`` (default: the base), for intervals by resampling the prompts."""
        from torch.func import functional_call

        out = {}
        for t, (b, answers) in self._batches.items():
            kwargs = b.kwargs()
            logits = (self.model(**kwargs) if params is None else functional_call(self.model, self.call_params(params), (), kwargs)).logits
            pred = logits[torch.arange(len(b), device=logits.device), b.last.to(logits.device)].argmax(-1)
            out[t] = (pred == answers).cpu().numpy()
        return out

    def accuracy_of(self, params: Mapping[str, torch.Tensor] | None = None) -> dict[str, float]:
        """Per-task zero-shot top-1 accuracy of the model with ``params`` (default: the base)."""
        return {t: float(c.mean()) for t, c in self.correct_of(params).items()}

    def batches(self) -> dict[str, tuple]:
        """The tokenized held-out prompts and answer ids of every task: {task: (Batch, answers)}."""
        return dict(self._batches)

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
    """Learned coefficients [block, task_vector] (aTLAS) and the training loss [step].

    Blocks are :mod:`workbench.blocks` names (``embed``, ``layer.L``, ``final_norm``,
    ``unembed``, ``other``) of the subject's layout family (``attrs["family"]``)."""

    def weights_by_tensor(self, keys: Sequence[str]) -> dict[str, list[float]]:
        """Per-tensor weights for ``merge(..., weights=...)``."""
        blocks = self.coord("block")
        coef = self["coefficient"]
        family = self.attrs.get("family")
        missing = sorted({block_of(k, family) for k in keys} - set(blocks))
        if missing:
            raise WorkbenchError(f"no learned coefficient for blocks {missing}; this result has {blocks}")
        return {k: coef[blocks.index(block_of(k, family))].tolist() for k in keys}


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
    (blocks: :func:`workbench.blocks.block_of` of the subject's family: ``embed``, each
    ``layer.L``, ``final_norm``, ``unembed``, ``other``). The coefficients start at ``init`` and
    are trained with Adam on the answer-token cross-entropy of ``n_val`` zero-shot
    prompts per task from ``split`` (a small validation set, disjoint from the test
    prompts the evaluator scores). Seeded.
    """
    from torch.func import functional_call

    ev = evaluator
    family = ev.subject.family
    block = {k: block_of(k, family) for k in ev.keys}
    blocks = block_order(block.values())
    bidx = {b: i for i, b in enumerate(blocks)}
    torch.manual_seed(seed)
    dev = next(iter(ev.base.values())).device  # the coefficients live with the weights they mix
    coef = torch.full((len(blocks), len(ev.names)), float(init), device=dev, requires_grad=True)
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
            c = coef[bidx[block[k]]]
            params[k] = ev.base[k] + torch.tensordot(c, stacked[k], dims=1)
        logits = functional_call(ev.model, ev.call_params(params), (), batch.kwargs()).logits
        loss = _answer_loss(logits, batch.last, ans)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    params = {"n_val": n_val, "steps": steps, "lr": lr, "init": init, "split": split, "task_vectors": ev.names,
              "family": family.name}
    return AtlasCoefficients(
        dims={"block": blocks, "task_vector": ev.names, "step": list(range(steps))},
        data={"coefficient": (("block", "task_vector"), coef.detach().cpu().numpy()),
              "loss": (("step",), np.array(losses))},
        attrs=params, provenance=provenance(ev.subject, seed=seed, params=params),
    )


__all__ = ["AtlasCoefficients", "MergeEvaluator", "MergeSweep", "finetune", "finetune_all", "learn_coefficients",
           "normalized_accuracy"]
