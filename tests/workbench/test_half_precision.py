"""Every lens on a half-precision model on the CPU: tasklm loaded in bfloat16 and in
float16 gives finite results close to the same lens on the float32 model.

Tolerances are stated per lens for bf16, which keeps 8 significant bits (a relative
rounding of 2^-8 = 0.4% per operation); float16 keeps 11 (2^-11 = 0.05%), so the same
tolerances hold for it with room to spare. float16's danger is range, not precision (its
largest value is 65504): sums of squares, Gramians and losses overflow there unless the
lens upcasts, which is what these tests catch.

Where a lens accumulates (means, Gramians, SAE statistics, merges) it upcasts, so the
half-precision error is the error of the model's own forward, not of the lens."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench import WorkbenchError
from workbench.stats import spearman

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def f32():
    return workbench.load("tasklm", device="cpu")


HALF = [torch.bfloat16, torch.float16]


@pytest.fixture(scope="module", params=HALF, ids=["bf16", "fp16"])
def half(request):
    return workbench.load("tasklm", device="cpu", dtype=request.param)


def rel_err(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_load_takes_a_dtype_and_refuses_others(half):
    assert half.dtype in HALF and all(p.dtype == half.dtype for p in half.model.parameters())
    name = str(half.dtype).replace("torch.", "")
    assert workbench.load("tasklm", device="cpu", dtype=name).dtype == half.dtype
    for bad in ("int8", "float17", 16, torch.int64):
        with pytest.raises(WorkbenchError, match="dtype"):
            workbench.load("tasklm", device="cpu", dtype=bad)


def test_head_scores_half(f32, half):
    from workbench.attention import head_scores
    from workbench.data import repeated_sequences

    ids = {"input_ids": torch.tensor(repeated_sequences(f32.tokenizer, 16, 12, seed=0)["input_ids"])}
    a = head_scores(f32, ids, n_boot=0, control=False)
    b = head_scores(half, ids, n_boot=0, control=False)
    assert np.isfinite(b["score"]).all()
    assert np.abs(b["score"] - a["score"]).max() < 0.02  # scores are attention masses in [0, 1]
    assert spearman(a["score"], b["score"]) > 0.95
    for kind in ("previous_token", "induction"):
        assert a.best(kind) == b.best(kind)


def test_scan_heads_half_exact_and_attribution(f32, half):
    from workbench.attention import scan_heads
    from workbench.data import agreement_sentences

    texts = agreement_sentences(12, seed=3)
    a = scan_heads(f32, texts, replacement="mean")
    b = scan_heads(half, texts, replacement="mean")
    for var in ("effect", "attribution"):
        assert np.isfinite(b[var]).all()
        assert rel_err(b[var], a[var]) < 0.1, var
        assert spearman(a[var], b[var]) > 0.9, var
    assert abs(b.attrs["base"] - a.attrs["base"]) < 0.02 * abs(a.attrs["base"])


def test_function_vector_and_icl_task_vectors_half(f32, half):
    from workbench.taskvec import function_vector, icl_task_vectors

    a = function_vector(f32, "capitalize", n_demos=3, n_prompts=12)
    b = function_vector(half, "capitalize", n_demos=3, n_prompts=12)
    for var in ("mean_z", "head_out", "indirect_effect"):
        assert np.isfinite(b[var]).all() and b[var].dtype != np.dtype("float16"), var
    assert rel_err(b["mean_z"], a["mean_z"]) < 0.03
    assert rel_err(b["head_out"], a["head_out"]) < 0.03
    assert rel_err(b["indirect_effect"], a["indirect_effect"]) < 0.1
    assert spearman(a["indirect_effect"], b["indirect_effect"]) > 0.9
    assert a.top_heads(2) == b.top_heads(2)
    ia = icl_task_vectors(f32, ["capitalize"], n_demos=3, n_prompts=8, mode="add")
    ib = icl_task_vectors(half, ["capitalize"], n_demos=3, n_prompts=8, mode="add")
    assert np.isfinite(ib["theta"]).all() and rel_err(ib["theta"], ia["theta"]) < 0.03
    assert np.abs(ib["accuracy"] - ia["accuracy"]).max() <= 1 / 8 + 1e-9  # at most one prompt flips


def test_sae_on_half_activations(f32, half):
    from workbench.circuits import SAE, collect, train_sae
    from workbench.data import agreement_sentences

    texts = agreement_sentences(60, seed=0)
    xa = collect(f32, "resid_post.0", texts)
    xb = collect(half, "resid_post.0", texts)
    assert xb.dtype == torch.float32 and torch.isfinite(xb).all()
    assert rel_err(xb, xa) < 0.03
    raw = half.cache(half.tokenize(texts[:4]), ["resid_post.0"])["resid_post.0"]
    assert raw.dtype == half.dtype
    logs = {}
    for name, data in (("f32", xa), ("half", xb), ("half raw", xb.to(half.dtype))):
        sae = SAE(f32.d_model, 256, kind="topk", k=8, seed=0)
        logs[name] = train_sae(sae, data, steps=30, batch_size=128, progress=False)
        f = sae.encode(raw)  # a float32 SAE reads half-precision activations directly
        assert f.dtype == torch.float32 and torch.isfinite(f).all() and ((f > 0).sum(-1) <= 8).all()
    for name in ("half", "half raw"):
        assert np.isfinite(logs[name]["mse"]).all()
        assert abs(logs[name]["mse"][-1] - logs["f32"]["mse"][-1]) < 0.05 * logs["f32"]["mse"][-1], name


def test_node_effects_half(f32, half):
    from workbench.circuits import SAE, node_effects
    from workbench.data import agreement_pairs
    from workbench.metrics import logit_diff

    ds = agreement_pairs(8, seed=1, tokenizer=f32.tokenizer)
    good, bad = list(ds["clean_answer_id"]), list(ds["corrupted_answer_id"])

    def metric(logits, batch):
        return logit_diff(logits, batch, good, bad)

    sae = SAE(f32.d_model, 64, kind="topk", k=8, site="resid_post.0", seed=2)
    out = {}
    for name, subj in (("f32", f32), ("half", half)):
        for method in ("attribution", "exact"):
            out[name, method] = node_effects(subj, {"resid_post.0": sae}, list(ds["clean"]), list(ds["corrupted"]),
                                             metric, method=method)["effect"]
    for method in ("attribution", "exact"):
        a, b = out["f32", method], out["half", method]
        assert np.isfinite(b).all()
        top = np.argsort(-np.abs(a))[:20]
        assert spearman(a[top], b[top]) > 0.9, method
        assert rel_err(b, a) < 0.15, method


def test_task_gradients_half(f32, half):
    from workbench.data import agreement_sentences
    from workbench.metrics import next_token_loss
    from workbench.mtl import shared_parameters, task_gradients

    texts = agreement_sentences(16, seed=5)
    res = {}
    for name, subj in (("f32", f32), ("half", half)):
        batch = subj.tokenize(texts)
        logits = subj.model(**batch.kwargs()).logits
        nll = next_token_loss(logits, batch)
        losses = [nll[i::4].mean() for i in range(4)]
        res[name] = task_gradients(losses, shared_parameters(subj.model), family=subj.family, mode="gramian")
        subj.model.zero_grad(set_to_none=True)
    a, b = res["f32"], res["half"]
    assert b["gramian"].dtype == np.float64 and np.isfinite(b["gramian"]).all()
    assert rel_err(b["gramian"], a["gramian"]) < 0.05
    assert np.abs(b["cosine"] - a["cosine"]).max() < 0.05
    assert np.abs(np.nan_to_num(b["block_cosine"]) - np.nan_to_num(a["block_cosine"])).max() < 0.1


def test_merge_half_task_vectors(half):
    from workbench.taskvec import TaskVector, merge

    base = {k: v.detach().clone() for k, v in half.model.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    fts = [{k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v
            for k, v in base.items()} for _ in range(3)]
    for method, kw in (("ties", {"density": 0.3}), ("task_arithmetic", {"lam": 0.5})):
        m = merge(base, [TaskVector(base, f) for f in fts], method, **kw)
        base32 = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
        ref = merge(base32, [TaskVector(base32, {k: v.float() if v.is_floating_point() else v for k, v in f.items()})
                             for f in fts], method, **kw)
        for k, v in m.items():
            if not v.is_floating_point():
                continue
            assert v.dtype == half.dtype and torch.isfinite(v).all(), k
            # the merge computes in float32 and rounds once to the half dtype: within half an ulp of the float32 merge
            assert torch.allclose(v.float(), ref[k], rtol=torch.finfo(half.dtype).eps / 2, atol=1e-6), (method, k)


def test_find_circuit_half(f32, half):
    """The spliced run writes the SAE reconstruction back in the model's dtype (a float32
    SAE on a half-precision model), so the circuit's edges come out as on float32."""
    from workbench.circuits import SAE, find_circuit
    from workbench.data import agreement_pairs

    ds = agreement_pairs(8, seed=1, tokenizer=f32.tokenizer)
    saes = {f"resid_post.{l}": SAE(f32.d_model, 64, kind="topk", k=8, site=f"resid_post.{l}", seed=l) for l in range(2)}
    edges = {}
    for name, subj in (("f32", f32), ("half", half)):
        g = find_circuit(subj, saes, list(ds["clean"]), list(ds["corrupted"]), "loss", node_threshold=1e-3,
                         edge_threshold=1e-5)
        assert np.isfinite(g["effect"]).all() and np.isfinite(g["edge_weight"]).all()
        edges[name] = {(int(a), int(b)): w for a, b, w in zip(g["edge_src"], g["edge_dst"], g["edge_weight"])}
    common = sorted(set(edges["f32"]) & set(edges["half"]))
    assert len(edges["f32"]) >= 10 and len(common) >= 0.8 * len(edges["f32"])  # only edges near a threshold differ
    a, b = (np.array([edges[k][e] for e in common]) for k in ("f32", "half"))
    assert rel_err(b, a) < 0.15 and spearman(a, b) > 0.9


