"""Checkpoints: named tensors read one at a time, and merged states written back.

A :class:`Checkpoint` is a state dict, a module, a Subject, a safetensors file or a model
folder (``model.safetensors`` or a sharded index). Files are read through
:class:`workbench.safetensors_io.SafetensorsFile`: one tensor, or one slice of a
flattened tensor, at a time, with positioned reads into buffers this process owns,
never memory-mapped, so neither a model that does not fit twice in memory nor the page
cache of the checkpoint files counts against a merge.

:func:`write_state` writes a merged state as one safetensors file or as a model folder
(the base folder's config and tokenizer files beside ``model.safetensors``), atomically
and without replacing anything it did not write unless asked to. :func:`load_state`
copies a state into a module after checking every name, shape and value.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Mapping

import torch

from workbench.errors import WorkbenchError
from workbench.safetensors_io import (
    FLOAT_DTYPES, SafetensorsFile, atomic_directory, check_writable, torch_dtype, write_file,
)


class Checkpoint:
    """Read-only named tensors: a state dict, a module, a Subject, a safetensors file,
    or a directory holding ``model.safetensors`` (or a sharded index). Tensors are read
    one at a time (or a slice at a time) with positioned reads; files are never mapped
    or loaded whole."""

    def __init__(self, source: Any, name: str | None = None) -> None:
        self.path: str | None = None
        self.config: dict | None = None
        self._files: dict[str, SafetensorsFile] = {}
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
                files = [single]
            elif os.path.exists(index):
                with open(index) as f:
                    wmap = json.load(f)["weight_map"]
                files = list(dict.fromkeys(os.path.join(path, v) for v in wmap.values()))
            else:
                raise WorkbenchError(f"{path!r} holds neither model.safetensors nor model.safetensors.index.json")
            cfg = os.path.join(path, "config.json")
            if os.path.exists(cfg):
                with open(cfg) as f:
                    self.config = json.load(f)
        elif os.path.isfile(path) and path.endswith(".safetensors"):
            files = [path]
        else:
            raise WorkbenchError(f"no checkpoint at {path!r}; pass a .safetensors file or a directory holding one")
        self.path = path
        for file in files:
            handle = SafetensorsFile(file)
            self._files[file] = handle
            for k in handle.keys():
                self._where[k] = file

    @property
    def folder(self) -> str | None:
        """The model folder this checkpoint was read from (None for a file or in memory)."""
        return self.path if self.path is not None and os.path.isdir(self.path) else None

    def keys(self) -> list[str]:
        """Names of the floating-point tensors (integer buffers are not part of a task vector)."""
        if self._tensors is not None:
            return [k for k, v in self._tensors.items() if v.is_floating_point()]
        return [k for k, f in self._where.items() if self._files[f].dtype(k) in FLOAT_DTYPES]

    def all_keys(self) -> list[str]:
        return list(self._tensors) if self._tensors is not None else list(self._where)

    def shape(self, key: str) -> tuple[int, ...]:
        if self._tensors is not None:
            return tuple(self._tensors[key].shape)
        return self._files[self._where[key]].shape(key)

    def dtype(self, key: str) -> torch.dtype:
        """The torch dtype of tensor ``key`` (without reading it)."""
        if self._tensors is not None:
            return self._tensors[key].dtype
        return torch_dtype(self._files[self._where[key]].dtype(key))

    def nbytes(self, key: str) -> int:
        """Bytes of tensor ``key`` (without reading it)."""
        if self._tensors is not None:
            t = self._tensors[key]
            return t.numel() * t.element_size()
        return self._files[self._where[key]].nbytes(key)

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


def default_name(obj: Any, fallback: str) -> str | None:
    """Paths and checkpoints keep their own names; anything else gets ``fallback``."""
    return None if isinstance(obj, (str, os.PathLike, Checkpoint)) else fallback


ARCH_FIELDS = ("model_type", "hidden_size", "n_embd", "num_hidden_layers", "n_layer", "num_attention_heads", "n_head",
               "intermediate_size", "n_inner", "vocab_size")


def check_compatible(a: Checkpoint, b: Checkpoint) -> None:
    """Raise a WorkbenchError naming what differs when two checkpoints cannot be differenced."""
    if a.config and b.config:
        diff = {f: (a.config.get(f), b.config.get(f)) for f in ARCH_FIELDS
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


def all_finite(t: torch.Tensor) -> bool:
    """Whether every entry is finite: a NaN or inf makes the sum non-finite, so a finite
    sum settles it in one cheap reduction; only a non-finite sum (or an overflow of
    large finite entries) needs the entry-wise check."""
    if t.numel() == 0 or not t.is_floating_point():
        return True
    if t.element_size() == 1:  # float8: reductions want a wider type
        t = t.float()
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def check_finite(t: torch.Tensor, key: str, who: str) -> None:
    """Raise a WorkbenchError naming ``key`` of ``who`` when ``t`` holds NaN or inf."""
    if not all_finite(t):
        n_nan = int(torch.isnan(t).sum())
        n_inf = int(torch.isinf(t).sum())
        raise WorkbenchError(
            f"tensor {key!r} of checkpoint {who!r} holds {n_nan} NaN and {n_inf} infinite values; "
            "task vectors need finite weights (nothing was written)"
        )


# ---------------------------------------------------------------------- writing


def write_state(state: Mapping[str, torch.Tensor], out: str | os.PathLike, *, base: Checkpoint | None = None,
                metadata: Mapping[str, str] | None = None, overwrite: bool = False) -> str:
    """Write ``state`` to ``out``: a path ending in ``.safetensors`` is one file; any
    other path becomes a model folder (``model.safetensors`` plus the base folder's
    config and tokenizer files, or a ``config.json`` from the base's config), built under
    a temporary name and renamed into place in one step.

    An existing non-empty ``out`` is refused unless ``overwrite``; on any error nothing
    is left behind and an existing ``out`` is untouched."""
    out = os.fspath(out)
    if out.endswith(".safetensors"):
        return write_file(state, out, metadata, overwrite=overwrite)
    check_writable(out, overwrite=overwrite, what="model folder")
    folder = base.folder if base is not None else None
    with atomic_directory(out, overwrite=overwrite) as tmp:
        if folder is not None:
            for f in os.listdir(folder):
                src = os.path.join(folder, f)
                if os.path.isfile(src) and not f.endswith(".safetensors") and not f.endswith(".safetensors.index.json"):
                    shutil.copy2(src, tmp)
        elif base is not None and base.config:
            with open(os.path.join(tmp, "config.json"), "w") as fh:
                json.dump(base.config, fh, indent=2, default=str)
        write_file(state, os.path.join(tmp, "model.safetensors"), {"format": "pt", **dict(metadata or {})})
    return out


def save_pretrained(state: Mapping[str, torch.Tensor], base_dir: str | os.PathLike, out_dir: str | os.PathLike,
                    *, overwrite: bool = False) -> str:
    """Write a merged state as a Hugging Face model directory: the base directory's
    config and tokenizer files copied, the weights as ``model.safetensors`` (tensor
    names as in the base's files, so ``from_pretrained`` maps them as it maps the base's).
    The directory is built under a temporary name and renamed when complete; an existing
    non-empty ``out_dir`` is refused unless ``overwrite``."""
    base_dir, out_dir = os.fspath(base_dir), os.fspath(out_dir)
    if not os.path.isdir(base_dir) or not os.path.exists(os.path.join(base_dir, "config.json")):
        raise WorkbenchError(f"{base_dir!r} is not a model directory with a config.json")
    if out_dir.endswith(".safetensors"):
        raise WorkbenchError(f"save_pretrained writes a model folder; {out_dir!r} names a file")
    for k, v in state.items():
        if v.is_floating_point():
            check_finite(v, k, "merged state")
    return write_state(state, out_dir, base=Checkpoint(base_dir), overwrite=overwrite)


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
            check_finite(v, k, "state")
    with torch.no_grad():
        for k, v in state.items():
            own[k].copy_(v)
    return model


__all__ = ["ARCH_FIELDS", "Checkpoint", "all_finite", "check_compatible", "check_finite", "default_name", "load_state",
           "save_pretrained", "write_state"]
