"""Hostile inputs to the lenses and their files: results I/O, task vectors and merging,
attention heads and the effects engine, circuits, and the widgets. Each case asserts the
exact outcome: a WorkbenchError whose message names the culprit and what is accepted,
the right value, or (for files) that nothing was lost or half-written."""

from __future__ import annotations

import json
import os
import re
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import workbench
from workbench import Result, WorkbenchError
from workbench import attention as A
from workbench import effects as E
from workbench import taskvec as T
from workbench.circuits import SAE


@pytest.fixture(scope="module")
def lm():
    return workbench.load("tasklm")


@pytest.fixture(scope="module")
def tvs(lm):
    base = {k: v.clone() for k, v in lm.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    fts = [{k: v + 0.01 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in base.items()}
           for _ in range(2)]
    return base, [T.task_vector(base, ft, name=f"t{i}") for i, ft in enumerate(fts)]


def small_result():
    return Result("demo", dims={"layer": [0, 1], "head": [0, 1, 2]},
                  data={"score": (("layer", "head"), np.arange(6.0).reshape(2, 3))}, attrs={"kind": "x"})


def _write_raw(path, header: bytes, body: bytes = b""):
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)) + header + body)
    return path


def _result_with_header(tmp, meta):
    head = json.dumps({"__metadata__": {"workbench": meta},
                       "score": {"dtype": "F64", "shape": [2, 3], "data_offsets": [0, 48]}}).encode()
    return _write_raw(tmp / "r.safetensors", head, np.arange(6.0).tobytes())


def _merge_nan(lm, tvs, tmp):
    base, vs = tvs
    bad = dict(base)
    key = next(k for k, v in base.items() if v.is_floating_point())
    bad[key] = base[key].clone()
    bad[key].view(-1)[0] = float("nan")
    return T.merge(bad, vs, out=tmp / "m.safetensors")


