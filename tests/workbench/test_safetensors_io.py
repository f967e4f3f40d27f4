"""The one safetensors module: owned-buffer reads (whole and sliced) and atomic writes,
both interchangeable with the safetensors library, and outputs never replaced unasked."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from workbench.errors import WorkbenchError
from workbench.safetensors_io import SafetensorsFile, atomic_directory, read_file, write_file
from workbench.taskvec.checkpoint import Checkpoint

T = torch.tensor


def _tensors():
    g = torch.Generator().manual_seed(1)
    return {"f32": torch.randn(3, 5, generator=g), "bf16": torch.randn(7, generator=g).to(torch.bfloat16),
            "f16": torch.randn(2, 3, generator=g).half(), "f64": torch.randn(4, generator=g).double(),
            "i64": torch.arange(6).view(2, 3), "u8": torch.arange(5, dtype=torch.uint8), "b": T([True, False]),
            "scalar": T(2.5), "empty": torch.zeros(0, 4)}


def test_reader_and_writer_match_the_library(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = _tensors()
    save_file(tensors, tmp_path / "lib.safetensors")
    ours = SafetensorsFile(tmp_path / "lib.safetensors")
    assert sorted(ours.keys()) == sorted(tensors)
    for k, v in tensors.items():
        got = ours.read(k)
        assert got.dtype == v.dtype and got.shape == v.shape and torch.equal(got, v), k
    assert torch.equal(ours.read("f32", 4, 11), tensors["f32"].reshape(-1)[4:11])
    assert torch.equal(ours.read("bf16", 5, 99), tensors["bf16"][5:])
    # what we write, the library reads back (values, dtypes, metadata)
    write_file(tensors, tmp_path / "ours.safetensors", {"note": "x"})
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as f:
        assert f.metadata() == {"note": "x"} and sorted(f.keys()) == sorted(tensors)
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k), v), k
    (tmp_path / "bad.safetensors").write_bytes((10**6).to_bytes(8, "little") + b"{}")
    with pytest.raises(WorkbenchError, match="not a readable safetensors file.*exceeds the file size"):
        Checkpoint(str(tmp_path / "bad.safetensors"))
    raw = (tmp_path / "lib.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(raw[:-8])
    with pytest.raises(WorkbenchError, match="lies outside the file"):
        Checkpoint(str(tmp_path / "cut.safetensors"))


def test_numpy_round_trip_keeps_dtypes_and_zero_d(tmp_path):
    arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "f16": np.array([1.5, -2], dtype=np.float16),
              "i8": np.array([-3, 4], dtype=np.int8), "u32": np.array([7], dtype=np.uint32),
              "bool": np.array([[True], [False]]), "zero_d": np.asarray(0.25), "big_endian": np.array([1.0, 2.0], ">f8")}
    write_file(arrays, tmp_path / "a.safetensors", {"k": "v"})
    back, meta = read_file(tmp_path / "a.safetensors", framework="np")
    assert meta == {"k": "v"}
    for k, v in arrays.items():
        assert back[k].shape == v.shape and np.array_equal(back[k], v), k
        assert back[k].dtype == v.dtype.newbyteorder("="), k
    with pytest.raises(WorkbenchError, match="numbers and bools only"):
        write_file({"s": np.array(["x"])}, tmp_path / "s.safetensors")
    with pytest.raises(WorkbenchError, match="numpy cannot hold"):
        read_file(_bf16(tmp_path), framework="np")
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors", "bf.safetensors"]


def _bf16(tmp_path):
    return write_file({"x": torch.ones(2, dtype=torch.bfloat16)}, tmp_path / "bf.safetensors")


def test_write_is_atomic_and_never_replaces_unasked(tmp_path, monkeypatch):
    import workbench.safetensors_io as io_

    path = tmp_path / "t.safetensors"
    path.write_bytes(b"keep me")
    with pytest.raises(WorkbenchError, match="already exists and is not empty"):
        write_file({"a": torch.ones(2)}, path, overwrite=False)
    assert path.read_bytes() == b"keep me"
    with pytest.raises(WorkbenchError, match="numbers and bools only"):
        write_file({"a": torch.ones(2), "b": np.array([object()])}, path)
    calls = []

    def boom(v):  # the disk fills up after the first tensor
        calls.append(1)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        return real(v)

    real = io_._raw
    monkeypatch.setattr(io_, "_raw", boom)
    with pytest.raises(OSError, match="No space left"):
        write_file({"a": torch.ones(2), "b": torch.ones(3)}, path)
    monkeypatch.undo()
    assert path.read_bytes() == b"keep me" and os.listdir(tmp_path) == ["t.safetensors"]
    write_file({"a": torch.ones(2)}, path)  # overwrite=True is the default for a single file
    assert torch.equal(SafetensorsFile(path).read("a"), torch.ones(2))
    empty = tmp_path / "empty.safetensors"
    empty.touch()  # an empty placeholder may be replaced
    write_file({"a": torch.zeros(1)}, empty, overwrite=False)
    assert torch.equal(SafetensorsFile(empty).read("a"), torch.zeros(1))
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(empty).st_mode & 0o777 == 0o666 & ~umask  # not the temporary's private 0600


def test_atomic_directory_commits_once_or_not_at_all(tmp_path):
    out = tmp_path / "sae"
    with pytest.raises(RuntimeError):
        with atomic_directory(out) as tmp:
            write_file({"w": torch.ones(3)}, os.path.join(tmp, "sae.safetensors"))
            raise RuntimeError("training crashed")
    assert os.listdir(tmp_path) == []  # neither the folder nor its temporary
    with atomic_directory(out) as tmp:
        write_file({"w": torch.ones(3)}, os.path.join(tmp, "sae.safetensors"))
        (open(os.path.join(tmp, "cfg.json"), "w")).close()
    assert sorted(os.listdir(out)) == ["cfg.json", "sae.safetensors"]
    with pytest.raises(WorkbenchError, match="already exists and is not empty"):
        with atomic_directory(out):
            pass
    with atomic_directory(out, overwrite=True) as tmp:
        write_file({"w": torch.zeros(3)}, os.path.join(tmp, "sae.safetensors"))
    assert os.listdir(out) == ["sae.safetensors"] and os.listdir(tmp_path) == ["sae"]
    assert torch.equal(SafetensorsFile(out / "sae.safetensors").read("w"), torch.zeros(3))
