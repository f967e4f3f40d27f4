"""Merging task vectors: one arithmetic for every method, and the driver that streams it.

``merge(base, task_vectors, method=...)`` returns the merged state dict:

========================= =================================================================
method                    per tensor, with deltas d_t and weights w_t
========================= =================================================================
``task_arithmetic``       base + lam * sum_t w_t d_t
``ties``                  trim each d_t to its top ``density`` fraction by magnitude, elect
                          the sign of sum_t w_t d_t per entry, disjoint mean of the weighted
                          entries that agree with it (divided by the sum of their weights)
``dare``                  drop each entry of d_t with probability ``p``, rescale survivors by
                          1/(1-p) (seeded), then task arithmetic
``dare_ties``             DARE's drop-and-rescale in place of TIES's trim, then sign
                          election and the sum of the agreeing weighted entries
========================= =================================================================

One function, :func:`merge_delta`, computes the mixed delta of every method on whole
tensors or on the same slice of each; :func:`merge_tensor` adds it to the base.
:func:`merge` (whatever the tensor size) and the interactive
:class:`~workbench.taskvec.finetune.MergeEvaluator` both call :func:`merge_tensor`, so a
slider shows exactly the model ``merge`` writes.

``weights`` is one number per task vector, or a mapping from tensor name to one number
per task vector (learned per-block coefficients, as aTLAS trains them); ``lam`` scales
the mixed delta. ``normalize`` divides by the weights' sum (task arithmetic, DARE) or
by the sum of the agreeing entries' weights (TIES, DARE-TIES); its default is mergekit
0.1.5's: True for ``ties``, False for the others (``dare_ties`` included).

Conventions (those of mergekit 0.1.5; ``tests/conformance/test_mergekit.py`` compares
the two on the same inputs):

- Arithmetic is in float32 (float64 for a float64 base); the result is cast to the
  base's dtype.
- Weights multiply the deltas before the sign election, so the election sees
  ``w_t d_t`` and a negative weight votes with the sign of ``-d_t``: it subtracts its
  task vector. With ``normalize`` the divisor is the *signed* sum of the agreeing
  weights, as in mergekit; where every agreeing weight is negative that division flips
  the sign back (a lone task vector at weight -1 is added, not subtracted). To subtract
  a task vector under TIES, keep ``normalize=False`` (as ``dare_ties`` does by default).
  A divisor of exactly 0 (agreeing weights that cancel, or no agreeing entry) is
  replaced by 1; for task arithmetic and DARE a weight sum with ``|sum| < 1e-8`` is.
- TIES trim: ``k = max(1, int(density * numel))`` entries are kept per tensor for any
  ``density > 0`` (a small tensor at a low density keeps its largest entry, as mergekit
  does; ``density = 0`` trims everything, ``density >= 1`` nothing). The threshold is
  the k-th largest magnitude, found by ``torch.kthvalue`` (linear-time selection, no
  sort), and every entry whose magnitude is >= the threshold is kept. Where several
  entries tie exactly at the threshold the workbench keeps all of them (the result may
  hold more than k non-zeros and does not depend on the order of the entries), while
  mergekit keeps the first ones in the order of its unstable ``argsort`` until it has
  exactly k. The two agree everywhere except at such exact ties.
- Sign election: an entry whose weighted sum is exactly 0 elects ``+``; zero deltas
  never agree.
- DARE masks: entry i of task vector t's delta for tensor ``key`` is kept when a
  uniform draw is >= p; the draws come in blocks of ``DARE_BLOCK`` entries, each from a
  generator seeded by ``(seed, key, t, block)``. A mask therefore depends only on
  those, never on how the tensor is sliced, and ``merge`` and the evaluator draw the
  same one. mergekit draws from torch's global generator (``torch.bernoulli``), so the
  masks cannot agree bit for bit; given the same mask the arithmetic agrees. mergekit
  0.1.5's ``rescale: true`` rescales each dropped delta to its L1 norm instead of by
  1/(1-p); :func:`~workbench.taskvec.to_mergekit_yaml` writes ``rescale: false`` and
  folds 1/(1-p) into ``lambda``, which is the same merge.

Memory. Tensors are merged in slices of ``CHUNK`` entries, each slice re-read from the
checkpoints: besides the merged state the working set is a few slices per task vector
and, for TIES, one whole delta at a time while its trim threshold is found (first
pass). Every operation is per entry or a reduction over the task axis, so slicing does
not change a single bit of the result.

Bad input raises a :class:`~workbench.errors.WorkbenchError` before anything is
computed or written: an unknown method or parameter, a weight, ``lam``, ``density`` or
``p`` that is NaN, infinite or out of range; a NaN or inf in a checkpoint or task vector
raises naming the tensor, and a merged tensor that overflows its dtype raises, all
before ``out`` is touched. ``out`` is written atomically and an existing non-empty
``out`` is never replaced unless ``overwrite=True``.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from typing import Any, Mapping, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.memory import check_budget
from workbench.safetensors_io import Deferred, check_writable
from workbench.taskvec.checkpoint import Checkpoint, all_finite, check_compatible, check_finite, default_name, write_state
from workbench.taskvec.vectors import TaskVector

METHODS = ("task_arithmetic", "ties", "dare", "dare_ties")
TIES_METHODS = ("ties", "dare_ties")
DARE_METHODS = ("dare", "dare_ties")
CHUNK = 1 << 18  # entries per slice merged at a time (8 task vectors: 8 MB of float32 per slice)
DARE_BLOCK = 1 << 16  # entries per independently seeded block of a DARE drop mask


def default_normalize(method: str) -> bool:
    """mergekit 0.1.5's default: True for ``ties``, False otherwise."""
    return method == "ties"


