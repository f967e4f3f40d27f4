"""Feature circuits: attribution against exact patching, error nodes, edges by hand,
integrated-gradients completeness, faithfulness of the full graph, bad pairs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from workbench import WorkbenchError, from_model
from workbench.circuits import SAE, faithfulness, feature_means, find_circuit, node_effects, spliced_run
from workbench.data import agreement_pairs
from workbench.metrics import logit_diff


def random_sae(d: int, d_sae: int, site: str, kind: str = "relu", seed: int = 0) -> SAE:
    sae = SAE(d, d_sae, kind=kind, k=8 if kind == "topk" else None, site=site, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    return sae.eval()


@pytest.fixture(scope="module")
def pairs(word_tokenizer):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds = agreement_pairs(6, seed=1, tokenizer=word_tokenizer)
    good, bad = list(ds["clean_answer_id"]), list(ds["corrupted_answer_id"])
    metric = lambda logits, batch: logit_diff(logits, batch, good, bad)  # noqa: E731
    metric.good, metric.bad = good, bad
    return list(ds["clean"]), list(ds["corrupted"]), metric


@pytest.fixture(scope="module")
def linear(word_tokenizer):
    """A tiny GPT-2 whose final LayerNorm is the identity: logits are linear in mlp_out.1
    and in resid_post.1."""
    model = make_tiny("gpt2", word_tokenizer, seed=3)
    model.transformer.ln_f = torch.nn.Identity()
    with torch.no_grad():  # GPT-2's init (std 0.02) leaves tiny activations; make effects visible
        for name, p in model.named_parameters():
            if ".ln_" not in name:
                p.mul_(10)
    return from_model(model, word_tokenizer, name="tiny-linear")


def test_attribution_equals_exact_patching_when_linear(linear, pairs):
    clean, corrupted, metric = pairs
    saes = {"mlp_out.1": random_sae(32, 48, "mlp_out.1", seed=1)}
    exact = node_effects(linear, saes, clean, corrupted, metric, method="exact")
    attrib = node_effects(linear, saes, clean, corrupted, metric, method="attribution")
    ig = node_effects(linear, saes, clean, corrupted, metric, method="ig", ig_steps=2)
    e = exact["effect"]
    assert np.abs(e).max() > 1e-3 and (np.abs(e) > 1e-6).sum() > 10
    np.testing.assert_allclose(attrib["effect"], e, atol=1e-4 * np.abs(e).max())
    np.testing.assert_allclose(ig["effect"], e, atol=1e-4 * np.abs(e).max())
    assert attrib.coord("node")[-1] == "mlp_out.1/err" and attrib["feature"][-1] == -1
    # everything at the site together: the effect of corrupting the whole site
    assert exact.attrs["metric_clean"] == pytest.approx(attrib.attrs["metric_clean"], abs=1e-5)


def test_error_nodes_make_the_spliced_model_exact(tiny, pairs):
    arch, subject = tiny
    if not subject.has_logits:
        pytest.skip("needs logits")
    clean, _, _ = pairs
    w = subject.n_heads * subject.d_head
    saes = {"resid_pre.0": random_sae(subject.d_model, 40, "resid_pre.0", "topk", 1),
            "z.0": random_sae(w, 40, "z.0", "relu", 2),
            "mlp_out.1": random_sae(subject.d_model, 40, "mlp_out.1", "topk", 3),
            "resid_post.1": random_sae(subject.d_model, 40, "resid_post.1", "relu", 4)}
    batch = subject.tokenize(clean)
    want = subject.logits(batch)
    nodes, _, got = spliced_run(subject, batch, saes)
    assert torch.allclose(got, want, atol=1e-4 * (1 + want.abs().max()))
    # and the SAEs alone (error nodes dropped) change the output
    _, _, lossy = spliced_run(subject, batch, saes, edit={s: (lambda f, e: (f, torch.zeros_like(e))) for s in saes})
    assert not torch.allclose(lossy, want, atol=1e-3)


def test_ig_effects_add_up_to_the_site_effect(pairs, word_tokenizer):
    clean, corrupted, metric = pairs
    subject = from_model(make_tiny("llama", word_tokenizer, seed=1), word_tokenizer)
    site = "resid_post.0"
    sae = random_sae(32, 40, site, seed=5)
    ig = node_effects(subject, {site: sae}, clean, corrupted, metric, method="ig", ig_steps=24)
    cb, xb = subject.tokenize(clean), subject.tokenize(corrupted)
    corrupt_act = subject.cache(xb, [site])[site]
    m_clean = float(metric(subject.logits(cb), cb).mean())
    m_patch = float(metric(subject.logits(cb, patch={site: corrupt_act}), cb).mean())
    total = m_patch - m_clean
    assert abs(total) > 1e-3
    assert ig["effect"].sum() == pytest.approx(total, rel=0.02, abs=1e-4)


def test_edges_match_a_hand_computation(linear, pairs):
    """u = mlp_out.1, d = resid_post.1 = resid_mid + u: with ReLU SAEs, the edge from u's
    feature i to d's feature j is sum gm_j * 1[pre_j > 0] * (W_enc_d[:, j] . W_dec_u[i]) * du_i (gm of the batch-mean metric)."""
    clean, corrupted, metric = pairs
    u, d = "mlp_out.1", "resid_post.1"
    su, sd = random_sae(32, 24, u, seed=7), random_sae(32, 24, d, seed=8)
    g = find_circuit(linear, {u: su, d: sd}, clean, corrupted, metric, node_threshold=0.0, edge_threshold=0.0)
    with torch.no_grad():
        n_u = su.d_sae + 1
        # reference
        cb, xb = linear.tokenize(clean), linear.tokenize(corrupted)
        acts_c = linear.cache(cb, [u, d])
        acts_x = linear.cache(xb, [u])
        du = su.encode(acts_x[u]) - su.encode(acts_c[u])
        derr = (acts_x[u] - su(acts_x[u])) - (acts_c[u] - su(acts_c[u]))
        pre = sd.pre(acts_c[d])
        W_U = linear.W_U
        direction = torch.zeros(len(clean), cb.input_ids.shape[1], 32)  # dm/d resid_post.1 (ln_f is the identity)
        for b in range(len(clean)):
            direction[b, cb.last[b]] = (W_U[:, metric.good[b]] - W_U[:, metric.bad[b]]) / len(clean)
        gm = direction @ sd.W_dec.T  # dm/df_d [b, p, d_sae]
        active = (pre > 0).float()
        for k in range(len(g.coord("edge"))):
            s, t, w = int(g["edge_src"][k]), int(g["edge_dst"][k]), float(g["edge_weight"][k])
            j = t - n_u
            if j == sd.d_sae:  # into d's error node: checked by the sum rule below
                continue
            coef = gm[..., j] * active[..., j]
            if s < su.d_sae:
                want = float((coef * (sd.W_enc[:, j] @ su.W_dec[s]) * du[..., s]).sum())
            else:
                want = float((coef * (derr @ sd.W_enc[:, j])).sum())
            assert w == pytest.approx(want, abs=1e-5 + 1e-4 * abs(want)), (s, t)
    assert len(g.coord("edge")) > 100
    # subgraph pruning by thresholds
    nodes, edges = g.subgraph(node_threshold=0.0, edge_threshold=float(np.median(np.abs(g["edge_weight"]))))
    assert 0 < len(edges) < len(g.coord("edge"))


