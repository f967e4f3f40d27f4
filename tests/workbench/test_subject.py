"""Subject and layouts on tiny random models of every supported family."""

from __future__ import annotations

import copy

import pytest
import torch

import workbench
from tests.conftest import FAMILY_OF, PROMPTS, make_tiny
from workbench import WorkbenchError
from workbench.layout import SITE_KINDS


def _plain_logits(subject, batch):
    with torch.no_grad():
        return subject.model(**batch.kwargs()).logits


def test_family_and_logits_equal_plain_forward(tiny):
    arch, s = tiny
    assert s.family.name == FAMILY_OF[arch]
    batch = s.tokenize(PROMPTS)
    assert torch.equal(s.logits(batch), _plain_logits(s, batch))


def test_every_site_reads_with_its_shape(tiny):
    arch, s = tiny
    batch = s.tokenize(PROMPTS)
    b, p = batch.input_ids.shape
    acts = s.cache(batch, s.sites)
    assert set(acts) == set(s.sites)
    d, h, dh = s.d_model, s.n_heads, s.d_head
    want = {"embed": (b, p, d), "resid_pre": (b, p, d), "pattern": (b, h, p, p), "z": (b, p, h, dh),
            "attn_out": (b, p, d), "mlp_out": (b, p, d), "resid_post": (b, p, d), "logits": (b, p, s.d_vocab)}
    for name, value in acts.items():
        assert tuple(value.shape) == want[name.split(".")[0]], name
    # attention rows are distributions over the unmasked keys, causal for decoders
    pat = acts["pattern.1"]
    mask = batch.attention_mask.bool()
    rows = pat.sum(-1).permute(0, 2, 1)[mask]  # [real queries, head]
    assert torch.allclose(rows, torch.ones_like(rows), atol=1e-5)
    assert (~mask).any()
    for i in range(b):  # real queries put no weight on padding keys
        real = mask[i]
        if (~real).any():
            assert float(pat[i][:, real][:, :, ~real].abs().max()) < 1e-6
    if s.causal:
        assert float(torch.triu(pat[0, 0], diagonal=1).abs().max()) == 0.0
    # the residual stream entering layer 1 is the one leaving layer 0
    assert torch.equal(acts["resid_pre.1"], acts["resid_post.0"])


def test_writing_every_site_back_unchanged_keeps_logits(tiny):
    arch, s = tiny
    batch = s.tokenize(PROMPTS)
    ref = _plain_logits(s, batch)
    patch = {name: (lambda x: x.clone()) for name in s.sites if name != "logits"}
    assert torch.equal(s.logits(batch, patch=patch), ref)


@pytest.mark.parametrize("layer,head", [(0, 1), (1, 3)])
def test_zeroing_one_head_equals_zeroing_its_output_weights(tiny, layer, head):
    arch, s = tiny
    batch = s.tokenize(PROMPTS)
    dh = s.d_head

    def zero_head(z):
        z = z.clone()
        z[:, :, head] = 0
        return z

    acts = s.cache(batch, [f"z.{layer}", f"attn_out.{layer}", f"resid_pre.{layer}"])
    patched = s.cache(batch, [f"attn_out.{layer}", f"resid_pre.{layer}", "logits"], patch={f"z.{layer}": zero_head})
    # upstream untouched; attn_out moves by exactly that head's term z_h @ W_O[h]
    assert torch.equal(patched[f"resid_pre.{layer}"], acts[f"resid_pre.{layer}"])
    term = torch.einsum("bpd,de->bpe", acts[f"z.{layer}"][:, :, head], s.W_O(layer)[head])
    assert torch.allclose(acts[f"attn_out.{layer}"] - patched[f"attn_out.{layer}"], term, atol=1e-5)
    # and the logits equal a plain forward of a copy whose W_O rows for that head are zero
    twin = copy.deepcopy(s.model)
    proj = twin.get_submodule(s.module_path(f"z.{layer}"))
    with torch.no_grad():
        if type(proj).__name__ == "Conv1D":
            proj.weight[head * dh:(head + 1) * dh, :] = 0
        else:
            proj.weight[:, head * dh:(head + 1) * dh] = 0
        ref = twin(**batch.kwargs()).logits
    assert torch.allclose(patched["logits"], ref, atol=1e-5)
    assert not torch.allclose(patched["logits"], s.logits(batch), atol=1e-4)


def test_writing_a_pattern_changes_what_heads_read(tiny):
    arch, s = tiny
    batch = s.tokenize(PROMPTS)

    def attend_first(p):
        q = torch.zeros_like(p)
        q[..., 0] = 1.0
        return q

    acts = s.cache(batch, ["z.1"], patch={"pattern.1": attend_first})
    z = acts["z.1"]  # every position now copies the value vector of position 0
    assert torch.allclose(z, z[:, :1].expand_as(z), atol=1e-6)
    assert not torch.allclose(s.cache(batch, ["z.1"])["z.1"], z, atol=1e-4)


