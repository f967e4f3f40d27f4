"""Sparse autoencoders: planted-direction recovery, exact resume, buffers over every
layout family, SAELens folders, evaluation with known answers, clear errors."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch

from workbench import WorkbenchError
from workbench.circuits import SAE, ActivationBuffer, TensorStream, collect, evaluate_sae, site_width, train_sae
from workbench.circuits.sae import site_from_hook

TEXTS = ["the keys near the cabinet are", "hot -> cold ; big -> small", "the old dog near the tables is",
         "France -> Paris ; Japan -> Tokyo", "a b c d e f", "the cats by the door are"] * 3


def planted(n=12000, d=32, m=64, p=0.05, seed=0):
    """Sparse combinations of m random unit directions in d dimensions."""
    g = torch.Generator().manual_seed(seed)
    D = torch.randn(m, d, generator=g)
    D /= D.norm(dim=1, keepdim=True)
    on = torch.rand(n, m, generator=g) < p
    mag = torch.rand(n, m, generator=g) * 2 + 0.5
    return (on * mag) @ D, D


@pytest.mark.parametrize("kind,kw", [("topk", dict(k=4)), ("batchtopk", dict(k=4)),
                                     ("relu", dict(l1=0.3, resample_every=300))])
def test_sae_recovers_planted_directions(kind, kw):
    X, D = planted()
    sae = SAE(32, 128, kind=kind, k=kw.get("k"), seed=0)
    log = train_sae(sae, X, steps=900, batch_size=256, lr=3e-3, l1_coeff=kw.get("l1", 0.0), dead_after=4000,
                    resample_every=kw.get("resample_every"), progress=False)
    best = (D @ sae.W_dec.detach().T).max(1).values  # each planted direction's best decoder match
    assert float((best > 0.9).float().mean()) >= 0.9, best
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(128), atol=1e-5)
    assert log["mse"][-1] < 0.3 * log["mse"][0]
    if kind != "relu":
        assert 3 <= log["l0"][-1] <= 4 + 1e-6  # k active at most (ReLU may zero a few)
    sae.eval()
    with torch.no_grad():
        f = sae.encode(X[:500])
        fvu = float((sae(X[:500]) - X[:500]).pow(2).sum() / (X[:500] - X[:500].mean(0)).pow(2).sum())
    assert fvu < 0.2
    # planted L0 is 64 x 0.05 = 3.2; ReLU + L1 keeps some small extra activations
    assert float((f > 0).sum(-1).float().mean()) < (20 if kind == "relu" else 4.5)


def test_topk_sparse_decode_matches_dense():
    sae = SAE(16, 64, kind="topk", k=5, seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
    x = torch.randn(3, 7, 16)
    assert torch.allclose(sae(x), sae.decode(sae.encode(x)), atol=1e-5)
    assert ((sae.encode(x) > 0).sum(-1) <= 5).all()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.bfloat16, 2e-2)])
def test_sparse_encoder_gradient_is_the_dense_one(dtype, tol):
    """SparsePre's backward (index_add / embedding_bag over the k gathered entries) gives
    the gradients autograd gives through the dense pre-activations; in bf16 it accumulates
    in float32, so it stays within bf16 rounding of the float64 answer."""
    from workbench.circuits.sae import SparsePre

    g = torch.Generator().manual_seed(0)
    rows, d, n, k = 600, 12, 50, 4  # rows > SparsePre.ROWS: the chunked index_add is crossed
    xc64 = torch.randn(rows, d, generator=g, dtype=torch.float64)
    W64, b64 = torch.randn(d, n, generator=g, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)
    weights = torch.randn(rows, k, generator=g, dtype=torch.float64)

    def grads(fn, dt):
        xc, W, b = (t.to(dt).detach().requires_grad_() for t in (xc64, W64, b64))
        with torch.no_grad():
            pre = xc @ W + b
        idx = (xc64 @ W64 + b64).topk(k, dim=-1).indices  # the same entries in both precisions
        (fn(xc, W, b, pre, idx).double() * weights).sum().backward()
        return [t.grad.double() for t in (xc, W, b)]

    ref = grads(lambda xc, W, b, pre, idx: (xc @ W + b).gather(-1, idx), torch.float64)
    got = grads(SparsePre.apply, dtype)
    for r, o, name in zip(ref, got, ("xc", "W_enc", "b_enc")):
        err = float((o - r).abs().max() / r.abs().max())
        assert err < tol, (name, err)


def test_topk_training_with_the_sparse_backward_is_dense_training(monkeypatch):
    """Whole TopK training runs (aux loss over dead features on, gradient clipping) reach
    the same weights with the sparse encoder backward and with autograd through the dense
    pre-activations (float64)."""
    from workbench.circuits import sae as sae_mod

    data = torch.randn(512, 16, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run():
        sae = SAE(16, 96, kind="topk", k=3, seed=2, dtype=torch.float64)
        log = train_sae(sae, data, steps=12, batch_size=64, lr=3e-3, dead_after=64, aux_coeff=0.5,
                        max_grad_norm=1.0, progress=False)
        return sae, log

    sparse, log_s = run()
    with monkeypatch.context() as m:
        m.setattr(sae_mod.SparsePre, "apply", staticmethod(lambda xc, W, b, pre, idx: (xc @ W + b).gather(-1, idx)))
        dense, log_d = run()
    assert max(log_s["aux"]) > 0  # dead features existed: the aux path was exercised
    np.testing.assert_allclose(log_s["loss"], log_d["loss"], rtol=1e-10)
    for name, p in sparse.named_parameters():
        torch.testing.assert_close(p, dict(dense.named_parameters())[name], rtol=1e-9, atol=1e-11)


class Interrupting(TensorStream):
    def __init__(self, *a, stop_at, **kw):
        super().__init__(*a, **kw)
        self.calls, self.stop_at = 0, stop_at

    def __next__(self):
        self.calls += 1
        if self.calls > self.stop_at:
            raise KeyboardInterrupt
        return super().__next__()


@pytest.mark.parametrize("kind", ["topk", "relu"])
def test_checkpoint_resumes_exactly(tmp_path, kind):
    X, _ = planted(n=3000)
    k = 4 if kind == "topk" else None
    kw = dict(steps=40, batch_size=64, lr=3e-3, l1_coeff=0.1, dead_after=200, seed=3, progress=False,
              resample_every=15 if kind == "relu" else None)
    ref = SAE(32, 96, kind=kind, k=k, seed=0)
    log_ref = train_sae(ref, X, **kw)
    # interrupted at step 27 (last checkpoint at 20), then resumed with a fresh SAE and stream
    first = SAE(32, 96, kind=kind, k=k, seed=0)
    with pytest.raises(KeyboardInterrupt):
        train_sae(first, Interrupting(X, 64, seed=3, stop_at=27), checkpoint=tmp_path / "ck", checkpoint_every=10, **kw)
    assert json.loads((tmp_path / "ck" / "train_state.json").read_text())["step"] == 20
    again = SAE(32, 96, kind=kind, k=k, seed=0)
    log = train_sae(again, X, checkpoint=tmp_path / "ck", checkpoint_every=10, **kw)
    for name, p in ref.state_dict().items():
        assert torch.equal(p, again.state_dict()[name]), name
    assert np.array_equal(log["loss"], log_ref["loss"]) and len(log["loss"]) == 40


def test_checkpoint_for_another_sae_is_refused(tmp_path):
    X, _ = planted(n=500)
    train_sae(SAE(32, 64, kind="topk", k=4), X, steps=3, checkpoint=tmp_path / "ck", progress=False)
    with pytest.raises(WorkbenchError, match="checkpoint"):
        train_sae(SAE(32, 128, kind="topk", k=4), X, steps=5, checkpoint=tmp_path / "ck", progress=False)


def test_save_load_roundtrip(tmp_path):
    sae = SAE(16, 48, kind="batchtopk", k=3, site="resid_post.1", model="tiny", seed=2)
    with torch.no_grad():
        sae.threshold.fill_(0.25)
        sae.b_enc.normal_()
    sae.save(tmp_path / "s")
    names = sorted(p.name for p in (tmp_path / "s").iterdir())
    cfg = json.loads((tmp_path / "s" / "cfg.json").read_text())
    assert names == ["cfg.json", cfg["tensors"]["file"]] and re.fullmatch(r"sae-[0-9a-f]{16}\.safetensors", names[1])
    back = SAE.load(tmp_path / "s")
    assert back.config() == sae.config()
    x = torch.randn(5, 16)
    assert torch.equal(back.encode(x), sae.eval().encode(x))
    # saving again over it replaces the weights file and keeps a file the user put there
    (tmp_path / "s" / "notes.txt").write_text("mine")
    with torch.no_grad():
        sae.b_enc.add_(1.0)
    sae.save(tmp_path / "s")
    assert (tmp_path / "s" / "notes.txt").read_text() == "mine"
    assert len(list((tmp_path / "s").glob("sae-*.safetensors"))) == 1
    assert torch.equal(SAE.load(tmp_path / "s").b_enc, sae.b_enc)


def test_save_never_deletes_what_it_did_not_write(tmp_path):
    sae = SAE(8, 16, kind="relu")
    user = tmp_path / "results"
    user.mkdir()
    (user / "data.csv").write_text("1,2,3")
    with pytest.raises(WorkbenchError, match="SAE.save did not write.*data.csv"):
        sae.save(user)
    assert (user / "data.csv").read_text() == "1,2,3" and sorted(p.name for p in user.iterdir()) == ["data.csv"]
    lens = tmp_path / "lens"  # another tool's SAE folder is not ours either
    lens.mkdir()
    (lens / "cfg.json").write_text(json.dumps({"architecture": "standard"}))
    with pytest.raises(WorkbenchError, match="did not write"):
        sae.save(lens)
    (tmp_path / "file").write_text("x")
    with pytest.raises(WorkbenchError, match="is a file"):
        sae.save(tmp_path / "file")
    empty = tmp_path / "empty"
    empty.mkdir()
    sae.save(empty)
    assert SAE.load(empty).d_sae == 16


def test_load_reports_damaged_folders(tmp_path):
    sae = SAE(8, 16, kind="topk", k=2)
    sae.save(tmp_path / "s")
    cfg_path = tmp_path / "s" / "cfg.json"
    good = cfg_path.read_text()
    cfg_path.write_text(good[: len(good) // 2])  # cut JSON
    with pytest.raises(WorkbenchError, match=r"cfg.json.*not valid JSON"):
        SAE.load(tmp_path / "s")
    cfg = json.loads(good)
    cfg_path.write_text(json.dumps({k: v for k, v in cfg.items() if k != "d_sae"}))
    with pytest.raises(WorkbenchError, match=r"cfg.json.*lacks.*'d_sae'"):
        SAE.load(tmp_path / "s")
    cfg_path.write_text(json.dumps({**cfg, "d_sae": 17}))  # tensors of the wrong shapes for the config
    with pytest.raises(WorkbenchError, match=r"safetensors.*wrong shapes.*W_enc \(8, 16\) \(expected \(8, 17\)"):
        SAE.load(tmp_path / "s")
    cfg_path.write_text(json.dumps({**cfg, "kind": "sparse"}))
    with pytest.raises(WorkbenchError, match=r"cfg.json.*unknown SAE kind 'sparse'"):
        SAE.load(tmp_path / "s")
    cfg_path.write_text(good)
    wpath = tmp_path / "s" / cfg["tensors"]["file"]
    raw = bytearray(wpath.read_bytes())
    raw[-1] ^= 0xFF  # a flipped bit in the weights
    wpath.write_bytes(bytes(raw))
    with pytest.raises(WorkbenchError, match="SHA-256"):
        SAE.load(tmp_path / "s")
    wpath.unlink()
    with pytest.raises(WorkbenchError, match="does not exist"):
        SAE.load(tmp_path / "s")


def test_version_1_folders_still_load(tmp_path):
    """Folders of the first layout (cfg.json + sae.safetensors) load, and a save over one
    replaces its weights file."""
    from safetensors.torch import save_file

    sae = SAE(8, 16, kind="jumprelu", site="z.1")
    with torch.no_grad():
        sae.threshold.fill_(0.1)
    old = tmp_path / "v1"
    old.mkdir()
    save_file({k: v.contiguous() for k, v in sae.state_dict().items()}, old / "sae.safetensors")
    (old / "cfg.json").write_text(json.dumps({"format": "workbench-sae", **sae.config()}))
    back = SAE.load(old)
    assert back.config() == sae.config() and torch.equal(back.threshold, sae.threshold)
    back.save(old)
    assert not (old / "sae.safetensors").exists() and torch.equal(SAE.load(old).threshold, sae.threshold)


def _write_saelens(folder, cfg, weights):
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(weights, folder / "sae_weights.safetensors")


def test_load_saelens_folders(tmp_path):
    g = torch.Generator().manual_seed(0)
    w = {"W_enc": torch.randn(8, 20, generator=g), "b_enc": torch.randn(20, generator=g),
         "W_dec": torch.randn(20, 8, generator=g), "b_dec": torch.randn(8, generator=g)}
    x = torch.randn(4, 8, generator=g)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    # standard (ReLU), old-style flat cfg
    _write_saelens(tmp_path / "std", {"d_in": 8, "d_sae": 20, "architecture": "standard", "activation_fn_str": "relu",
                                      "hook_name": "blocks.1.hook_resid_pre", "model_name": "gpt2",
                                      "apply_b_dec_to_input": True, "normalize_activations": "none"}, w)
    sae = SAE.load(tmp_path / "std")
    assert sae.kind == "relu" and sae.site == "resid_pre.1" and sae.model_name == "gpt2"
    assert torch.allclose(sae.encode(x), torch.relu(pre), atol=1e-5)
    assert torch.allclose(sae(x), torch.relu(pre) @ w["W_dec"] + w["b_dec"], atol=1e-5)
    # jumprelu with a threshold, new-style cfg with metadata
    thr = torch.rand(20, generator=g)
    _write_saelens(tmp_path / "jump", {"d_in": 8, "d_sae": 20, "architecture": "jumprelu", "apply_b_dec_to_input": False,
                                       "metadata": {"hook_name": "blocks.0.attn.hook_z", "model_name": "m"}},
                   {**w, "threshold": thr})
    sae = SAE.load(tmp_path / "jump")
    pre2 = x @ w["W_enc"] + w["b_enc"]
    assert sae.kind == "jumprelu" and sae.site == "z.0"
    assert torch.allclose(sae.encode(x), pre2 * (pre2 > thr), atol=1e-5)
    # topk
    _write_saelens(tmp_path / "topk", {"d_in": 8, "d_sae": 20, "architecture": "topk", "k": 3,
                                       "hook_name": "blocks.2.hook_mlp_out"}, w)
    sae = SAE.load(tmp_path / "topk")
    assert sae.kind == "topk" and sae.k == 3 and sae.site == "mlp_out.2"
    assert ((sae.encode(x) > 0).sum(-1) <= 3).all()
    # mismatched cfg / weights, missing weights, not a folder
    _write_saelens(tmp_path / "bad", {"d_in": 9, "d_sae": 20}, w)
    with pytest.raises(WorkbenchError, match="d_in=9"):
        SAE.load(tmp_path / "bad")
    _write_saelens(tmp_path / "partial", {"d_in": 8}, {"W_enc": w["W_enc"]})
    with pytest.raises(WorkbenchError, match="b_enc"):
        SAE.load(tmp_path / "partial")
    with pytest.raises(WorkbenchError, match="cfg.json"):
        SAE.load(tmp_path / "nowhere")


def test_hook_names():
    assert site_from_hook("blocks.8.hook_resid_post") == "resid_post.8"
    assert site_from_hook("hook_embed") == "embed"
    assert site_from_hook("blocks.3.hook_resid_mid") is None


def test_buffer_streams_every_family(tiny):
    arch, subject = tiny
    batch = subject.tokenize(TEXTS)
    n_real = int(batch.attention_mask.sum()) - len(TEXTS)
    for site in ("resid_post.1", "z.0", "mlp_out.0", "embed"):
        width = site_width(subject, site)
        assert width == (subject.n_heads * subject.d_head if site.startswith("z") else subject.d_model)
        buf = ActivationBuffer(subject, site, TEXTS, batch_size=16, capacity=64, prompt_batch_size=4, epochs=1, seed=0)
        rows = torch.cat(list(buf))
        assert rows.shape == (n_real, width)
        assert len(buf.rows) == 0
        # the same rows as a direct collect, in another (shuffled) order
        direct = collect(subject, site, TEXTS)
        assert direct.shape == rows.shape
        assert torch.allclose(direct.sum(0), rows.sum(0), atol=1e-3 * (1 + direct.abs().sum(0).max()))
        assert not torch.equal(direct, rows)


def test_buffer_state_resumes_the_stream(tiny):
    arch, subject = tiny
    if arch not in ("gpt2", "llama"):
        pytest.skip("one decoder of each position scheme is enough here")
    a = ActivationBuffer(subject, "resid_pre.1", TEXTS, batch_size=8, capacity=40, prompt_batch_size=3, seed=5)
    for _ in range(4):
        next(a)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    want = [next(a) for _ in range(6)]
    b = ActivationBuffer(subject, "resid_pre.1", TEXTS, batch_size=8, capacity=40, prompt_batch_size=3, seed=99)
    b.load_state_dict(state)
    got = [next(b) for _ in range(6)]
    assert all(torch.equal(x, y) for x, y in zip(want, got))


def test_train_from_a_buffer(tiny):
    arch, subject = tiny
    if arch != "gpt2":
        pytest.skip("one family is enough for the streamed training run")
    buf = ActivationBuffer(subject, "resid_post.0", TEXTS, batch_size=32, capacity=128, prompt_batch_size=6, seed=0)
    sae = SAE(subject.d_model, 64, kind="topk", k=4, site="resid_post.0")
    log = train_sae(sae, buf, steps=60, lr=3e-3, progress=False)
    assert log["mse"][-5:].mean() < log["mse"][:5].mean()
    assert buf.tokens_seen > 0


def test_bad_sites_and_widths(tiny):
    arch, subject = tiny
    with pytest.raises(WorkbenchError, match="valid: embed"):
        ActivationBuffer(subject, "resid.0", TEXTS)
    with pytest.raises(WorkbenchError, match="valid sites"):
        ActivationBuffer(subject, "pattern.0", TEXTS)
    with pytest.raises(WorkbenchError, match="would take"):
        ActivationBuffer(subject, "resid_post.0", TEXTS, capacity=10_000, max_bytes=1000)
    sae = SAE(subject.d_model + 1, 16, kind="relu")
    with pytest.raises(WorkbenchError, match="width mismatch.*d_in=33"):
        evaluate_sae(subject, sae, TEXTS, site="resid_post.0")
    with pytest.raises(WorkbenchError, match="width 32"):
        sae.encode(torch.zeros(2, subject.d_model))
    with pytest.raises(WorkbenchError, match="1 <= k"):
        SAE(8, 4, kind="topk", k=5)
    with pytest.raises(WorkbenchError, match="unknown SAE kind"):
        SAE(8, 4, kind="matryoshka")


def identity_sae(d: int, site: str) -> SAE:
    """f = relu([x, -x]), x_hat = f @ [I; -I] = x exactly."""
    sae = SAE(d, 2 * d, kind="relu", site=site)
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae.eval()


def test_evaluation_known_answers(tiny):
    arch, subject = tiny
    site = "mlp_out.0"
    ev = evaluate_sae(subject, identity_sae(subject.d_model, site), TEXTS)
    m = ev.metrics
    assert m["mse"] < 1e-9 and m["fvu"] < 1e-9
    assert abs(m["loss_sae"] - m["loss_clean"]) < 1e-5
    if abs(m["loss_zero"] - m["loss_clean"]) > 1e-3:
        assert abs(m["loss_recovered_zero"] - 1) < 1e-3
    assert m["dead_fraction"] == 0.0
    # an SAE that never fires reconstructs b_dec: zero -> loss_zero; the mean -> loss_mean
    dead = identity_sae(subject.d_model, site)
    with torch.no_grad():
        dead.b_enc.fill_(-1e6)
    m0 = evaluate_sae(subject, dead, TEXTS).metrics
    assert abs(m0["loss_sae"] - m0["loss_zero"]) < 1e-5 and m0["l0"] == 0 and m0["dead_fraction"] == 1.0
    assert m0["fvu"] >= 1 - 1e-6  # reconstructing 0 is no better than the mean
    x = collect(subject, site, TEXTS)
    with torch.no_grad():
        dead.b_dec.copy_(x.mean(0))
    m1 = evaluate_sae(subject, dead, TEXTS).metrics
    assert abs(m1["loss_sae"] - m1["loss_mean"]) < 1e-4
    assert abs(m1["fvu"] - 1) < 1e-3


def test_evaluation_result_roundtrip(tmp_path, tiny):
    arch, subject = tiny
    if arch != "gpt2":
        pytest.skip("one family is enough")
    ev = evaluate_sae(subject, identity_sae(subject.d_model, "z.1"), TEXTS, site="resid_post.1")
    ev.save(tmp_path / "e.safetensors")
    back = type(ev).load(tmp_path / "e.safetensors")
    assert back.equals(ev) and back.metrics == ev.metrics and back.l0 == ev.l0


def test_gradient_clipping():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g) * 10

    def trained(**kw):
        sae = SAE(16, 32, kind="topk", k=4, seed=1)
        train_sae(sae, x, steps=5, batch_size=64, lr=1e-2, progress=False, **kw)
        return sae.state_dict()

    plain, loose, tight = trained(), trained(max_grad_norm=1e12), trained(max_grad_norm=1e-3)
    assert all(torch.equal(plain[k], loose[k]) for k in plain)  # a clip never reached changes nothing
    assert not torch.allclose(plain["W_enc"], tight["W_enc"])
    with pytest.raises(WorkbenchError, match="max_grad_norm"):
        trained(max_grad_norm=0.0)


def test_saelens_settings_by_hand(tmp_path):
    """The SAELens settings that change what an SAE computes, on hand-made folders (the
    conformance tests compare with SAELens itself when it is installed)."""
    g = torch.Generator().manual_seed(1)
    w = {"W_enc": torch.randn(8, 20, generator=g), "b_enc": torch.randn(20, generator=g),
         "W_dec": torch.randn(20, 8, generator=g) * 3, "b_dec": torch.randn(8, generator=g)}
    x = torch.randn(6, 8, generator=g)
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    norms = w["W_dec"].norm(dim=1)
    # TopK with rescale_acts_by_decoder_norm: select on pre x |W_dec row|, decode f / |W_dec row|
    _write_saelens(tmp_path / "rescaled", {"architecture": "topk", "k": 3, "rescale_acts_by_decoder_norm": True,
                                           "metadata": {"sae_lens_version": "6.5.0"}}, w)
    sae = SAE.load(tmp_path / "rescaled")
    scaled = pre * norms
    vals, idx = scaled.topk(3, dim=-1)
    want_f = torch.zeros_like(pre).scatter(-1, idx, vals.relu())
    assert torch.allclose(sae.encode(x), want_f, atol=1e-4)
    assert torch.allclose(sae(x), (want_f / norms) @ w["W_dec"] + w["b_dec"], atol=1e-4)
    # JumpReLU storing log_threshold; the activation is relu(pre) where pre > threshold
    _write_saelens(tmp_path / "logthr", {"architecture": "jumprelu"},
                   {**w, "log_threshold": torch.full((20,), -1.0)})
    sae = SAE.load(tmp_path / "logthr")
    assert torch.allclose(sae.threshold, torch.full((20,), math.exp(-1.0)))
    assert torch.allclose(sae.encode(x), pre.relu() * (pre > math.exp(-1.0)), atol=1e-5)
    # SAELens < 6 finetuning scaling factor (decode(f * s)): folded into W_dec
    s = torch.rand(20, generator=g) + 0.5
    _write_saelens(tmp_path / "ft", {"architecture": "standard", "hook_point": "blocks.0.hook_resid_pre",
                                     "finetuning_scaling_factor": True}, {**w, "scaling_factor": s})
    sae = SAE.load(tmp_path / "ft")
    assert sae.site == "resid_pre.0"
    assert torch.allclose(sae(x), (pre.relu() * s) @ w["W_dec"] + w["b_dec"], atol=1e-4)
    # settings that cannot be honoured are refused, naming the key
    for cfg, match in (({"architecture": "standard", "normalize_activations": "layer_norm"}, "normalize_activations"),
                       ({"architecture": "transcoder"}, "architecture='transcoder' is not supported"),
                       ({"architecture": "standard", "reshape_activations": "heads"}, "reshape_activations"),
                       ({"architecture": "standard", "dtype": "int8"}, "dtype='int8'"),
                       ({"architecture": "topk"}, "needs its k")):
        folder = tmp_path / f"bad{len(list(tmp_path.iterdir()))}"
        _write_saelens(folder, cfg, w)
        with pytest.raises(WorkbenchError, match=match):
            SAE.load(folder)
    folder = tmp_path / "shapes"
    _write_saelens(folder, {"architecture": "standard"}, {**w, "b_enc": torch.zeros(19)})
    with pytest.raises(WorkbenchError, match=r"sae_weights.safetensors.*b_enc \(19,\) \(expected \(20,\)\)"):
        SAE.load(folder)


def test_gated_and_jumprelu_forward():
    g = torch.Generator().manual_seed(2)
    sae = SAE(6, 10, kind="gated")
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    x = torch.randn(4, 6, generator=g)
    s = x - sae.b_dec
    want = ((s @ sae.W_enc + sae.b_enc) > 0) * torch.relu(s @ (sae.W_enc * sae.r_mag.exp()) + sae.b_mag)
    assert torch.allclose(sae.encode(x), want, atol=1e-5) and bool((want > 0).any())
    j = SAE(6, 10, kind="jumprelu")
    with torch.no_grad():
        j.threshold.fill_(-0.5)  # a negative threshold never lets a negative activation through
        j.b_enc.normal_(generator=g)
    assert bool((j.encode(x) >= 0).all())
    with pytest.raises(WorkbenchError, match="training gated SAEs is not supported"):
        train_sae(sae, torch.randn(8, 6), steps=1, progress=False)


def test_training_refuses_bad_numbers(tmp_path):
    X, _ = planted(n=400, d=16, m=32)
    sae = SAE(16, 32, kind="topk", k=4)
    before = {k: v.clone() for k, v in sae.state_dict().items()}
    for bs in (0, -3, 2.5):
        with pytest.raises(WorkbenchError, match="batch_size must be an integer >= 1"):
            train_sae(sae, X, steps=3, batch_size=bs, progress=False)
    bad = X.clone()
    bad[123, 5] = float("nan")
    with pytest.raises(WorkbenchError, match=r"training data holds NaN or inf in 1 of its 400 rows \(first: row 123\)"):
        train_sae(sae, bad, steps=3, progress=False)

    def stream():
        for i in range(10):
            b = X[i * 32:(i + 1) * 32].clone()
            if i == 4:
                b[7] = float("inf")
            yield b

    with pytest.raises(WorkbenchError, match=r"batch of step 4 holds NaN or inf in 1 of its 32 rows \(first: row 7\)"):
        train_sae(sae, stream(), steps=10, checkpoint=tmp_path / "ck", checkpoint_every=2, progress=False)
    assert all(torch.isfinite(v).all() for v in sae.state_dict().values())
    assert json.loads((tmp_path / "ck" / "train_state.json").read_text())["step"] == 4  # the last good state
    with pytest.raises(WorkbenchError, match=r"loss of step 0 is inf"):
        train_sae(SAE(16, 32, kind="relu"), X * 1e30, steps=3, progress=False)
    with pytest.raises(WorkbenchError, match="steps must be an integer"):
        train_sae(sae, X, steps=2.0, progress=False)
    assert not torch.equal(before["W_enc"], sae.W_enc)  # (the stream run trained 4 steps)


def test_resume_checks_hyperparameters(tmp_path):
    X, _ = planted(n=500, d=16, m=32)
    kw = dict(steps=6, batch_size=32, lr=1e-3, checkpoint=tmp_path / "ck", checkpoint_every=3, progress=False)
    train_sae(SAE(16, 32, kind="topk", k=4), X, **{**kw, "steps": 3})
    with pytest.raises(WorkbenchError, match=r"other hyperparameters \(batch_size: checkpoint 32, this call 64; "
                                             r"lr: checkpoint 0.001, this call 0.003\)"):
        train_sae(SAE(16, 32, kind="topk", k=4), X, **{**kw, "lr": 3e-3, "batch_size": 64})
    with pytest.raises(WorkbenchError, match="same data"):
        train_sae(SAE(16, 32, kind="topk", k=4), X[:400], **kw)
    with pytest.raises(WorkbenchError, match="past steps=2"):
        train_sae(SAE(16, 32, kind="topk", k=4), X, **{**kw, "steps": 2})
    with pytest.raises(WorkbenchError, match=r"another SAE \(apply_b_dec_to_input: checkpoint True, this SAE False\)"):
        train_sae(SAE(16, 32, kind="topk", k=4, apply_b_dec_to_input=False), X, **kw)
    log = train_sae(SAE(16, 32, kind="topk", k=4), X, **kw)  # same settings: resumes
    assert len(log["loss"]) == 6
    (tmp_path / "ck" / "train_state.json").write_text("{\"step\": 3, ")
    with pytest.raises(WorkbenchError, match="train_state.json.*not valid JSON"):
        train_sae(SAE(16, 32, kind="topk", k=4), X, **kw)