def test_faithfulness_of_the_full_graph_is_one(tiny, pairs):
    arch, subject = tiny
    if not subject.has_logits:
        pytest.skip("needs logits")
    clean, corrupted, metric = pairs
    saes = {"resid_post.0": random_sae(subject.d_model, 32, "resid_post.0", "topk", 1),
            "mlp_out.1": random_sae(subject.d_model, 32, "mlp_out.1", "relu", 2)}
    eff = node_effects(subject, saes, clean, corrupted, metric)
    curve = faithfulness(subject, saes, clean, metric, eff, thresholds=[1e9, float(np.median(np.abs(eff["effect"]))), 0.0])
    full = curve.to_frame().set_index("threshold").loc[0.0]
    assert full["size"] == 2 * 33
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-5)
    assert full["completeness"] == pytest.approx(0.0, abs=1e-5)  # nothing left outside the full graph
    empty = curve.to_frame().set_index("threshold").loc[1e9]
    assert empty["size"] == 0 and empty["faithfulness"] == pytest.approx(0.0, abs=1e-6)
    assert empty["completeness"] == pytest.approx(1.0, abs=1e-5)


def test_bad_inputs(linear, pairs):
    clean, corrupted, metric = pairs
    saes = {"mlp_out.1": random_sae(32, 16, "mlp_out.1")}
    with pytest.raises(WorkbenchError, match="same number of tokens"):
        node_effects(linear, saes, ["the key near the cabinet"], ["the old keys near the cabinet"], metric)
    with pytest.raises(WorkbenchError, match="1 clean prompts but 2"):
        node_effects(linear, saes, clean[:1], corrupted[:2], metric)
    with pytest.raises(WorkbenchError, match="unknown attribution method"):
        node_effects(linear, saes, clean, corrupted, metric, method="magic")
    with pytest.raises(WorkbenchError, match="width mismatch"):
        node_effects(linear, {"mlp_out.1": random_sae(33, 16, "x")}, clean, corrupted, metric)
    with pytest.raises(WorkbenchError, match="valid: embed"):
        node_effects(linear, {"mlp.1": saes["mlp_out.1"]}, clean, corrupted, metric)


def test_results_roundtrip(tmp_path, linear, pairs):
    clean, corrupted, metric = pairs
    saes = {"resid_post.0": random_sae(32, 16, "resid_post.0"), "mlp_out.1": random_sae(32, 16, "mlp_out.1", seed=2)}
    g = find_circuit(linear, saes, clean, corrupted, metric, node_threshold=0.01, edge_threshold=0.0)
    g.save(tmp_path / "g.safetensors")
    back = type(g).load(tmp_path / "g.safetensors")
    assert back.equals(g) and back.circuit() == g.circuit()
    means = feature_means(linear, saes, clean)
    assert means["mlp_out.1"][0].shape == (16,) and means["mlp_out.1"][1].shape == (32,)
