"""Crash-safe folders of tensors: a JSON manifest, written last, is the single commit point.

A folder artifact (an SAE, a training checkpoint) is a manifest (``cfg.json``,
``train_state.json``) plus one safetensors file it names by content hash
(``sae-<16 hex>.safetensors``) together with the file's SHA-256. :func:`commit` writes the
tensors under a temporary name, renames them to their content name, then replaces the
manifest atomically (``os.replace``), and only then removes the tensor files the old
manifest named. Whenever it is interrupted (an exception, Ctrl-C, a crash), the
manifest names either the old tensors or the new ones, both complete, never a mix;
readers (:func:`read_json`, then :func:`read_committed`) trust only what a complete
manifest names, and check its hash. Files the folder holds that do not match this
artifact's names are never touched.

The I/O steps are the module-level functions :func:`write_tensors`,
:func:`write_text`, :func:`replace` and :func:`remove`, each one step, so tests can make
any step fail. Safetensors and JSON only: no pickle.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from workbench.errors import WorkbenchError

TMP_MARK = ".tmp-"


# ---------------------------------------------------------------------- single I/O steps


def fsync_dir(folder: Path) -> None:
    """Flush a folder's entries (a rename is durable only then); a no-op where unsupported."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write ``tensors`` to the safetensors file ``path`` and flush it to disk."""
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to disk."""
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def replace(src: Path, dst: Path) -> None:
    """Atomically rename ``src`` to ``dst`` (replacing it) and flush the folder."""
    os.replace(src, dst)
    fsync_dir(Path(dst).parent)


def remove(path: Path) -> None:
    Path(path).unlink(missing_ok=True)


# ---------------------------------------------------------------------- commit protocol


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def tensor_file_pattern(prefix: str) -> re.Pattern:
    return re.compile(rf"{re.escape(prefix)}-[0-9a-f]{{16}}\.safetensors")


def is_own_file(name: str, manifest_name: str, prefix: str) -> bool:
    """Whether ``name`` is a file :func:`commit` writes for this artifact (its manifest,
    a content-named tensor file, or a temporary file of an interrupted write)."""
    return (name == manifest_name or bool(tensor_file_pattern(prefix).fullmatch(name))
            or name.startswith(f".{prefix}{TMP_MARK}") or name.startswith(f".{manifest_name}{TMP_MARK}"))


def commit(folder: str | os.PathLike, manifest_name: str, manifest: Mapping[str, Any],
           tensors: Mapping[str, torch.Tensor], *, prefix: str) -> dict[str, Any]:
    """Write ``tensors`` and then ``manifest`` (with ``"tensors": {"file", "sha256"}``
    added) into ``folder``; the manifest's atomic replacement is the commit point. Returns
    the manifest written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex[:12]
    tmp = folder / f".{prefix}{TMP_MARK}{token}.safetensors"
    try:
        write_tensors(tmp, tensors)
        digest = sha256_file(tmp)
        name = f"{prefix}-{digest[:16]}.safetensors"
        replace(tmp, folder / name)
    finally:
        tmp.unlink(missing_ok=True)
    out = {**manifest, "tensors": {"file": name, "sha256": digest}}
    mtmp = folder / f".{manifest_name}{TMP_MARK}{token}"
    try:
        write_text(mtmp, json.dumps(out, indent=1, allow_nan=False))
        replace(mtmp, folder / manifest_name)  # the commit point
    finally:
        mtmp.unlink(missing_ok=True)
    for p in folder.iterdir():  # what the old manifest named, and leftovers of interrupted writes
        if p.name not in (name, manifest_name) and is_own_file(p.name, manifest_name, prefix):
            remove(p)
    return out


# ---------------------------------------------------------------------- reading


def read_json(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A JSON object from ``path``; malformed or truncated JSON is a WorkbenchError naming the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise WorkbenchError(f"{what} {str(path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise WorkbenchError(f"cannot read {what} {str(path)!r}: {e}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise WorkbenchError(f"{what} {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                             "it may be truncated by an interrupted write") from None
    if not isinstance(obj, dict):
        raise WorkbenchError(f"{what} {str(path)!r} must hold a JSON object, got {type(obj).__name__}")
    return obj


def require_keys(obj: Mapping[str, Any], keys: Iterable[str], path: str | os.PathLike) -> None:
    missing = [k for k in keys if k not in obj]
    if missing:
        raise WorkbenchError(f"{str(path)!r} lacks the key(s) {missing}; it needs {list(keys)}")


def load_tensors(path: str | os.PathLike, *, sha256: str | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; with ``sha256``, the file must have that hash."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise WorkbenchError(f"tensor file {str(path)!r} does not exist")
    if sha256 is not None and sha256_file(path) != sha256:
        raise WorkbenchError(f"tensor file {str(path)!r} does not match the SHA-256 its manifest records: "
                             "the file was changed or damaged after it was written")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for a damaged header
        raise WorkbenchError(f"cannot read tensor file {str(path)!r}: {e}") from None


def read_committed(folder: str | os.PathLike, manifest_name: str, what: str, *,
                   manifest: Mapping[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """The tensors the manifest of ``folder`` names (hash checked); pass ``manifest`` when
    it was read already, so both come from the same commit."""
    folder = Path(folder)
    if manifest is None:
        manifest = read_json(folder / manifest_name, what)
    ref = manifest.get("tensors")
    if not isinstance(ref, dict) or not isinstance(ref.get("file"), str) or not isinstance(ref.get("sha256"), str):
        raise WorkbenchError(f"{what} {str(folder / manifest_name)!r} names no tensor file (key 'tensors' with "
                             "'file' and 'sha256'); it was not written by this version of workbench")
    if Path(ref["file"]).name != ref["file"]:
        raise WorkbenchError(f"{what} {str(folder / manifest_name)!r} names a tensor file outside its folder: "
                             f"{ref['file']!r}")
    return load_tensors(folder / ref["file"], sha256=ref["sha256"])


def check_tensors(tensors: Mapping[str, torch.Tensor], want: Mapping[str, tuple[int, ...]], path) -> None:
    """Raise unless ``tensors`` holds exactly the names of ``want`` with those shapes."""
    missing = sorted(set(want) - set(tensors))
    extra = sorted(set(tensors) - set(want))
    bad = [f"{k} {tuple(tensors[k].shape)} (expected {tuple(want[k])})" for k in want
           if k in tensors and tuple(tensors[k].shape) != tuple(want[k])]
    problems = []
    if missing:
        problems.append(f"missing {missing}")
    if extra:
        problems.append(f"unexpected {extra}")
    if bad:
        problems.append("wrong shapes: " + ", ".join(bad))
    if problems:
        raise WorkbenchError(f"{str(path)!r}: " + "; ".join(problems))