def test_gradients_match_autograd(tiny):
    arch, s = tiny
    batch = s.tokenize(PROMPTS)
    target = 7

    def metric(logits, b):
        return logits[torch.arange(len(b)), b.last, target].sum()

    acts, grads, value = s.gradients(batch, ["resid_post.0", "z.1"], metric)
    assert grads["z.1"].shape == acts["z.1"].shape
    # directional check: a small step along the gradient changes the metric as predicted
    eps = 1e-3
    step = grads["resid_post.0"] / grads["resid_post.0"].norm()
    moved = s.logits(batch, patch={"resid_post.0": acts["resid_post.0"] + eps * step})
    delta = float(metric(moved, batch) - value)
    assert delta == pytest.approx(eps * float(grads["resid_post.0"].norm()), rel=2e-2)


def test_gqa_heads_are_query_heads(word_tokenizer):
    from workbench import from_model

    s = from_model(make_tiny("qwen2", word_tokenizer), word_tokenizer)
    assert (s.n_heads, s.n_kv_heads) == (4, 1)
    acts = s.cache(s.tokenize(PROMPTS), ["z.0", "pattern.0"])
    assert acts["z.0"].shape[2] == 4 and acts["pattern.0"].shape[1] == 4


def test_bad_sites_name_what_is_valid(word_tokenizer):
    from workbench import from_model

    s = from_model(make_tiny("gpt2", word_tokenizer), word_tokenizer)
    with pytest.raises(WorkbenchError, match="valid: .*resid_pre"):
        s.site("resid_mid.0")
    with pytest.raises(WorkbenchError, match="layers 0..1"):
        s.site("z.5")
    with pytest.raises(WorkbenchError, match="needs a layer"):
        s.site("z")
    with pytest.raises(WorkbenchError, match="has no layer"):
        s.site("logits.1")
    assert s.site("z.-1").layer == 1
    assert set(SITE_KINDS) == {n.split(".")[0] for n in s.sites}


def test_bad_inputs(word_tokenizer):
    from workbench import from_model

    s = from_model(make_tiny("gpt2", word_tokenizer), word_tokenizer)
    with pytest.raises(WorkbenchError, match="empty prompt list"):
        s.tokenize([])
    with pytest.raises(WorkbenchError, match="context holds 64 positions"):
        s.tokenize(["hot " * 80])
    with pytest.raises(WorkbenchError, match="cannot use dict"):
        s.as_batch({"ids": [1, 2]})
    with pytest.raises(WorkbenchError, match="must be strings"):
        s.tokenize(["ok", 3])


def test_unknown_model_lists_the_zoo():
    with pytest.raises(WorkbenchError, match=r"Zoo names \(offline\): tasklm, minilm.*hub id"):
        workbench.load("./no/such/dir")
    with pytest.raises(WorkbenchError, match="zoo name, a local path or a hub id"):
        workbench.load("")


def test_load_from_a_local_directory_and_device_map(tmp_path, word_tokenizer, monkeypatch):
    import transformers

    model = make_tiny("llama", word_tokenizer)
    model.save_pretrained(tmp_path)
    word_tokenizer.save_pretrained(tmp_path)
    seen = {}
    original = transformers.LlamaForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.update(kwargs)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.LlamaForCausalLM, "from_pretrained", classmethod(spy))
    s = workbench.load(str(tmp_path), device_map={"": "cpu"})
    assert seen["device_map"] == {"": "cpu"} and seen["use_safetensors"] is True
    assert seen["trust_remote_code"] is False
    assert s.model.config._attn_implementation == "eager"
    batch = s.tokenize(PROMPTS)
    with torch.no_grad():
        ref = model(**batch.kwargs()).logits
    assert torch.allclose(s.logits(batch), ref, atol=1e-6)


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPTJConfig

    GPTJConfig(n_layer=1, n_embd=16, n_head=2, vocab_size=20).save_pretrained(tmp_path)
    with pytest.raises(WorkbenchError, match="no layout for model type 'gptj'; supported model types: .*gpt2"):
        workbench.load(str(tmp_path))


def test_remote_passes_through_to_nnsight(monkeypatch, word_tokenizer):
    """remote=True builds nnsight's TransformersModel from the hub id and runs every trace with
    remote=True (NDIF itself cannot be reached offline, so the wrapper is faked)."""
    import nnsight

    built, traced = {}, {}
    model = make_tiny("gpt2", word_tokenizer)

    class FakeLM:
        def __init__(self, repo, **kw):
            built.update(repo=repo, **kw)
            self._module, self.tokenizer = model, word_tokenizer

        def trace(self, *args, **kwargs):
            traced.update(kwargs)
            raise RuntimeError("stop here")

    monkeypatch.setattr(nnsight, "TransformersModel", FakeLM)
    s = workbench.load("openai-community/gpt2", remote=True)
    assert s.remote and built["repo"] == "openai-community/gpt2" and built["attn_implementation"] == "eager"
    assert built["task"] == "text-generation"
    with pytest.raises(RuntimeError, match="stop here"):
        s.trace(s.tokenize(PROMPTS))
    assert traced["remote"] is True and "input_ids" in traced
