"""Per-task gradients on shared parameters, and the conflict metrics over them.

``task_gradients`` runs one backward pass per task loss over the same forward graph (the
sequential ``backward(retain_graph=True)`` loop of LibMTL, with ``torch.autograd.grad``),
so it costs one forward plus T backwards and holds the T x P Jacobian, no more. Inner
products (the Gramian, cosines, norms) accumulate in float64, per parameter block too.

Representation gradients (``representation_gradients``) are the gradients with respect
to shared *features* instead of parameters, as MGDA-UB uses: cheaper, but a different
quantity, and named as such everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError


def shared_parameters(module: torch.nn.Module, prefix: str | None = None) -> list[tuple[str, torch.nn.Parameter]]:
    """Trainable parameters of ``module`` (optionally only names starting with ``prefix``)."""
    out = [(n, p) for n, p in module.named_parameters() if p.requires_grad and (prefix is None or n.startswith(prefix))]
    if not out:
        raise WorkbenchError(f"no trainable parameters{' under ' + repr(prefix) if prefix else ''} in {type(module).__name__}")
    return out


@lru_cache(maxsize=65536)
def block_of(name: str, depth: int = 2) -> str:
    """Group parameter names into blocks: up to the first layer index
    (``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.3``), else the first
    ``depth`` name parts that are not weight/bias (``head.0``, ``trunk.fc1``)."""
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:depth]) or name


@dataclass
class TaskGradients:
    """Per-task gradients over shared parameters.

    ``jacobian``: [T, P] float32 (None in Gramian-only mode); ``gramian``: [T, T] float64;
    ``block_gramians``: [B, T, T] float64 over ``blocks`` (parameter groups);
    ``losses``: the T loss values; ``kind``: ``"parameters"`` or ``"representation"``.
    """

    jacobian: torch.Tensor | None
    gramian: np.ndarray
    block_gramians: np.ndarray
    blocks: list[str]
    losses: np.ndarray
    kind: str = "parameters"
    extra_grads: list | None = None  # summed over tasks, for the ``extra`` parameters

    @property
    def n_tasks(self) -> int:
        return self.gramian.shape[0]

    @property
    def norms(self) -> np.ndarray:
        return np.sqrt(np.clip(np.diag(self.gramian), 0, None))

    def cosines(self) -> np.ndarray:
        return cosine_from_gramian(self.gramian)

    def block_cosines(self) -> np.ndarray:
        return np.stack([cosine_from_gramian(g) for g in self.block_gramians])


def cosine_from_gramian(g: np.ndarray) -> np.ndarray:
    n = np.sqrt(np.clip(np.diag(g), 0, None))
    with np.errstate(invalid="ignore", divide="ignore"):
        c = g / np.outer(n, n)
    return np.where(np.outer(n, n) > 0, c, np.nan)


def _check_losses(losses: Sequence[torch.Tensor]) -> list[torch.Tensor]:
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


CHUNK = 4096


GROUP = 256  # chunks per batched product: bounds any temporary to T x 1M floats


def _gram64(part: torch.Tensor) -> np.ndarray:
    """J J^T of a [T, n] float32 slice, accurate to float64 without a float64 copy: float32
    products over chunks of 4096 entries (short sums, small rounding error), the chunk
    results summed in float64. The chunks go through batched matrix products, up to
    ``GROUP`` chunks at a time, instead of one Python iteration each."""
    T, n = part.shape
    if n <= CHUNK:
        return (part @ part.T).double().cpu().numpy()
    out = torch.zeros(T, T, dtype=torch.float64, device=part.device)
    full = n // CHUNK * CHUNK
    for c in range(0, full, GROUP * CHUNK):
        stop = min(c + GROUP * CHUNK, full)
        blk = part[:, c:stop].reshape(T, -1, CHUNK).transpose(0, 1)  # [chunks, T, CHUNK], a view
        out += torch.bmm(blk, blk.transpose(1, 2)).double().sum(0)
    if full < n:
        rest = part[:, full:]
        out += (rest @ rest.T).double()
    return out.cpu().numpy()


SMALL = 1 << 20  # T * P entries up to which the Gramians come from one float64 copy of J


def _block_gramians(jac: torch.Tensor, block_idx: tuple, sizes: tuple, n_blocks: int) -> np.ndarray:
    """[B, T, T] float64 Gramians of the column blocks of ``jac``, one product per run of
    consecutive parameters of the same block. A small Jacobian (up to ``SMALL`` entries,
    8 MB in float64) is copied to float64 once and multiplied exactly: per-step monitoring of
    a small model is dominated by per-operation overhead, not arithmetic. A larger one goes
    through ``_gram64`` (float32 chunks summed in float64, no float64 copy)."""
    T, P = jac.shape
    small = T * P <= SMALL
    src = jac.double() if small else jac
    out = torch.zeros(n_blocks, T, T, dtype=torch.float64) if small else np.zeros((n_blocks, T, T))
    off = start = 0
    for i, (bi, n) in enumerate(zip(block_idx, sizes)):
        off += n
        if i == len(sizes) - 1 or block_idx[i + 1] != bi:
            part = src[:, start:off]
            if small:
                out[bi] += (part @ part.T).cpu()
            else:
                out[bi] += _gram64(part)
            start = off
    return out.numpy() if small else out


def task_gradients(
    losses: Sequence[torch.Tensor],
    params: Iterable[tuple[str, torch.nn.Parameter]] | Iterable[torch.nn.Parameter],
    *,
    mode: str = "jacobian",
    block_depth: int = 2,
    retain_graph: bool = False,
    extra: Sequence[torch.nn.Parameter] = (),
) -> TaskGradients:
    """The T x P matrix of per-task gradients of ``losses`` on ``params`` (one backward per
    task over the shared forward graph), with float64 Gramians overall and per block.

    ``mode="gramian"`` drops the Jacobian after the inner products are taken.
    ``extra``: parameters outside the Jacobian (e.g. task heads) whose gradient of the
    *summed* loss is wanted too; it comes from the same T backward passes
    (``extra_grads``, None where no loss reaches a parameter), so a trainer needs no
    further backward for them.
    """
    if mode not in ("jacobian", "gramian"):
        raise WorkbenchError(f"mode must be 'jacobian' or 'gramian', got {mode!r}")
    losses = _check_losses(losses)
    named = [(f"param{i}", p) if isinstance(p, torch.Tensor) else p for i, p in enumerate(params)]
    if not named:
        raise WorkbenchError("no shared parameters given")
    tensors = [p for _, p in named]
    blocks: list[str] = []
    block_idx = []
    for n, _ in named:
        b = block_of(n, block_depth)
        if b not in blocks:
            blocks.append(b)
        block_idx.append(blocks.index(b))
    sizes = [p.numel() for p in tensors]
    T, P = len(losses), sum(sizes)
    extra = list(extra)
    extra_sum: list = [None] * len(extra)
    jac = torch.empty(T, P, dtype=torch.float32, device=tensors[0].device)
    for t, loss in enumerate(losses):
        grads = torch.autograd.grad(loss, tensors + extra, retain_graph=retain_graph or t < T - 1, allow_unused=True)
        grads, more = grads[: len(tensors)], grads[len(tensors) :]
        if all(g is None for g in grads):
            raise WorkbenchError(f"loss {t} does not depend on the shared parameters: its gradient there is undefined")
        torch.cat([g.reshape(-1) if g is not None else torch.zeros(n, dtype=jac.dtype, device=jac.device)
                   for g, n in zip(grads, sizes)], out=jac[t])
        for i, g in enumerate(more):
            if g is not None:
                extra_sum[i] = g if extra_sum[i] is None else extra_sum[i] + g
    bg = _block_gramians(jac, tuple(block_idx), tuple(sizes), len(blocks))
    gram = bg.sum(0)
    return TaskGradients(
        jacobian=jac if mode == "jacobian" else None, gramian=gram, block_gramians=bg, blocks=blocks,
        losses=np.asarray([float(l.detach()) for l in losses]), extra_grads=extra_sum if extra else None,
    )


def representation_gradients(losses: Sequence[torch.Tensor], features: torch.Tensor, *, retain_graph: bool = False
                             ) -> TaskGradients:
    """Per-task gradients with respect to shared ``features`` (e.g. the trunk's output),
    flattened over the batch: the MGDA-UB quantity. ``kind`` is ``"representation"``."""
    losses = _check_losses(losses)
    T = len(losses)
    rows = []
    for t, loss in enumerate(losses):
        (g,) = torch.autograd.grad(loss, [features], retain_graph=retain_graph or t < T - 1, allow_unused=True)
        if g is None:
            raise WorkbenchError(f"loss {t} does not depend on the shared features")
        rows.append(g.reshape(-1).float())
    jac = torch.stack(rows)
    gram = _gram64(jac)
    return TaskGradients(jacobian=jac, gramian=gram, block_gramians=gram[None], blocks=["features"],
                         losses=np.asarray([float(l.detach()) for l in losses]), kind="representation")


@lru_cache(maxsize=16)
def _triu(T: int) -> tuple[np.ndarray, np.ndarray]:
    return np.triu_indices(T, 1)


def _cosines_and_conflicts(g: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Cosines [N, T, T] and conflict fractions (share of task pairs with cosine < 0, pairs
    with a zero gradient left out) of N stacked Gramians: the part of ``conflict_summary``
    the trainer's history keeps (it runs at every monitored step)."""
    T = g.shape[1]
    n = np.sqrt(np.clip(np.diagonal(g, axis1=1, axis2=2), 0, None))
    nn = n[:, :, None] * n[:, None, :]
    cos = np.full_like(g, np.nan)
    np.divide(g, nn, out=cos, where=nn > 0)
    iu = _triu(T)
    pairs = cos[:, iu[0], iu[1]]
    valid = (nn[:, iu[0], iu[1]] > 0).sum(1)
    neg = (pairs < 0).sum(1)  # NaN compares False
    return cos, [float(a / b) if b else 0.0 for a, b in zip(neg, valid)]


def conflict_summary(tg: TaskGradients) -> dict:
    """Pairwise cosines, the fraction of conflicting pairs (cosine < 0), gradient-magnitude
    similarity (2|gi||gj| / (|gi|^2 + |gj|^2)), overall and per block (all of them in one
    vectorised pass over the stacked Gramians)."""
    g = np.concatenate([tg.gramian[None], tg.block_gramians])  # [1 + B, T, T]
    cos, frac = _cosines_and_conflicts(g)
    n = np.sqrt(np.clip(np.einsum("bii->bi", g), 0, None))  # [1 + B, T]
    with np.errstate(invalid="ignore", divide="ignore"):
        gms = 2 * n[:, :, None] * n[:, None, :] / (n[:, :, None] ** 2 + n[:, None, :] ** 2)
    iu = _triu(g.shape[1])
    pairs = cos[:, iu[0], iu[1]]  # [1 + B, pairs]
    valid = ~np.isnan(pairs)
    n_valid = valid.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(n_valid > 0, np.where(valid, pairs, 0).sum(1) / n_valid, np.nan)

    def one(b):
        return {"cosine": cos[b], "conflict_fraction": float(frac[b]), "magnitude_similarity": gms[b],
                "mean_cosine": float(mean[b])}

    out = one(0)
    out["blocks"] = {name: one(b + 1) for b, name in enumerate(tg.blocks)}
    out["kind"] = tg.kind
    return out
