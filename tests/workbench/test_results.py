"""Result objects: frames, exact save/load round trips, clear errors, nothing half-written."""

from __future__ import annotations

import os

import numpy as np
import pytest

from workbench import Result, WorkbenchError, provenance
from workbench.results import register


def _result():
    rng = np.random.default_rng(0)
    score = rng.normal(size=(2, 3)).astype(np.float32)
    score[0, 1] = np.nan
    return Result(
        "demo",
        dims={"layer": [0, 1], "head": [0, 1, 2], "task": ["antonym", "plural"]},
        data={
            "score": (("layer", "head"), score),
            "ci_low": (("layer", "head"), score - 0.1),
            "count": (("task",), np.array([3, 4], dtype=np.int64)),
            "mask": (("layer", "head"), score > 0),
        },
        attrs={"kinds": ("prev", "induction"), "seed": 3, "alpha": 0.1 + 0.2},
        provenance=provenance(seed=3, params={"a": 1}),
    )


def test_to_frame_is_tidy():
    r = _result()
    f = r.to_frame()
    assert list(f.columns) == ["layer", "head", "score", "ci_low", "mask"]
    assert len(f) == 6
    assert f.loc[(f["layer"] == 1) & (f["head"] == 2), "score"].item() == pytest.approx(float(r["score"][1, 2]))
    assert list(r.to_frame(["count"]).columns) == ["task", "count"]
    with pytest.raises(WorkbenchError, match="do not share dimensions"):
        r.to_frame(["score", "count"])


def test_save_load_round_trip_is_exact(tmp_path):
    r = _result()
    path = r.save(tmp_path / "r.safetensors")
    back = Result.load(path)
    assert back.equals(r)
    assert back["count"].dtype == np.int64 and back["mask"].dtype == bool
    assert back.attrs["alpha"] == 0.1 + 0.2 and back.attrs["kinds"] == ["prev", "induction"]
    assert back.provenance["versions"]["torch"]
    assert back.to_frame().equals(r.to_frame())


def test_registered_subclass_comes_back_as_itself(tmp_path):
    @register("demo_sub")
    class DemoSub(Result):
        def best(self):
            return int(np.nanargmax(self["score"]))

    r = DemoSub(dims={"i": [0, 1, 2]}, data={"score": (("i",), [0.0, 2.0, 1.0])})
    back = Result.load(r.save(tmp_path / "s.safetensors"))
    assert type(back) is DemoSub and back.best() == 1


def test_bad_results_are_refused():
    with pytest.raises(WorkbenchError, match="unknown dimensions"):
        Result("x", dims={"a": [0]}, data={"v": (("b",), [1.0])})
    with pytest.raises(WorkbenchError, match="has shape"):
        Result("x", dims={"a": [0, 1]}, data={"v": (("a",), [1.0])})
    with pytest.raises(WorkbenchError, match="no variable 'nope'"):
        _result()["nope"]


def test_nothing_half_written(tmp_path):
    r = Result("x", dims={"a": [0]}, data={"v": (("a",), np.array(["s"], dtype=object))})
    with pytest.raises(WorkbenchError, match="only numeric"):
        r.save(tmp_path / "bad.safetensors")
    assert os.listdir(tmp_path) == []


def test_loading_foreign_files_is_refused(tmp_path):
    (tmp_path / "x.safetensors").write_bytes(b"\x00" * 8)
    with pytest.raises(WorkbenchError, match="not a safetensors file"):
        Result.load(tmp_path / "x.safetensors")
    from safetensors.numpy import save_file

    save_file({"a": np.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(WorkbenchError, match="no workbench result header"):
        Result.load(tmp_path / "plain.safetensors")
    with pytest.raises(WorkbenchError, match="no result file"):
        Result.load(tmp_path / "missing.safetensors")


def test_provenance_names_the_model(tasklm):
    p = provenance(tasklm, seed=1, params={"k": 2})
    assert p["model"] == "tasklm" and p["seed"] == 1 and len(p["config_hash"]) == 16
    assert len(p["weights_sha256"]) == 64 and p["versions"]["nnsight"]


def test_scalar_variables_round_trip(tmp_path):
    # a 0-d variable (a baseline, a p-value) keeps its shape through save / load
    r = Result("demo", dims={"layer": [0, 1]},
               data={"accuracy": (("layer",), [0.5, 0.75]), "zero_shot": ((), np.float64(0.25))})
    back = Result.load(r.save(tmp_path / "scalar.safetensors"))
    assert back["zero_shot"].shape == () and float(back["zero_shot"]) == 0.25 and back.equals(r)


def test_zero_d_and_every_numeric_dtype_round_trip(tmp_path):
    r = Result(
        "scalars",
        dims={"i": [0, 1]},
        data={"total": ((), np.asarray(0.5)), "count": ((), np.asarray(3, dtype=np.int32)),
              "half": (("i",), np.array([1.5, -2.0], dtype=np.float16)), "u": (("i",), np.array([1, 2], dtype=np.uint16)),
              "f64": (("i",), np.array([np.pi, np.inf]))},
    )
    back = Result.load(r.save(tmp_path / "s.safetensors"))
    assert back.equals(r)
    assert back["total"].shape == () and float(back["total"]) == 0.5 and back["count"].dtype == np.int32
    assert back["half"].dtype == np.float16 and back["u"].dtype == np.uint16 and back["f64"][0] == np.pi
    # the file is a plain safetensors file: the library reads the same arrays
    from safetensors.numpy import load_file

    lib = load_file(str(tmp_path / "s.safetensors"))
    assert np.array_equal(lib["half"], r["half"]) and float(lib["total"].reshape(())) == 0.5


def test_save_replaces_a_result_atomically(tmp_path):
    path = tmp_path / "r.safetensors"
    _result().save(path)
    r = Result("x", dims={"a": [0]}, data={"v": (("a",), [2.0])})
    r.save(path)
    assert Result.load(path).equals(r) and os.listdir(tmp_path) == ["r.safetensors"]