# (name, call(lm, tvs, tmp_path), regex the WorkbenchError message must match)
ERRORS = [
    # --- results I/O
    ("result load missing file", lambda lm, v, t: Result.load(t / "nope.safetensors"), r"no result file at"),
    ("result load not safetensors", lambda lm, v, t: Result.load(_text(t / "x.safetensors", "hello")),
     r"is not a safetensors file written by Result.save"),
    ("result load header cut", lambda lm, v, t: Result.load(_write_raw(t / "c.safetensors", b'{"__metadata__": {"work')),
     r"not a safetensors file"),
    ("result load no workbench header", lambda lm, v, t: Result.load(_write_raw(
        t / "n.safetensors", json.dumps({"x": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode(), b"\0" * 4)),
     r"holds no workbench result header"),
    ("result load damaged json", lambda lm, v, t: Result.load(_result_with_header(t, "{not json")),
     r"damaged workbench result header"),
    ("result load other format version", lambda lm, v, t: Result.load(_result_with_header(
        t, json.dumps({"format_version": 999}))), r"result format 999; this version reads"),
    ("result load missing keys", lambda lm, v, t: Result.load(_result_with_header(
        t, json.dumps({"format_version": _fv(), "kind": "demo"}))), r"header lacks"),
    ("result load lacks variable arrays", lambda lm, v, t: Result.load(_result_with_header(
        t, json.dumps({"format_version": _fv(), "kind": "demo", "dims": {"a": [0]}, "var_dims": {"other": ["a"]},
                       "var_dtypes": {"other": "float64"}, "attrs": {}, "provenance": {}}))),
     r"lacks the arrays of variables \['other'\]"),
    ("result save object dtype", lambda lm, v, t: Result("x", dims={"a": [0]}, data={"v": (("a",), np.array([object()]))})
     .save(t / "o.safetensors"), r"variable 'v' has dtype object"),
    ("result unknown dim", lambda lm, v, t: Result("x", dims={"a": [0]}, data={"v": (("b",), [1.0])}),
     r"unknown dimensions \['b'\]"),
    ("result wrong shape", lambda lm, v, t: Result("x", dims={"a": [0, 1]}, data={"v": (("a",), [1.0])}),
     r"has shape \(1,\), but its dimensions \('a',\) give \(2,\)"),
    ("result unknown variable", lambda lm, v, t: small_result()["nope"], r"no variable 'nope'.*variables: \['score'\]"),
    ("result unknown coord", lambda lm, v, t: small_result().coord("task"), r"no dimension 'task'"),
    ("result frame of mixed dims", lambda lm, v, t: Result("x", dims={"a": [0], "b": [0, 1]},
                                                              data={"u": (("a",), [1.0]), "w": (("b",), [1.0, 2.0])})
     .to_frame(["u", "w"]), r"do not share dimensions"),
    # --- task vectors and merging
    ("merge unknown method", lambda lm, v, t: T.merge(v[0], v[1], "average"), r"unknown merge method 'average'; valid"),
    ("merge unknown parameter", lambda lm, v, t: T.merge(v[0], v[1], "ties", densty=0.5), r"unknown merge parameters \['densty'\]"),
    ("merge NaN weight", lambda lm, v, t: T.merge(v[0], v[1], weights=[1.0, float("nan")]), r"weight|finite"),
    ("merge infinite lam", lambda lm, v, t: T.merge(v[0], v[1], lam=float("inf")), r"lam"),
    ("merge density negative", lambda lm, v, t: T.merge(v[0], v[1], "ties", density=-0.1), r"density must be in \[0, 1\]"),
    ("merge density above 1", lambda lm, v, t: T.merge(v[0], v[1], "ties", density=1.5), r"density"),
    ("merge dare p = 1", lambda lm, v, t: T.merge(v[0], v[1], "dare", p=1.0), r"\bp\b"),
    ("merge dare p negative", lambda lm, v, t: T.merge(v[0], v[1], "dare", p=-0.1), r"\bp\b"),
    ("merge weights of wrong length", lambda lm, v, t: T.merge(v[0], v[1], weights=[1.0]), r"weight"),
    ("merge weights as a scalar", lambda lm, v, t: T.merge(v[0], v[1], weights=0.5), r"weights must be a list of 2 numbers \(one per task vector\), got 0.5"),
    ("merge no task vectors", lambda lm, v, t: T.merge(v[0], []), r"task vector"),
    ("merge NaN in base refused before out", lambda lm, v, t: _merge_nan(lm, v, t), r"NaN|finite"),
    ("merge into non-empty folder", lambda lm, v, t: T.merge(v[0], v[1], out=_nonempty(t)), r"overwrite"),
    ("task vector of mismatched shapes", lambda lm, v, t: T.task_vector(v[0], {k: x[..., :1] if x.ndim else x
                                                                             for k, x in v[0].items()}), r"shape"),
    ("task vector of missing keys", lambda lm, v, t: T.task_vector(v[0], dict(list(v[0].items())[:3])), r"key|tensor"),
    ("function vector unknown task", lambda lm, v, t: T.function_vector(lm, "translate"), r"unknown task 'translate'"),
    ("function vector zero prompts", lambda lm, v, t: T.function_vector(lm, "antonym", n_prompts=0), r"n_prompts >= 1 prompts, got n_demos=5, n_prompts=0"),
    ("icl task vectors no tasks", lambda lm, v, t: T.icl_task_vectors(lm, []), r"task"),
    ("icl task vectors bad mode", lambda lm, v, t: T.icl_task_vectors(lm, ["antonym"], mode="swap"), r"mode 'swap'"),
    ("finetune zero steps", lambda lm, v, t: T.finetune(lm, "antonym", steps=0), r"steps >= 1"),
    ("finetune negative lr", lambda lm, v, t: T.finetune(lm, "antonym", lr=-1.0), r"lr > 0"),
    ("finetune repeated tasks", lambda lm, v, t: T.finetune(lm, ["antonym", "antonym"]), r"distinct"),
    # --- attention heads and the effects engine
    ("head scores unknown kind", lambda lm, v, t: A.head_scores(lm, ["a b a b"], kinds=["inductive"]), r"inductive"),
    ("head scores layer out of range", lambda lm, v, t: A.head_scores(lm, ["a b a b"], layers=[7]), r"layer"),
    ("head scores no prompts", lambda lm, v, t: A.head_scores(lm, []), r"empty prompt list|no prompts"),
    ("ablate head out of range", lambda lm, v, t: A.ablate_heads(lm, ["hot -> cold"], [(0, 99)]), r"head"),
    ("ablate unknown replacement", lambda lm, v, t: A.ablate_heads(lm, ["hot -> cold"], [(0, 1)], replacement="noise"),
     r"replacement 'noise'"),
    ("ablate unknown metric", lambda lm, v, t: A.ablate_heads(lm, ["hot -> cold"], [(0, 1)], metric="accuracy@5"),
     r"metric"),
    ("scan negative ig_steps", lambda lm, v, t: A.scan_heads(lm, ["hot -> cold"], ig_steps=-1), r"ig_steps"),
    ("effects unknown method", lambda lm, v, t: E.effects(lm, ["hot -> cold"], E.Heads(), method="shapley"),
     r"method 'shapley'"),
    ("effects corrupted without prompts", lambda lm, v, t: E.effects(lm, ["hot -> cold"], E.Heads(),
                                                                       replacement="corrupted"), r"corrupted"),
    ("effects corrupted of other length", lambda lm, v, t: E.effects(lm, ["hot -> cold"], E.Heads(), replacement="corrupted",
                                                                       corrupted=["a -> b", "c -> d"]), r"corrupted|pairs|align"),
    ("probe labels of wrong length", lambda lm, v, t: A.probe(lm, ["a", "b", "c", "d"], [0, 1]), r"label"),
    ("head overlap of 1-d effects", lambda lm, v, t: A.head_overlap(np.ones(4), np.ones(4), top_k=1), r"\[layer, head\]"),
    ("head overlap top_k 0", lambda lm, v, t: A.head_overlap(np.ones((2, 2)), np.ones((2, 2)), top_k=0), r"top_k must be"),
    ("prune curve step 0", lambda lm, v, t: A.prune_curve(lm, ["hot -> cold"], step=0), r"step"),
    # --- circuits
    ("SAE zero width", lambda lm, v, t: SAE(128, 0, k=4), r"width|d_sae|features"),
    ("SAE k above width", lambda lm, v, t: SAE(16, 8, k=9), r"\bk\b"),
    ("SAE unknown architecture", lambda lm, v, t: SAE(16, 32, kind="sparse"), r"kind"),
    ("SAE encode of wrong width", lambda lm, v, t: SAE(16, 32, k=4).encode(torch.zeros(2, 15)), r"16|width|shape"),
    ("SAE save over user folder", lambda lm, v, t: SAE(16, 32, k=4).save(_nonempty(t)), r"holds files that SAE.save did not write \(notes.txt\)"),
    ("SAE load missing folder", lambda lm, v, t: SAE.load(t / "none"), r"no SAE|not found|does not exist"),
]


def _fv():
    from workbench.results import FORMAT_VERSION

    return FORMAT_VERSION


def _text(path, text):
    path.write_text(text)
    return path


def _nonempty(tmp):
    d = tmp / "user"
    d.mkdir(exist_ok=True)
    (d / "notes.txt").write_text("keep me")
    return d


@pytest.mark.parametrize("name,call,match", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_lens_input_gets_a_clear_error(lm, tvs, tmp_path, name, call, match):
    with pytest.raises(WorkbenchError) as info:
        call(lm, tvs, tmp_path)
    assert re.search(match, str(info.value)), f"{name}: message {str(info.value)!r} does not match {match!r}"
    left = [p.name for p in tmp_path.rglob("*") if "tmp" in p.name or p.name.startswith(".") or p.name == "m.safetensors"]
    assert left == [], f"{name} left {left} behind"
    if (tmp_path / "user").exists():
        assert sorted(os.listdir(tmp_path / "user")) == ["notes.txt"], f"{name} touched the user's folder"
        assert (tmp_path / "user" / "notes.txt").read_text() == "keep me"


# (name, call(lm, tvs, tmp_path), check(result)) -- odd but valid input gets the right answer
def _ties_sign(v):
    base, vs = v
    key = next(k for k, x in base.items() if x.is_floating_point() and x.ndim == 2)
    # (normalize=False: with mergekit's normalisation by the signed weight sum, all-negative
    # weights cancel out -- documented in workbench.taskvec.merging, and checked against mergekit)
    pos = T.merge(base, vs, "ties", weights=[1.0, 1.0], density=1.0, normalize=False)[key] - base[key]
    neg = T.merge(base, vs, "ties", weights=[-1.0, -1.0], density=1.0, normalize=False)[key] - base[key]
    return pos, neg


VALUES = [
    ("a 0-d result saves and loads", lambda lm, v, t: Result.load(Result(
        "x", dims={}, data={"v": ((), np.float64(3.5))}).save(t / "z.safetensors")),
     lambda r: r["v"].shape == () and float(r["v"]) == 3.5),
    ("negative TIES weights subtract (not act as positive)", lambda lm, v, t: _ties_sign(v),
     lambda r: torch.allclose(r[0], -r[1], atol=1e-6) and r[0].abs().sum() > 0),
    ("zero weights merge to the base", lambda lm, v, t: (T.merge(v[0], v[1], weights=[0.0, 0.0]), v[0]),
     lambda r: all(torch.equal(r[0][k], r[1][k]) for k in r[1])),
    ("TIES keeps at least one entry of a tiny tensor", lambda lm, v, t: T.trim_topk(torch.tensor([0.1, -3.0, 0.2]), 0.01),
     lambda r: r.tolist() == [0.0, -3.0, 0.0]),
    ("a merge written to a new folder is complete", lambda lm, v, t: (T.merge(v[0], v[1], out=t / "new.safetensors"),
                                                                     t / "new.safetensors"),
     lambda r: {k: x.shape for k, x in __import__("safetensors.torch").torch.load_file(str(r[1])).items()}
     == {k: x.shape for k, x in r[0].items()}),
    ("head overlap of identical effects is complete", lambda lm, v, t: A.head_overlap(np.arange(6.0).reshape(2, 3), np.arange(6.0).reshape(2, 3), top_k=2),
     lambda r: r["jaccard"] == 1.0 and r["n_shared"] == 2),
]


@pytest.mark.parametrize("name,call,check", VALUES, ids=[c[0] for c in VALUES])
def test_odd_lens_input_gets_the_right_answer(lm, tvs, tmp_path, name, call, check):
    assert check(call(lm, tvs, tmp_path)), name


_DTYPES = st.sampled_from([np.float16, np.float32, np.float64, np.int8, np.int32, np.int64, np.uint8, np.bool_])


@st.composite
def results(draw):
    n_dims = draw(st.integers(0, 3))
    dims = {f"d{i}": list(range(draw(st.integers(0, 4)))) for i in range(n_dims)}
    data = {}
    for j in range(draw(st.integers(1, 3))):
        vd = tuple(draw(st.permutations(list(dims)))[: draw(st.integers(0, n_dims))])
        shape = tuple(len(dims[d]) for d in vd)
        dtype = draw(_DTYPES)
        arr = draw(hnp.arrays(dtype, shape, elements=None if dtype != np.float16 else st.floats(-100, 100, width=16)))
        data[f"v{j}"] = (vd, arr)
    attrs = draw(st.dictionaries(st.text(min_size=1, max_size=5), st.one_of(st.integers(-5, 5), st.text(max_size=5)),
                                 max_size=3))
    return Result("prop", dims=dims, data=data, attrs=attrs)


@settings(max_examples=80, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(results())
def test_any_result_round_trips_exactly(tmp_path, r):
    """Any dims (including none: 0-d variables, and empty ones), dtypes (NaN and inf
    included) and attrs save and load bit for bit."""
    path = r.save(tmp_path / "r.safetensors")
    back = Result.load(path)
    assert back.equals(r)
    assert [p.name for p in tmp_path.iterdir()] == ["r.safetensors"]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(weights=st.lists(st.floats(-3, 3, allow_nan=False), min_size=2, max_size=2),
       density=st.floats(0.0, 1.0), method=st.sampled_from(["task_arithmetic", "ties", "dare", "dare_ties"]),
       p=st.floats(0.0, 0.9), lam=st.floats(-2, 2))
def test_any_valid_merge_parameters_give_a_finite_merge(weights, density, method, p, lam):
    """Every merge parameter in its accepted range gives a finite merge of the right
    shapes, and lam = 0 gives the base exactly."""
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 5, generator=g), "b": torch.randn(5, generator=g), "ids": torch.arange(3)}
    fts = [{k: (x + torch.randn(x.shape, generator=g) if x.is_floating_point() else x) for k, x in base.items()}
           for _ in range(2)]
    vs = [T.task_vector(base, ft, name=f"t{i}") for i, ft in enumerate(fts)]
    out = T.merge(base, vs, method, weights=weights, density=density, p=p, lam=lam)
    assert {k: x.shape for k, x in out.items()} == {k: x.shape for k, x in base.items()}
    assert all(torch.isfinite(x.float()).all() for x in out.values())
    assert torch.equal(out["ids"], base["ids"])
    zero = T.merge(base, vs, method, weights=weights, density=density, p=p, lam=0.0)
    assert all(torch.equal(zero[k], base[k]) for k in base)


@settings(max_examples=30, deadline=None, derandomize=True)
@given(bad=st.one_of(st.just(float("nan")), st.just(float("inf")), st.just(-float("inf")), st.text(max_size=3),
                     st.none()), where=st.sampled_from(["weight", "lam", "density", "p"]))
def test_any_non_finite_merge_parameter_is_refused_before_work(bad, where):
    base = {"w": torch.ones(3)}
    vs = [T.task_vector(base, {"w": torch.full((3,), 2.0)}, name="a"), T.task_vector(base, {"w": torch.zeros(3)}, name="b")]
    kw = {"weights": [1.0, bad]} if where == "weight" else {where: bad}
    if where == "weight" and bad is None:
        kw = {"weights": [None, 1.0]}
    method = "dare" if where == "p" else "ties"
    with pytest.raises(WorkbenchError) as info:
        T.merge(base, vs, method, **kw)
    assert ("weight" if where == "weight" else where) in str(info.value), str(info.value)


# ---------------------------------------------------------------------- widgets

@pytest.fixture(scope="module")
def atlas_view():
    from widgets import TaskAtlas
    from workbench.atlas import shipped_atlas

    return TaskAtlas(shipped_atlas(), background=False, n_boot=50)


WIDGET_ERRORS = [
    ("atlas of a non-atlas result", lambda v: __import__("widgets").TaskAtlas(small_result()), WorkbenchError,
     r"TaskAtlas shows a workbench.atlas.TaskAtlas result .*got Result"),
    ("atlas unknown lens measure", lambda v: setattr(v, "measure", "vibes"), Exception,
     r"lens measure 'vibes' is not shown here; choose one of \['heads_ie'"),
    ("atlas unknown ground truth", lambda v: setattr(v, "truth", "heads_ie"), Exception,
     r"ground truth 'heads_ie' is not shown here"),
    ("atlas pair of one task", lambda v: setattr(v, "pair", ("antonym", "antonym")), Exception,
     r"is not two different tasks of the atlas"),
    ("atlas pair with an unknown task", lambda v: setattr(v, "pair", ("antonym", "<b>x</b>")), Exception,
     r"is not two different tasks"),
    ("atlas group size that does not divide", lambda v: setattr(v, "group_size", 3), Exception,
     r"8 tasks split into groups of \[2, 4\], not 3"),
]


@pytest.mark.parametrize("name,call,exc,match", WIDGET_ERRORS, ids=[c[0] for c in WIDGET_ERRORS])
def test_bad_widget_input_gets_a_clear_error_and_keeps_the_view(atlas_view, name, call, exc, match):
    import traitlets

    state = (atlas_view.measure, atlas_view.truth, atlas_view.pair, atlas_view.group_size)
    with pytest.raises(exc) as info:
        call(atlas_view)
    assert isinstance(info.value, (WorkbenchError, traitlets.TraitError)), type(info.value)
    assert re.search(match, str(info.value)), f"{name}: message {str(info.value)!r} does not match {match!r}"
    assert (atlas_view.measure, atlas_view.truth, atlas_view.pair, atlas_view.group_size) == state
