"""Result objects: named dimensions, the numbers, and where they came from.

Every analysis returns a :class:`Result` (or a subclass). It holds one or more named
arrays ("variables"), each over named dimensions whose coordinates are shared, the
parameters of the analysis (``attrs``) and provenance (model, revision, config hash,
seed, package versions). ``to_frame()`` gives a tidy pandas frame; ``save`` / ``load``
round-trip exactly through one safetensors file (arrays of any shape, 0-d included, as
tensors, everything else as JSON in its header; no pickle anywhere), read and written
by :mod:`workbench.safetensors_io` (atomic writes).

    r = Result("demo", dims={"layer": [0, 1], "head": [0, 1, 2]},
               data={"score": (("layer", "head"), np.zeros((2, 3)))})
    r.to_frame()          # columns: layer, head, score
    r.save("demo.safetensors"); Result.load("demo.safetensors")
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import platform
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np

from workbench.errors import WorkbenchError

FORMAT_VERSION = 1
_REGISTRY: dict[str, type["Result"]] = {}


def register(kind: str):
    """Class decorator: ``Result.load`` rebuilds results of ``kind`` as this subclass."""

    def deco(cls):
        cls.KIND = kind
        _REGISTRY[kind] = cls
        return cls

    return deco


def _jsonable(obj: Any) -> Any:
    """Normalise to what JSON round-trips unchanged (tuples -> lists, numpy -> python)."""
    return json.loads(json.dumps(obj, default=_json_default))


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "tolist"):
        return o.tolist()
    return str(o)


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("interp-workbench", "torch", "transformers", "nnsight", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def params_hash(params: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(_jsonable(params), sort_keys=True).encode()).hexdigest()[:16]


def provenance(subject=None, *, seed: int | None = None, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Provenance for a result: the model (name, revision, config hash, weights hash),
    the seed, a hash of the analysis parameters, package versions and the time."""
    prov: dict[str, Any] = {}
    if subject is not None:
        prov.update(subject.provenance())
    prov["seed"] = seed
    prov["params_hash"] = params_hash(params or {})
    prov["versions"] = package_versions()
    prov["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return prov


class Result:
    """Named arrays over shared named dimensions, with attrs and provenance."""

    KIND: ClassVar[str] = "result"

    def __init__(
        self,
        kind: str | None = None,
        *,
        dims: Mapping[str, Sequence],
        data: Mapping[str, tuple[Sequence[str], Any]],
        attrs: Mapping[str, Any] | None = None,
        provenance: Mapping[str, Any] | None = None,
    ) -> None:
        self.kind = kind or self.KIND
        self.dims = {str(k): _jsonable(list(v)) for k, v in dims.items()}
        self.data: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
        for name, (vdims, arr) in data.items():
            arr = np.asarray(arr.detach().cpu().numpy() if hasattr(arr, "detach") else arr)
            vdims = tuple(vdims)
            unknown = [d for d in vdims if d not in self.dims]
            if unknown:
                raise WorkbenchError(f"variable {name!r} uses unknown dimensions {unknown}; known: {list(self.dims)}")
            want = tuple(len(self.dims[d]) for d in vdims)
            if arr.shape != want:
                raise WorkbenchError(f"variable {name!r} has shape {arr.shape}, but its dimensions {vdims} give {want}")
            self.data[str(name)] = (vdims, arr)
        self.attrs = _jsonable(dict(attrs or {}))
        self.provenance = _jsonable(dict(provenance or {}))

    # ------------------------------------------------------------------ access

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.data:
            raise WorkbenchError(f"no variable {name!r} in this {self.kind} result; variables: {list(self.data)}")
        return self.data[name][1]

    def __contains__(self, name: str) -> bool:
        return name in self.data

    def dims_of(self, name: str) -> tuple[str, ...]:
        self[name]
        return self.data[name][0]

    @property
    def variables(self) -> list[str]:
        return list(self.data)

    def coord(self, dim: str) -> list:
        if dim not in self.dims:
            raise WorkbenchError(f"no dimension {dim!r}; dimensions: {list(self.dims)}")
        return self.dims[dim]

    def to_frame(self, variables: Sequence[str] | None = None):
        """A tidy pandas frame: one column per dimension, one per variable.

        By default it holds every variable over the same dimensions as the first one.
        """
        import pandas as pd

        if not self.data:
            return pd.DataFrame()
        names = list(variables) if variables is not None else None
        if names is None:
            first = next(iter(self.data.values()))[0]
            names = [n for n, (d, _) in self.data.items() if d == first]
        vdims = self.dims_of(names[0])
        for n in names:
            if self.dims_of(n) != vdims:
                raise WorkbenchError(f"variables {names} do not share dimensions; frame them separately")
        index = pd.MultiIndex.from_product([self.dims[d] for d in vdims], names=list(vdims)) if vdims else None
        cols = {n: self[n].reshape(-1) for n in names}
        frame = pd.DataFrame(cols, index=index)
        return frame.reset_index() if vdims else frame

    # ------------------------------------------------------------------ persistence

    def _header(self) -> dict[str, Any]:
        return {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "dims": self.dims,
            "var_dims": {n: list(d) for n, (d, _) in self.data.items()},
            "var_dtypes": {n: str(a.dtype) for n, (_, a) in self.data.items()},
            "attrs": self.attrs,
            "provenance": self.provenance,
        }

    def save(self, path: str | os.PathLike) -> str:
        """Write to one safetensors file (written to a temp file, then renamed, so a
        failure never leaves a half-written result)."""
        from workbench.safetensors_io import write_file

        path = os.fspath(path)
        tensors = {n: a for n, (_, a) in self.data.items()}  # (np.ascontiguousarray would make 0-d arrays 1-d)
        for n, a in tensors.items():
            if a.dtype == object or a.dtype.kind not in "biuf":
                raise WorkbenchError(f"variable {n!r} has dtype {a.dtype}; only numeric and bool arrays can be saved")
        return write_file(tensors, path, {"workbench": json.dumps(self._header())})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Result":
        """Read a result written by ``save`` (as its registered subclass)."""
        from workbench.safetensors_io import SafetensorsFile

        path = os.fspath(path)
        if not os.path.exists(path):
            raise WorkbenchError(f"no result file at {path!r}")
        try:
            with SafetensorsFile(path) as f:
                meta = f.metadata.get("workbench")
                arrays = {k: f.read_numpy(k) for k in f.keys()}
        except WorkbenchError as err:
            raise WorkbenchError(f"{path!r} is not a safetensors file written by Result.save ({err})") from err
        if meta is None:
            raise WorkbenchError(f"{path!r} is a safetensors file but holds no workbench result header")
        try:
            head = json.loads(meta)
        except ValueError as err:
            raise WorkbenchError(f"{path!r} holds a damaged workbench result header ({err})") from err
        if not isinstance(head, dict):
            raise WorkbenchError(f"{path!r} holds a damaged workbench result header (not a JSON object)")
        if head.get("format_version") != FORMAT_VERSION:
            raise WorkbenchError(f"{path!r} has result format {head.get('format_version')}; this version reads {FORMAT_VERSION}")
        lacking = [k for k in ("kind", "dims", "var_dims", "var_dtypes", "attrs", "provenance") if k not in head]
        if lacking:
            raise WorkbenchError(f"{path!r}: the result header lacks {lacking}; the file is damaged")
        missing = [n for n in head["var_dims"] if n not in arrays]
        if missing:
            raise WorkbenchError(f"{path!r} lacks the arrays of variables {missing}; the file is damaged")
        target = _REGISTRY.get(head["kind"], Result)
        obj = target.__new__(target)
        Result.__init__(
            obj, head["kind"], dims=head["dims"],
            data={n: (tuple(d), arrays[n].astype(head["var_dtypes"][n], copy=False)) for n, d in head["var_dims"].items()},
            attrs=head["attrs"], provenance=head["provenance"],
        )
        return obj

    def equals(self, other: "Result") -> bool:
        """Exact equality of kind, dimensions, arrays (bitwise, NaN-aware), attrs and provenance."""
        if not isinstance(other, Result) or self._header() != other._header():
            return False
        return all(
            np.array_equal(a, other.data[n][1], equal_nan=a.dtype.kind in "fc") for n, (_, a) in self.data.items()
        )

    def __repr__(self) -> str:
        shape = ", ".join(f"{d}={len(v)}" for d, v in self.dims.items())
        model = self.provenance.get("model")
        return f"<{type(self).__name__} {self.kind!r} [{shape}] variables={self.variables}{f' model={model!r}' if model else ''}>"
