"""Task vectors in activation space: in-context task vectors and function vectors.

All reads and writes go through nnsight traces on the Subject (``resid_pre.L``,
``z.L``, ``logits``), so the same code runs on every layout family.

**In-context task vectors** (Hendel et al., "In-Context Learning Creates Task Vectors"):
run a prompt of ``k`` demonstrations followed by a dummy query (``dummy_query=True``, as
in the paper) or the demonstrations alone, read the residual stream entering layer L at
its last token (theta), and write theta over the last-token residual of a zero-shot query
``x ->`` at the same layer. :func:`icl_task_vectors` gives the patched accuracy per
layer beside the zero-shot and full in-context baselines.

**Function vectors** (Todd et al., "Function Vectors in Large Language Models"):
:func:`function_vector` takes the mean output of every head at the last token over
in-context prompts (``z.L``), then its causal indirect effect: the mean output of head
(L, h) is written into that head on prompts whose demonstration labels are shuffled, and
the rise in the probability of the correct answer is measured: the exact effects of
:mod:`workbench.effects` (the corrupted batch repeated once per head, each copy patching
one head), not one forward per head. The function vector is the sum of the top-k heads' mean
outputs projected through W_O; :func:`fv_accuracy` adds it to the residual entering layer
L at the last token of zero-shot prompts and scores accuracy against k and L.

**Learned head weights** (after "Learning Task Representations from In-Context
Learning"): :func:`learn_head_weights` makes the vector a weighted sum of all heads'
projected mean outputs, ``sum_lh a_lh * head_out[l, h]``, and trains the weights by
gradient descent on the causal objective: the answer's cross-entropy on zero-shot
prompts with the vector added at layer L.

:func:`fv_cosines` compares the function vectors of tasks with each other and with each
task's in-context task vector (theta minus the mean zero-shot residual at the same layer:
what the demonstrations wrote).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from workbench.data import DEFAULT_FORMAT, answer_token_ids, get_task, icl_prompts, zero_shot_prompts
from workbench.effects import Heads, Patching
from workbench.errors import WorkbenchError
from workbench.memory import DEFAULT_BUDGET_BYTES
from workbench.metrics import upcast
from workbench.results import Result, provenance, register


# ---------------------------------------------------------------------- helpers


def _check_tokenizer(subject, ds) -> None:
    """Prompts built with another tokenizer carry answer ids that do not match this one."""
    if "answer_id" not in ds.column_names or len(ds) == 0:
        return
    m = min(len(ds), 16)
    ids = answer_token_ids(subject.tokenizer, ds["prompt"][:m], ds["answer"][:m])
    mine = [a[0] if a else None for a in ids]
    if mine != list(ds["answer_id"][:m]):
        raise WorkbenchError(
            f"these prompts were tokenized with a different tokenizer than {subject.name!r}'s (answer ids "
            f"{list(ds['answer_id'][:3])} vs {mine[:3]}); build them with tokenizer=subject.tokenizer"
        )


def _prompt_set(subject, task, n_demos: int, n_prompts: int, *, seed: int, split: str, shuffle_labels: bool = False):
    ds = icl_prompts(task, n_demos, n_prompts, seed=seed, split=split, shuffle_labels=shuffle_labels, tokenizer=subject.tokenizer)
    if len(ds) == 0:
        raise WorkbenchError(f"no prompts of task {task!r} can be scored with {subject.name!r}'s tokenizer")
    return ds


def _as_prompts(subject, task_or_ds, n_demos: int, n_prompts: int, *, seed: int, split: str, shuffle_labels: bool = False):
    if isinstance(task_or_ds, str):
        return _prompt_set(subject, task_or_ds, n_demos, n_prompts, seed=seed, split=split, shuffle_labels=shuffle_labels)
    _check_tokenizer(subject, task_or_ds)
    return task_or_ds


def _last_rows(batch):
    return torch.arange(len(batch), device=batch.input_ids.device), batch.last


def _answer_probs(logits: torch.Tensor, batch, answers: torch.Tensor) -> torch.Tensor:
    rows, last = _last_rows(batch)
    return logits[rows, last].float().softmax(-1)[rows, answers]


def _correct(logits: torch.Tensor, batch, answers: torch.Tensor) -> torch.Tensor:
    rows, last = _last_rows(batch)
    return (logits[rows, last].argmax(-1) == answers).float()


def _add_at_last(batch, vec: torch.Tensor):
    rows, last = _last_rows(batch)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, last] = x[rows, last] + vec.to(x.device, x.dtype)
        return x

    return fn


def _set_at_last(batch, values: torch.Tensor):
    rows, last = _last_rows(batch)

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[rows, last] = values.to(x.dtype)
        return x

    return fn


def zero_shot_batch(subject, task: str, n_prompts: int, *, split: str = "test", seed: int = 0):
    """Tokenized zero-shot prompts of ``task`` (each pair of ``split`` once, up to ``n_prompts``)
    and their answer ids."""
    size = min(n_prompts, len(get_task(task).split(split)))
    ds = zero_shot_prompts(task, size, split=split, seed=seed, tokenizer=subject.tokenizer)
    b = subject.tokenize(ds["prompt"])
    return b, torch.tensor(ds["answer_id"], device=b.input_ids.device)


# ---------------------------------------------------------------------- ICL task vectors


@register("icl_task_vectors")
class ICLTaskVectors(Result):
    """Hendel et al. task vectors: ``accuracy`` [task, layer] of zero-shot queries with
    theta patched in at layer L; ``zero_shot`` and ``icl`` [task] baselines; ``theta``
    [task, layer, dim] (mean over demonstration sets) and ``delta`` [task, layer, dim]
    (theta minus the mean zero-shot residual at that layer)."""

    def best_layer(self, task: str) -> int:
        return int(self.coord("layer")[int(np.argmax(self["accuracy"][self.coord("task").index(task)]))])


@torch.no_grad()
def icl_task_vectors(
    subject,
    tasks: Sequence[str],
    *,
    n_demos: int = 5,
    n_prompts: int = 32,
    layers: Sequence[int] | None = None,
    dummy_query: bool = True,
    mode: str = "replace",
    split: str = "test",
    seed: int = 0,
) -> ICLTaskVectors:
    """In-context task vectors of ``tasks``, patched into zero-shot queries layer by layer.

    Query i gets theta from its own demonstration set (drawn without the query), as in
    the paper. ``layers``: the layers L whose entering residual (``resid_pre.L``) is read
    and patched (default: all). ``mode="replace"`` (the paper) overwrites the query's
    last-token residual with theta; ``mode="add"`` instead adds the mean delta (theta minus
    the mean zero-shot residual), which keeps the query's own information: in a model too
    shallow to have a layer where the task is formed but the query not yet read (a
    2-layer model), replacing also replaces the query.
    """
    if mode not in ("replace", "add"):
        raise WorkbenchError(f"unknown mode {mode!r}; use 'replace' (Hendel et al.) or 'add'")
    tasks = [get_task(t).name for t in ([tasks] if isinstance(tasks, str) else tasks)]
    if not tasks:
        raise WorkbenchError("no tasks given; pass one task name or a list of them (workbench.data.task_names())")
    layers = list(range(subject.n_layers)) if layers is None else [subject.site(f"resid_pre.{l}").layer for l in layers]
    sites = [f"resid_pre.{l}" for l in layers]
    acc = np.zeros((len(tasks), len(layers)))
    zs, icl = np.zeros(len(tasks)), np.zeros(len(tasks))
    thetas = np.zeros((len(tasks), len(layers), subject.d_model))
    deltas = np.zeros_like(thetas)
    for ti, task in enumerate(tasks):
        ds = _prompt_set(subject, task, n_demos, n_prompts, seed=seed, split=split)
        answers = torch.tensor(ds["answer_id"])
        if dummy_query:
            # the demonstrations and a dummy query taken from another row's query
            src = [DEFAULT_FORMAT.prompt([tuple(d) for d in demos], ds["query"][(i + 1) % len(ds)])
                   for i, demos in enumerate(ds["demos"])]
        else:
            src = [DEFAULT_FORMAT.demos_only([tuple(d) for d in demos]) for demos in ds["demos"]]
        sb = subject.tokenize(src)
        cache = subject.cache(sb, sites)
        rows, last = _last_rows(sb)
        theta = {s: cache[s][rows, last] for s in sites}
        zb = subject.tokenize([DEFAULT_FORMAT.prompt([], q) for q in ds["query"]])
        answers = answers.to(zb.input_ids.device)
        zcache = subject.cache(zb, sites + ["logits"])
        zs[ti] = float(_correct(zcache["logits"], zb, answers).mean())
        full = subject.tokenize(ds["prompt"])
        icl[ti] = float(_correct(subject.logits(full), full, answers).mean())
        zr, zl = _last_rows(zb)
        for li, s in enumerate(sites):
            thetas[ti, li] = theta[s].float().mean(0).cpu().numpy()
            deltas[ti, li] = thetas[ti, li] - zcache[s][zr, zl].float().mean(0).cpu().numpy()
            if mode == "replace":
                fn = _set_at_last(zb, theta[s])
            else:
                fn = _add_at_last(zb, torch.tensor(deltas[ti, li], dtype=torch.float32, device=zb.input_ids.device))
            logits = subject.logits(zb, patch={s: fn})
            acc[ti, li] = float(_correct(logits, zb, answers).mean())
    params = {"tasks": tasks, "n_demos": n_demos, "n_prompts": n_prompts, "layers": layers, "dummy_query": dummy_query, "mode": mode, "split": split}
    return ICLTaskVectors(
        dims={"task": tasks, "layer": layers, "dim": list(range(subject.d_model))},
        data={"accuracy": (("task", "layer"), acc), "zero_shot": (("task",), zs), "icl": (("task",), icl),
              "theta": (("task", "layer", "dim"), thetas), "delta": (("task", "layer", "dim"), deltas)},
        attrs=params, provenance=provenance(subject, seed=seed, params=params),
    )


# ---------------------------------------------------------------------- function vectors


@register("function_vector")
class FunctionVector(Result):
    """Todd et al. function vector of one task.

    ``mean_z`` [layer, head, d_head]: mean head output at the last token of in-context
    prompts; ``head_out`` [layer, head, dim]: the same projected through W_O;
    ``indirect_effect`` [layer, head]: mean rise of p(answer) on shuffled-label prompts
    when the head's mean output is patched in; ``p_corrupted`` []: p(answer) unpatched.
    """

    @property
    def task(self) -> str:
        return self.attrs["task"]

    def top_heads(self, top_k: int) -> list[tuple[int, int]]:
        """The ``top_k`` heads of largest indirect effect, as (layer, head)."""
        ie = self["indirect_effect"]
        layers, heads = self.coord("layer"), self.coord("head")
        order = np.argsort(-ie.reshape(-1), kind="stable")[:top_k]
        return [(layers[i // ie.shape[1]], heads[i % ie.shape[1]]) for i in order]

    def vector(self, top_k: int | None = 10, heads: Sequence[tuple[int, int]] | None = None) -> torch.Tensor:
        """Sum of the projected mean outputs of ``heads`` (default: the top ``top_k``) [dim]."""
        heads = self.top_heads(top_k) if heads is None else [tuple(h) for h in heads]
        layers, hs = self.coord("layer"), self.coord("head")
        out = np.zeros(self["head_out"].shape[-1])
        for l, h in heads:
            if l not in layers or h not in hs:
                raise WorkbenchError(f"no head L{l}H{h}; layers {layers}, heads {hs}")
            out += self["head_out"][layers.index(l), hs.index(h)]
        return torch.tensor(out, dtype=torch.float32)


def mean_head_outputs(subject, batch) -> torch.Tensor:
    """Mean per-head output at the last token over ``batch`` [layer, head, d_head]."""
    sites = [f"z.{l}" for l in range(subject.n_layers)]
    cache = subject.cache(batch, sites)
    rows, last = _last_rows(batch)
    return torch.stack([cache[s][rows, last].float().mean(0) for s in sites])


def project_heads(subject, mean_z: torch.Tensor) -> torch.Tensor:
    """Head outputs through the output projection: [layer, head, d_head] -> [layer, head, d_model]
    (in float32 at least: a half-precision model's W_O is upcast, not the means rounded)."""
    with torch.no_grad():
        return torch.stack([torch.einsum("hd,hdm->hm", upcast(mean_z[l]), upcast(subject.W_O(l).detach()))
                            for l in range(subject.n_layers)])


@torch.no_grad()
def indirect_effects(
    subject, corrupted, answers: torch.Tensor, mean_z: torch.Tensor, *, batched: bool = True,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> tuple[torch.Tensor, float]:
    """Indirect effect of every head [layer, head] and p(answer) on the corrupted batch.

    ``batched=True``: the exact effects of :mod:`workbench.effects`, each head's output at
    the last token replaced by its mean ``mean_z`` (the corrupted batch repeated once per
    head, as many copies per forward as fit ``max_bytes``); ``batched=False``: the
    sequential reference, one forward per head.
    """
    L, H = subject.n_layers, subject.n_heads
    answers = answers.to(corrupted.input_ids.device)

    def p_answer(logits, batch):
        return _answer_probs(logits, batch, answers)

    if batched:
        pt = Patching(subject, corrupted, Heads(), replacement={f"z.{l}": mean_z[l] for l in range(L)},
                      positions="last")
        ie = pt.exact(p_answer, max_bytes=max_bytes)
        return torch.tensor(ie, dtype=torch.float32).reshape(L, H), pt.base(p_answer)
    base_p = p_answer(subject.logits(corrupted), corrupted)
    rows, last = _last_rows(corrupted)
    ie = torch.zeros(L, H, device=base_p.device)  # filled on the device: no read per head
    for l in range(L):
        for h in range(H):
            def fn(x, h=h, l=l):
                x = x.clone()
                x[rows, last, h] = mean_z[l, h].to(x.dtype)
                return x

            probs = p_answer(subject.logits(corrupted, patch={f"z.{l}": fn}), corrupted)
            ie[l, h] = (probs - base_p).mean()
    return ie.cpu(), float(base_p.mean())


def function_vector(
    subject,
    task: str,
    *,
    n_demos: int = 5,
    n_prompts: int = 32,
    n_corrupted: int | None = None,
    split: str = "train",
    seed: int = 0,
    batched: bool = True,
    prompts=None,
    corrupted=None,
) -> FunctionVector:
    """Mean head outputs over ``n_prompts`` in-context prompts of ``task`` (``n_demos`` demonstrations,
    from ``split``) and each head's indirect effect on shuffled-label prompts.

    ``prompts`` / ``corrupted``: your own datasets (as built by ``icl_prompts`` with this
    subject's tokenizer) in place of the drawn ones; prompts tokenized with another
    tokenizer are refused."""
    subject.require_local("function_vector (it projects the head outputs through W_O)")
    task = get_task(task).name
    clean = _as_prompts(subject, prompts if prompts is not None else task, n_demos, n_prompts, seed=seed, split=split)
    cb = subject.tokenize(clean["prompt"])
    with torch.no_grad():
        mean_z = mean_head_outputs(subject, cb)
    corr = _as_prompts(subject, corrupted if corrupted is not None else task, n_demos, n_corrupted or n_prompts, seed=seed + 1,
                       split=split, shuffle_labels=True)
    xb = subject.tokenize(corr["prompt"])
    answers = torch.tensor(corr["answer_id"], device=xb.input_ids.device)
    ie, p0 = indirect_effects(subject, xb, answers, mean_z, batched=batched)
    head_out = project_heads(subject, mean_z)
    params = {"task": task, "n_demos": n_demos, "n_prompts": n_prompts, "split": split, "batched": batched}
    L, H = subject.n_layers, subject.n_heads
    return FunctionVector(
        dims={"layer": list(range(L)), "head": list(range(H)), "d_head": list(range(subject.d_head)),
              "dim": list(range(subject.d_model))},
        data={"mean_z": (("layer", "head", "d_head"), mean_z.cpu().numpy()),
              "head_out": (("layer", "head", "dim"), head_out.cpu().numpy()),
              "indirect_effect": (("layer", "head"), ie.numpy()),
              "p_corrupted": ((), np.asarray(p0))},
        attrs=params, provenance=provenance(subject, seed=seed, params=params),
    )


@register("fv_accuracy")
class FVAccuracy(Result):
    """Zero-shot accuracy with a function vector added: ``accuracy`` [k, layer] and the
    unpatched ``zero_shot`` baseline []."""

    def best(self) -> tuple[int, int, float]:
        a = self["accuracy"]
        i, j = np.unravel_index(int(np.argmax(a)), a.shape)
        return int(self.coord("top_k")[i]), int(self.coord("layer")[j]), float(a[i, j])


@torch.no_grad()
def add_vector_accuracy(subject, batch, answers: torch.Tensor, vector: torch.Tensor, layer: int, scale: float = 1.0) -> float:
    """Top-1 accuracy with ``scale * vector`` added to ``resid_pre.layer`` at the last token."""
    v = (scale * vector).to(subject.device)
    logits = subject.logits(batch, patch={f"resid_pre.{layer}": _add_at_last(batch, v)})
    return float(_correct(logits, batch, answers).mean())


@torch.no_grad()
def fv_accuracy(
    subject, fv: FunctionVector, *, top_ks: Sequence[int] = (1, 2, 4, 8), layers: Sequence[int] | None = None,
    n_prompts: int = 64, split: str = "test", seed: int = 0, scale: float = 1.0,
) -> FVAccuracy:
    """Zero-shot accuracy on held-out queries of ``fv.task`` with the top-k function vector
    added at the last token of the residual entering layer L, for each k and L."""
    layers = list(range(subject.n_layers)) if layers is None else [subject.site(f"resid_pre.{l}").layer for l in layers]
    n_heads = len(fv.coord("layer")) * len(fv.coord("head"))
    bad = [k for k in top_ks if not 0 <= k <= n_heads]
    if bad:
        raise WorkbenchError(f"top_ks must be in 0..{n_heads} (the number of heads), got {bad}")
    b, answers = zero_shot_batch(subject, fv.task, n_prompts, split=split, seed=seed)
    base = float(_correct(subject.logits(b), b, answers).mean())
    acc = np.array([[add_vector_accuracy(subject, b, answers, fv.vector(k), l, scale) for l in layers] for k in top_ks])
    params = {"task": fv.task, "top_ks": list(top_ks), "layers": layers, "n_prompts": n_prompts, "split": split,
              "scale": scale}
    return FVAccuracy(
        dims={"top_k": list(top_ks), "layer": layers},
        data={"accuracy": (("top_k", "layer"), acc), "zero_shot": ((), np.asarray(base))},
        attrs=params, provenance=provenance(subject, seed=seed, params=params),
    )


# ---------------------------------------------------------------------- learned head weights


@register("learned_head_weights")
class LearnedHeadWeights(Result):
    """Head weights [layer, head] trained on the causal objective, the loss [step], and
    ``vector`` [dim] = sum of weight * projected mean head output."""


def learn_head_weights(
    subject, fv: FunctionVector, *, layer: int, n_prompts: int = 32, steps: int = 60, lr: float = 0.1,
    init: str = "zeros", split: str = "train", seed: int = 0,
) -> LearnedHeadWeights:
    """Learn one weight per head so that ``sum_lh w_lh * head_out[l, h]`` added at the
    last token of ``resid_pre.layer`` makes zero-shot prompts of ``fv.task`` (``split``)
    predict their answers (Adam on the answer cross-entropy). ``init``: ``"zeros"`` or
    ``"ie"`` (the indirect effects, clipped at 0, scaled to sum to 1)."""
    subject.require_local("learn_head_weights (a backward pass through logits brought back here)")
    layer = subject.site(f"resid_pre.{layer}").layer
    b, answers = zero_shot_batch(subject, fv.task, n_prompts, split=split, seed=seed)
    head_out = torch.tensor(fv["head_out"], dtype=torch.float32, device=subject.device)  # [L, H, d]
    if init == "zeros":
        w0 = torch.zeros(head_out.shape[:2])
    elif init == "ie":
        ie = torch.tensor(fv["indirect_effect"]).clamp(min=0).float()
        w0 = ie / ie.sum() if float(ie.sum()) > 0 else torch.zeros_like(ie)
    else:
        raise WorkbenchError(f"unknown init {init!r}; use 'zeros' or 'ie'")
    torch.manual_seed(seed)
    w = w0.clone().to(subject.device).requires_grad_(True)
    opt = torch.optim.Adam([w], lr=lr)
    rows, last = _last_rows(b)
    losses = []
    for _ in range(steps):
        vec = torch.einsum("lh,lhd->d", w, head_out)
        logits = subject.logits(b, patch={f"resid_pre.{layer}": _add_at_last(b, vec)}, grad=True)
        loss = torch.nn.functional.cross_entropy(logits[rows, last].float(), answers)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    vec = torch.einsum("lh,lhd->d", w.detach(), head_out).cpu()
    params = {"task": fv.task, "layer": layer, "n_prompts": n_prompts, "steps": steps, "lr": lr, "init": init, "split": split}
    return LearnedHeadWeights(
        dims={"layer": fv.coord("layer"), "head": fv.coord("head"), "step": list(range(steps)), "dim": fv.coord("dim")},
        data={"weight": (("layer", "head"), w.detach().cpu().numpy()), "loss": (("step",), np.array(losses)),
              "vector": (("dim",), vec.numpy())},
        attrs=params, provenance=provenance(subject, seed=seed, params=params),
    )


# ---------------------------------------------------------------------- comparisons


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else 0.0


@register("fv_cosines")
class FVCosines(Result):
    """``fv_cosine`` [task, task_b] between function vectors; ``fv_vs_icl`` [task]: cosine
    between a task's function vector and its in-context task vector (delta) at the layer."""


def fv_cosines(fvs: Mapping[str, FunctionVector], *, top_k: int = 10, icl: ICLTaskVectors | None = None,
               layer: int | None = None) -> FVCosines:
    """Cosines between the top-k function vectors of tasks, and (with ``icl``) between
    each task's function vector and its in-context task vector at ``layer``."""
    names = list(fvs)
    vecs = {t: fvs[t].vector(top_k).numpy() for t in names}
    mat = np.array([[_cos(vecs[a], vecs[b]) for b in names] for a in names])
    data = {"fv_cosine": (("task", "task_b"), mat)}
    if icl is not None:
        if layer is None:
            raise WorkbenchError("give the layer whose in-context task vector to compare with")
        missing = [t for t in names if t not in icl.coord("task")]
        if missing:
            raise WorkbenchError(f"no in-context task vectors for {missing}; computed for {icl.coord('task')}")
        li = icl.coord("layer").index(layer)
        data["fv_vs_icl"] = (("task",), np.array([_cos(vecs[t], icl["delta"][icl.coord("task").index(t), li]) for t in names]))
    params = {"top_k": top_k, "layer": layer, "tasks": names}
    return FVCosines(dims={"task": names, "task_b": names}, data=data, attrs=params, provenance=provenance(params=params))


__all__ = [
    "FVAccuracy", "FVCosines", "FunctionVector", "ICLTaskVectors", "LearnedHeadWeights", "add_vector_accuracy",
    "function_vector", "fv_accuracy", "fv_cosines", "icl_task_vectors", "indirect_effects", "learn_head_weights",
    "mean_head_outputs", "project_heads", "zero_shot_batch",
]
