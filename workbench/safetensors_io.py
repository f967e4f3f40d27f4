"""Every safetensors file the workbench reads or writes goes through this module.

Reading: :class:`SafetensorsFile` parses the header once and copies one tensor (or a
slice ``lo:hi`` of a flattened tensor) straight from the file into a buffer this
process owns, with positioned reads. Nothing is memory-mapped, so only the tensors
asked for occupy memory and the page cache of a checkpoint never counts against the
caller (what keeps a merge of eight checkpoints small). :func:`read_file` reads a whole
file as torch tensors or numpy arrays, with its metadata.

Writing: :func:`write_file` writes torch tensors or numpy arrays one at a time straight
from their memory (no serialised copy of the whole state) into a temporary file next to
the target, flushes it to disk, then renames it into place: a reader sees either the
old file or the whole new one, and a failure leaves nothing behind. With
``overwrite=False`` an existing non-empty file is refused (checked up front, and
committed with a no-clobber link, so a file that appears meanwhile is not replaced).

Several files that belong together (a model directory, an SAE folder with its config)
are written with :func:`atomic_directory`: build them in the yielded temporary folder,
and the folder is renamed to its final name in one step when the block ends without an
error (removed otherwise)::

    with atomic_directory(path) as tmp:          # refuses a non-empty `path`
        write_file(state, os.path.join(tmp, "sae.safetensors"))
        with open(os.path.join(tmp, "cfg.json"), "w") as f:
            json.dump(cfg, f)

A single file written alone only needs ``write_file(tensors, path)``.

Files are compatible with the ``safetensors`` library in both directions (same header,
8-byte aligned data); dtypes this reader does not know, and big-endian hosts, fall back
to the library.
"""

from __future__ import annotations

import contextlib
import errno
import json
import math
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

from workbench.errors import WorkbenchError

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"})
"""Safetensors dtype codes of floating-point tensors."""

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
_ST_NUMPY = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"), "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"), "BOOL": np.dtype("?"),
}
_NUMPY_ST = {v.newbyteorder("="): k for k, v in _ST_NUMPY.items()}
_ITEMSIZE = {**{k: v.itemsize for k, v in _ST_TORCH.items()}, **{k: v.itemsize for k, v in _ST_NUMPY.items()}}
_UMASK = os.umask(0o022)
os.umask(_UMASK)  # read once: temporaries are created private (0600 / 0700) and opened up to this at commit


