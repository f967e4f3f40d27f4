"""Retrieval heads ("Retrieval Head Mechanistically Explains Long-Context Factuality",
Wu et al. 2024), and head overlap between tasks ("Circuit Component Reuse Across Tasks").

Retrieval score: the model decodes greedily after a needle-in-a-haystack prompt. Whenever
the token it emits is copied from the needle, every head whose most-attended context
position is that needle token gets a hit. A head's score is its hits divided by the
number of needle tokens to copy, averaged over prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register


def needle_prompts(tokenizer, n: int, *, needle_len: int = 8, haystack_len: int = 40, cue: int = 2,
                   seed: int = 0) -> list[dict]:
    """Random-token haystacks with a random needle inside, ending with the needle's first
    ``cue`` tokens so that the continuation copies the rest. Each item: ``input_ids``
    (list), ``needle_start`` (index of the needle in the context), ``needle`` (its ids)."""
    if needle_len <= cue or haystack_len < 2:
        raise WorkbenchError(f"need needle_len > cue and haystack_len >= 2, got {needle_len}, {cue}, {haystack_len}")
    special = set(tokenizer.all_special_ids)
    pool = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(seed)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    out = []
    for _ in range(n):
        toks = rng.choice(pool, size=needle_len + haystack_len, replace=False).tolist()
        needle, hay = toks[:needle_len], toks[needle_len:]
        at = int(rng.integers(1, haystack_len))
        ids = bos + hay[:at] + needle + hay[at:] + needle[:cue]
        out.append({"input_ids": ids, "needle_start": len(bos) + at, "needle": needle, "cue": cue})
    return out


@register("retrieval_scores")
class RetrievalScores(Result):
    """Retrieval score per [layer, head] and the share of needle tokens the model copied."""

    def best(self) -> tuple[int, int]:
        s = self["score"]
        layer, head = divmod(int(np.nanargmax(s)), s.shape[1])
        return layer, head


def retrieval_scores(subject, prompts: Sequence[dict]) -> RetrievalScores:
    """Score every head on needle-in-a-haystack ``prompts`` (see :func:`needle_prompts`;
    each needs ``input_ids``, ``needle_start``, ``needle`` and ``cue``)."""
    if not subject.causal:
        raise WorkbenchError(f"retrieval scores need greedy decoding, i.e. a causal model; {subject.name} is bidirectional")
    if not prompts:
        raise WorkbenchError("no prompts; build some with needle_prompts(tokenizer, n)")
    L, H = subject.n_layers, subject.n_heads
    hits = np.zeros((len(prompts), L, H))
    copied = []
    sites = [f"pattern.{l}" for l in range(L)] + ["logits"]
    for i, pr in enumerate(prompts):
        ids = list(pr["input_ids"])
        start, needle, cue = int(pr["needle_start"]), list(pr["needle"]), int(pr["cue"])
        todo = len(needle) - cue
        n_ok = 0
        for step in range(todo):
            acts = subject.cache(torch.tensor([ids]), sites)
            tok = int(acts["logits"][0, -1].argmax())
            if tok in needle:  # copied from the needle: which heads looked at it?
                pos = start + needle.index(tok)
                # each head's most attended position at the last query, every layer in one read
                top = torch.stack([acts[f"pattern.{layer}"][0, :, -1].argmax(-1) for layer in range(L)])  # [layer, head]
                hits[i] += (top == pos).cpu().numpy()
            n_ok += tok == needle[cue + step]
            ids.append(tok)
        hits[i] /= max(todo, 1)
        copied.append(n_ok / max(todo, 1))
    return RetrievalScores(
        dims={"layer": list(range(L)), "head": list(range(H)), "prompt": list(range(len(prompts)))},
        data={"score": (("layer", "head"), hits.mean(0)), "per_prompt": (("prompt", "layer", "head"), hits),
              "copy_accuracy": (("prompt",), np.asarray(copied))},
        attrs={"n_prompts": len(prompts)},
        provenance=provenance(subject, params={"n_prompts": len(prompts)}),
    )


def top_heads(effects: np.ndarray, k: int) -> set[tuple[int, int]]:
    """The ``k`` heads with the largest |effect| in a [layer, head] array."""
    order = np.argsort(-np.abs(np.nan_to_num(effects)), axis=None)[:k]
    return {(int(i // effects.shape[1]), int(i % effects.shape[1])) for i in order}


def head_overlap(effects_a: np.ndarray, effects_b: np.ndarray, top_k: int) -> dict:
    """Overlap of the ``top_k`` most important heads of two tasks (from e.g. ``scan_heads``):
    the shared heads, Jaccard index, and the overlap expected by chance (k^2 / N)."""
    a, b = np.asarray(effects_a), np.asarray(effects_b)
    if a.shape != b.shape:
        raise WorkbenchError(f"effect arrays differ in shape: {a.shape} vs {b.shape}")
    if a.ndim != 2:
        raise WorkbenchError(f"head effects must be [layer, head] arrays, got shape {a.shape}")
    k = top_k
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= a.size:
        raise WorkbenchError(f"top_k must be an integer in 1..{a.size}, got {k!r}")
    sa, sb = top_heads(a, k), top_heads(b, k)
    shared = sorted(sa & sb)
    return {"shared": shared, "n_shared": len(shared), "jaccard": len(shared) / len(sa | sb),
            "chance": k * k / a.size, "a": sorted(sa), "b": sorted(sb)}