def test_finetune_and_learned_coefficients_half(f32, half):
    """Fine-tuning trains a float32 copy of a half-precision model (in pure fp16 Adam's eps
    rounds to 0 and the loss turns NaN at the second step) and returns the state in the
    model's dtype; the task vector points the way the float32 run's does."""
    from workbench.taskvec import finetune
    from workbench.taskvec.finetune import MergeEvaluator, learn_coefficients

    kw = {"steps": 3, "batch_size": 8, "lr": 1e-3}
    ft = {name: finetune(subj, "capitalize", **kw) for name, subj in (("f32", f32), ("half", half))}
    assert all(v.dtype == half.dtype for v in ft["half"].values() if v.is_floating_point())
    base = {"f32": f32.model.state_dict(), "half": half.model.state_dict()}
    tv = {n: torch.cat([(ft[n][k].double() - base[n][k].double()).reshape(-1) for k in base[n]
                        if base[n][k].is_floating_point()]) for n in ft}
    cos = float(tv["f32"] @ tv["half"] / (tv["f32"].norm() * tv["half"].norm()))
    assert torch.isfinite(tv["half"]).all() and cos > 0.95, cos
    ev = MergeEvaluator(half, {"capitalize": ft["half"]}, n=8)
    coef = learn_coefficients(ev, steps=2, n_val=8)
    assert np.isfinite(coef["coefficient"]).all() and np.isfinite(coef["loss"]).all()
