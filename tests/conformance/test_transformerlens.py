"""Conformance with TransformerLens 3.x on the same weights: a tiny seeded GPT-2 as an HF
model (what workbench reads) and as a HookedTransformer (TransformerLens' own GPT-2 weight
conversion). Head scores agree with ``detect_head`` exactly under
``convention="transformer_lens"`` and through the relation documented in ``head_scores``
under the default convention; cached activations agree at every site both define."""

from __future__ import annotations

import numpy as np
import pytest
import torch

pytest.importorskip("transformer_lens")

from tests.conftest import make_tiny  # noqa: E402
from workbench import from_model  # noqa: E402
from workbench.attention.scores import head_scores, target_masks  # noqa: E402

pytestmark = pytest.mark.conformance

TL_NAMES = {"previous_token": "previous_token_head", "duplicate": "duplicate_token_head", "induction": "induction_head"}
WORDS = ["cat", "dog", "red", "hot", "cold", "big"]  # few words: repeats, adjacent ones too
ATOL = 1e-5  # float32 on both sides; the two forwards differ by rounding only


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(Subject, HookedTransformer) over the same seeded random GPT-2 weights."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights
    from transformers import AutoTokenizer

    from workbench.data import vocabulary
    from workbench.zoo.tokenizer import build_word_tokenizer

    # TransformerLens reloads the tokenizer from its name_or_path (to set add_bos_token),
    # so it must come from a folder
    folder = tmp_path_factory.mktemp("word_tokenizer")
    build_word_tokenizer(vocabulary()).save_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    hf = make_tiny("gpt2", tok, seed=0)
    d = hf.config.n_embd
    with torch.no_grad():  # sharper queries and keys than the 0.02-std init: patterns far from uniform
        for block in hf.transformer.h:
            block.attn.c_attn.weight[:, : 2 * d] *= 12
    c = hf.config
    cfg = HookedTransformerConfig(
        d_model=d, d_head=d // c.n_head, n_heads=c.n_head, d_mlp=4 * d, n_layers=c.n_layer, n_ctx=c.n_positions,
        d_vocab=c.vocab_size, act_fn=c.activation_function, normalization_type="LN", eps=c.layer_norm_epsilon,
        positional_embedding_type="standard", original_architecture="GPT2LMHeadModel", default_prepend_bos=True,
        device="cpu", seed=0,
    )
    tl = HookedTransformer(cfg, tokenizer=tok, default_padding_side="right")
    state = convert_gpt2_weights(hf, cfg)
    state["unembed.b_U"] = torch.zeros(c.vocab_size)  # GPT-2's LM head has no bias
    missing, unexpected = tl.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith((".mask", ".IGNORE")) for k in missing), (missing, unexpected)
    tl.eval()
    return from_model(hf, tok, name="tiny-gpt2"), tl


@pytest.fixture(scope="module")
def prompts():
    rng = np.random.default_rng(0)
    out = [" ".join(rng.choice(WORDS, size=int(rng.integers(6, 20)))) for _ in range(8)]
    return out + ["hot cold big", "cat cat cat cat"]  # no repeat at all; nothing but adjacent repeats


def _tl_tokens(tl, text: str) -> torch.Tensor:
    return tl.to_tokens(text)[0]


def test_prompts_tokenize_the_same_and_exercise_adjacent_repeats(models, prompts):
    subject, tl = models
    batch = subject.tokenize(prompts)
    for i, p in enumerate(prompts):
        n = int(batch.attention_mask[i].sum())
        assert torch.equal(batch.input_ids[i, :n], _tl_tokens(tl, p)), p
    adjacent = [p for p in prompts if any(a == b for a, b in zip(p.split(), p.split()[1:]))]
    assert len(adjacent) >= 3


def test_transformer_lens_convention_equals_detect_head(models, prompts):
    from transformer_lens.head_detector import detect_head

    subject, tl = models
    r = head_scores(subject, prompts, kinds=list(TL_NAMES), n_boot=0, control=False, convention="transformer_lens")
    diffs, per_prompt = {}, {}
    for i, (kind, name) in enumerate(TL_NAMES.items()):
        ref = detect_head(tl, prompts, name)  # [layer, head], the mean over prompts
        diffs[kind] = float((torch.as_tensor(r["score"][i]) - ref).abs().max())
        each = torch.stack([detect_head(tl, p, name) for p in prompts])  # [prompt, layer, head]
        per_prompt[kind] = float((torch.as_tensor(r["per_prompt"][:, i]) - each).abs().max())
        assert float(ref.abs().max()) > 0.05, kind  # not a comparison of zeros
    assert max(diffs.values()) < ATOL, f"max |workbench - detect_head| per kind: {diffs}"
    assert max(per_prompt.values()) < ATOL, f"per prompt, max |workbench - detect_head| per kind: {per_prompt}"


def _counts(ids: torch.Tensor, kinds) -> dict[str, int]:
    """|Q|: the number of queries with a workbench target, per kind, for one unpadded prompt."""
    t = target_masks(ids[None], torch.ones_like(ids)[None], kinds)
    return {k: int((v[0].sum(-1) > 0).sum()) for k, v in t.items()}