# ---------------------------------------------------------------------- trim (TIES)


def trim_count(numel: int, density: float) -> int:
    """How many entries TIES keeps of a tensor of ``numel``: ``max(1, int(density * numel))``
    for ``0 < density < 1``, none at ``density <= 0``, all at ``density >= 1``."""
    if density >= 1.0 or numel == 0:
        return numel
    if density <= 0.0:
        return 0
    return min(numel, max(1, int(density * numel)))


def magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, in float32 at least (kthvalue and float8 need it): a new tensor."""
    mag = delta.abs().reshape(-1)
    return mag if mag.dtype in (torch.float32, torch.float64) else mag.float()


def trim_threshold(delta: torch.Tensor, density: float) -> float | None:
    """The magnitude TIES keeps entries at or above: the k-th largest of the whole
    tensor, ``k = trim_count(numel, density)`` (None: keep everything; inf: nothing)."""
    return magnitude_threshold(magnitudes(delta), density)


def magnitude_threshold(mag: torch.Tensor, density: float) -> float | None:
    """:func:`trim_threshold` from the magnitudes ``mag`` (flat, float32 at least) themselves.

    On the CPU the selection runs in place (numpy's introselect reorders ``mag``, so pass
    a copy of your own): ``torch.kthvalue`` would copy the values and build an int64 index
    of the whole tensor, three times the delta's float32 size for a large embedding."""
    n = mag.numel()
    k = trim_count(n, density)
    if k >= n:
        return None
    if k == 0:
        return math.inf
    if mag.device.type == "cpu" and mag.is_contiguous():
        a = mag.numpy()
        a.partition(n - k)
        return float(a[n - k])
    return mag.kthvalue(n - k + 1).values.item()


def trim(delta: torch.Tensor, threshold: float | None) -> torch.Tensor:
    """Zero the entries of ``delta`` (a tensor or a slice) below ``threshold``."""
    if threshold is None:
        return delta
    if threshold == math.inf:
        return torch.zeros_like(delta)
    return delta * (magnitudes(delta) >= threshold).view_as(delta)


