"""The NDIF path (``load(..., remote=True)``) checked without the service.

The stand-in for the service: ``load`` builds ``nnsight.TransformersModel`` for the hub
id; here that class is replaced by one over the offline zoo model ``tasklm`` whose
``trace`` records the ``remote`` flag it was asked for and, when it is ``True``, runs the
trace through nnsight's serverless dry run (the trace serialized and rebuilt as NDIF
rebuilds it) with ``workbench``, ``widgets`` and ``tests`` made unimportable while it is
rebuilt, as on a server that has none of them installed. What runs remotely is compared,
number for number, with the same call on the model loaded locally.

The example of ``docs/remote.md`` is run from the page itself, so the page cannot rot.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import sys
from pathlib import Path

import cloudpickle
import nnsight
import numpy as np
import pandas as pd
import pytest
import torch
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.tracing import tracer as nnsight_tracing

import workbench
from workbench import WorkbenchError
from workbench.results import Result
from workbench.subject import save

DOC = Path(__file__).resolve().parents[2] / "docs" / "remote.md"
NOT_ON_SERVER = ("workbench", "widgets", "tests")
REAL_MODEL = nnsight.TransformersModel
REAL_LOAD = workbench.load
HUB_ID = "example-org/some-causal-lm"


def doc_blocks(info: str) -> list[str]:
    """The code blocks of docs/remote.md whose info string is exactly ``info``."""
    text = DOC.read_text()
    return [code for tag, code in re.findall(r"^```([^\n]*)\n(.*?)^```", text, re.S | re.M) if tag.strip() == info]


class _Unimportable:
    """A meta-path finder that refuses the packages an NDIF server does not have (the
    editable install's finder would otherwise import them while a request is rebuilt)."""

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in NOT_ON_SERVER:
            raise ModuleNotFoundError(f"No module named {name!r} (not installed on the server)")
        return None


def over_the_wire(push):
    """``push`` (nnsight writing a trace's saved values into the caller's frame) with the
    values sent through ``torch.save`` / ``torch.load`` first, as NDIF sends them back:
    tensors arrive without their autograd graph."""

    def wired(frame, variables):
        buf = io.BytesIO()
        torch.save(variables, buf)
        buf.seek(0)
        push(frame, torch.load(buf, map_location="cpu", weights_only=False))

    return wired


class ServerlessNDIF(LocalSimulationBackend):
    """nnsight's serverless dry run, with the workbench made unimportable while the
    request is rebuilt (code that did not travel by value fails here as on the server),
    and the saved values sent back through ``torch.save`` as from the server."""

    def __call__(self, tracer) -> None:
        real = nnsight_tracing.push
        nnsight_tracing.push = over_the_wire(real)
        try:
            super().__call__(tracer)
        finally:
            nnsight_tracing.push = real

    def _hide_local_modules(self) -> dict:
        hidden = super()._hide_local_modules()
        hidden["finder"] = _Unimportable()
        sys.meta_path.insert(0, hidden["finder"])
        return hidden

    def _restore(self, hidden: dict) -> None:
        sys.meta_path.remove(hidden["finder"])
        super()._restore(hidden)


class FakeNDIF:
    """Stands in for ``nnsight.TransformersModel`` as ``load(..., remote=True)`` builds it."""

    def __init__(self) -> None:
        self.built: list[tuple[str, dict]] = []
        self.flags: list = []  # the remote= of every trace, in order

    def __call__(self, repo, **kwargs):
        self.built.append((repo, kwargs))
        here = REAL_LOAD("tasklm")  # its own copy: the local reference keeps its own hooks
        lm = REAL_MODEL(here.model, task=kwargs["task"], tokenizer=here.tokenizer)
        real_trace = lm.trace

        def trace(*args, remote=False, **kw):
            self.flags.append(remote)
            if remote is True:
                kw["backend"] = ServerlessNDIF(lm)
            return real_trace(*args, **kw)

        lm.trace = trace
        return lm


@pytest.fixture
def ndif(monkeypatch):
    fake = FakeNDIF()
    monkeypatch.setattr(nnsight, "TransformersModel", fake)
    return fake


@pytest.fixture(scope="module")
def local():
    return REAL_LOAD("tasklm")


@pytest.fixture
def remote(ndif):
    subject = workbench.load(HUB_ID, remote=True)
    assert subject.remote and ndif.flags == []
    return subject


def same(a, b, where: str = "") -> None:
    """Assert a == b exactly: tensors, arrays, Results (frame and attrs), and containers."""
    if isinstance(a, Result):
        assert type(a) is type(b), where
        pd.testing.assert_frame_equal(a.to_frame(), b.to_frame(), check_exact=True, obj=where)
        same(a.attrs, b.attrs, where + ".attrs")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        np.testing.assert_array_equal(a, b, err_msg=where)
    elif isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=where)
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and np.isnan(a):
        assert np.isnan(b), where
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


