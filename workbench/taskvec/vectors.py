"""Task vectors: ``finetuned - base``, tensor by tensor, computed on demand.

A :class:`TaskVector` holds no tensors: it is a linear combination of (fine-tuned,
base) checkpoint pairs, so ``a + b``, ``a - b``, ``-a`` and ``2 * a`` cost nothing and a
tensor is only computed (in float32, or float64 when a checkpoint holds float64) when
it is asked for: ``tv[key]`` whole, or
``tv.flat(key, lo, hi)`` for entries ``lo:hi`` of its flattening, read from the
checkpoint files and nothing more.
"""

from __future__ import annotations

import json
import os
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.safetensors_io import write_file
from workbench.taskvec.checkpoint import Checkpoint, all_finite, check_compatible, check_finite, default_name

Term = tuple[float, Checkpoint, "Checkpoint | None"]


def _work(*tensors: torch.Tensor) -> torch.dtype:
    """float64 when any input is float64, else float32 (what merges compute in)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def sub_in_slices(d: torch.Tensor, b: torch.Tensor, rows: int = 1 << 20) -> torch.Tensor:
    """``d -= b`` in place, slice by slice when ``b`` is narrower than ``d`` (a bf16 base
    from a float32 copy): ``sub_`` would first promote the whole of ``b``."""
    if b.dtype == d.dtype:
        return d.sub_(b)
    fd, fb = d.view(-1), b.reshape(-1)
    for lo in range(0, fd.numel(), rows):
        fd[lo:lo + rows].sub_(fb[lo:lo + rows])
    return d


class TaskVector:
    """``finetuned - base``, tensor by tensor, computed on demand (float32; float64 for
    float64 checkpoints).

    ``tv[key]`` is one tensor of the difference; ``tv.keys()`` the floating-point tensor
    names; ``a + b``, ``a - b``, ``-a``, ``2.0 * a`` make new lazy task vectors;
    ``tv.apply_to(base, scale)`` returns ``base + scale * tv`` as a state dict.
    ``terms``: the combination itself, ``[(coefficient, fine-tuned, base or None)]``
    (None: the fine-tuned entry is already a difference).
    """

    def __init__(self, base: Any = None, finetuned: Any = None, *, name: str | None = None,
                 terms: list[Term] | None = None) -> None:
        if terms is None:
            if base is None or finetuned is None:
                raise WorkbenchError("TaskVector(base, finetuned) needs both checkpoints")
            b = Checkpoint(base, default_name(base, "base"))
            f = Checkpoint(finetuned, name or default_name(finetuned, "finetuned"))
            check_compatible(b, f)
            terms = [(1.0, f, b)]
        self.terms = list(terms)
        self.name = name or (self.terms[0][1].name if len(self.terms) == 1 else "combination")
        self._keys = self.terms[0][1].keys()
        self._shapes = {k: self.terms[0][1].shape(k) for k in self._keys}

    @classmethod
    def from_deltas(cls, deltas: Mapping[str, torch.Tensor], *, name: str = "deltas") -> "TaskVector":
        """A task vector given directly as tensors (e.g. loaded from ``TaskVector.save``)."""
        return cls(terms=[(1.0, Checkpoint(dict(deltas), name), None)], name=name)

    @classmethod
    def load(cls, path: str | os.PathLike, *, name: str | None = None) -> "TaskVector":
        """A task vector saved by :meth:`save` (read lazily)."""
        ck = Checkpoint(path)
        return cls(terms=[(1.0, ck, None)], name=name or os.path.basename(os.fspath(path)))

    # -------------------------------------------------------------- access

    def keys(self) -> list[str]:
        return list(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __getitem__(self, key: str) -> torch.Tensor:
        """The whole tensor ``key`` (float32), checked finite: a NaN or inf in a checkpoint
        raises a WorkbenchError naming the tensor and the checkpoint."""
        if key not in self._shapes:
            raise WorkbenchError(f"task vector {self.name!r} has no tensor {key!r}")
        out = None
        for coef, ft, base in self.terms:  # in place on a copy of our own: one work-dtype tensor, not three
            f = ft.get(key)
            if base is None:
                check_finite(f, key, ft.name)
                d = f.to(_work(f), copy=True)
            else:
                b = base.get(key)
                d = sub_in_slices(f.to(_work(f, b), copy=True), b)
                if not all_finite(d):
                    check_finite(b, key, base.name)
                    check_finite(f, key, ft.name)
                    check_finite(d, key, f"{ft.name} - {base.name}")
                del b
            del f
            if coef != 1.0:
                d.mul_(coef)
            out = d if out is None else out.add_(d)
        return out

    def flat(self, key: str, lo: int, hi: int, *, check: bool = True) -> torch.Tensor:
        """Entries ``lo:hi`` of the flattened ``self[key]``, computed from those entries of
        the checkpoints only (the same arithmetic as ``self[key]``). With ``check`` a
        non-finite slice raises ``self[key]``'s error (pass False only for a tensor
        already read whole, which checked it)."""
        out = None
        for coef, ft, base in self.terms:
            f = ft.get_flat(key, lo, hi)
            if base is None:
                d = f.to(_work(f))
            else:
                b = base.get_flat(key, lo, hi)
                dt = _work(f, b)
                d = f.to(dt) - b.to(dt)
            d = d if coef == 1.0 else d * coef
            out = d if out is None else out + d
        if check and not all_finite(out):
            self[key]  # names the checkpoint and the tensor
            raise WorkbenchError(f"tensor {key!r} of task vector {self.name!r} is not finite (entries {lo}:{hi})")
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

    def check_same(self, other: "TaskVector") -> None:
        """Raise a WorkbenchError unless ``other`` holds the same tensor names and shapes."""
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
        self.check_same(other)
        return TaskVector(terms=self.terms + other.terms, name=f"({self.name} + {other.name})")

    def __neg__(self) -> "TaskVector":
        return self * -1.0

    def __sub__(self, other: "TaskVector") -> "TaskVector":
        self.check_same(other)
        return TaskVector(terms=self.terms + (-other).terms, name=f"({self.name} - {other.name})")

    def __mul__(self, c: float) -> "TaskVector":
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c):
            raise WorkbenchError(f"a task vector scales by a finite number, not {c!r}")
        return TaskVector(terms=[(coef * float(c), f, b) for coef, f, b in self.terms],
                          name=self.name if c == 1 else f"{c:g}*{self.name}")

    __rmul__ = __mul__

    def __truediv__(self, c: float) -> "TaskVector":
        if isinstance(c, bool) or not isinstance(c, (int, float)) or not np.isfinite(c) or c == 0:
            raise WorkbenchError(f"a task vector divides by a finite non-zero number, not {c!r}")
        return self * (1.0 / c)

    # -------------------------------------------------------------- use

    def apply_to(self, base: Any, scale: float = 1.0) -> dict[str, torch.Tensor]:
        """``base + scale * self`` as a new state dict (integer buffers copied as they are).
        The base's dtype is kept."""
        from workbench.taskvec.merging import merge

        return merge(base, [self], method="task_arithmetic", weights=[scale])

    def save(self, path: str | os.PathLike, *, overwrite: bool = True) -> str:
        """Write the task vector (float32) to one safetensors file, atomically."""
        return write_file(self.to_dict(), os.fspath(path), {"workbench": json.dumps({"task_vector": self.name})},
                          overwrite=overwrite)

    def __repr__(self) -> str:
        return f"TaskVector({self.name!r}, {len(self._keys)} tensors, {self.numel()} parameters)"


def task_vector(base: Any, finetuned: Any, *, name: str | None = None) -> TaskVector:
    """``TaskVector(base, finetuned)``."""
    return TaskVector(base, finetuned, name=name)


__all__ = ["TaskVector", "task_vector"]