def trim_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES's trim of one whole tensor: keep the entries whose magnitude is among the
    top ``density`` fraction (ties at the threshold all kept; see the module docstring)."""
    if not 0.0 <= density <= 1.0:
        raise WorkbenchError(f"density must be in [0, 1], got {density}")
    return trim(delta, trim_threshold(delta, density))


# ---------------------------------------------------------------------- drop (DARE)


def key_seed(seed: int, key: str, t: int, block: int = 0) -> int:
    """The seed of block ``block`` of task vector ``t``'s drop mask for tensor ``key``."""
    h = hashlib.sha256(f"{seed}\x00{key}\x00{t}\x00{block}".encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def dare_keep(numel: int, p: float, *, seed: int, key: str, t: int, lo: int = 0, hi: int | None = None) -> torch.Tensor:
    """Entries ``lo:hi`` (all by default) of the DARE keep mask (bool, flat) of task
    vector ``t`` for tensor ``key`` of ``numel`` entries: kept where a uniform draw is
    >= ``p``, so each entry survives with probability 1 - p, independently."""
    if not 0.0 <= p < 1.0:
        raise WorkbenchError(f"DARE drop probability p must be in [0, 1), got {p}")
    hi = numel if hi is None else min(hi, numel)
    lo = max(0, lo)
    if p == 0.0 or hi <= lo:
        return torch.ones(max(0, hi - lo), dtype=torch.bool)
    parts = []
    for block in range(lo // DARE_BLOCK, (hi - 1) // DARE_BLOCK + 1):
        start = block * DARE_BLOCK
        g = torch.Generator().manual_seed(key_seed(seed, key, t, block))
        draw = torch.rand(min(DARE_BLOCK, numel - start), generator=g)
        parts.append(draw[max(lo, start) - start: min(hi, start + DARE_BLOCK) - start] >= p)
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def drop(delta: torch.Tensor, keep: torch.Tensor, p: float) -> torch.Tensor:
    """DARE's drop and rescale: ``delta * keep / (1 - p)`` (``keep`` flat or shaped)."""
    if p == 0.0:
        return delta
    return (delta * keep.to(delta.device).view_as(delta)) / (1.0 - p)


# ---------------------------------------------------------------------- combine


def elect_and_mean(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES sign election and disjoint merge over ``weighted`` [task, ...] (already
    multiplied by ``weights`` [task]): the elected sign is that of the sum (0 elects +);
    entries agreeing with it (zeros never agree) are summed and, with ``normalize``,
    divided by the signed sum of the agreeing tasks' weights (0 -> 1)."""
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = weighted.sign() == sign
    mixed = (weighted * agree).sum(0)
    if normalize:
        w = weights.view(-1, *([1] * (weighted.ndim - 1))).to(weighted.dtype)
        div = (w * agree).sum(0)
        div = div.masked_fill(div == 0, 1)  # no boolean gather: the host never waits
        mixed = mixed / div
    return mixed


def work_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype merges compute in: float64 for float64, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def merge_delta(
    deltas: Sequence[torch.Tensor], weights: Sequence[float], method: str, *, density: float = 1.0, p: float = 0.0,
    normalize: bool | None = None, thresholds: Sequence[float | None] | None = None,
    keeps: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """The mixed delta of ``method`` over ``deltas`` (one per task vector: whole tensors,
    or the same slice of each), before ``lam``.

    TIES trims at ``thresholds`` (one per delta, from :func:`trim_threshold` on the whole
    tensor; computed here from ``deltas`` when they are whole and none are given). DARE
    drops with ``keeps`` (one mask per delta, from :func:`dare_keep`; required when
    ``p > 0``). Then everything follows the module docstring's conventions."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    ds = list(deltas)
    if not ds:
        raise WorkbenchError("merge needs at least one task vector")
    if len(weights) != len(ds):
        raise WorkbenchError(f"need one weight per task vector ({len(ds)}), got {len(weights)}")
    dtype = work_dtype(ds[0].dtype)
    ds = [d.to(dtype) for d in ds]
    if method == "ties":
        if thresholds is None:
            thresholds = [trim_threshold(d, density) for d in ds]
        ds = [trim(d, thr) for d, thr in zip(ds, thresholds)]
    elif method in DARE_METHODS and p > 0.0:
        if keeps is None or len(keeps) != len(ds):
            raise WorkbenchError("DARE needs one keep mask per task vector (workbench.taskvec.merging.dare_keep)")
        ds = [drop(d, keep, p) for d, keep in zip(ds, keeps)]
    w = torch.tensor([float(x) for x in weights], dtype=dtype, device=ds[0].device)
    weighted = torch.stack(ds) * w.view(-1, *([1] * ds[0].ndim))
    norm = default_normalize(method) if normalize is None else normalize
    if method in TIES_METHODS:
        return elect_and_mean(weighted, w, normalize=norm)
    mixed = weighted.sum(0)
    if norm:
        s = float(w.sum())
        mixed = mixed / (s if abs(s) >= 1e-8 else 1.0)
    return mixed


def merge_tensor(
    base_t: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, method: str,
    density: float = 1.0, p: float = 0.0, lam: float = 1.0, normalize: bool | None = None,
    thresholds: Sequence[float | None] | None = None, keeps: Sequence[torch.Tensor] | None = None,
) -> torch.Tensor:
    """``base_t + lam * merge_delta(deltas, ...)`` in the base's dtype (``base_t`` and the
    deltas: whole tensors or the same slice)."""
    mixed = merge_delta(deltas, weights, method, density=density, p=p, normalize=normalize, thresholds=thresholds,
                        keeps=keeps)
    if lam != 1.0:
        mixed = mixed * lam
    return (base_t.to(mixed.dtype) + mixed).to(base_t.dtype)


# ---------------------------------------------------------------------- validation


def _finite_number(x: Any, what: str) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise WorkbenchError(f"{what} must be a real number, got {x!r}")
    x = float(x)
    if not math.isfinite(x):
        raise WorkbenchError(f"{what} must be finite, got {x}; nothing was merged or written")
    return x


def weights_for(weights: Any, key: str, n: int) -> list[float]:
    """The ``n`` weights of tensor ``key``: ``weights`` itself, or its entry for ``key``."""
    if isinstance(weights, Mapping):
        w = weights.get(key)
        if w is None:
            raise WorkbenchError(f"per-tensor weights have no entry for {key!r}; give one list of {n} numbers per tensor")
    else:
        w = weights
    w = w.tolist() if hasattr(w, "tolist") else w
    if isinstance(w, (str, bytes)) or not isinstance(w, Sequence):
        raise WorkbenchError(f"weights must be a list of {n} numbers (one per task vector), got {w!r}")
    w = list(w)
    where = f" for {key!r}" if isinstance(weights, Mapping) else ""
    if len(w) != n:
        raise WorkbenchError(f"need one weight per task vector ({n}), got {len(w)}{where}")
    return [_finite_number(x, f"weight {i}{where}") for i, x in enumerate(w)]


def check_merge_params(method: str, *, n: int, weights: Any, lam: Any, density: Any, p: Any, seed: Any,
                       keys: Sequence[str]) -> tuple[Any, float]:
    """Validate every merge parameter up front; return (weights, lam) normalised
    (weights: a list, or a mapping of lists, of floats)."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    lam = _finite_number(lam, "lam")
    density = _finite_number(density, "density")
    p = _finite_number(p, "p")
    if not 0.0 <= density <= 1.0:
        raise WorkbenchError(f"TIES density must be in [0, 1], got {density}")
    if not 0.0 <= p < 1.0:
        raise WorkbenchError(f"DARE drop probability p must be in [0, 1), got {p}")
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise WorkbenchError(f"seed must be an integer, got {seed!r}")
    if weights is None:
        return [1.0] * n, lam
    if isinstance(weights, Mapping):
        return {k: weights_for(weights, k, n) for k in keys}, lam
    return weights_for(weights, "", n), lam


# ---------------------------------------------------------------------- driver


def as_task_vectors(base: Checkpoint, task_vectors: Any) -> list[TaskVector]:
    """``task_vectors`` as TaskVector objects made from ``base`` (fine-tuned checkpoints
    are differenced against it), checked to hold the base's tensors."""
    if isinstance(task_vectors, TaskVector):
        task_vectors = [task_vectors]
    tvs = []
    for i, tv in enumerate(task_vectors):
        if not isinstance(tv, TaskVector):
            tv = TaskVector(base, tv, name=f"model {i}")
        tvs.append(tv)
    if not tvs:
        raise WorkbenchError("merge needs at least one task vector")
    for tv in tvs[1:]:
        tvs[0].check_same(tv)
    bkeys = set(base.keys())
    tkeys = set(tvs[0].keys())
    if bkeys != tkeys:
        diff = sorted(bkeys ^ tkeys)
        raise WorkbenchError(
            f"the base {base.name!r} and task vector {tvs[0].name!r} hold different tensors, e.g. {diff[:5]}; "
            "merge task vectors made from this base"
        )
    bad = [k for k in tkeys if tuple(base.shape(k)) != tuple(tvs[0].shape(k))]
    if bad:
        raise WorkbenchError(
            f"tensor {bad[0]!r} has shape {list(base.shape(bad[0]))} in the base but {list(tvs[0].shape(bad[0]))} "
            f"in task vector {tvs[0].name!r}"
        )
    for tv in tvs:
        b = tv.base
        if b is not None and b.config and base.config and b is not base:
            check_compatible(base, b)
    return tvs


def _merge_key(base_t: torch.Tensor, tvs: Sequence[TaskVector], key: str, weights: list[float], *, method: str,
               density: float, p: float, seed: int, lam: float, normalize: bool) -> torch.Tensor:
    """One tensor of ``merge``: in slices of ``CHUNK`` entries (one slice when small)."""
    n = base_t.numel()
    device = base_t.device
    flat_base = base_t.reshape(-1)
    thresholds = None
    whole = None
    if n <= CHUNK:
        whole = [tv[key].reshape(-1).to(device) for tv in tvs]  # checked finite
        if method == "ties":
            thresholds = [trim_threshold(d, density) for d in whole]
    elif method == "ties":
        thresholds = []
        for tv in tvs:  # first pass: one whole delta at a time, checked finite, for its threshold
            d = tv[key]  # our own float32 / float64 copy: its magnitudes in place
            thresholds.append(magnitude_threshold(d.abs_().reshape(-1), density))
            del d
    out = torch.empty(n, dtype=base_t.dtype, device=device)
    for lo in range(0, n, CHUNK):
        hi = min(n, lo + CHUNK)
        ds = whole if whole is not None else [tv.flat(key, lo, hi, check=thresholds is None).to(device) for tv in tvs]
        keeps = None
        if method in DARE_METHODS and p > 0.0:
            keeps = [dare_keep(n, p, seed=seed, key=key, t=t, lo=lo, hi=hi) for t in range(len(tvs))]
        out[lo:hi] = merge_tensor(flat_base[lo:hi], ds, weights, method=method, density=density, p=p, lam=lam,
                                  normalize=normalize, thresholds=thresholds, keeps=keeps)
    if not all_finite(out):
        raise WorkbenchError(
            f"merged tensor {key!r} holds non-finite values: base + lam * (mixed delta) overflows {base_t.dtype}; "
            "lower lam or the weights (nothing was written)"
        )
    return out.view(base_t.shape)


def merge_bytes(base: Checkpoint, n: int, *, keep: bool = True) -> int:
    """Bytes ``merge`` holds: the merged state (the base's size and dtypes; with
    ``keep=False`` only its largest tensor) plus, for the largest floating tensor, the
    base's copy and the two checkpoints' copies being subtracted, the delta in the work
    dtype (float32; the TIES threshold is selected in place on it), and a slice of
    ``CHUNK`` entries of each of the ``n`` deltas with their work copies."""
    sizes = [base.nbytes(k) for k in base.all_keys()]
    out = sum(sizes) if keep else max(sizes, default=0)
    big = max((math.prod(base.shape(k)) for k in base.keys()), default=0)
    src = max((base.nbytes(k) for k in base.keys()), default=0)
    work = max((work_dtype(base.dtype(k)).itemsize for k in base.keys()), default=4)
    return out + 3 * src + work * (big + min(big, CHUNK) * (n + 3))


def merge(
    base: Any,
    task_vectors: Sequence[TaskVector | Any],
    method: str = "task_arithmetic",
    *,
    weights: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
    lam: float = 1.0,
    density: float = 1.0,
    p: float = 0.0,
    seed: int = 0,
    normalize: bool | None = None,
    out: str | os.PathLike | None = None,
    overwrite: bool = False,
    progress: bool = False,
    max_bytes: int | None = None,
    keep: bool = True,
    **params: Any,
) -> dict[str, torch.Tensor] | Checkpoint:
    """Merge ``task_vectors`` into ``base`` tensor by tensor; return the merged state dict.

    ``base``: a state dict, module, Subject or safetensors path / model folder.
    ``task_vectors``: :class:`TaskVector` objects (or fine-tuned checkpoints, differenced
    against ``base``). ``method``: one of ``task_arithmetic``, ``ties`` (``density``),
    ``dare`` (``p``, ``seed``) or ``dare_ties`` (``p``, ``seed``). ``weights``: one per task
    vector (default 1), or a mapping tensor name -> one per task vector. ``lam``: scale of
    the mixed delta. ``normalize``: see the module docstring (default True for ``ties``,
    False otherwise, as mergekit). ``out``: also write the merge there: a path ending in
    ``.safetensors`` is one file, any other path a model folder (with the base folder's
    config and tokenizer files); written atomically once every tensor merged, and an
    existing non-empty ``out`` is refused unless ``overwrite=True``. Non-float tensors of
    the base are copied unchanged. NaN / inf anywhere raises before ``out`` is touched.
    ``max_bytes``: the memory budget (the merged state, which is returned, plus the
    float32 work of the largest tensor, :func:`merge_bytes`); a merge over it is refused
    before any tensor is read, with the estimate. None: no limit.
    ``keep=False`` (with ``out``): each merged tensor is written as soon as it is made and
    none is kept, so memory stays at one tensor's work whatever the model's size; the
    return value is then a :class:`Checkpoint` of ``out`` (tensors read on demand with
    ``.get(key)``). A failure part way leaves ``out`` untouched, as always.
    """
    if "lambda" in params:
        lam = params.pop("lambda")
    if params:
        raise WorkbenchError(
            f"unknown merge parameters {sorted(params)}; accepted: weights, lam (or lambda), density (ties), "
            "p and seed (dare, dare_ties), normalize, out, overwrite, progress"
        )
    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if out is not None:
        check_writable(out, overwrite=overwrite, what="merge output")
    base_ck = Checkpoint(base, default_name(base, "base"))
    tvs = as_task_vectors(base_ck, task_vectors)
    n = len(tvs)
    keys = base_ck.keys()
    if not keep and out is None:
        raise WorkbenchError("keep=False writes each merged tensor to out as it is made; pass out= (a .safetensors "
                             "path or a model folder)")
    check_budget(merge_bytes(base_ck, n, keep=keep), max_bytes, f"merging {n} task vectors into {base_ck.name or 'the base'}",
                 "merge on a machine with more memory or raise max_bytes (the merged state is held in memory)")
    weights, lam = check_merge_params(method, n=n, weights=weights, lam=lam, density=density, p=p, seed=seed, keys=keys)
    density, p = float(density), float(p)
    norm = default_normalize(method) if normalize is None else bool(normalize)
    floats = set(keys)
    it = base_ck.all_keys()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(it), desc=f"merge ({method})")

    def make(key: str) -> torch.Tensor:
        b = base_ck.get(key)
        if key not in floats:
            t = b.clone()
        else:
            check_finite(b, key, base_ck.name)
            t = _merge_key(b, tvs, key, weights_for(weights, key, n), method=method, density=density, p=p,
                           seed=seed, lam=lam, normalize=norm)
        if bar is not None:
            bar.update(1)
        return t

    if keep:
        merged: dict[str, torch.Tensor] = {key: make(key) for key in it}
    else:
        merged = {key: Deferred(base_ck.dtype(key), base_ck.shape(key), lambda key=key: make(key)) for key in it}
    if out is not None:
        meta = {"method": method, "lam": lam, "density": density, "p": p, "seed": seed, "normalize": norm,
                "task_vectors": [tv.name for tv in tvs]}
        written = write_state(merged, out, base=base_ck, metadata={"workbench": json.dumps({"merge": meta})},
                              overwrite=overwrite)
        if not keep:
            return Checkpoint(written)
    return merged


__all__ = ["CHUNK", "DARE_BLOCK", "METHODS", "as_task_vectors", "check_merge_params", "dare_keep", "default_normalize",
           "drop", "elect_and_mean", "key_seed", "magnitude_threshold", "merge", "merge_bytes", "merge_delta", "merge_tensor", "trim", "trim_count",
           "trim_threshold", "trim_topk", "weights_for", "work_dtype"]