# ---------------------------------------------------------------------- the docs page


def run_example(code: str) -> tuple[dict, str]:
    ns: dict = {"__name__": "remote_docs_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(DOC), "exec"), ns)
    return ns, out.getvalue()


def test_docs_example_runs_remotely_and_equals_the_local_run(ndif, local, monkeypatch):
    (code,) = doc_blocks("python")
    assert "remote=True" in code
    remote_ns, remote_out = run_example(code)

    # built once, from the hub id, as text generation with eager attention, nothing placed here
    ((repo, kwargs),) = ndif.built
    assert repo == remote_ns["MODEL"]
    assert kwargs["task"] == "text-generation" and kwargs["attn_implementation"] == "eager"
    assert not {"device_map", "dtype", "device"} & kwargs.keys()
    # one request per cache / effects call at least, every one of them remote
    assert len(ndif.flags) >= 4 and all(flag is True for flag in ndif.flags), ndif.flags

    # the same code on the model loaded here
    monkeypatch.setattr(workbench, "load", lambda name, **kw: local)
    local_ns, local_out = run_example(code)
    assert remote_out == local_out
    names = [k for k, v in remote_ns.items() if not k.startswith("__") and k not in ("subject", "MODEL")
             and isinstance(v, (Result, torch.Tensor, np.ndarray, dict, list, tuple, float, int, str))]
    assert {"acts", "exact", "approx", "agreement", "ablation"} <= set(names)
    for k in names:
        same(remote_ns[k], local_ns[k], k)
    # real numbers: gradients that came back from the server are not the zeros a trace
    # without its graph would give
    assert np.abs(remote_ns["approx"]["effect"]).max() > 1e-3
    assert np.abs(remote_ns["exact"]["effect"]).max() > 1e-3


def test_docs_setup_names_what_nnsight_provides(monkeypatch):
    """The API-key set-up of the page uses nnsight's own config: the names exist, the
    environment variable is the one nnsight reads, and the console command is installed."""
    from importlib.metadata import entry_points

    from nnsight.schema.config import Config

    (setup,) = doc_blocks("python setup")
    tree = ast.parse(setup)
    imports = [(n.module, a.name) for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) for a in n.names]
    assert imports == [("nnsight", "CONFIG")]
    calls = [n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    assert calls == ["set_default_api_key"] and callable(nnsight.CONFIG.set_default_api_key)
    for name in ("login", "status", "is_model_running", "register"):
        assert callable(getattr(nnsight, name)), name
    text = DOC.read_text()
    assert "NDIF_API_KEY" in text and "nnsight login" in text
    monkeypatch.setenv("NDIF_API_KEY", "key-from-env")
    assert Config.load().API.APIKEY == "key-from-env"
    assert [e.value for e in entry_points(group="console_scripts", name="nnsight")] == ["nnsight.ndif:main"]
    assert "http" not in text  # the page points nowhere outside the repository


def test_workbench_travels_by_value(remote):
    """The server has no workbench: without load()'s registration the request cannot be
    rebuilt (this is what the stand-in service checks on every trace)."""
    prompts = ["hot -> cold ; tall ->"]
    remote.cache(prompts, ["z.1"])
    cloudpickle.unregister_pickle_by_value(workbench)
    try:
        with pytest.raises(ModuleNotFoundError, match="workbench"):
            remote.cache(prompts, ["z.1"])
    finally:
        nnsight.register(workbench)
    remote.cache(prompts, ["z.1"])


# ---------------------------------------------------------------------- the table of docs/remote.md

PROMPTS = ["hot -> cold ; tall -> short ; big ->", "up -> down ; left -> right ; in ->",
           "cat -> Cat ; dog -> Dog ; sun ->", "one -> two ; two -> three ; three ->"]


def _own_trace(s):
    with s.trace(PROMPTS):
        z = s.read("z.1")
        s.write("z.1", z * 0.5)
        out = save({"z": z, "logits": s.read("logits")})
    return out


def _subject_calls(s):
    from workbench.metrics import resolve_metric

    loss = resolve_metric("loss")
    return {
        "cache": s.cache(PROMPTS, ["embed", "resid_pre.1", "attn_out.0", "mlp_out.1", "logits"]),
        "logits_patch": s.logits(PROMPTS, patch={"z.0": lambda z: z * 0, "mlp_out.1": torch.zeros(s.d_model)}),
        "gradients": s.gradients(PROMPTS, ["z.0", "mlp_out.1"], loss, patch={"z.1": lambda z: z * 0.5}),
        "own_trace": _own_trace(s),
    }


def _effects_calls(s):
    from workbench.effects import Heads, Neurons, effects, node_means

    return {
        "ig": effects(s, PROMPTS, Heads(layers=[0]), "loss", method="ig", ig_steps=2),
        "neurons": effects(s, PROMPTS, Neurons("mlp_out.0", [0, 1, 2]), "loss", method="attribution",
                           replacement="mean", reference=PROMPTS[:2]),
        "means": node_means(s, PROMPTS, Heads(layers=[1])),
    }


def _attention_calls(s):
    from workbench.attention import ablate_heads, attention_patterns, head_scores, needle_prompts, probe
    from workbench.attention import prune_curve, retrieval_scores, scan_heads

    return {
        "scan": scan_heads(s, PROMPTS, attribution=True),
        "ablate": ablate_heads(s, PROMPTS, [(1, 0)], replacement="mean", n_random=2),
        "prune_gradient": prune_curve(s, PROMPTS, max_heads=2),
        "prune_exact": prune_curve(s, PROMPTS, max_heads=2, importance="exact"),
        "probe": probe(s, PROMPTS * 3, ["a", "a", "b", "b"] * 3, folds=3),
        "scores": head_scores(s, PROMPTS, n_boot=20),
        "patterns": attention_patterns(s, PROMPTS[:2]),
        "retrieval": retrieval_scores(s, needle_prompts(s.tokenizer, 2, haystack_len=12)),
    }


def _circuit_calls(s):
    from workbench.circuits import (SAE, ablate_features, collect, evaluate_sae, faithfulness, node_effects, steer,
                                    train_sae)
    from workbench.metrics import resolve_metric

    acts = collect(s, "mlp_out.1", PROMPTS)
    sae = SAE(s.d_model, 64, kind="topk", k=4, site="mlp_out.1", seed=0)
    train_sae(sae, acts, steps=5, batch_size=16)
    saes = {"mlp_out.1": sae}
    loss = resolve_metric("loss")
    eff = node_effects(s, saes, PROMPTS[:2], PROMPTS[2:], "loss")
    return {
        "acts": acts,
        "sae": dict(sae.state_dict()),
        "evaluation": evaluate_sae(s, sae, PROMPTS),
        "node_effects": eff,
        "node_effects_exact": node_effects(s, saes, PROMPTS[:2], PROMPTS[2:], "loss", method="exact",
                                           features={"mlp_out.1": [0, 1]}),
        "faithfulness": faithfulness(s, saes, PROMPTS, "loss", eff, thresholds=[0.0, 1e-3]),
        "ablate_features": ablate_features(s, saes, {"mlp_out.1": [0, 1]}, PROMPTS, loss),
        "steer": steer(s, sae, 0, 4.0, PROMPTS, loss, top_k=2),
        "steer_z": steer(s, SAE(s.n_heads * s.d_head, 16, kind="relu", site="z.1", seed=2), 3, 2.0, PROMPTS, loss),
    }


def _taskvec_calls(s, fv):
    from workbench.taskvec.activations import fv_accuracy, icl_task_vectors, indirect_effects, mean_head_outputs

    b = s.tokenize(PROMPTS)
    answers = b.input_ids[torch.arange(len(b)), b.last]
    mean_z = mean_head_outputs(s, b)
    return {
        "mean_z": mean_z,
        "indirect": indirect_effects(s, b, answers, mean_z),
        "icl": icl_task_vectors(s, ["antonym", "capitalize"], n_demos=2, n_prompts=4, layers=[1]),
        "fv_accuracy": fv_accuracy(s, fv, top_ks=(1, 2), layers=[1], n_prompts=8),
    }


@pytest.fixture(scope="module")
def fv(local):
    """A function vector computed here (function_vector needs W_O), used remotely after."""
    from workbench.taskvec.activations import function_vector

    return function_vector(local, "antonym", n_demos=2, n_prompts=4)


@pytest.mark.parametrize("calls", [_subject_calls, _effects_calls, _attention_calls, _circuit_calls, "taskvec"])
def test_what_docs_say_runs_remotely_equals_local(calls, remote, local, ndif, fv):
    if calls == "taskvec":
        got, want = _taskvec_calls(remote, fv), _taskvec_calls(local, fv)
    else:
        got, want = calls(remote), calls(local)
    assert ndif.flags and all(flag is True for flag in ndif.flags), ndif.flags
    same(got, want, calls if isinstance(calls, str) else calls.__name__)


# ---------------------------------------------------------------------- what needs the weights here


def _needs_local(s, fv):
    from workbench.attention import token_attribution
    from workbench.circuits import SAE, feature_summary, find_circuit, output_direction, spliced_run
    from workbench.taskvec.activations import function_vector, learn_head_weights
    from workbench.taskvec.finetune import MergeEvaluator, finetune
    from workbench.atlas import task_atlas

    sae_z = SAE(s.n_heads * s.d_head, 8, kind="relu", site="z.1")
    sae_m = SAE(s.d_model, 8, kind="relu", site="mlp_out.1")
    return [
        ("W_O", lambda: s.W_O(0)),
        ("W_U", lambda: s.W_U),
        ("cache(..., grad=True)", lambda: s.cache(PROMPTS, ["z.0"], grad=True)),
        ("cache(..., grad=True)", lambda: s.logits(PROMPTS, grad=True)),
        ("function_vector", lambda: function_vector(s, "antonym", n_demos=2, n_prompts=4)),
        ("learn_head_weights", lambda: learn_head_weights(s, fv, layer=1, steps=1)),
        ("feature_summary", lambda: feature_summary(s, sae_m, 0, PROMPTS)),
        ("W_O", lambda: output_direction(s, sae_z, 0, "z.1")),
        ("find_circuit", lambda: find_circuit(s, {"mlp_out.1": sae_m}, PROMPTS[:2], PROMPTS[2:], "loss")),
        ("gradients between SAE nodes", lambda: spliced_run(s, s.tokenize(PROMPTS), {"mlp_out.1": sae_m}, leaves=True)),
        ("token_attribution", lambda: token_attribution(s, PROMPTS[0])),
        ("finetune", lambda: finetune(s, "antonym", steps=1)),
        ("MergeEvaluator", lambda: MergeEvaluator(s, {"antonym": {}})),
        ("task_atlas", lambda: task_atlas(s)),
    ]


def test_what_needs_the_weights_refuses_a_remote_subject(remote, ndif, fv):
    for what, call in _needs_local(remote, fv):
        with pytest.raises(WorkbenchError, match=re.escape(what) + r".*remote=True.*docs/remote.md"):
            try:
                call()
            except WorkbenchError:
                raise
            else:
                raise AssertionError(f"{what} ran on a remote subject")
    assert ndif.flags == []  # each refused before sending a request


# ---------------------------------------------------------------------- load's own checks


@pytest.mark.parametrize("name, kwargs, says", [
    ("tasklm", {}, "'tasklm' is a zoo model"),
    (str(Path(__file__).parent), {}, "is a local path"),
    ("not a hub id!", {}, "is not a hub id"),
    (HUB_ID, {"device": "cpu"}, "device='cpu' does not apply with remote=True"),
    (HUB_ID, {"dtype": "bfloat16"}, "dtype='bfloat16' does not apply"),
    (HUB_ID, {"dtype": torch.float16}, "dtype=torch.float16 does not apply"),
    (HUB_ID, {"device_map": "auto"}, "device_map does not apply with remote=True"),
    (HUB_ID, {"max_memory": {"cpu": "1GB"}, "offload_folder": "x"}, "max_memory, offload_folder do not apply"),
    (HUB_ID, {"remote": "yes"}, "remote must be True .* or False"),
    (HUB_ID, {"remote": 1}, "remote must be True"),
])
def test_load_remote_refuses_what_has_no_meaning_there(ndif, name, kwargs, says):
    kwargs = {"remote": True, **kwargs}
    with pytest.raises(WorkbenchError, match=says):
        workbench.load(name, **kwargs)
    assert ndif.built == []  # refused before anything was read from the hub


def test_load_remote_hub_failure_is_a_workbench_error(monkeypatch):
    def unreachable(repo, **kwargs):
        raise OSError(f"{repo} is not a valid model identifier")

    monkeypatch.setattr(nnsight, "TransformersModel", unreachable)
    with pytest.raises(WorkbenchError, match="could not read 'example-org/missing' from the Hugging Face hub"):
        workbench.load("example-org/missing", remote=True)


def test_remote_false_is_unchanged(ndif, local):
    s = workbench.load("tasklm", remote=False)
    assert not s.remote and ndif.built == []
    same(s.cache(PROMPTS, ["z.1"]), local.cache(PROMPTS, ["z.1"]))
