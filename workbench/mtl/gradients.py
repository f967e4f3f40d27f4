"""Per-task gradients on shared parameters, and the conflict metrics over them.

``task_gradients`` runs one backward pass per task loss over the same forward graph (the
sequential ``backward(retain_graph=True)`` loop of LibMTL, with ``torch.autograd.grad``),
so it costs one forward plus T backwards and holds the T x P Jacobian, no more. Inner
products (the Gramian, cosines, norms) accumulate in float64, per parameter block too.
It returns a :class:`TaskGradients` result; ``conflict_summary`` turns one into a
:class:`ConflictSummary` (cosines, conflict fractions, gradient-magnitude similarity,
overall and per block).

Blocks are the shared names of :mod:`workbench.blocks`: with a layout family (an HF
model: pass ``family=subject.family``) a parameter belongs to ``embed``, ``layer.L``,
``final_norm``, ``unembed`` or ``other``, as in every other lens; without one (a plain
``nn.Module``) to its module path (``trunk.1``).

Representation gradients (``representation_gradients``) are the gradients with respect
to shared *features* instead of parameters, as MGDA-UB uses: cheaper, but a different
quantity, and named as such everywhere (``wrt="representation"``).
"""

from __future__ import annotations

import numbers
from functools import lru_cache
from typing import Iterable, Mapping, Sequence

import numpy as np
import torch

from workbench.blocks import block_of, block_order
from workbench.errors import WorkbenchError
from workbench.layout import FAMILIES, Family
from workbench.memory import check_budget
from workbench.results import Result, provenance, register
from workbench.stats import cosine_from_gramian