class SafetensorsFile:
    """One safetensors file, read with positioned reads into fresh buffers.

    ``keys()`` lists its tensors, ``info[key]`` is ``(dtype code, shape, begin, end)``,
    ``metadata`` the header's string metadata. ``read(key)`` returns a torch tensor;
    ``read(key, lo, hi)`` entries ``lo:hi`` of the flattened tensor (only those bytes are
    read); ``read_numpy(key)`` a numpy array. Each result owns its memory."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        try:
            self._fh = open(self.path, "rb", buffering=0)
        except OSError as err:
            raise WorkbenchError(f"{self.path!r} is not a readable safetensors file ({err})") from err
        try:
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
            self._fh.close()
            raise WorkbenchError(f"{self.path!r} is not a readable safetensors file ({err})") from err
        meta = header.pop("__metadata__", None) or {}
        self.metadata: dict[str, str] = {str(k): str(v) for k, v in meta.items()} if isinstance(meta, dict) else {}
        self._start = 8 + n
        self.info: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        for key, v in header.items():
            try:
                dt, shape = str(v["dtype"]), tuple(int(x) for x in v["shape"])
                begin, end = (int(x) for x in v["data_offsets"])
            except (KeyError, TypeError, ValueError) as err:
                self._fh.close()
                raise WorkbenchError(f"{self.path!r} is not a readable safetensors file (bad entry for {key!r})") from err
            if self._start + end > size or begin > end or begin < 0:
                self._fh.close()
                raise WorkbenchError(
                    f"{self.path!r} is not a readable safetensors file (tensor {key!r} lies outside the file)")
            if dt in _ITEMSIZE:
                need = int(np.prod(shape, dtype=np.int64)) * _ITEMSIZE[dt]
                if end - begin != need:
                    self._fh.close()
                    raise WorkbenchError(
                        f"{self.path!r} is not a readable safetensors file (tensor {key!r} has {end - begin} bytes, "
                        f"its shape and dtype need {need})"
                    )
            self.info[key] = (dt, shape, begin, end)
        self._fallback = None

    def keys(self) -> list[str]:
        return list(self.info)

    def __contains__(self, key: str) -> bool:
        return key in self.info

    def dtype(self, key: str) -> str:
        """The safetensors dtype code (``"F32"``, ``"BF16"``...) of ``key``."""
        return self._entry(key)[0]

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entry(key)[1]

    def nbytes(self, key: str) -> int:
        """Bytes of tensor ``key`` in the file."""
        _, _, begin, end = self._entry(key)
        return end - begin

    def _entry(self, key: str):
        try:
            return self.info[key]
        except KeyError:
            raise WorkbenchError(f"{self.path!r} holds no tensor {key!r}; it holds {self.keys()[:10]}") from None

    def _read_bytes(self, key: str, lo: int | None, hi: int | None,
                    torch_buffer: bool) -> tuple[Any, tuple[int, ...] | None]:
        """The raw bytes of entries ``lo:hi`` (all by default) in a buffer of our own (a
        uint8 torch tensor or numpy array), and the shape to give them (None for a
        slice: flat)."""
        dt, shape, begin, _ = self._entry(key)
        numel = int(np.prod(shape, dtype=np.int64))
        whole = lo is None and hi is None
        lo, hi = max(0, lo or 0), min(numel, numel if hi is None else hi)
        hi = max(lo, hi)
        size = _ITEMSIZE[dt]
        nbytes = (hi - lo) * size
        buf = torch.empty(nbytes, dtype=torch.uint8) if torch_buffer else np.empty(nbytes, dtype=np.uint8)
        view = memoryview(buf.numpy() if torch_buffer else buf)
        pos, done = self._start + begin + lo * size, 0
        while done < len(view):
            self._fh.seek(pos + done)
            got = self._fh.readinto(view[done:])
            if not got:
                raise WorkbenchError(f"{self.path!r} ended while reading tensor {key!r}; the file is truncated")
            done += got
        return buf, (shape if whole else None)

    def _library(self, framework: str):
        if self._fallback is None:
            self._fallback = {}
        if framework not in self._fallback:
            from safetensors import safe_open

            self._fallback[framework] = safe_open(self.path, framework=framework)
        return self._fallback[framework]

    def read(self, key: str, lo: int | None = None, hi: int | None = None) -> torch.Tensor:
        """Tensor ``key`` as torch (entries ``lo:hi`` of its flattening when given)."""
        dt = self._entry(key)[0]
        dtype = _ST_TORCH.get(dt)
        if dtype is None or sys.byteorder != "little":
            t = self._library("pt").get_tensor(key)
            return t if lo is None and hi is None else t.reshape(-1)[lo:hi].clone()
        buf, shape = self._read_bytes(key, lo, hi, torch_buffer=True)
        out = buf.view(dtype)
        return out.reshape(shape) if shape is not None else out

    def read_numpy(self, key: str) -> np.ndarray:
        """Tensor ``key`` as a numpy array (dtypes numpy has: no bfloat16 or float8)."""
        dt = self._entry(key)[0]
        if dt not in _ST_NUMPY:
            raise WorkbenchError(f"tensor {key!r} of {self.path!r} has dtype {dt}, which numpy cannot hold; read it as torch")
        if sys.byteorder != "little":
            return self._library("np").get_tensor(key)
        buf, shape = self._read_bytes(key, None, None, torch_buffer=False)
        return buf.view(_ST_NUMPY[dt]).reshape(shape)

    def close(self) -> None:
        self._fh.close()
        self._fallback = None

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"SafetensorsFile({self.path!r}, {len(self.info)} tensors)"


def read_file(path: str | os.PathLike, *, framework: str = "pt") -> tuple[dict[str, Any], dict[str, str]]:
    """Every tensor of a file (``framework="pt"``: torch, ``"np"``: numpy) and its metadata."""
    if framework not in ("pt", "np"):
        raise WorkbenchError(f"framework must be 'pt' (torch) or 'np' (numpy), got {framework!r}")
    with SafetensorsFile(path) as f:
        get = f.read if framework == "pt" else f.read_numpy
        return {k: get(k) for k in f.keys()}, dict(f.metadata)


# ---------------------------------------------------------------------- writing


def torch_dtype(code: str) -> torch.dtype:
    """The torch dtype of a safetensors dtype code (``"BF16"`` -> ``torch.bfloat16``)."""
    if code not in _ST_TORCH:
        raise WorkbenchError(f"safetensors dtype {code!r} has no torch dtype here; known: {', '.join(_ST_TORCH)}")
    return _ST_TORCH[code]


@dataclass(frozen=True)
class Deferred:
    """A tensor that :func:`write_file` makes only when its turn to be written comes:
    its dtype and shape (for the header) and a function that returns it. A writer of
    many large tensors (a merge) then holds one at a time, not all of them."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    make: Callable[[], torch.Tensor]

    def value(self, name: str) -> torch.Tensor:
        t = self.make()
        if not isinstance(t, torch.Tensor) or t.dtype != self.dtype or tuple(t.shape) != tuple(self.shape):
            got = f"{t.dtype} {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
            raise WorkbenchError(f"deferred tensor {name!r} was announced as {self.dtype} {tuple(self.shape)} but "
                                 f"made as {got}")
        return t


