"""All-head scoring of 256 prompts: ``workbench.attention.head_scores`` against
TransformerLens' ``detect_head`` (one forward per prompt with the full cache, a ``.item()``
per head, one call per kind) and against a plain per-prompt HF loop, on the same model
and prompts; and against one plain batched HF forward of the same model (the cost floor:
scoring every kind of every head should cost no more than that)."""

from __future__ import annotations

import torch

from bench.harness import Table, timeit

TL_KINDS = {"previous_token": "previous_token_head", "duplicate": "duplicate_token_head", "induction": "induction_head"}


def _hooked(subject):
    """The same GPT-NeoX model as a TransformerLens HookedTransformer (logits checked equal)."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_neox_weights

    c = subject.config
    rot = int(c.hidden_size // c.num_attention_heads * c.rope_parameters.get("partial_rotary_factor", 1.0))
    cfg = HookedTransformerConfig(
        d_model=c.hidden_size, d_head=c.hidden_size // c.num_attention_heads, n_heads=c.num_attention_heads,
        d_mlp=c.intermediate_size, n_layers=c.num_hidden_layers, n_ctx=c.max_position_embeddings, d_vocab=c.vocab_size,
        act_fn="gelu", normalization_type="LN", positional_embedding_type="rotary", rotary_dim=rot,
        rotary_base=int(c.rope_parameters.get("rope_theta", 10000)), parallel_attn_mlp=c.use_parallel_residual,
        original_architecture="GPTNeoXForCausalLM", eps=c.layer_norm_eps, default_prepend_bos=True, device="cpu",
    )
    model = HookedTransformer(cfg, tokenizer=subject.tokenizer, default_padding_side="right")
    model.load_state_dict(convert_neox_weights(subject.model, cfg), strict=False)
    model.eval()
    return model


def _loop_scores(subject, ids: torch.Tensor) -> torch.Tensor:
    """Plain per-prompt loop: one HF forward with attentions per prompt, three kinds."""
    from workbench.attention.scores import score_patterns, target_masks

    out = []
    with torch.no_grad():
        for row in ids:
            r = row[None]
            att = subject.model(input_ids=r, output_attentions=True).attentions
            t = target_masks(r, torch.ones_like(r), list(TL_KINDS))
            out.append(torch.stack([score_patterns(a, t)[0] for a in att]))
    return torch.stack(out).nanmean(0)


def run() -> Table:
    import workbench
    from workbench.attention import head_scores
    from workbench.data import repeated_sequences

    lm = workbench.load("tasklm", device="cpu")
    ids = torch.tensor(repeated_sequences(lm.tokenizer, 256, 32, seed=0)["input_ids"])  # 256 x 65
    texts = [" ".join(lm.tokenizer.convert_ids_to_tokens(r[1:])) for r in ids]  # decode() would merge "x ."
    assert torch.equal(lm.tokenize(texts).input_ids, ids), "prompts re-tokenize to the same ids"
    t = Table(f"All heads x 3 kinds on {ids.shape[0]} x {ids.shape[1]} tokens, tasklm (one CPU thread)",
              ["workbench", "detect_head", "HF loop", "HF forward"], unit="s")

    ours = lambda: head_scores(lm, {"input_ids": ids}, kinds=list(TL_KINDS), n_boot=0, control=False)  # noqa: E731

    def forward():
        with torch.no_grad():
            return lm.model(input_ids=ids).logits

    try:
        tl = _hooked(lm)
        with torch.no_grad():
            assert torch.allclose(tl(ids[:4]), lm.model(input_ids=ids[:4]).logits, atol=1e-3), "TL model = HF model"
        assert torch.equal(tl.to_tokens(texts[0])[0], ids[0]), "TL tokenizes the prompts to the same ids"

        def detect():
            from transformer_lens.head_detector import detect_head

            return {k: detect_head(tl, texts, v) for k, v in TL_KINDS.items()}
    except ImportError:
        detect = None
        t.notes.append("transformer-lens not installed (python3 dev.py bench installs it): detect_head column is 0")

    slow = dict(repeat=1, warmup=1, min_time=0.0)
    t.add("3 kinds, mean only", timeit(ours, repeat=3, warmup=1, min_time=0.0),
          timeit(detect, **slow) if detect else 0.0, timeit(lambda: _loop_scores(lm, ids), **slow),
          timeit(forward, repeat=3, warmup=1, min_time=0.0))
    full = lambda: head_scores(lm, {"input_ids": ids}, n_boot=1000, control=True)  # noqa: E731
    t.add("5 kinds + 1000 bootstrap + control", timeit(full, repeat=3, warmup=1, min_time=0.0),
          t.rows[0][1][1], t.rows[0][1][2], t.rows[0][1][3])
    if detect:  # the scores agree (detect_head with its default 'mul' measure, BOS included)
        ref = detect()
        mine = ours()
        for i, k in enumerate(TL_KINDS):
            diff = (torch.as_tensor(mine["score"][i]) - ref[k]).abs().max()
            t.notes.append(f"{k}: max |workbench - detect_head| = {float(diff):.3f}")
    t.notes.append("detect_head ('mul') averages over all n query rows, workbench over the m rows that have a target: "
                   "per prompt workbench = detect_head x n/m, i.e. n/(n-1) for previous-token and (2L+1)/L, about 2x, "
                   "for duplicate and induction on L tokens repeated once; detect_head's induction target also counts "
                   "the query itself where two adjacent tokens are equal. head_scores(..., convention='transformer_lens') "
                   "gives detect_head's numbers (tests/conformance/test_transformerlens.py)")
    t.notes.append("speedup = detect_head / workbench and HF loop / workbench; cost = workbench / one batched HF forward")
    return t


RATIOS = [(1, 0, "speedup vs detect_head"), (2, 0, "speedup vs HF loop"), (0, 3, "cost vs HF forward")]