def shared_parameters(module: torch.nn.Module, prefix: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters of ``module`` (optionally only names starting with ``prefix``)."""
    if not isinstance(module, torch.nn.Module):
        raise WorkbenchError(f"shared_parameters takes a torch.nn.Module, got {type(module).__name__}")
    if prefix is not None and not isinstance(prefix, str):
        raise WorkbenchError(f"prefix must be a string (the start of the shared parameters' names), got {prefix!r}")
    out = [(n, p) for n, p in module.named_parameters() if p.requires_grad and (prefix is None or n.startswith(prefix))]
    if not out:
        raise WorkbenchError(f"no trainable parameters{' under ' + repr(prefix) if prefix else ''} in {type(module).__name__}")
    return out


def family_of_model(model: torch.nn.Module) -> tuple[Family | None, str]:
    """The layout family of the first HF model inside ``model`` (itself or a submodule
    whose ``config.model_type`` has a layout) and that submodule's name prefix
    (``"trunk."``), or ``(None, "")`` for a model with none (then blocks are module paths)."""
    for name, mod in model.named_modules():
        model_type = getattr(getattr(mod, "config", None), "model_type", None)
        if isinstance(model_type, str):
            fam = next((f for f in FAMILIES.values() if model_type in f.model_types), None)
            if fam is not None:
                return fam, f"{name}." if name else ""
    return None, ""


def parameter_blocks(names: Sequence[str], family: Family | str | None = None, *, depth: int = 2,
                     prefix: str = "") -> tuple[list[str], list[int]]:
    """The blocks of parameters ``names`` (see :func:`workbench.blocks.block_of`) and each
    name's index into them. ``prefix`` is cut from names that start with it before they
    are resolved (the path of an HF model inside a wrapper). With a family the blocks come
    in depth order (embed, layer.0, ..., final_norm, unembed, others); without one in the
    order the parameters come."""
    check_depth(depth)
    named = [block_of(n[len(prefix):] if prefix and n.startswith(prefix) else n, family, depth=depth) for n in names]
    blocks = block_order(named) if family is not None else list(dict.fromkeys(named))
    index = {b: i for i, b in enumerate(blocks)}
    return blocks, [index[b] for b in named]


def check_depth(depth) -> int:
    """``block_depth``: an integer >= 1 (name parts kept for a block without a layout)."""
    if isinstance(depth, bool) or not isinstance(depth, numbers.Integral) or depth < 1:
        raise WorkbenchError(f"block_depth must be an integer >= 1 (name parts that make a block), got {depth!r}")
    return int(depth)


def check_losses(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """At least two scalar, finite losses with a graph; otherwise an error naming the culprit."""
    if losses is None or isinstance(losses, (str, bytes, torch.Tensor)):
        raise WorkbenchError(f"losses must be a list (or dict task -> loss) of scalar tensors, got "
                             f"{type(losses).__name__}")
    losses = list(losses)
    if len(losses) < 2:
        raise WorkbenchError(f"gradient conflicts need at least two task losses, got {len(losses)}")
    if all(isinstance(l, torch.Tensor) and l.numel() == 1 and l.requires_grad for l in losses) and bool(
            torch.isfinite(torch.stack([l.detach().reshape(()) for l in losses])).all()):
        return losses  # the common case, in one check; otherwise find the culprit below
    for i, l in enumerate(losses):
        if not isinstance(l, torch.Tensor) or l.numel() != 1:
            raise WorkbenchError(f"loss {i} must be a scalar tensor, got {type(l).__name__} "
                                 f"{tuple(l.shape) if isinstance(l, torch.Tensor) else ''}")
        if not torch.isfinite(l).all():
            raise WorkbenchError(f"loss {i} is {float(l.detach())}: not finite; check the inputs or lower the learning rate")
        if not l.requires_grad:
            raise WorkbenchError(f"loss {i} does not depend on any trainable parameter (no graph)")
    return losses


def host_values(losses: Sequence[torch.Tensor]) -> list[float]:
    """The losses' values as floats, read from the device in one transfer (not one per task)."""
    return torch.stack([l.detach().reshape(()).double().to(losses[0].device) for l in losses]).tolist()


CHUNK = 4096
GROUP = 256  # chunks per batched product: bounds any temporary to T x 1M floats


def gram64(part: torch.Tensor) -> np.ndarray:
    """J J^T of a [T, n] float32 slice, accurate to float64 without a float64 copy: float32
    products over chunks of 4096 entries (short sums, small rounding error), the chunk
    results summed in float64. The chunks go through batched matrix products, up to
    ``GROUP`` chunks at a time, instead of one Python iteration each."""
    if not isinstance(part, torch.Tensor) or part.ndim != 2:
        raise WorkbenchError(f"gram64 takes a [tasks, entries] tensor, got "
                             f"{tuple(part.shape) if isinstance(part, torch.Tensor) else type(part).__name__}")
    return gram64_tensor(part).cpu().numpy()


def gram64_tensor(part: torch.Tensor) -> torch.Tensor:
    """:func:`gram64` left on ``part``'s device (float64 [T, T]), for callers that add
    several of them up before reading the sum to the host once."""
    T, n = part.shape
    if n <= CHUNK:
        return (part @ part.T).double()
    out = torch.zeros(T, T, dtype=torch.float64, device=part.device)
    full = n // CHUNK * CHUNK
    for c in range(0, full, GROUP * CHUNK):
        stop = min(c + GROUP * CHUNK, full)
        blk = part[:, c:stop].reshape(T, -1, CHUNK).transpose(0, 1)  # [chunks, T, CHUNK], a view
        out += torch.bmm(blk, blk.transpose(1, 2)).double().sum(0)
    if full < n:
        rest = part[:, full:]
        out += (rest @ rest.T).double()
    return out


SMALL = 1 << 20  # T * P entries up to which the Gramians come from one float64 copy of J


def block_gramians(jac: torch.Tensor, block_index: Sequence[int], sizes: Sequence[int], n_blocks: int) -> np.ndarray:
    """[B, T, T] float64 Gramians of the column blocks of ``jac`` (parameter i has
    ``sizes[i]`` columns and belongs to block ``block_index[i]``), one product per run of
    consecutive parameters of the same block. A small Jacobian (up to ``SMALL`` entries,
    8 MB in float64) is copied to float64 once and multiplied exactly: per-step monitoring of
    a small model is dominated by per-operation overhead, not arithmetic. A larger one goes
    through ``gram64`` (float32 chunks summed in float64, no float64 copy)."""
    if not isinstance(jac, torch.Tensor) or jac.ndim != 2:
        raise WorkbenchError(f"block_gramians takes a [tasks, params] Jacobian, got "
                             f"{tuple(jac.shape) if isinstance(jac, torch.Tensor) else type(jac).__name__}")
    if len(block_index) != len(sizes) or sum(sizes) != jac.shape[1]:
        raise WorkbenchError(f"block_gramians: {len(sizes)} parameter sizes summing to {sum(sizes)} for "
                             f"{len(block_index)} block indices and a Jacobian of {jac.shape[1]} columns; "
                             "they must agree")
    if any(not 0 <= b < n_blocks for b in block_index):
        raise WorkbenchError(f"block_gramians: block indices must lie in 0..{n_blocks - 1}, got "
                             f"{sorted(set(block_index))}")
    T, P = jac.shape
    small = T * P <= SMALL
    src = jac.double() if small else jac
    out = torch.zeros(n_blocks, T, T, dtype=torch.float64, device=jac.device)  # summed on the device, read once
    off = start = 0
    for i, (bi, n) in enumerate(zip(block_index, sizes)):
        off += n
        if i == len(sizes) - 1 or block_index[i + 1] != bi:
            part = src[:, start:off]
            out[bi] += (part @ part.T) if small else gram64_tensor(part)
            start = off
    return out.cpu().numpy()


def jacobian(losses: Sequence[torch.Tensor], tensors: Sequence[torch.Tensor], *, retain_graph: bool = False,
             extra: Sequence[torch.nn.Parameter] = (), reached: list | None = None) -> tuple[torch.Tensor, list | None]:
    """The [T, P] float32 matrix of per-task gradients of (checked) ``losses`` on
    ``tensors``, one ``autograd.grad`` per loss over the shared graph; and, for the
    ``extra`` parameters, the gradient of the summed loss from the same passes (None where
    no loss reaches one; None in all when ``extra`` is empty). A loss that reaches none of
    ``tensors`` is an error, unless ``reached`` (a list of T flags) is given: then its
    row is zero and ``reached[t]`` is set for each loss that reaches some tensor."""
    if not tensors:
        raise WorkbenchError("no shared parameters given: the Jacobian needs at least one tensor")
    sizes = [p.numel() for p in tensors]
    T, P = len(losses), sum(sizes)
    extra = list(extra)
    extra_sum: list = [None] * len(extra)
    jac = torch.empty(T, P, dtype=torch.float32, device=tensors[0].device)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, list(tensors) + extra, retain_graph=retain_graph or t < T - 1,
                                    allow_unused=True)
        grads, more = grads[: len(tensors)], grads[len(tensors):]
        if reached is not None:
            reached[t] = reached[t] or any(g is not None for g in grads)
        elif all(g is None for g in grads):
            raise WorkbenchError(f"loss {t} does not depend on the shared parameters: its gradient there is undefined")
        torch.cat([g.reshape(-1) if g is not None else torch.zeros(n, dtype=jac.dtype, device=jac.device)
                   for g, n in zip(grads, sizes)], out=jac[t])
        for i, g in enumerate(more):
            if g is not None:
                extra_sum[i] = g if extra_sum[i] is None else extra_sum[i] + g
    return jac, (extra_sum if extra else None)


