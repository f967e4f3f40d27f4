"""Attention patterns for a batch of prompts: padded, mask-aware, memory-bounded."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.memory import DEFAULT_BUDGET_BYTES, fmt_bytes, forward_bytes, rows_per_batch
from workbench.results import Result, provenance, register
from workbench.tokens import token_strings


@register("attention_patterns")
class AttentionPatterns(Result):
    """Attention probabilities [prompt, layer, head, query, key], zero on padding.

    ``attrs["tokens"]`` holds each prompt's token strings; ``lengths`` its real length.
    """

    def tokens(self, prompt: int) -> list[str]:
        return self.attrs["tokens"][prompt]

    def pattern(self, prompt: int, layer: int, head: int) -> np.ndarray:
        """The [query, key] pattern of one head on one prompt, trimmed to the prompt's length."""
        n = int(self["lengths"][prompt])
        li = self.coord("layer").index(layer)
        hi = self.coord("head").index(head)
        return self["pattern"][prompt, li, hi, :n, :n]


def attention_patterns(
    subject,
    prompts: Sequence[str],
    *,
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    batch_size: int | None = None,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> AttentionPatterns:
    """Attention patterns of ``layers`` x ``heads`` (default: all) on ``prompts``.

    Prompts are right-padded; the attention mask keeps padding out (pattern rows and
    columns of padding are zero). Memory is estimated first: the returned array must fit
    in ``max_bytes`` (else an error says how much it would take), and the forward runs
    over as many prompts at a time as keep the working set under the same budget.
    """
    prompts = list(prompts)
    if not prompts:
        raise WorkbenchError("empty prompt list; pass at least one prompt")
    layers = list(range(subject.n_layers)) if layers is None else [subject.site(f"pattern.{l}").layer for l in layers]
    heads = list(range(subject.n_heads)) if heads is None else list(heads)
    bad = [h for h in heads if not 0 <= h < subject.n_heads]
    if bad:
        raise WorkbenchError(f"heads {bad} out of range: this model has heads 0..{subject.n_heads - 1}")
    full = subject.tokenize(prompts)
    n, p = full.input_ids.shape
    out_bytes = n * len(layers) * len(heads) * p * p * 4
    if out_bytes > max_bytes:
        raise WorkbenchError(
            f"{n} prompts x {len(layers)} layers x {len(heads)} heads x {p}^2 positions would take "
            f"{fmt_bytes(out_bytes)} (budget {fmt_bytes(max_bytes)}); pass fewer prompts, layers or heads, or raise max_bytes"
        )
    # working set per prompt, in what the kept patterns leave of the budget: every layer's
    # full pattern and the forward's own activations
    per_row = subject.n_layers * subject.n_heads * p * p * 4 + forward_bytes(subject, 1, p)
    bs = batch_size or rows_per_batch(per_row, max_bytes - out_bytes, n)
    arr = np.zeros((n, len(layers), len(heads), p, p), dtype=np.float32)
    sites = [f"pattern.{l}" for l in layers]
    hidx = torch.tensor(heads, dtype=torch.long, device=full.input_ids.device)
    for start in range(0, n, bs):
        sl = slice(start, start + bs)
        batch = full[sl]
        acts = subject.cache(batch, sites)
        mask = batch.attention_mask.bool()
        keep = (mask[:, None, :, None] & mask[:, None, None, :]).float()
        # every layer's patterns of the batch in one transfer
        arr[sl] = torch.stack([acts[s][:, hidx.to(acts[s].device)].float() * keep for s in sites], 1).cpu().numpy()
    lengths = full.attention_mask.sum(-1).tolist()
    ids = full.input_ids.tolist()  # one read, not one per prompt
    tokens = [token_strings(subject.tokenizer, ids[i][: lengths[i]]) for i in range(n)]
    params = {"prompts": prompts, "layers": layers, "heads": heads}
    return AttentionPatterns(
        dims={"prompt": list(range(n)), "layer": layers, "head": heads, "query": list(range(p)), "key": list(range(p))},
        data={
            "pattern": (("prompt", "layer", "head", "query", "key"), arr),
            "lengths": (("prompt",), np.asarray(lengths, dtype=np.int64)),
        },
        attrs={**params, "tokens": tokens, "causal": subject.causal},
        provenance=provenance(subject, params=params),
    )
