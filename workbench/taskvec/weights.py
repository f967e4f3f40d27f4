"""Task vectors in weight space: fine-tuned minus base, merges and interference diagnostics.

A :class:`TaskVector` is ``finetuned - base`` computed tensor by tensor, lazily: the two
checkpoints may be state dicts, modules, Subjects, or safetensors files / directories read
one tensor (or one slice of a tensor) at a time with positioned reads into buffers this
process owns, never memory-mapped, so neither a model that does not fit twice in memory
nor the page cache of the checkpoint files counts against the merge. Task vectors add,
subtract, negate and scale; each is kept as a linear combination of (fine-tuned, base)
pairs, so nothing is materialised until a tensor is asked for.

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
                          election and disjoint mean
========================= =================================================================

``weights`` is one number per task vector, or a mapping from tensor name to one number
per task vector (learned per-block coefficients, as aTLAS trains them); ``lam`` scales
the mixed delta. The conventions are mergekit's, so :func:`to_mergekit_yaml` writes a
recipe that mergekit turns into the same model.

TIES trim and ties. ``k = int(density * numel)`` entries are kept per tensor. The
threshold is the k-th largest magnitude, found by ``torch.kthvalue`` (a linear-time
selection, no full sort); every entry whose magnitude is >= the threshold is kept. So
when several entries tie exactly at the threshold, all of them are kept (the result may
hold more than k non-zeros, and it does not depend on the order of the entries);
mergekit keeps an arbitrary k of them (the order of its ``argsort``). Results agree
with mergekit everywhere except at such exact ties. ``k = 0`` trims the whole tensor.
Sign election: an entry whose weighted sum is exactly 0 elects ``+``; zero deltas never
count as agreeing.

Diagnostics (:func:`diagnose`): cosine similarity between task vectors over the whole
model and per block (embeddings, each layer, the rest), the pairwise sign-conflict rate
(of the entries where both are non-zero, the share whose signs differ), and the top-k
mass (the share of a task vector's L1 mass kept by TIES's per-tensor trim at density k).

Memory. TIES works on one tensor at a time in two passes: the first finds each task
vector's trim threshold (one full delta at a time), the second re-reads the deltas in
slices of ``_CHUNK`` entries and trims, elects and averages each slice. So besides the
merged state the working set is about four copies of the largest tensor (its base, one
delta, the delta's magnitudes and ``kthvalue``'s copy of them), whatever the number of
task vectors; the result is the same as :func:`merge_tensor` on whole tensors
(every operation is per entry or a reduction over the task axis).

Bad input is a :class:`~workbench.errors.WorkbenchError` naming the tensor: checkpoints
with different keys or shapes, of different architectures, or holding NaN / inf. A merge
written to disk goes to a temporary file first, so a failure leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import tempfile
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register

METHODS = ("task_arithmetic", "ties", "dare", "dare_ties")
_SAFETENSORS_DTYPES = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}
_CHUNK = 1 << 18  # entries per slice in the second TIES pass (8 task vectors: 8 MB of float32)
_ST_TORCH = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"), ("U32", "uint32"),
                     ("U64", "uint64")):
    if hasattr(torch, _attr):
        _ST_TORCH[_name] = getattr(torch, _attr)
_TORCH_ST = {v: k for k, v in _ST_TORCH.items()}


class _SafetensorsFile:
    """One safetensors file read with positioned reads (``pread``-like) into fresh tensors.

    The header is parsed once; ``read(key, lo, hi)`` copies entries ``lo:hi`` of the
    flattened tensor (all of it by default) straight from the file into a buffer of its
    own, so nothing stays mapped and only the tensors asked for occupy memory. Dtypes
    this table does not know fall back to ``safetensors.safe_open``."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            self._fh = open(path, "rb", buffering=0)
            size = os.fstat(self._fh.fileno()).st_size
            head = self._fh.read(8)
            if len(head) != 8:
                raise ValueError("file shorter than its 8-byte header length")
            n = int.from_bytes(head, "little")
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(self._fh.read(n))
            if not isinstance(header, dict):
                raise ValueError("the header is not a JSON object")
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise WorkbenchError(f"{path!r} is not a readable safetensors file ({err})") from err
        header.pop("__metadata__", None)
        self._start = 8 + n
        self.info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, v in header.items():
            try:
                dt, shape = v["dtype"], tuple(int(x) for x in v["shape"])
                begin, end = (int(x) for x in v["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                raise WorkbenchError(f"{path!r} is not a readable safetensors file (bad entry for {key!r})") from err
            if self._start + end > size or begin > end:
                raise WorkbenchError(f"{path!r} is not a readable safetensors file (tensor {key!r} lies outside the file)")
            if dt in _ST_TORCH:
                need = int(np.prod(shape, dtype=np.int64)) * _ST_TORCH[dt].itemsize
                if end - begin != need:
                    raise WorkbenchError(
                        f"{path!r} is not a readable safetensors file (tensor {key!r} has {end - begin} bytes, "
                        f"its shape and dtype need {need})"
                    )
            self.info[key] = (dt, shape, begin, end)
        self._fallback = None

    def keys(self) -> list[str]:
        return list(self.info)

    def read(self, key: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        dt, shape, begin, _ = self.info[key]
        dtype = _ST_TORCH.get(dt)
        if dtype is None or sys.byteorder != "little":
            if self._fallback is None:
                from safetensors import safe_open

                self._fallback = safe_open(self.path, framework="pt")
            t = self._fallback.get_tensor(key)
            return t if lo is None and hi is None else t.reshape(-1)[lo:hi].clone()
        whole = lo is None and hi is None
        numel = int(np.prod(shape, dtype=np.int64))
        lo, hi = max(0, lo or 0), min(numel, numel if hi is None else hi)
        hi = max(lo, hi)
        size = dtype.itemsize
        buf = torch.empty((hi - lo) * size, dtype=torch.uint8)
        view = memoryview(buf.numpy())
        pos, done = self._start + begin + lo * size, 0
        while done < len(view):
            self._fh.seek(pos + done)
            got = self._fh.readinto(view[done:])
            if not got:
                raise WorkbenchError(f"{self.path!r} ended while reading tensor {key!r}; the file is truncated")
            done += got
        out = buf.view(dtype)
        return out.reshape(shape) if whole else out


# ---------------------------------------------------------------------- checkpoints


class Checkpoint:
    """Read-only named tensors: a state dict, a module, a Subject, a safetensors file,
    or a directory holding ``model.safetensors`` (or a sharded index). Tensors are read
    one at a time (or a slice at a time) with positioned reads; files are never mapped
    or loaded whole."""

    def __init__(self, source: Any, name: str | None = None) -> None:
        self.path: str | None = None
        self.config: dict | None = None
        self._files: dict[str, Any] = {}
        self._where: dict[str, str] = {}
        self._tensors: Mapping[str, torch.Tensor] | None = None
        if isinstance(source, Checkpoint):
            self.__dict__.update(source.__dict__)
            self.name = name or source.name
            return
        if hasattr(source, "model") and hasattr(source, "nn") and isinstance(getattr(source, "model"), torch.nn.Module):
            self.config = source.model.config.to_dict()
            self.name = name or getattr(source, "name", "subject")
            source = source.model
        if isinstance(source, torch.nn.Module):
            if self.config is None and hasattr(source, "config"):
                self.config = source.config.to_dict()
            self.name = name or type(source).__name__
            self._tensors = dict(source.state_dict())
        elif isinstance(source, Mapping):
            bad = [k for k, v in source.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise WorkbenchError(f"state dict entries must be tensors; {bad[:5]} are not")
            self.name = name or "state_dict"
            self._tensors = source
        elif isinstance(source, (str, os.PathLike)):
            self._open_path(os.fspath(source))
            self.name = name or self.path
        else:
            raise WorkbenchError(
                f"cannot read a checkpoint from a {type(source).__name__}; pass a state dict, an nn.Module, a Subject, "
                "a .safetensors file or a directory holding model.safetensors"
            )

    def _open_path(self, path: str) -> None:
        if os.path.isdir(path):
            single = os.path.join(path, "model.safetensors")
            index = os.path.join(path, "model.safetensors.index.json")
            if os.path.exists(single):
                files = {single: None}
            elif os.path.exists(index):
                with open(index) as f:
                    wmap = json.load(f)["weight_map"]
                files = {os.path.join(path, v): None for v in wmap.values()}
            else:
                raise WorkbenchError(f"{path!r} holds neither model.safetensors nor model.safetensors.index.json")
            cfg = os.path.join(path, "config.json")
            if os.path.exists(cfg):
                with open(cfg) as f:
                    self.config = json.load(f)
        elif os.path.isfile(path) and path.endswith(".safetensors"):
            files = {path: None}
        else:
            raise WorkbenchError(f"no checkpoint at {path!r}; pass a .safetensors file or a directory holding one")
        self.path = path
        for file in files:
            handle = _SafetensorsFile(file)
            self._files[file] = handle
            for k in handle.keys():
                self._where[k] = file

    def keys(self) -> list[str]:
        """Names of the floating-point tensors (integer buffers are not part of a task vector)."""
        if self._tensors is not None:
            return [k for k, v in self._tensors.items() if v.is_floating_point()]
        return [k for k, f in self._where.items() if self._files[f].info[k][0] in _SAFETENSORS_DTYPES]

    def all_keys(self) -> list[str]:
        return list(self._tensors) if self._tensors is not None else list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return self._files[self._where[key]].info[key][1]

    def get(self, key: str) -> torch.Tensor:
        if self._tensors is not None:
            return self._tensors[key]
        return self._files[self._where[key]].read(key)

    def get_flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Entries ``lo:hi`` of the flattened tensor (a view for in-memory tensors; read
        from the file, and only those bytes, otherwise)."""
        if self._tensors is not None:
            return self._tensors[key].reshape(-1)[lo:hi]
        return self._files[self._where[key]].read(key, lo, hi)

    def __repr__(self) -> str:
        return f"Checkpoint({self.name!r}, {len(self.all_keys())} tensors)"


def _default_name(obj: Any, fallback: str) -> str | None:
    """Paths and checkpoints keep their own names; anything else gets ``fallback``."""
    return None if isinstance(obj, (str, os.PathLike, Checkpoint)) else fallback


_ARCH_FIELDS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
                "intermediate_size", "n_inner", "vocab_size")


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Raise a WorkbenchError naming what differs when two checkpoints cannot be differenced."""
    if a.config and b.config:
        diff = {f: (a.config.get(f), b.config.get(f)) for f in _ARCH_FIELDS
                if f in a.config and f in b.config and a.config.get(f) != b.config.get(f)}
        if diff:
            shown = ", ".join(f"{f}: {x!r} vs {y!r}" for f, (x, y) in diff.items())
            raise WorkbenchError(
                f"checkpoints {a.name!r} and {b.name!r} are of different architectures ({shown}); "
                "a task vector needs a fine-tune of the same base architecture"
            )
    ka, kb = a.keys(), b.keys()
    sa, sb = set(ka), set(kb)
    if sa != sb:
        only_a, only_b = sorted(sa - sb), sorted(sb - sa)
        msg = f"checkpoints {a.name!r} and {b.name!r} hold different tensors"
        if only_a:
            msg += f"; only in {a.name!r}: {only_a[:5]}{' ...' if len(only_a) > 5 else ''} ({len(only_a)})"
        if only_b:
            msg += f"; only in {b.name!r}: {only_b[:5]}{' ...' if len(only_b) > 5 else ''} ({len(only_b)})"
        if len(sa & sb) < max(len(sa), len(sb)) // 2:
            msg += "; they look like different architectures"
        raise WorkbenchError(msg + ". Both must be checkpoints of the same architecture with the same tensor names.")
    bad = [(k, a.shape(k), b.shape(k)) for k in ka if a.shape(k) != b.shape(k)]
    if bad:
        k, x, y = bad[0]
        raise WorkbenchError(
            f"tensor {k!r} has shape {list(x)} in {a.name!r} but {list(y)} in {b.name!r}"
            f"{f' ({len(bad)} tensors differ in shape)' if len(bad) > 1 else ''}; the checkpoints must have equal shapes"
        )


def _all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a NaN or inf makes the sum non-finite, so a finite
    sum settles it in one cheap reduction; only a non-finite sum (or an overflow of
    large finite entries) needs the entry-wise check."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.element_size() == 1:  # float8: reductions want a wider type
        t = t.float()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def _check_finite(t: torch.Tensor, key: str, who: str) -> None:
    if not _all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise WorkbenchError(
            f"tensor {key!r} of checkpoint {who!r} holds {n_nan} NaN and {n_inf} infinite values; "
            "task vectors need finite weights (nothing was written)"
        )


# ---------------------------------------------------------------------- task vectors


class TaskVector:
    """``finetuned - base``, tensor by tensor, computed on demand (float32).

    ``tv[key]`` is one tensor of the difference; ``tv.keys()`` the floating-point tensor
    names; ``a + b``, ``a - b``, ``-a``, ``2.0 * a`` make new lazy task vectors;
    ``tv.apply_to(base, scale)`` returns ``base + scale * tv`` as a state dict.
    """

    def __init__(self, base: Any = None, finetuned: Any = None, *, name: str | None = None,
                 _terms: list[tuple[float, Checkpoint, Checkpoint | None]] | None = None) -> None:
        if _terms is None:
            if base is None or finetuned is None:
                raise WorkbenchError("TaskVector(base, finetuned) needs both checkpoints")
            b = Checkpoint(base, _default_name(base, "base"))
            f = Checkpoint(finetuned, name or _default_name(finetuned, "finetuned"))
            check_compatible(b, f)
            _terms = [(1.0, f, b)]
        self.terms = _terms
        self.name = name or (self.terms[0][1].name if len(self.terms) == 1 else "combination")
        self._keys = self.terms[0][1].keys()
        self._shapes = {k: self.terms[0][1].shape(k) for k in self._keys}

    @classmethod
    def from_deltas(cls, deltas: Mapping[str, torch.Tensor], *, name: str = "deltas") -> "TaskVector":
        """A task vector given directly as tensors (e.g. loaded from ``TaskVector.save``)."""
        return cls(_terms=[(1.0, Checkpoint(dict(deltas), name), None)], name=name)

    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None) -> "TaskVector":
        """A task vector saved by :meth:`save` (read lazily)."""
        ck = Checkpoint(path)
        return cls(_terms=[(1.0, ck, None)], name=name or os.path.basename(os.fspath(path)))

    # -------------------------------------------------------------- access

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._shapes:
            raise WorkbenchError(f"task vector {self.name!r} has no tensor {key!r}")
        out = None
        for coef, ft, base in self.terms:
            f = ft.get(key)
            if base is None:
                _check_finite(f, key, ft.name)
                d = f.float()
            else:
                b = base.get(key)
                d = f.float() - b.float()
                if not _all_finite(d):
                    _check_finite(b, key, base.name)
                    _check_finite(f, key, ft.name)
                    _check_finite(d, key, f"{ft.name} - {base.name}")
            d = d if coef == 1.0 else d * coef
            out = d if out is None else out + d
        return out

    def flat(self, key: str, lo: int, hi: int) -> torch.Tensor:
        """Entries ``lo:hi`` of the flattened ``self[key]``, computed from those entries of
        the checkpoints only (the same arithmetic as ``self[key]``, without its finiteness
        check: read the whole tensor once first when the input is not known to be finite)."""
        out = None
        for coef, ft, base in self.terms:
            f = ft.get_flat(key, lo, hi)
            d = f.float() if base is None else f.float() - base.get_flat(key, lo, hi).float()
            d = d if coef == 1.0 else d * coef
            out = d if out is None else out + d
        return out

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        for k in self._keys:
            yield k, self[k]

    def to_dict(self) -> dict[str, torch.Tensor]:
        return dict(self.items())

    def numel(self) -> int:
        return int(sum(np.prod(s) for s in self._shapes.values()))

    def norm(self) -> float:
        return float(sum(float(self[k].double().pow(2).sum()) for k in self._keys) ** 0.5)

    @property
    def base(self) -> Checkpoint | None:
        """The base checkpoint (of the first term)."""
        return self.terms[0][2]

    # -------------------------------------------------------------- algebra

    def _check_same(self, other: "TaskVector") -> None:
        if not isinstance(other, TaskVector):
            raise WorkbenchError(f"can only combine task vectors with task vectors, not {type(other).__name__}")
        if set(self._keys) != set(other._keys):
            diff = sorted(set(self._keys) ^ set(other._keys))
            raise WorkbenchError(f"task vectors {self.name!r} and {other.name!r} hold different tensors, e.g. {diff[:5]}")
        bad = [k for k in self._keys if self._shapes[k] != other._shapes[k]]
        if bad:
            raise WorkbenchError(
                f"tensor {bad[0]!r} has shape {list(self._shapes[bad[0]])} in {self.name!r} but "
                f"{list(other._shapes[bad[0]])} in {other.name!r}"
            )

    def __add__(self, other: "TaskVector") -> "TaskVector":
        self._check_same(other)
        return TaskVector(_terms=self.terms + other.terms, name=f"({self.name} + {other.name})")

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self._check_same(other)
        return TaskVector(_terms=self.terms + (-other).terms, name=f"({self.name} - {other.name})")

    def __mul__(self, c: float) -> "TaskVector":
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c):
            raise WorkbenchError(f"a task vector scales by a finite number, not {c!r}")
        return TaskVector(_terms=[(coef * float(c), f, b) for coef, f, b in self.terms],
                          name=self.name if c == 1 else f"{c:g}*{self.name}")

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "TaskVector":
        return self * (1.0 / c)

    # -------------------------------------------------------------- use

    def apply_to(self, base: Any, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``base + scale * self`` as a new state dict (integer buffers copied as they are).
        The base's dtype is kept."""
        return merge(base, [self], method="task_arithmetic", weights=[scale])

    def save(self, path: str | os.PathLike) -> str:
        """Write the task vector (float32) to one safetensors file, atomically."""
        return _write_safetensors(self.to_dict(), os.fspath(path), {"workbench": json.dumps({"task_vector": self.name})})

    def __repr__(self) -> str:
        return f"TaskVector({self.name!r}, {len(self._keys)} tensors, {self.numel()} parameters)"


def task_vector(base: Any, finetuned: Any, *, name: str | None = None) -> TaskVector:
    """``TaskVector(base, finetuned)``."""
    return TaskVector(base, finetuned, name=name)


# ---------------------------------------------------------------------- primitives


def trim_topk(delta: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries of ``delta`` whose magnitude is among the top ``density`` fraction
    (``k = int(density * numel)``; threshold by ``torch.kthvalue``; entries tied at the
    threshold are all kept), zero the rest."""
    if not 0.0 <= density <= 1.0:
        raise WorkbenchError(f"density must be in [0, 1], got {density}")
    thresh = _trim_threshold(delta, density)
    if thresh is None:
        return delta
    if thresh == float("inf"):
        return torch.zeros_like(delta)
    return delta * (_magnitudes(delta) >= thresh).view_as(delta)


def _magnitudes(delta: torch.Tensor) -> torch.Tensor:
    """|delta| flattened, in float32 at least (kthvalue and float8 need it)."""
    mag = delta.abs().reshape(-1)
    return mag if mag.dtype in (torch.float32, torch.float64) else mag.float()


def _trim_threshold(delta: torch.Tensor, density: float) -> float | None:
    """The magnitude ``trim_topk`` keeps entries at or above: the k-th largest, k =
    ``int(density * numel)`` (``None``: keep everything, ``inf``: keep nothing)."""
    n = delta.numel()
    k = int(density * n)
    if k >= n:
        return None
    if k == 0:
        return float("inf")
    return _magnitudes(delta).kthvalue(n - k + 1).values.item()


def dare_drop(delta: torch.Tensor, p: float, generator: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Drop each entry with probability ``p`` and rescale the survivors by 1/(1-p)
    (so the expectation of every entry is unchanged)."""
    if not 0.0 <= p < 1.0:
        raise WorkbenchError(f"DARE drop probability p must be in [0, 1), got {p}")
    if p == 0.0:
        return delta
    keep = torch.rand(delta.shape, generator=generator, device="cpu") >= p
    out = delta * keep.to(delta.device)
    return out / (1.0 - p) if rescale else out


def _key_seed(seed: int, key: str, t: int) -> int:
    h = hashlib.sha256(f"{seed}\x00{key}\x00{t}".encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


def elect_and_mean(weighted: torch.Tensor, weights: torch.Tensor, normalize: bool = True) -> torch.Tensor:
    """TIES sign election and disjoint mean over ``weighted`` [task, ...] (already
    multiplied by ``weights`` [task]): the elected sign is that of the sum (0 elects +);
    entries agreeing with it (zeros never agree) are summed and, with ``normalize``,
    divided by the sum of the agreeing tasks' weights."""
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(weighted.dtype)
    agree = weighted.sign() == sign
    mixed = (weighted * agree).sum(0)
    if normalize:
        w = weights.view(-1, *([1] * (weighted.ndim - 1))).to(weighted.dtype)
        div = (w * agree).sum(0)
        div[div == 0] = 1
        mixed = mixed / div
    return mixed


# ---------------------------------------------------------------------- merge


def _as_task_vectors(base: Checkpoint, task_vectors: Sequence[Any]) -> list[TaskVector]:
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
        tvs[0]._check_same(tv)
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
        if b is not None and b.config and base.config:
            if b is not base:
                check_compatible(base, b)
    return tvs


def _weights_for(weights, key: str, n: int) -> list[float]:
    if isinstance(weights, Mapping):
        w = weights.get(key)
        if w is None:
            raise WorkbenchError(f"per-tensor weights have no entry for {key!r}; give one list of {n} numbers per tensor")
    else:
        w = weights
    w = [float(x) for x in (w.tolist() if hasattr(w, "tolist") else w)]
    if len(w) != n:
        raise WorkbenchError(f"need one weight per task vector ({n}), got {len(w)}" + (f" for {key!r}" if isinstance(weights, Mapping) else ""))
    return w


def merge_tensor(
    base_t: torch.Tensor, deltas: Sequence[torch.Tensor], weights: Sequence[float], *, method: str,
    density: float = 1.0, p: float = 0.0, lam: float = 1.0, normalize: bool | None = None,
    generators: Sequence[torch.Generator] | None = None,
) -> torch.Tensor:
    """Merge one tensor (see the module docstring for each method)."""
    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    w = torch.tensor(weights, dtype=torch.float32, device=base_t.device)
    ds = list(deltas)
    if method in ("dare", "dare_ties"):
        ds = [dare_drop(d, p, g) for d, g in zip(ds, generators)]
    if method == "ties":
        ds = [trim_topk(d, density) for d in ds]
    if method in ("ties", "dare_ties"):
        weighted = torch.stack(ds) * w.view(-1, *([1] * base_t.ndim))
        mixed = elect_and_mean(weighted, w, normalize=True if normalize is None else normalize)
    else:
        mixed = ds[0] * w[0]
        for d, wi in zip(ds[1:], w[1:]):
            mixed = mixed + d * wi
        if normalize:
            s = float(w.sum())
            mixed = mixed / (s if abs(s) >= 1e-8 else 1.0)
    if lam != 1.0:
        mixed = mixed * lam
    return (base_t.float() + mixed).to(base_t.dtype)


def _ties_streamed(base_t: torch.Tensor, tvs: Sequence[TaskVector], key: str,
                   weights: Sequence[float], *, density: float, lam: float, normalize: bool | None) -> torch.Tensor:
    """``merge_tensor(base_t, [tv[key] ...], weights, method="ties", ...)`` without holding
    every delta at once: pass 1 reads one whole delta at a time (checking it is finite)
    for its trim threshold; pass 2 re-reads the deltas ``_CHUNK`` entries at a time and
    trims, elects and averages each slice. Every step is per entry or a reduction over
    the task axis, so the result is that of ``merge_tensor`` entry for entry."""
    n = base_t.numel()
    thresholds = []
    for tv in tvs:
        d = tv[key]
        thresholds.append(_trim_threshold(d, density))
        del d
    w = torch.tensor(weights, dtype=torch.float32)
    wcol = w.view(-1, 1)
    norm = True if normalize is None else normalize
    out = torch.empty(n, dtype=base_t.dtype)
    flat_base = base_t.reshape(-1)
    for lo in range(0, n, _CHUNK):
        hi = min(n, lo + _CHUNK)
        ds = []
        for tv, thr in zip(tvs, thresholds):
            d = tv.flat(key, lo, hi)
            ds.append(d if thr is None else d * (d.abs() >= thr))
        mixed = elect_and_mean(torch.stack(ds) * wcol, w, normalize=norm)
        if lam != 1.0:
            mixed = mixed * lam
        out[lo:hi] = (flat_base[lo:hi].float() + mixed).to(base_t.dtype)
    return out.view(base_t.shape)


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
    progress: bool = False,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge ``task_vectors`` into ``base`` tensor by tensor; return the merged state dict.

    ``base``: a state dict, module, Subject or safetensors path. ``task_vectors``:
    :class:`TaskVector` objects (or fine-tuned checkpoints, differenced against ``base``).
    ``method``: one of ``task_arithmetic``, ``ties`` (``density``), ``dare`` (``p``, ``seed``)
    or ``dare_ties`` (``p``, ``seed``). ``weights``: one per task vector (default 1), or a
    mapping tensor name -> one per task vector. ``lam``: scale of the mixed delta.
    ``normalize``: divide by the (agreeing) weights' sum; default True for the TIES
    methods, False otherwise (mergekit's defaults). ``out``: also write the merge to this
    safetensors file (atomically: nothing is written unless every tensor merged).
    Non-float tensors of the base are copied unchanged. Any NaN / inf raises.
    """
    if "lambda" in params:
        lam = params.pop("lambda")
    if params:
        raise WorkbenchError(
            f"unknown merge parameters {sorted(params)}; accepted: weights, lam (or lambda), density (ties), "
            "p and seed (dare, dare_ties), normalize, out"
        )
    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
    if method == "ties" and not 0.0 <= density <= 1.0:
        raise WorkbenchError(f"TIES density must be in [0, 1], got {density}")
    if method in ("dare", "dare_ties") and not 0.0 <= p < 1.0:
        raise WorkbenchError(f"DARE drop probability p must be in [0, 1), got {p}")
    base_ck = Checkpoint(base, _default_name(base, "base"))
    tvs = _as_task_vectors(base_ck, task_vectors)
    n = len(tvs)
    weights = [1.0] * n if weights is None else weights
    if not isinstance(weights, Mapping):
        _weights_for(weights, "", n)
    keys = set(base_ck.keys())
    merged: dict[str, torch.Tensor] = {}
    it = base_ck.all_keys()
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=f"merge ({method})")
    for key in it:
        b = base_ck.get(key)
        if key not in keys:
            merged[key] = b.clone()
            continue
        _check_finite(b, key, base_ck.name)
        if method == "ties" and b.numel() > _CHUNK and b.device.type == "cpu":
            merged[key] = _ties_streamed(b, tvs, key, _weights_for(weights, key, n), density=density, lam=lam,
                                         normalize=normalize)
            continue
        deltas = [tv[key].to(b.device) for tv in tvs]
        gens = None
        if method in ("dare", "dare_ties"):
            gens = [torch.Generator().manual_seed(_key_seed(seed, key, t)) for t in range(n)]
        merged[key] = merge_tensor(b, deltas, _weights_for(weights, key, n), method=method, density=density, p=p,
                                   lam=lam, normalize=normalize, generators=gens)
    if out is not None:
        meta = {"method": method, "lam": lam, "density": density, "p": p, "seed": seed,
                "task_vectors": [tv.name for tv in tvs]}
        _write_safetensors(merged, os.fspath(out), {"workbench": json.dumps({"merge": meta})})
    return merged


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> str:
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise WorkbenchError(f"cannot write {path!r}: no directory {directory!r}")
    # widest dtypes first (stable), so every tensor starts aligned to its element size
    items = sorted(tensors.items(), key=lambda kv: -kv[1].element_size())
    entries, offset = {}, 0
    for k, v in items:
        if v.dtype not in _TORCH_ST:
            raise WorkbenchError(f"tensor {k!r} has dtype {v.dtype}, which safetensors cannot store")
        nbytes = v.numel() * v.element_size()
        entries[k] = {"dtype": _TORCH_ST[v.dtype], "shape": list(v.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        entries = {"__metadata__": dict(metadata), **entries}
    header = json.dumps(entries, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)  # the data starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    try:
        # one tensor at a time, straight from its memory: no serialised copy of the whole state
        with os.fdopen(fd, "wb") as f:
            f.write(len(header).to_bytes(8, "little"))
            f.write(header)
            for _, v in items:
                if v.numel():
                    f.write(memoryview(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def save_pretrained(state: Mapping[str, torch.Tensor], base_dir: str | os.PathLike, out_dir: str | os.PathLike) -> str:
    """Write a merged state as a Hugging Face model directory: the base directory's
    config and tokenizer files copied, the weights as ``model.safetensors`` (tensor
    names as in the base's files, so ``from_pretrained`` maps them as it maps the base's).
    The directory is built under a temporary name and renamed when complete."""
    import shutil

    base_dir, out_dir = os.fspath(base_dir), os.fspath(out_dir)
    if not os.path.isdir(base_dir) or not os.path.exists(os.path.join(base_dir, "config.json")):
        raise WorkbenchError(f"{base_dir!r} is not a model directory with a config.json")
    if os.path.exists(out_dir):
        raise WorkbenchError(f"{out_dir!r} already exists; pass a new directory")
    for k, v in state.items():
        if v.is_floating_point():
            _check_finite(v, k, "merged state")
    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(out_dir)) or ".", suffix=".tmp")
    try:
        for f in os.listdir(base_dir):
            if not f.endswith(".safetensors") and not f.endswith(".safetensors.index.json") and os.path.isfile(os.path.join(base_dir, f)):
                shutil.copy2(os.path.join(base_dir, f), tmp)
        _write_safetensors(state, os.path.join(tmp, "model.safetensors"), {"format": "pt"})
        os.replace(tmp, out_dir)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
    return out_dir


def load_state(model: torch.nn.Module, state: Mapping[str, torch.Tensor]) -> torch.nn.Module:
    """Copy ``state`` into ``model`` in place after checking every name, shape and value
    first (so a bad state changes nothing)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(set(state) - set(own))
    if extra or missing:
        raise WorkbenchError(
            f"state does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {extra[:5]}; nothing was loaded"
        )
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise WorkbenchError(f"tensor {k!r} has shape {list(v.shape)}; the model needs {list(own[k].shape)}; nothing was loaded")
        if v.is_floating_point():
            _check_finite(v, k, "state")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model


# ---------------------------------------------------------------------- mergekit


_MERGEKIT_METHOD = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear", "dare_ties": "dare_ties"}


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
    paths: Mapping[str, str] | None = None,
) -> str:
    """A mergekit YAML recipe for the same merge (``mergekit-yaml recipe.yml out/``).

    Every checkpoint must live on disk: give the base as a path and each task vector's
    fine-tuned checkpoint as a path (or map checkpoint names to paths with ``paths``).
    A task vector that is a combination (``a - b``, ``2 * a``) becomes one model entry
    per fine-tuned checkpoint, its coefficient folded into the weight. DARE's drop mask
    is random in mergekit, so a DARE recipe reproduces the method, not the exact bits.
    Per-tensor weights (aTLAS) cannot be written as a mergekit recipe.
    """
    import yaml

    if method not in METHODS:
        raise WorkbenchError(f"unknown merge method {method!r}; valid: {', '.join(METHODS)}")
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
    base_path = where(base, "base")
    models = []
    for tv, w in zip(tvs, weights):
        for coef, ft, b in tv.terms:
            if b is None:
                raise WorkbenchError(f"task vector {tv.name!r} was given as raw deltas; mergekit needs its fine-tuned checkpoint")
            if where(b, "base") != base_path:
                raise WorkbenchError(f"task vector {tv.name!r} was made from base {b.name!r}, not {base_path!r}")
            par: dict[str, Any] = {"weight": float(coef * w)}
            if method == "ties":
                par["density"] = float(density)
            elif method in ("dare", "dare_ties"):
                par["density"] = float(1.0 - p)
            models.append({"model": where(ft, "fine-tuned checkpoint"), "parameters": par})
    if normalize is None:
        normalize = method in ("ties", "dare_ties")
    recipe = {
        "merge_method": _MERGEKIT_METHOD[method],
        "base_model": base_path,
        "models": models,
        "parameters": {"normalize": bool(normalize), "lambda": float(lam)},
        "dtype": dtype,
    }
    if method in ("dare", "dare_ties"):
        recipe["parameters"]["rescale"] = True
    return yaml.safe_dump(recipe, sort_keys=False)


# ---------------------------------------------------------------------- diagnostics


_LAYER_RE = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")


def block_of(key: str) -> str:
    """The block a tensor belongs to: ``"layer N"``, ``"embed"`` or ``"other"``."""
    m = _LAYER_RE.search(key)
    if m:
        return f"layer {int(m.group(1))}"
    if re.search(r"(emb|wte|wpe|embed)", key):
        return "embed"
    return "other"


def _block_order(blocks: Iterable[str]) -> list[str]:
    def rank(b: str):
        if b == "embed":
            return (0, 0)
        if b.startswith("layer "):
            return (1, int(b.split()[1]))
        return (2, 0)

    return sorted(set(blocks), key=rank)


@register("task_vector_diagnostics")
class TaskVectorDiagnostics(Result):
    """Interference diagnostics of a set of task vectors.

    Variables: ``cosine`` [task, task_b]; ``cosine_by_block`` [block, task, task_b];
    ``sign_conflict`` [task, task_b] (share of co-non-zero entries with opposite signs);
    ``sign_conflict_all`` [] (share of entries non-zero in >= 2 task vectors whose
    signs are not all equal); ``topk_mass`` [task, density]; ``norm`` [task].
    """


def diagnose(task_vectors: Sequence[TaskVector], *, names: Sequence[str] | None = None,
             densities: Sequence[float] = (0.01, 0.05, 0.1, 0.2, 0.5)) -> TaskVectorDiagnostics:
    """Cosines (whole and per block), sign-conflict rates and top-k mass, in one pass."""
    tvs = list(task_vectors)
    if len(tvs) < 1:
        raise WorkbenchError("diagnose needs at least one task vector")
    for tv in tvs[1:]:
        tvs[0]._check_same(tv)
    names = list(names) if names is not None else [tv.name for tv in tvs]
    if len(names) != len(tvs):
        raise WorkbenchError(f"need one name per task vector ({len(tvs)}), got {len(names)}")
    if len(set(names)) != len(names):
        raise WorkbenchError(f"task vector names must be unique, got {names}")
    n = len(tvs)
    keys = tvs[0].keys()
    blocks = _block_order(block_of(k) for k in keys)
    bi = {b: i for i, b in enumerate(blocks)}
    gram = torch.zeros(len(blocks), n, n, dtype=torch.float64)
    both = torch.zeros(n, n, dtype=torch.float64)
    opposite = torch.zeros(n, n, dtype=torch.float64)
    multi = 0.0
    mixed_sign = 0.0
    mass = torch.zeros(n, len(densities), dtype=torch.float64)
    total = torch.zeros(n, dtype=torch.float64)
    for key in keys:
        ds = torch.stack([tv[key].reshape(-1) for tv in tvs]).double()
        gram[bi[block_of(key)]] += ds @ ds.T
        s = ds.sign()
        nz = (s != 0).double()
        both += nz @ nz.T
        pos, neg = (s > 0).double(), (s < 0).double()
        opposite += pos @ neg.T + neg @ pos.T
        cnt = nz.sum(0)
        multi += float((cnt >= 2).sum())
        mixed_sign += float(((pos.sum(0) > 0) & (neg.sum(0) > 0)).sum())
        a = ds.abs()
        total += a.sum(1)
        for j, dens in enumerate(densities):
            for t in range(n):
                mass[t, j] += float(trim_topk(a[t], dens).sum())
    whole = gram.sum(0)

    def cos(g: torch.Tensor) -> torch.Tensor:
        d = g.diagonal().clamp(min=0).sqrt()
        den = d[:, None] * d[None, :]
        return torch.where(den > 0, g / den.clamp(min=1e-300), torch.zeros_like(g))

    cosine = cos(whole)
    by_block = torch.stack([cos(g) for g in gram])
    conflict = torch.where(both > 0, opposite / both.clamp(min=1), torch.zeros_like(both))
    topk = torch.where(total[:, None] > 0, mass / total[:, None].clamp(min=1e-300), torch.zeros_like(mass))
    params = {"names": names, "densities": list(densities)}
    return TaskVectorDiagnostics(
        dims={"task": names, "task_b": names, "block": blocks, "density": list(densities)},
        data={
            "cosine": (("task", "task_b"), cosine.numpy()),
            "cosine_by_block": (("block", "task", "task_b"), by_block.numpy()),
            "sign_conflict": (("task", "task_b"), conflict.numpy()),
            "sign_conflict_all": ((), np.asarray(mixed_sign / multi if multi else 0.0)),
            "topk_mass": (("task", "density"), topk.numpy()),
            "norm": (("task",), whole.diagonal().sqrt().numpy()),
        },
        attrs=params,
        provenance=provenance(params=params),
    )


def cosine_similarity(a: TaskVector, b: TaskVector) -> float:
    """Cosine between two task vectors over all their tensors."""
    return float(diagnose([a, b], names=["a", "b"], densities=())["cosine"][0, 1])


__all__ = [
    "Checkpoint", "METHODS", "TaskVector", "TaskVectorDiagnostics", "block_of", "check_compatible", "cosine_similarity",
    "dare_drop", "diagnose", "elect_and_mean", "load_state", "merge", "merge_tensor", "save_pretrained", "task_vector", "to_mergekit_yaml",
    "trim_topk",
]