@lru_cache(maxsize=16)
def _triu(T: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(T, 1)


def check_stacked(g, what: str, *, finite: bool) -> np.ndarray:
    """``g`` as a float64 array [N, T, T] (N stacked square matrices); otherwise an error
    saying what is accepted. With ``finite``, NaN or inf entries are refused too."""
    g = np.asarray(g, dtype=np.float64)
    if g.ndim != 3 or g.shape[1] != g.shape[2] or g.shape[1] < 1:
        raise WorkbenchError(f"{what} must be N stacked square [T, T] matrices, shape [N, T, T], got shape "
                             f"{g.shape}{'; add an axis (g[None]) for one' if g.ndim == 2 else ''}")
    if finite and not np.isfinite(g).all():
        raise WorkbenchError(f"{what} hold NaN or inf entries: the gradients they come from are not finite")
    return g


def conflict_fractions(cos: np.ndarray) -> np.ndarray:
    """Conflict fractions [N] of stacked cosines [N, T, T]: the share of task pairs whose
    cosine is < 0, pairs with a zero gradient (NaN cosine) left out (0 when none is left)."""
    cos = check_stacked(cos, "cosines", finite=False)
    iu = _triu(cos.shape[-1])
    pairs = cos[:, iu[0], iu[1]]
    valid = (~np.isnan(pairs)).sum(1)
    return np.divide((pairs < 0).sum(1), valid, out=np.zeros(len(pairs)), where=valid > 0)  # NaN compares False


def cosines_and_conflicts(g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cosines [N, T, T] and conflict fractions [N] of N stacked Gramians [N, T, T] (the
    trainer runs this at every monitored step)."""
    g = check_stacked(g, "Gramians", finite=True)
    cos = cosine_from_gramian(g)
    return cos, conflict_fractions(cos)


def mean_pair_cosine(cos: np.ndarray) -> np.ndarray:
    """Mean cosine over the task pairs (i < j) of [..., T, T] cosines, NaN pairs left out
    (NaN when none is left)."""
    cos = np.asarray(cos, dtype=np.float64)
    if cos.ndim < 2 or cos.shape[-1] != cos.shape[-2]:
        raise WorkbenchError(f"cosines must be [..., T, T] square matrices, got shape {cos.shape}")
    iu = _triu(cos.shape[-1])
    pairs = cos[..., iu[0], iu[1]]
    valid = ~np.isnan(pairs)
    n = valid.sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(n > 0, np.where(valid, pairs, 0).sum(-1) / n, np.nan)


def magnitude_similarity(g: np.ndarray) -> np.ndarray:
    """Gradient-magnitude similarity 2|gi||gj| / (|gi|^2 + |gj|^2) [..., T, T] from
    Gramians [..., T, T] (1: equal norms; NaN for two zero gradients)."""
    g = np.asarray(g, dtype=np.float64)
    if g.ndim < 2 or g.shape[-1] != g.shape[-2]:
        raise WorkbenchError(f"Gramians must be [..., T, T] square matrices, got shape {g.shape}")
    sq = np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0, None)
    n = np.sqrt(sq)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * n[..., :, None] * n[..., None, :] / (sq[..., :, None] + sq[..., None, :])


def _norms(g: np.ndarray) -> np.ndarray:
    return np.sqrt(np.clip(np.diagonal(g, axis1=-2, axis2=-1), 0, None))


def named_parameters(params) -> list[tuple[str, torch.Tensor]]:
    """``params`` as (name, tensor) pairs: each given as a pair or a bare tensor (named
    ``param{i}``), every one a tensor that requires grad, none twice; otherwise an error
    naming the culprit."""
    if isinstance(params, torch.nn.Module):
        raise WorkbenchError(f"params must be (name, parameter) pairs or parameters, got a {type(params).__name__} "
                             "module; pass shared_parameters(model, prefix) or list(module.named_parameters())")
    if params is None or isinstance(params, (str, bytes, torch.Tensor)):
        raise WorkbenchError(f"params must be a list of (name, parameter) pairs or parameters, got "
                             f"{type(params).__name__}")
    named, seen = [], {}
    for i, p in enumerate(params):
        if isinstance(p, torch.Tensor):
            p = (f"param{i}", p)
        if not (isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) and isinstance(p[1], torch.Tensor)):
            raise WorkbenchError(f"parameter {i} must be a tensor or a (name, tensor) pair, got {type(p).__name__}")
        name, t = p
        if not t.requires_grad:
            raise WorkbenchError(f"parameter {name!r} does not require grad: it is frozen or detached, so it has no "
                                 "gradient; pass trainable parameters only")
        if id(t) in seen:
            raise WorkbenchError(f"parameter {name!r} is given twice (also as {seen[id(t)]!r}); each shared "
                                 "parameter must appear once, or its gradient counts double")
        seen[id(t)] = name
        named.append((name, t))
    if not named:
        raise WorkbenchError("no shared parameters given")
    return named


def check_tensors(tensors, what: str) -> list[torch.Tensor]:
    """A list of tensors that require grad (``extra`` parameters, shared features)."""
    out = list(tensors) if isinstance(tensors, (list, tuple)) or not isinstance(tensors, torch.Tensor) else [tensors]
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor) or not t.requires_grad:
            got = "a tensor that does not require grad" if isinstance(t, torch.Tensor) else type(t).__name__
            raise WorkbenchError(f"{what}[{i}] must be a tensor that requires grad, got {got}")
    return out


@register("task_gradients")
class TaskGradients(Result):
    """Per-task gradients over shared parameters (or shared features), as inner products.

    Variables (float64): ``gramian`` [task, task_b] (inner products of the T gradients),
    ``block_gramian`` [block, task, task_b] (the same per parameter block; they sum to
    ``gramian``), ``norm`` [task], ``block_norm`` [block, task], ``cosine`` [task, task_b],
    ``block_cosine`` [block, task, task_b] (NaN where a gradient is zero), ``loss`` [task];
    ``block_size`` [block] (int64, entries per block). ``attrs["wrt"]``: ``"parameters"``
    or ``"representation"``.

    Not saved: ``jacobian``, the [T, P] float32 tensor itself (mode ``"jacobian"``, for an
    aggregator; None in Gramian-only mode and on a loaded result), and ``extra_grads``.
    """

    jacobian: torch.Tensor | None = None
    extra_grads: list | None = None

    @property
    def wrt(self) -> str:
        return self.attrs["wrt"]

    @property
    def blocks(self) -> list[str]:
        return self.coord("block")

    @property
    def n_tasks(self) -> int:
        return len(self.coord("task"))


def _task_names(losses, tasks) -> tuple[list, list[torch.Tensor]]:
    if losses is None or isinstance(losses, (str, bytes, torch.Tensor)):
        raise WorkbenchError(f"losses must be a list (or dict task -> loss) of scalar tensors, got "
                             f"{type(losses).__name__}")
    if isinstance(losses, Mapping):
        names, losses = list(losses), list(losses.values())
    else:
        losses = list(losses)
        names = list(range(len(losses)))
    if tasks is not None:
        names = list(tasks)
        if len(names) != len(losses) or len(set(map(str, names))) != len(names):
            raise WorkbenchError(f"tasks must name each of the {len(losses)} losses once, got {names}")
    return names, losses


def _gradients_result(jac: torch.Tensor | None, bg: np.ndarray, losses: Sequence[float], *, tasks: Sequence,
                      blocks: Sequence[str], block_size: Sequence[int], wrt: str, params: dict) -> TaskGradients:
    """A :class:`TaskGradients` from block Gramians [B, T, T] (the Jacobian kept as the
    unsaved ``jacobian`` field when given)."""
    gram = bg.sum(0)
    res = TaskGradients(
        dims={"task": tasks, "task_b": tasks, "block": blocks},
        data={
            "gramian": (("task", "task_b"), gram), "block_gramian": (("block", "task", "task_b"), bg),
            "norm": (("task",), _norms(gram)), "block_norm": (("block", "task"), _norms(bg)),
            "cosine": (("task", "task_b"), cosine_from_gramian(gram)),
            "block_cosine": (("block", "task", "task_b"), cosine_from_gramian(bg)),
            "loss": (("task",), np.asarray(losses, dtype=np.float64)),
            "block_size": (("block",), np.asarray(block_size, dtype=np.int64)),
        },
        attrs={**params, "wrt": wrt}, provenance=provenance(None, params=params),
    )
    res.jacobian = jac
    return res


def jacobian_bytes(n_tasks: int, tensors: Sequence[torch.Tensor]) -> int:
    """Bytes ``task_gradients`` adds on top of the forward graph: the [T, P] float32
    Jacobian and one task's gradient in the parameters' dtype."""
    return 4 * n_tasks * sum(p.numel() for p in tensors) + sum(p.numel() * p.element_size() for p in tensors)


def parameter_groups(n_tasks: int, tensors: Sequence[torch.Tensor], max_bytes: int) -> list[list[int]]:
    """Consecutive groups of ``tensors`` (indices) whose per-task gradients
    (:func:`jacobian_bytes`) each fit ``max_bytes``, as few as greedy packing gives; one
    tensor that alone does not fit is refused with its estimate."""
    groups: list[list[int]] = [[]]
    used = 0
    for i, p in enumerate(tensors):
        need = jacobian_bytes(n_tasks, [p])
        check_budget(need, max_bytes, f"the per-task gradients of one parameter ({tuple(p.shape)}, {n_tasks} tasks)",
                     "raise max_bytes: a parameter is the smallest group the Gramian is taken over")
        if used + need > max_bytes and groups[-1]:
            groups.append([])
            used = 0
        groups[-1].append(i)
        used += need
    return groups


def task_gradients(
    losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor],
    params: Iterable[tuple[str, torch.nn.Parameter]] | Iterable[torch.nn.Parameter],
    *,
    tasks: Sequence | None = None,
    mode: str = "jacobian",
    family: Family | str | None = None,
    block_depth: int = 2,
    retain_graph: bool = False,
    extra: Sequence[torch.nn.Parameter] = (),
    max_bytes: int | None = None,
) -> TaskGradients:
    """Per-task gradients of ``losses`` on ``params`` (one backward per task over the
    shared forward graph) as a :class:`TaskGradients` result: float64 Gramians overall and
    per block, norms, cosines.

    ``losses``: a list (tasks ``0..T-1``, or named by ``tasks``) or a dict task -> loss.
    ``params``: (name, parameter) pairs (or bare parameters). ``family``: the layout
    family of the model the names come from (``subject.family``): blocks are then
    ``embed``, ``layer.L``, ``final_norm``, ``unembed``; without one, module paths cut
    after the first layer index or ``block_depth`` parts.
    ``mode="jacobian"`` keeps the [T, P] float32 matrix as the (unsaved) ``jacobian``
    field, for an aggregator; ``mode="gramian"`` drops it once the products are taken.
    ``extra``: parameters outside the Jacobian (e.g. task heads) whose gradient of the
    *summed* loss is wanted too, from the same T backward passes (``extra_grads``).
    ``max_bytes``: the memory budget for what this call adds to the forward graph (the
    T x P float32 Jacobian plus one task's gradient, :func:`jacobian_bytes`). In
    ``"gramian"`` mode a Jacobian over the budget is never built: the parameters are cut
    into consecutive groups whose [T, group] Jacobian fits (:func:`parameter_groups`), and
    the Gramians are summed over the groups, at the cost of T backward passes per group
    (``attrs["parameter_groups"]``), so memory no longer grows with T x P. In
    ``"jacobian"`` mode, or when one parameter alone does not fit, the request is refused
    before any backward pass, with the estimate. None: no limit.
    """
    if mode not in ("jacobian", "gramian"):
        raise WorkbenchError(f"mode must be 'jacobian' or 'gramian', got {mode!r}")
    check_depth(block_depth)
    names, losses = _task_names(losses, tasks)
    losses = check_losses(losses)
    named = named_parameters(params)
    tensors = [p for _, p in named]
    extra = check_tensors(extra, "extra")
    blocks, block_index = parameter_blocks([n for n, _ in named], family, depth=block_depth)
    sizes = [p.numel() for p in tensors]
    T = len(losses)
    need = jacobian_bytes(T, tensors)
    if mode == "jacobian" or max_bytes is None or need <= max_bytes:
        check_budget(need, max_bytes, f"per-task gradients of {T} tasks on {sum(sizes):,} parameters (the [T, P] "
                     "float32 Jacobian and one task's gradient)",
                     "use mode='gramian' (the products are taken over parameter groups that fit, at one backward "
                     "pass per task and group), pass fewer shared parameters or tasks, or raise max_bytes")
        jac, extra_grads = jacobian(losses, tensors, retain_graph=retain_graph, extra=extra)
        bg = block_gramians(jac, block_index, sizes, len(blocks))
        n_groups = 1
    else:
        groups = parameter_groups(T, tensors, max_bytes)
        n_groups = len(groups)
        bg = np.zeros((len(blocks), T, T))
        reached = [False] * T
        extra_grads = None
        for gi, idx in enumerate(groups):
            part, more = jacobian(losses, [tensors[i] for i in idx], retain_graph=retain_graph or gi < n_groups - 1,
                                  extra=extra if gi == 0 else (), reached=reached)
            bg += block_gramians(part, [block_index[i] for i in idx], [sizes[i] for i in idx], len(blocks))
            extra_grads = more if gi == 0 else extra_grads
            del part
        if not all(reached):
            raise WorkbenchError(f"loss {reached.index(False)} does not depend on the shared parameters: its "
                                 "gradient there is undefined")
        jac = None
    block_size = np.bincount(block_index, weights=sizes, minlength=len(blocks)).astype(np.int64)
    fam = family if family is None or isinstance(family, str) else family.name
    settings = {"mode": mode, "family": fam, "block_depth": block_depth, "n_params": int(sum(sizes)),
                "parameter_groups": n_groups}
    res = _gradients_result(jac if mode == "jacobian" else None, bg, host_values(losses), tasks=names,
                            blocks=blocks, block_size=block_size, wrt="parameters", params=settings)
    res.extra_grads = extra_grads
    return res


def representation_gradients(losses: Sequence[torch.Tensor] | Mapping[str, torch.Tensor], features: torch.Tensor, *,
                             tasks: Sequence | None = None, retain_graph: bool = False) -> TaskGradients:
    """Per-task gradients with respect to shared ``features`` (e.g. the trunk's output),
    flattened over the batch: the MGDA-UB quantity, one block ``features``,
    ``attrs["wrt"] == "representation"``; the Jacobian is kept as ``jacobian``."""
    if not isinstance(features, torch.Tensor) or not features.requires_grad:
        got = "a tensor that does not require grad" if isinstance(features, torch.Tensor) else type(features).__name__
        raise WorkbenchError(f"features must be a tensor the losses were computed from (requiring grad, e.g. the "
                             f"trunk's output), got {got}")
    names, losses = _task_names(losses, tasks)
    losses = check_losses(losses)
    T = len(losses)
    rows = []
    for t, loss in enumerate(losses):
        (g,) = torch.autograd.grad(loss, [features], retain_graph=retain_graph or t < T - 1, allow_unused=True)
        if g is None:
            raise WorkbenchError(f"loss {t} does not depend on the shared features")
        rows.append(g.reshape(-1).float())
    jac = torch.stack(rows)
    return _gradients_result(jac, gram64(jac)[None], host_values(losses), tasks=names,
                            blocks=["features"], block_size=[jac.shape[1]], wrt="representation",
                            params={"mode": "jacobian", "n_features": int(jac.shape[1])})


@register("conflict_summary")
class ConflictSummary(Result):
    """Gradient conflict between tasks, overall and per block.

    Variables: ``cosine`` and ``magnitude_similarity`` [task, task_b] (gradient-magnitude
    similarity 2|gi||gj| / (|gi|^2 + |gj|^2)); ``block_cosine`` and
    ``block_magnitude_similarity`` [block, task, task_b]; ``block_conflict_fraction``
    (share of task pairs with cosine < 0, pairs with a zero gradient left out) and
    ``block_mean_cosine`` [block]. The overall conflict fraction and mean cosine are the
    properties ``conflict_fraction`` / ``mean_cosine`` (computed from ``cosine`` the same
    way). ``block_frame()``: one row per block, to join other lenses' per-block frames.
    """

    @property
    def wrt(self) -> str:
        return self.attrs["wrt"]

    @property
    def conflict_fraction(self) -> float:
        return float(conflict_fractions(self["cosine"][None])[0])

    @property
    def mean_cosine(self) -> float:
        return float(mean_pair_cosine(self["cosine"]))

    def block_frame(self):
        """Per block: ``block``, ``conflict_fraction``, ``mean_cosine`` (a pandas frame)."""
        return self.to_frame(["block_conflict_fraction", "block_mean_cosine"]).rename(
            columns={"block_conflict_fraction": "conflict_fraction", "block_mean_cosine": "mean_cosine"})


def conflict_summary(tg: TaskGradients) -> ConflictSummary:
    """Pairwise cosines, conflict fractions and gradient-magnitude similarity of a
    :class:`TaskGradients` result (fresh or loaded), overall and per block (one vectorised
    pass over the stacked Gramians)."""
    if not isinstance(tg, Result) or "block_gramian" not in tg:
        raise WorkbenchError(f"conflict_summary takes a task_gradients result, got {type(tg).__name__}")
    g = np.concatenate([tg["gramian"][None], tg["block_gramian"]])  # [1 + B, T, T]
    cos, frac = cosines_and_conflicts(g)
    gms = magnitude_similarity(g)
    tasks = tg.coord("task")
    return ConflictSummary(
        dims={"task": tasks, "task_b": tasks, "block": tg.coord("block")},
        data={
            "cosine": (("task", "task_b"), cos[0]), "magnitude_similarity": (("task", "task_b"), gms[0]),
            "block_cosine": (("block", "task", "task_b"), cos[1:]),
            "block_magnitude_similarity": (("block", "task", "task_b"), gms[1:]),
            "block_conflict_fraction": (("block",), frac[1:]),
            "block_mean_cosine": (("block",), mean_pair_cosine(cos[1:])),
        },
        attrs={"wrt": tg.attrs.get("wrt", "parameters")}, provenance=tg.provenance,
    )


__all__ = [
    "ConflictSummary", "TaskGradients", "block_gramians", "check_depth", "check_losses", "check_stacked",
    "check_tensors", "conflict_fractions", "conflict_summary", "cosines_and_conflicts", "family_of_model", "gram64",
    "jacobian", "jacobian_bytes", "magnitude_similarity", "mean_pair_cosine", "named_parameters", "parameter_blocks",
    "parameter_groups",
    "representation_gradients", "shared_parameters", "task_gradients",
]
