"""Feature dashboards, feature flow, steering and SHIFT ablation, on hand-built SAEs
whose answers are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.workbench.test_circuits_attribution import linear, pairs, random_sae  # noqa: F401  (fixtures)
from tests.workbench.test_circuits_sae import TEXTS, identity_sae
from workbench import WorkbenchError
from workbench.circuits import ablate_features, collect, feature_flow, feature_summary, steer


def test_feature_summary_known_answers(linear):  # noqa: F811
    site = "mlp_out.0"
    sae = identity_sae(32, site)
    s = feature_summary(linear, sae, 3, TEXTS, quantiles=3, per_quantile=2, bins=10)
    x = collect(linear, site, TEXTS)  # the same real tokens (position 0 left out)
    act = torch.relu(x[:, 3]).numpy()
    assert s.examples[0]["activation"] == pytest.approx(float(act.max()), rel=1e-5)
    assert s.examples[0]["quantile"] == 2 and s.examples[-1]["quantile"] == 0
    ex = s.examples[0]
    assert ex["acts"][ex["focus"]] == pytest.approx(ex["activation"])
    assert len(ex["tokens"]) == len(ex["acts"])
    assert s["count"].sum() == int((act > 0).sum())
    assert s.attrs["frequency"] == pytest.approx(float((act > 0).mean()))
    # logit effect of e_3 through W_U is row 3 of W_U
    W_U = linear.W_U.detach()
    assert int(s["promoted_id"][0]) == int(W_U[3].argmax())
    assert float(s["promoted_logit"][0]) == pytest.approx(float(W_U[3].max()), rel=1e-5)
    assert int(s["suppressed_id"][0]) == int(W_U[3].argmin())
    with pytest.raises(WorkbenchError, match="out of range"):
        feature_summary(linear, sae, 64, TEXTS)


def test_z_feature_goes_through_W_O(linear):  # noqa: F811
    from workbench.circuits import output_direction

    sae = random_sae(32, 8, "z.1")
    d = output_direction(linear, sae, 2, "z.1")
    W_O = linear.W_O(1).detach()
    want = sum(sae.W_dec[2].detach().reshape(4, 8)[h] @ W_O[h] for h in range(4))
    assert torch.allclose(d, want, atol=1e-5)


def test_feature_flow_finds_a_permutation():
    a = random_sae(16, 40, "resid_post.0", seed=1)
    b = random_sae(16, 40, "resid_post.1", seed=2)
    perm = torch.randperm(40, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        b.W_dec.copy_(a.W_dec[perm])
    flow = feature_flow(a, b, top_k=3)
    inv = torch.argsort(perm)
    assert np.array_equal(flow["match"][:, 0], inv.numpy())
    assert np.allclose(flow["cosine"][:, 0], 1, atol=1e-5) and (flow["cosine"][:, 1] < 0.999).all()
    with pytest.raises(WorkbenchError, match="same width"):
        feature_flow(a, random_sae(8, 4, "x"))


def test_steering_known_answer(linear, pairs):  # noqa: F811
    clean, _, metric = pairs
    sae = random_sae(32, 16, "resid_post.1", seed=4)
    r = steer(linear, sae, 5, 3.0, clean, metric, positions="last")
    W_U = linear.W_U.detach()
    want = np.array([float(3.0 * sae.W_dec[5].detach() @ (W_U[:, g] - W_U[:, b])) for g, b in zip(metric.good, metric.bad)])
    np.testing.assert_allclose(r["after"] - r["before"], want, rtol=1e-4, atol=1e-5)
    assert r.change == pytest.approx(float(want.mean()), rel=1e-4)
    with pytest.raises(WorkbenchError, match="positions"):
        steer(linear, sae, 5, 1.0, clean, metric, positions="first")
    assert "top_after" not in r.attrs


def _pushing_sae(linear):
    """A random SAE whose feature 5 points along the unembedding of the token with the
    largest unembedding norm (steering it hard makes the model say that token)."""
    sae = random_sae(32, 16, "resid_post.1", seed=4)
    W_U = linear.W_U.detach()
    target = int(W_U.T.norm(dim=1).argmax())
    with torch.no_grad():
        sae.W_dec[5] = W_U[:, target] / W_U[:, target].norm()
    return sae, target


def test_steering_lists_what_the_model_says_next(linear, pairs):  # noqa: F811
    """top_k: the most probable next tokens (probability averaged over prompts at the last
    position) before and after; a strong push along a token's unembedding makes it first."""
    from workbench.tokens import token_strings

    clean, _, metric = pairs
    sae, target = _pushing_sae(linear)
    r = steer(linear, sae, 5, 200.0, clean, metric, positions="last", top_k=4)
    batch = linear.tokenize(clean)
    probs = torch.softmax(linear.logits(batch)[torch.arange(len(clean)), batch.last].float(), -1).mean(0)
    top = probs.topk(4)
    want = token_strings(linear.tokenizer, top.indices.tolist())
    assert [t for t, _ in r.attrs["top_before"]] == want
    assert np.allclose([p for _, p in r.attrs["top_before"]], top.values.numpy(), rtol=1e-5)
    assert r.attrs["top_after"][0][0] == token_strings(linear.tokenizer, [target])[0]
    assert r.attrs["top_after"][0][1] > 0.9
    with pytest.raises(WorkbenchError, match="top_k"):
        steer(linear, sae, 5, 1.0, clean, metric, top_k=-1)


