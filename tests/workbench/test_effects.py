"""The effects engine: exact effects against one hand-written patched forward per node
(heads, SAE features and error terms, neurons; every replacement), attribution against
exact patching where the downstream is linear and against a finite difference where it
is not, integrated gradients against exact, sets of nodes, Batch slicing, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.conftest import make_tiny
from workbench import WorkbenchError, from_model
from workbench.circuits import SAE
from workbench.effects import Features, Heads, Neurons, NodeEffects, Patching, derangement, effects
from workbench.metrics import logit_diff, next_token_loss
from workbench.subject import Batch

SAME_LEN = ["hot -> cold ; big -> small", "cat -> Cat ; dog -> Dog", "go -> went ; see -> saw"]
OTHER = ["big -> small ; hot -> cold", "dog -> Dog ; cat -> Cat", "see -> saw ; go -> went"]


def random_sae(d: int, d_sae: int, site: str, seed: int = 0) -> SAE:
    sae = SAE(d, d_sae, kind="relu", site=site, seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        sae.b_enc.copy_(0.1 * torch.randn(d_sae, generator=g))
        sae.b_dec.copy_(0.1 * torch.randn(d, generator=g))
    return sae.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama", "bert"])
def subject(request, word_tokenizer):
    model = make_tiny(request.param, word_tokenizer, seed=2)
    with torch.no_grad():  # larger weights than the init's, so that every node's effect is visible
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name and "wte" not in name and "wpe" not in name:
                p.mul_(4)
    return from_model(model, word_tokenizer, name=f"tiny-{request.param}")


def _metric(subject, batch, patch=None) -> float:
    return float(next_token_loss(subject.logits(batch, patch=patch), batch).double().mean())


def _hand_values(subject, batch, site, take, replacement):
    """The replacement of the values ``take(x)`` [b, p, ...] of ``site``, computed by hand."""
    x = subject.cache(batch, [site])[site]
    v = take(x)
    if replacement == "zero":
        return torch.zeros_like(v)
    if replacement == "mean":
        m = batch.attention_mask.bool()
        return v[m].mean(0).expand_as(v)
    if replacement == "resample":
        return v[derangement(len(batch), 0)]
    return take(subject.cache(subject.tokenize(OTHER), [site])[site])  # corrupted


@pytest.mark.parametrize("replacement", ["zero", "mean", "resample", "corrupted"])
def test_exact_head_effects_equal_one_forward_per_head(subject, replacement):
    batch = subject.tokenize(SAME_LEN)
    kw = {"corrupted": OTHER} if replacement == "corrupted" else {}
    r = effects(subject, batch, Heads(), method="exact", replacement=replacement, **kw)
    one = effects(subject, batch, Heads(), method="exact", replacement=replacement, max_bytes=1, **kw)
    base = _metric(subject, batch)
    assert r.attrs["base"] == pytest.approx(base, abs=1e-6)
    assert r.coord("node")[:2] == ["z.0/0", "z.0/1"] and list(r["layer"][:5]) == [0, 0, 0, 0, 1]
    for layer in range(subject.n_layers):
        repl = _hand_values(subject, batch, f"z.{layer}", lambda z: z, replacement)
        for h in range(subject.n_heads):
            def fn(z, h=h):
                z = z.clone()
                z[:, :, h] = repl[:, :, h]
                return z

            want = _metric(subject, batch, {f"z.{layer}": fn}) - base
            i = r.coord("node").index(f"z.{layer}/{h}")
            assert r["effect"][i] == pytest.approx(want, abs=1e-5), (subject.name, layer, h)
            assert r["head"][i] == h
    assert np.abs(r["effect"]).max() > 2e-4  # well above the tolerance
    np.testing.assert_allclose(r["effect"], one["effect"], atol=1e-5)


@pytest.mark.parametrize("replacement", ["zero", "mean", "corrupted"])
def test_exact_feature_effects_equal_one_spliced_forward_per_node(subject, replacement):
    site = "mlp_out.0"
    sae = random_sae(subject.d_model, 24, site, seed=1)
    batch = subject.tokenize(SAME_LEN)
    kw = {"corrupted": OTHER} if replacement == "corrupted" else {}
    r = effects(subject, batch, Features({site: sae}), method="exact", replacement=replacement, **kw)
    base = _metric(subject, batch)
    with torch.no_grad():
        f = _hand_values(subject, batch, site, sae.encode, replacement)
        err = _hand_values(subject, batch, site, lambda x: x - sae.decode(sae.encode(x)), replacement)
    for j in range(sae.d_sae + 1):
        def fn(x, j=j):
            fx = sae.encode(x)
            ex = x - sae.decode(fx)
            if j < sae.d_sae:
                fx = fx.clone()
                fx[..., j] = f[..., j]
            else:
                ex = err
            return sae.decode(fx) + ex

        want = _metric(subject, batch, {site: fn}) - base
        assert r["effect"][j] == pytest.approx(want, abs=1e-5), (subject.name, j)
    assert r.coord("node")[-1] == f"{site}/err" and r["feature"][-1] == -1 and r["feature"][3] == 3
    assert (np.abs(r["effect"]) > 1e-4).sum() > 3


@pytest.mark.parametrize("positions", [None, "last"])
def test_exact_neuron_effects_equal_one_forward_per_neuron(subject, positions):
    site, idx = "resid_pre.1", [0, 3, 7, 30]
    batch = subject.tokenize(["hot -> cold ; big ->", "the keys near the cabinet", "cat -> Cat"])
    r = effects(subject, batch, Neurons(site, idx), method="exact", replacement="mean", positions=positions,
                skip_first=True)
    base = _metric(subject, batch)
    x = subject.cache(batch, [site])[site]
    m = batch.attention_mask.bool().clone()
    m[:, 0] = False
    mean = x[m].mean(0)
    at = m.clone() if positions is None else torch.zeros_like(m)
    if positions == "last":
        at[torch.arange(len(batch)), batch.last] = True
    for k, i in enumerate(idx):
        def fn(x, i=i):
            x = x.clone()
            x[..., i] = torch.where(at, mean[i], x[..., i])
            return x

        want = _metric(subject, batch, {site: fn}) - base
        assert r["effect"][k] == pytest.approx(want, abs=1e-5), (subject.name, i)
        assert r["neuron"][k] == i and r.coord("node")[k] == f"{site}/{i}"
    if positions is None:
        assert np.abs(r["effect"]).max() > 1e-4


def test_explicit_values_and_sets_of_nodes(subject):
    """Explicit values at the last token; a set of heads across layers against one hand patch."""
    batch = subject.tokenize(SAME_LEN)
    vals = {f"z.{l}": torch.randn(subject.n_heads, subject.d_head, generator=torch.Generator().manual_seed(l))
            for l in range(subject.n_layers)}
    pt = Patching(subject, batch, Heads(), replacement=vals, positions="last")
    eff = pt.exact(next_token_loss)
    base = _metric(subject, batch)
    rows = torch.arange(len(batch))

    def fn(z, l=1, h=2):
        z = z.clone()
        z[rows, batch.last, h] = vals[f"z.{l}"][h]
        return z

    assert eff[pt.names.index("z.1/2")] == pytest.approx(_metric(subject, batch, {"z.1": fn}) - base, abs=1e-5)
    # a set across layers, zeroed: one copy of the batch
    pz = Patching(subject, batch, Heads(), replacement="zero")

    def zero(hs):
        def f(z):
            z = z.clone()
            z[:, :, hs] = 0
            return z
        return f

    want = _metric(subject, batch, {"z.0": zero([1]), "z.1": zero([0, 3])})
    got = pz.patched_metrics([["z.0/1", "z.1/0", "z.1/3"], [], ["z.1/0"]], next_token_loss)
    assert got[0] == pytest.approx(want, abs=1e-5) and got[1] == pytest.approx(base, abs=1e-5)
    assert got[2] == pytest.approx(_metric(subject, batch, {"z.1": zero([0])}), abs=1e-5)
    assert _metric(subject, batch, pz.patch(["z.0/1", "z.1/0", "z.1/3"])) == pytest.approx(want, abs=1e-5)


@pytest.fixture(scope="module")
def linear(word_tokenizer):
    """A tiny GPT-2 whose final LayerNorm is the identity: logits are linear in mlp_out.1."""
    model = make_tiny("gpt2", word_tokenizer, seed=3)
    model.transformer.ln_f = torch.nn.Identity()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".ln_" not in name:
                p.mul_(10)
    return from_model(model, word_tokenizer, name="tiny-linear")


def _diff_metric(subject):
    ids = subject.tokenizer.convert_tokens_to_ids(["cold", "small", "Dog"])

    def metric(logits, batch):
        return logit_diff(logits, batch, [ids[0]] * len(batch), [ids[1]] * len(batch))
    return metric


def test_attribution_equals_exact_when_the_downstream_is_linear(linear):
    metric = _diff_metric(linear)
    site = "mlp_out.1"
    nodes = [Neurons(site), Features({"resid_post.1": random_sae(32, 40, "resid_post.1", seed=4)})]
    for replacement, kw in (("mean", {}), ("corrupted", {"corrupted": OTHER})):
        exact = effects(linear, SAME_LEN, nodes, metric, method="exact", replacement=replacement, **kw)
        attrib = effects(linear, SAME_LEN, nodes, metric, method="attribution", replacement=replacement, **kw)
        ig = effects(linear, SAME_LEN, nodes, metric, method="ig", ig_steps=1, replacement=replacement, **kw)
        e = exact["effect"]
        assert np.abs(e).max() > 1e-2 and (np.abs(e) > 1e-6).sum() > 20
        np.testing.assert_allclose(attrib["effect"], e, atol=1e-4 * np.abs(e).max())
        np.testing.assert_allclose(ig["effect"], e, atol=1e-4 * np.abs(e).max())
        assert attrib.attrs["base"] == pytest.approx(exact.attrs["base"], abs=1e-4)
    assert exact.attrs["sites"] == [site, "resid_post.1"] and "metric_corrupted" in exact.attrs


def test_attribution_is_the_directional_derivative_and_ig_approaches_exact(word_tokenizer):
    """Where the downstream is not linear: attribution is the derivative along the
    replacement direction (a central difference in float64); integrated gradients with
    many points give the exact effect of moving one node, and a site's IG effects add up
    to the effect of replacing every node of the site at once."""
    subject = from_model(make_tiny("llama", word_tokenizer, seed=1).double(), word_tokenizer)
    batch = subject.tokenize(SAME_LEN)
    site, i = "resid_pre.1", 5
    attrib = effects(subject, batch, Neurons(site, [i]), method="attribution", replacement="zero")
    eps = 1e-3

    def scaled(c):
        def fn(x):
            x = x.clone()
            x[..., i] = x[..., i] * c
            return x
        return {site: fn}

    fd = (_metric(subject, batch, scaled(1 - eps)) - _metric(subject, batch, scaled(1 + eps))) / (2 * eps)
    assert attrib["effect"][0] == pytest.approx(fd, rel=1e-3), (attrib["effect"], fd)
    exact = effects(subject, batch, Neurons(site, [i]), method="exact", replacement="mean")
    ig = effects(subject, batch, Neurons(site, [i]), method="ig", ig_steps=32, replacement="mean")
    assert abs(exact["effect"][0]) > 1e-4
    assert ig["effect"][0] == pytest.approx(exact["effect"][0], rel=1e-3)
    heads = effects(subject, batch, Heads([1]), method="ig", ig_steps=32, replacement="mean")
    pt = Patching(subject, batch, Heads([1]), replacement="mean")
    whole = pt.patched_metrics([pt.names], next_token_loss)[0] - pt.base(next_token_loss)
    assert heads["effect"].sum() == pytest.approx(whole, rel=1e-3)
    assert not np.allclose(heads["effect"], effects(subject, batch, Heads([1]), replacement="mean")["effect"],
                           rtol=1e-2)  # per head, IG is not the exact effect of one head alone


def test_only_some_nodes_and_unchanged_nodes(linear):
    site = "mlp_out.1"
    sae = random_sae(32, 16, site, seed=2)
    r = effects(linear, SAME_LEN, Features({site: sae}), method="exact", replacement="corrupted", corrupted=SAME_LEN,
                only=[f"{site}/3", f"{site}/err"])
    # corrupted == clean: nothing moves, so every measured effect is exactly 0 without a forward
    assert np.isnan(r["effect"][0]) and r["effect"][3] == 0.0 and r["effect"][-1] == 0.0


def test_batch_slices_and_repeats_with_its_extra_inputs():
    ids = torch.arange(12).reshape(3, 4)
    b = Batch(ids, torch.ones_like(ids), {"token_type_ids": ids % 2})
    assert torch.equal(b[1:].input_ids, ids[1:]) and torch.equal(b[1:].extra["token_type_ids"], ids[1:] % 2)
    assert len(b[0]) == 1 and torch.equal(b[-1].input_ids, ids[2:])
    pick = b[torch.tensor([2, 0])]
    assert torch.equal(pick.input_ids, ids[[2, 0]]) and torch.equal(pick.extra["token_type_ids"], ids[[2, 0]] % 2)
    r = b.repeat(3)
    assert r.input_ids.shape == (9, 4) and torch.equal(r.input_ids[3:6], ids)
    assert torch.equal(r.extra["token_type_ids"][6:], ids % 2) and torch.equal(r.attention_mask, torch.ones(9, 4).long())
    with pytest.raises(WorkbenchError, match="positive number"):
        b.repeat(0)


def test_result_roundtrip_and_top(tmp_path, linear):
    r = effects(linear, SAME_LEN, [Heads(), Neurons("mlp_out.0", [1, 2])], replacement="mean")
    assert isinstance(r, NodeEffects) and r.attrs["sites"] == ["z.0", "mlp_out.0", "z.1"]
    r.save(tmp_path / "e.safetensors")
    back = NodeEffects.load(tmp_path / "e.safetensors")
    assert back.equals(r) and back.top(3) == r.top(3)
    assert np.array_equal(back.at("mlp_out.0"), r["effect"][4:6])


def test_bad_input(linear):
    with pytest.raises(WorkbenchError, match="unknown method 'magic'"):
        effects(linear, SAME_LEN, Heads(), method="magic")
    with pytest.raises(WorkbenchError, match="unknown replacement 'noise'.*resample"):
        effects(linear, SAME_LEN, Heads(), replacement="noise")
    with pytest.raises(WorkbenchError, match="needs the corrupted prompts"):
        effects(linear, SAME_LEN, Heads(), replacement="corrupted")
    with pytest.raises(WorkbenchError, match="same number of tokens"):
        effects(linear, SAME_LEN, Heads(), replacement="corrupted", corrupted=["a b", "c", "d"])
    with pytest.raises(WorkbenchError, match="equal lengths"):
        effects(linear, ["a b", "a b c d"], Heads(), replacement="resample")
    with pytest.raises(WorkbenchError, match="positions must be"):
        effects(linear, SAME_LEN, Heads(), positions="first")
    with pytest.raises(WorkbenchError, match="does not broadcast"):
        effects(linear, SAME_LEN, Heads([0]), replacement={"z.0": torch.zeros(3, 8)})
    with pytest.raises(WorkbenchError, match="two node groups at site mlp_out.0"):
        effects(linear, SAME_LEN, [Neurons("mlp_out.0", [1]), Neurons("mlp_out.0", [2])])
    with pytest.raises(WorkbenchError, match="neuron 99 out of range"):
        effects(linear, SAME_LEN, Neurons("mlp_out.0", [99]))
    with pytest.raises(WorkbenchError, match="ig_steps must be >= 1"):
        effects(linear, SAME_LEN, Heads(), method="ig", ig_steps=0)
    with pytest.raises(WorkbenchError, match="unknown metric"):
        effects(linear, SAME_LEN, Heads(), "accuracy")


@pytest.mark.parametrize("replacement", ["zero", "mean", "resample", "corrupted"])
def test_attribution_in_chunks_under_a_budget_is_the_whole_batch_attribution(subject, replacement):
    """A max_bytes below one batch's graph runs the prompts in chunks (one prompt each
    here); the metric still sees the whole batch (it reads per-prompt answer lists of
    the whole batch), and every node's estimate and the base equal the one-pass answer."""
    from workbench.memory import forward_bytes

    batch = subject.as_batch(SAME_LEN)
    good, bad = [3, 5, 7], [4, 6, 8]

    def metric(logits, b):
        return logit_diff(logits, b, good, bad)

    site = "resid_post.0"
    nodes = [Heads(layers=[0, 1]), Features({site: random_sae(subject.d_model, 16, site)})]
    kw = dict(replacement=replacement, corrupted=OTHER if replacement == "corrupted" else None)
    whole, base = Patching(subject, batch, nodes, **kw).attribution(metric, max_bytes=2**40)
    one_row = forward_bytes(subject, 1, batch.input_ids.shape[1], width=16, grad=True)
    pt = Patching(subject, batch, nodes, **kw)
    calls = []
    real = subject.gradients
    try:
        subject.gradients = lambda b, *a, **k: calls.append(len(b)) or real(b, *a, **k)
        chunked, base_c = pt.attribution(metric, max_bytes=one_row)
    finally:
        del subject.gradients
    assert calls == [1, 1, 1]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6)
    assert abs(base_c - base) < 1e-6
    assert np.abs(whole).max() > 0