def test_default_convention_follows_the_documented_relation(models, prompts):
    """Per prompt: W |Q| / n = D, minus detect_head's induction target on the query itself
    where the token before it is the same token."""
    from transformer_lens.head_detector import detect_head

    subject, tl = models
    r = head_scores(subject, prompts, kinds=list(TL_NAMES), n_boot=0, control=False)
    worst, corrected = {k: 0.0 for k in TL_NAMES}, 0.0
    for j, p in enumerate(prompts):
        ids = _tl_tokens(tl, p)
        n, q = len(ids), _counts(ids, list(TL_NAMES))
        with torch.no_grad():
            _, cache = tl.run_with_cache(ids[None])
        adjacent = (ids[1:] == ids[:-1]).float()
        for i, (kind, name) in enumerate(TL_NAMES.items()):
            d = detect_head(tl, p, name)
            if kind == "induction":
                diag = torch.stack([cache["pattern", l][0].diagonal(dim1=-2, dim2=-1)[:, 1:] for l in range(tl.cfg.n_layers)])
                self_target = (diag * adjacent).sum(-1) / n  # [layer, head]
                corrected = max(corrected, float(self_target.max()))
                d = d - self_target
            w = torch.as_tensor(r["per_prompt"][j, i])
            if kind == "previous_token":
                assert q[kind] == n - 1
            if q[kind] == 0:
                assert torch.isnan(w).all() and float(d.abs().max()) < ATOL, (p, kind)
                continue
            worst[kind] = max(worst[kind], float((w * q[kind] / n - d).abs().max()))
    assert corrected > 0.05  # the induction self-target matters on these prompts
    assert max(worst.values()) < ATOL, f"max |W |Q|/n - D| per kind: {worst}"


def test_default_convention_means_differ_by_the_documented_factor(models):
    """On equal-length prompts of L distinct words repeated once: n/(n-1) and n/L."""
    from transformer_lens.head_detector import detect_head

    subject, tl = models
    rng = np.random.default_rng(1)
    L = 5
    prompts = [" ".join(list(w) * 2) for w in (rng.choice(WORDS, size=L, replace=False) for _ in range(6))]
    n = 2 * L + 1
    r = head_scores(subject, prompts, kinds=list(TL_NAMES), n_boot=0, control=False)
    factor = {"previous_token": n / (n - 1), "duplicate": n / L, "induction": n / L}
    diffs = {}
    for i, (kind, name) in enumerate(TL_NAMES.items()):
        ref = detect_head(tl, prompts, name) * factor[kind]
        diffs[kind] = float((torch.as_tensor(r["score"][i]) - ref).abs().max())
    assert max(diffs.values()) < ATOL, f"max |workbench - detect_head x factor| per kind: {diffs}"


def test_bos_self_and_user_pattern_equal_detect_head_with_that_pattern(models, prompts):
    from transformer_lens.head_detector import detect_head

    subject, tl = models

    def two_back(ids):
        return torch.diag(torch.ones(len(ids) - 2), -2)

    kinds = ["bos", "self", "pattern"]
    mine = head_scores(subject, prompts, kinds=kinds, pattern=two_back, n_boot=0, control=False)
    tlc = head_scores(subject, prompts, kinds=kinds, pattern=two_back, n_boot=0, control=False,
                      convention="transformer_lens")
    worst = {k: 0.0 for k in kinds}
    for j, p in enumerate(prompts):
        ids = _tl_tokens(tl, p)
        n = len(ids)
        targets = target_masks(ids[None], torch.ones_like(ids)[None], kinds, two_back)
        for i, kind in enumerate(kinds):
            t = targets[kind][0]
            d = detect_head(tl, p, t)
            q = int((t.sum(-1) > 0).sum())
            w = torch.as_tensor(mine["per_prompt"][j, i])
            worst[kind] = max(worst[kind], float((w * q / n - d).abs().max()),
                              float((torch.as_tensor(tlc["per_prompt"][j, i]) - d).abs().max()))
    assert max(worst.values()) < ATOL, f"max difference from detect_head per kind: {worst}"


def test_cached_activations_equal_hooked_transformer_hooks(models, prompts):
    subject, tl = models
    sites = {"embed": "hook_embed", "logits": None}
    for l in range(tl.cfg.n_layers):
        sites.update({f"resid_pre.{l}": f"blocks.{l}.hook_resid_pre", f"pattern.{l}": f"blocks.{l}.attn.hook_pattern",
                      f"z.{l}": f"blocks.{l}.attn.hook_z", f"attn_out.{l}": f"blocks.{l}.hook_attn_out",
                      f"mlp_out.{l}": f"blocks.{l}.hook_mlp_out", f"resid_post.{l}": f"blocks.{l}.hook_resid_post"})
    batch = subject.tokenize(prompts)
    ours = subject.cache(batch, list(sites))
    diffs = {s: 0.0 for s in sites}
    for i, p in enumerate(prompts):
        n = int(batch.attention_mask[i].sum())
        with torch.no_grad():
            logits, cache = tl.run_with_cache(_tl_tokens(tl, p)[None])
        for s, hook in sites.items():
            ref = (logits if hook is None else cache[hook])[0]
            mine = ours[s][i][:, :n, :n] if s.startswith("pattern") else ours[s][i, :n]
            assert mine.shape == ref.shape, (s, tuple(mine.shape), tuple(ref.shape))
            diffs[s] = max(diffs[s], float((mine.float() - ref).abs().max()))
    scale = {s: float(ours[s].abs().max()) for s in sites}  # attn_out / mlp_out are small at this init
    bad = {s: d for s, d in diffs.items() if not d <= ATOL * scale[s]}
    assert not bad, f"max |workbench - TransformerLens| per site: {diffs}; max |activation|: {scale}"