def test_steering_continues_the_text_greedily(linear, pairs):  # noqa: F811
    """max_new_tokens: each prompt's greedy continuation without steering equals a manual
    greedy loop; a strong push along a token's unembedding makes every new token that one."""
    clean, _, metric = pairs
    sae, target = _pushing_sae(linear)
    r = steer(linear, sae, 5, 500.0, clean, metric, positions="last", max_new_tokens=3)
    batch = linear.tokenize(clean)
    for row, text in enumerate(r.attrs["text_before"]):
        ids = batch.input_ids[row, : int(batch.last[row]) + 1][None]
        for _ in range(3):
            ids = torch.cat([ids, linear.logits(ids)[:, -1].argmax(-1, keepdim=True)], dim=1)
        assert text == linear.tokenizer.decode(ids[0, -3:].tolist())
    assert r.attrs["text_after"] == [linear.tokenizer.decode([target] * 3)] * len(clean)
    with pytest.raises(WorkbenchError, match="max_new_tokens"):
        steer(linear, sae, 5, 1.0, clean, metric, max_new_tokens=-1)


def test_shift_ablation_known_answer(linear, pairs):  # noqa: F811
    clean, _, metric = pairs
    site = "mlp_out.1"
    sae = random_sae(32, 16, site, seed=6)
    r = ablate_features(linear, {site: sae}, {site: [2, 7]}, clean, metric)
    batch = linear.tokenize(clean)
    x = linear.cache(batch, [site])[site]
    f = sae.encode(x).detach()
    W_U = linear.W_U.detach()
    last = f[torch.arange(len(clean)), batch.last]
    want = np.array([float(-(last[b, [2, 7]] @ sae.W_dec[[2, 7]].detach()) @ (W_U[:, g] - W_U[:, bd]))
                     for b, (g, bd) in enumerate(zip(metric.good, metric.bad))])
    np.testing.assert_allclose(r["after"] - r["before"], want, rtol=1e-4, atol=1e-5)
    with pytest.raises(WorkbenchError, match="no SAE given"):
        ablate_features(linear, {site: sae}, {"mlp_out.0": [1]}, clean, metric)
    mean = ablate_features(linear, {site: sae}, {site: [2]}, clean, metric, replacement="mean")
    assert mean.attrs["value"] == "mean" and np.isfinite(mean["after"]).all()


def test_steer_and_ablate_take_a_metric_name(linear, pairs):  # noqa: F811
    from workbench.metrics import next_token_loss

    clean, _, _ = pairs
    sae = random_sae(32, 16, "resid_post.1", seed=4)
    by_name = steer(linear, sae, 5, 3.0, clean, "loss")
    by_fn = steer(linear, sae, 5, 3.0, clean, next_token_loss)
    np.testing.assert_array_equal(by_name["after"], by_fn["after"])
    assert not np.allclose(by_name["after"], by_name["before"])
    site = "mlp_out.1"
    sae = random_sae(32, 16, site, seed=6)
    a = ablate_features(linear, {site: sae}, {site: [2, 7]}, clean, "loss")
    b = ablate_features(linear, {site: sae}, {site: [2, 7]}, clean, next_token_loss)
    np.testing.assert_array_equal(a["after"], b["after"])