def _entry_of(name: str, v: Any) -> tuple[str, list[int], int, Any]:
    """(dtype code, shape, byte count, the value) of a torch tensor, numpy array or
    :class:`Deferred` tensor."""
    if isinstance(v, Deferred):
        if v.dtype not in _TORCH_ST:
            raise WorkbenchError(f"tensor {name!r} has dtype {v.dtype}, which safetensors cannot store")
        return _TORCH_ST[v.dtype], list(v.shape), math.prod(v.shape) * _ITEMSIZE[_TORCH_ST[v.dtype]], v
    if isinstance(v, torch.Tensor):
        if v.dtype not in _TORCH_ST:
            raise WorkbenchError(f"tensor {name!r} has dtype {v.dtype}, which safetensors cannot store")
        return _TORCH_ST[v.dtype], list(v.shape), v.numel() * v.element_size(), v
    a = np.asarray(v)
    code = _NUMPY_ST.get(a.dtype.newbyteorder("=")) if a.dtype.kind in "biuf" else None
    if code is None:
        raise WorkbenchError(f"array {name!r} has dtype {a.dtype}; safetensors stores numbers and bools only")
    return code, list(a.shape), a.size * a.itemsize, a


def _raw(v: Any) -> memoryview:
    """The bytes of a tensor / array in C order, little-endian."""
    if isinstance(v, torch.Tensor):
        return memoryview(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    a = np.ascontiguousarray(v)
    if a.dtype.byteorder == ">" or (a.dtype.byteorder == "=" and sys.byteorder != "little"):
        a = a.astype(a.dtype.newbyteorder("<"))
    return memoryview(a.reshape(-1).view(np.uint8))


def is_nonempty(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists as anything but an empty file or an empty directory."""
    path = os.fspath(path)
    if os.path.isdir(path) and not os.path.islink(path):
        return bool(os.listdir(path))
    if os.path.lexists(path):
        return not (os.path.isfile(path) and not os.path.islink(path) and os.path.getsize(path) == 0)
    return False


def check_writable(path: str | os.PathLike, *, overwrite: bool = False, what: str = "output") -> str:
    """Refuse, before any work, an output whose folder is missing or which already holds
    something (unless ``overwrite``); return the path."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise WorkbenchError(f"cannot write {what} {path!r}: no directory {directory!r}")
    if not overwrite and is_nonempty(path):
        raise WorkbenchError(
            f"{what} {path!r} already exists and is not empty; nothing was written. Pass a new path, "
            "or overwrite=True to replace it"
        )
    return path


def write_file(tensors: Mapping[str, Any], path: str | os.PathLike, metadata: Mapping[str, str] | None = None,
               *, overwrite: bool = True) -> str:
    """Write ``tensors`` (torch tensors, numpy arrays or :class:`Deferred` tensors, any
    mix) to one safetensors file, atomically: a temporary file in the same folder,
    flushed, then renamed into place. Deferred tensors are made one at a time, as they
    are written.

    ``overwrite=False`` refuses an existing non-empty ``path`` (and never replaces one
    that appears while writing). On any error nothing is left behind and an existing
    file is untouched. Returns ``path``."""
    path = check_writable(path, overwrite=overwrite, what="file")
    # widest dtypes first (stable), so every tensor starts aligned to its element size
    entries = {str(k): _entry_of(str(k), v) for k, v in tensors.items()}
    order = sorted(entries, key=lambda k: -_ITEMSIZE[entries[k][0]])
    header: dict[str, Any] = {}
    if metadata:
        bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
        if bad:
            raise WorkbenchError(f"safetensors metadata maps strings to strings; entries {bad[:5]} are not")
        header["__metadata__"] = dict(metadata)
    offset = 0
    for k in order:
        code, shape, nbytes, _ = entries[k]
        header[k] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(len(blob).to_bytes(8, "little"))
            f.write(blob)
            for k in order:
                if entries[k][2]:
                    v = entries[k][3]
                    f.write(_raw(v.value(k) if isinstance(v, Deferred) else v))
                    del v
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            os.fsync(f.fileno())
        _commit_file(tmp, path, overwrite)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _commit_file(tmp: str, path: str, overwrite: bool) -> None:
    if overwrite:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # fails if `path` exists: no window in which another file is replaced
    except FileExistsError:
        if is_nonempty(path):
            raise WorkbenchError(f"file {path!r} appeared while it was being written; it was left as it is") from None
        os.replace(tmp, path)  # an empty placeholder (e.g. from mkstemp) may be replaced
    except OSError as err:  # no hard links on this file system: check, then rename
        if err.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
            raise
        if is_nonempty(path):
            raise WorkbenchError(f"file {path!r} appeared while it was being written; it was left as it is") from None
        os.replace(tmp, path)
    else:
        os.remove(tmp)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[str]:
    """A temporary folder beside ``path``, renamed to ``path`` when the block succeeds.

    The rename is the single commit point: readers see no folder or the complete one,
    and an error inside the block removes the temporary folder and leaves ``path`` as it
    was. An existing non-empty ``path`` is refused unless ``overwrite`` (then the old
    folder is moved aside, the new one renamed in, and only then the old one removed)."""
    path = check_writable(path, overwrite=overwrite, what="folder")
    if os.path.lexists(path) and not os.path.isdir(path) and not overwrite:
        raise WorkbenchError(f"{path!r} is a file, not a folder; nothing was written (overwrite=True replaces it)")
    parent = os.path.dirname(os.path.abspath(path))
    tmp = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        os.chmod(tmp, 0o777 & ~_UMASK)
        yield tmp
        for name in os.listdir(tmp):  # make the folder's files durable before it becomes visible
            p = os.path.join(tmp, name)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        old = None
        if os.path.lexists(path) and (not os.path.isdir(path) or is_nonempty(path)):
            if not overwrite:
                raise WorkbenchError(f"{path!r} appeared while it was being written; it was left as it is")
            old = tempfile.mkdtemp(dir=parent, prefix="." + os.path.basename(path) + ".", suffix=".old")
            os.rmdir(old)
            os.rename(path, old)
        try:
            os.rename(tmp, path)  # onto nothing or an empty folder: atomic
        except OSError:
            if old is not None:
                os.rename(old, path)
            raise
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)


__all__ = ["FLOAT_DTYPES", "Deferred", "SafetensorsFile", "atomic_directory", "check_writable", "is_nonempty",
           "read_file", "torch_dtype", "write_file"]
