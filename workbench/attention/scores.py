"""Head-type scores for every head of every layer, batched, with intervals and a control.

A score is the attention a head puts on a *target* key, averaged over the query
positions that have one. Targets per kind (positions counted on the real tokens only):

- ``previous_token``: the key just before the query (queries 1..n-1);
- ``self``: the query itself;
- ``bos``: the first position (``<bos>``, ``[CLS]``), for queries 1..n-1;
- ``duplicate``: every earlier key holding the query's token (queries whose token
  occurred before);
- ``induction``: every key right after an earlier occurrence of the query's token, not
  the query itself (causal models only);
- ``pattern``: a user-given target, ``fn(ids) -> [n, n]`` weights (or a fixed matrix),
  scored as the attention mass on it per query that has any target.

``head_scores`` runs one batched forward per batch that reads only the attention
probabilities (and stops after the last layer), scores every kind at once, and reports
the mean over prompts with a percentile bootstrap 95% interval, beside the same score on
a control: each prompt's own tokens in a random order (special tokens kept in place), so
lengths, vocabulary and repeats match while order carries nothing.

``convention="transformer_lens"`` scores as TransformerLens' ``detect_head`` does (see
``head_scores`` for the exact relation between the two).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError, one_of
from workbench.memory import DEFAULT_BUDGET_BYTES, forward_bytes, rows_per_batch
from workbench.results import Result, provenance, register

KINDS = ("previous_token", "duplicate", "induction", "bos", "self")
CAUSAL_ONLY = ("induction",)
CONVENTIONS = ("workbench", "transformer_lens")
PatternFn = Callable[[torch.Tensor], torch.Tensor]


@register("head_scores")
class HeadScores(Result):
    """Scores [kind, layer, head] with ``ci_low`` / ``ci_high`` / ``control``, and the
    per-prompt scores [prompt, kind, layer, head] (NaN where a prompt has no target)."""

    def top(self, kind: str, n: int = 5) -> list[tuple[int, int, float]]:
        """The ``n`` best (layer, head, score) for ``kind``."""
        if kind not in self.coord("kind"):
            raise one_of("score kind", kind, self.coord("kind"))
        k = self.coord("kind").index(kind)
        s = self["score"][k]
        order = np.argsort(np.nan_to_num(s, nan=-np.inf), axis=None)[::-1][:n]
        layers, heads = self.coord("layer"), self.coord("head")
        return [(layers[i // s.shape[1]], heads[i % s.shape[1]], float(s.flat[i])) for i in order]

    def best(self, kind: str) -> tuple[int, int]:
        layer, head, _ = self.top(kind, 1)[0]
        return layer, head


def target_masks(ids: torch.Tensor, mask: torch.Tensor, kinds: Sequence[str], pattern: PatternFn | torch.Tensor | None = None,
                 *, convention: str = "workbench") -> dict[str, torch.Tensor]:
    """Target weights [batch, query, key] per kind for right-padded ``ids`` / ``mask``.

    With ``convention="transformer_lens"`` the induction target also holds the query
    itself where the token before it is the same token (as ``detect_head``'s does)."""
    b, p = ids.shape
    valid = mask.bool()
    pair = valid[:, :, None] & valid[:, None, :]
    qi = torch.arange(p, device=ids.device)[:, None]
    ki = torch.arange(p, device=ids.device)[None, :]
    out: dict[str, torch.Tensor] = {}
    for kind in kinds:
        if kind == "previous_token":
            t = (ki == qi - 1).expand(b, p, p)
        elif kind == "self":
            t = (ki == qi).expand(b, p, p)
        elif kind == "bos":
            t = ((ki == 0) & (qi >= 1)).expand(b, p, p)
        elif kind == "duplicate":
            t = (ids[:, :, None] == ids[:, None, :]) & (ki < qi)
        elif kind == "induction":
            prev = torch.cat([torch.full_like(ids[:, :1], -1), ids[:, :-1]], dim=1)  # token before each key
            upto = (ki <= qi) if convention == "transformer_lens" else (ki < qi)
            t = (ids[:, :, None] == prev[:, None, :]) & (ki >= 1) & upto
        elif kind == "pattern":
            t = _user_targets(ids, mask, pattern)
        else:
            raise WorkbenchError(f"unknown score kind {kind!r}; accepted: {', '.join(KINDS + ('pattern',))}")
        out[kind] = (t & pair) if t.dtype == torch.bool else t * pair
    return {k: v.float() for k, v in out.items()}


def _user_targets(ids: torch.Tensor, mask: torch.Tensor, pattern) -> torch.Tensor:
    if pattern is None:
        raise WorkbenchError("kind 'pattern' needs pattern=: a function of one prompt's token ids giving [n, n] "
                             "target weights, or a fixed [n, n] tensor")
    b, p = ids.shape
    out = torch.zeros(b, p, p, device=ids.device)
    lengths = mask.sum(-1).tolist()  # one read for every prompt
    for i in range(b):
        n = int(lengths[i])
        t = pattern(ids[i, :n]) if callable(pattern) else torch.as_tensor(pattern)
        t = torch.as_tensor(t, dtype=torch.float32, device=ids.device)
        if t.ndim != 2 or t.shape[0] < n or t.shape[1] < n:
            raise WorkbenchError(f"pattern target for prompt {i} has shape {tuple(t.shape)}; need at least [{n}, {n}]")
        out[i, :n, :n] = t[:n, :n]
    return out


def score_patterns(attn: torch.Tensor, targets: dict[str, torch.Tensor], *, mask: torch.Tensor | None = None,
                   convention: str = "workbench") -> torch.Tensor:
    """Per-prompt scores [batch, kind, head] of one layer's pattern ``attn`` [batch, head, q, k]:
    the attention mass on the targets, averaged over the queries that have one (NaN if none).

    ``convention="transformer_lens"``: the mass on the targets divided by the head's whole
    attention over the real (``mask``, default all) queries and keys, as ``detect_head``'s
    ``"mul"`` measure does; that is a mean over every query, 0 where none has a target."""
    attn = attn.float()
    if convention == "transformer_lens":
        valid = torch.ones(attn.shape[0], attn.shape[-1], device=attn.device) if mask is None else mask.float()
        total = torch.einsum("bhqk,bqk->bh", attn, valid[:, :, None] * valid[:, None, :])
        return torch.stack([torch.einsum("bhqk,bqk->bh", attn, t) / total for t in targets.values()], dim=1)
    rows = []
    for t in targets.values():
        has = (t.sum(-1) > 0).float()  # [b, q]
        mass = torch.einsum("bhqk,bqk->bhq", attn, t)
        n = has.sum(-1)  # [b]
        s = (mass * has[:, None]).sum(-1) / n[:, None].clamp(min=1)
        rows.append(torch.where(n[:, None] > 0, s, torch.full_like(s, float("nan"))))
    return torch.stack(rows, dim=1)


def shuffled_control(ids: torch.Tensor, mask: torch.Tensor, special: set[int], generator: torch.Generator) -> torch.Tensor:
    """Each row's real, non-special tokens permuted in place (specials and padding stay)."""
    out = ids.clone()
    rows, lengths = ids.tolist(), mask.sum(-1).tolist()  # one read each, not one per token
    for i in range(ids.shape[0]):
        pos = [j for j in range(int(lengths[i])) if rows[i][j] not in special]
        if len(pos) > 1:
            perm = torch.randperm(len(pos), generator=generator)
            idx = torch.tensor(pos, device=ids.device)
            out[i, idx] = ids[i, idx[perm.to(ids.device)]]
    return out


def bootstrap_mean(per: np.ndarray, n_boot: int, seed: int, level: float = 0.95) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean over axis 0 ignoring NaN, and a percentile bootstrap interval (resampling rows)."""
    valid = ~np.isnan(per)
    filled = np.where(valid, per, 0.0).reshape(per.shape[0], -1).astype(np.float64)
    cnt = valid.reshape(per.shape[0], -1).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = filled.sum(0) / cnt.sum(0)
        rng = np.random.default_rng(seed)
        n = per.shape[0]
        w = rng.multinomial(n, np.full(n, 1.0 / n), size=n_boot).astype(np.float64)  # [n_boot, n]
        boots = (w @ filled) / (w @ cnt)
    a = (1 - level) / 2
    lo, hi = np.nanquantile(boots, [a, 1 - a], axis=0) if n_boot else (mean, mean)
    shape = per.shape[1:]
    return mean.reshape(shape), np.asarray(lo).reshape(shape), np.asarray(hi).reshape(shape)


def head_scores(
    subject,
    prompts: Sequence[str] | torch.Tensor | dict,
    *,
    kinds: Sequence[str] = KINDS,
    pattern: PatternFn | torch.Tensor | None = None,
    layers: Sequence[int] | None = None,
    n_boot: int = 1000,
    control: bool = True,
    seed: int = 0,
    batch_size: int | None = None,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
    convention: str = "workbench",
) -> HeadScores:
    """Score every head of ``layers`` (default all) for each of ``kinds`` on ``prompts``.

    ``prompts``: strings, or token ids as a LongTensor / dict with ``input_ids`` and
    ``attention_mask`` (right padding). Returns a :class:`HeadScores` whose
    ``to_frame()`` has columns kind, layer, head, score, ci_low, ci_high, control.

    Relation to TransformerLens' ``detect_head`` (3.x, its defaults ``error_measure="mul"``,
    ``exclude_bos=False``, ``exclude_current_token=False``), on the same token ids
    (``detect_head`` tokenizes with ``model.to_tokens``, which prepends BOS). For one
    prompt of n tokens, with ``A`` one head's pattern and ``m_q`` query q's attention on
    its targets, ``detect_head`` gives ``D = sum_q m_q / n`` (its "mul" divides by the
    pattern's sum, which is n), a mean over *every* query row; the default convention
    gives ``W = sum_{q in Q} m_q / |Q|``, a mean over the queries Q that have a target.
    Hence per prompt:

    - ``previous_token`` equals ``previous_token_head``'s D times n/(n-1) (query 0 has
      no previous token);
    - ``duplicate`` equals ``duplicate_token_head``'s D times n/|Q|, Q the positions
      whose token occurred earlier (after BOS, L distinct tokens repeated once: n = 2L+1,
      |Q| = L, so about 2x);
    - ``induction`` equals ``induction_head``'s D times n/|Q|, Q the positions whose
      token occurred at least two positions earlier, when no two adjacent tokens are
      equal. ``detect_head``'s induction target also counts the query itself where the
      token before it is the same token (the diagonal of its shifted duplicate pattern);
      ours never does, so in general ``W |Q| / n = D - sum_{q: t_q = t_(q-1)} A[q, q] / n``;
    - ``bos``, ``self`` and ``pattern`` equal ``detect_head`` with that 0/1 target as its
      ``detection_pattern`` tensor times n/(n-1), 1 and n/|Q| respectively.

    Over prompts ``detect_head`` averages D with every prompt counting (0 where none of
    its queries has a target); ours averages W over the prompts that have a target (NaN
    per prompt otherwise). So the means differ by the factor above exactly when it is the
    same for every prompt (equal n and |Q| > 0, as in ``repeated_sequences``).

    ``convention="transformer_lens"`` computes D instead (its induction target, divided by
    the prompt's total attention over its real tokens, 0 for a prompt without targets):
    ``score`` then equals ``detect_head``'s mean up to float rounding, and ``per_prompt``
    its score of each prompt alone.
    """
    if convention not in CONVENTIONS:
        raise one_of("convention", convention, CONVENTIONS)
    kinds = [str(k) for k in kinds]
    if not kinds:
        raise WorkbenchError(f"no score kinds given; accepted: {', '.join(KINDS + ('pattern',))}")
    for k in kinds:
        if k not in KINDS + ("pattern",):
            raise one_of("score kind", k, KINDS + ("pattern",))
    if not subject.causal:
        bad = [k for k in kinds if k in CAUSAL_ONLY]
        if bad:
            raise WorkbenchError(f"score kinds {bad} need a causal (decoder) model; {subject.name} is bidirectional. "
                                 f"Use {[k for k in KINDS if k not in CAUSAL_ONLY]}")
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise WorkbenchError("empty prompt list; pass at least one prompt")
    full = subject.as_batch(prompts if not isinstance(prompts, tuple) else list(prompts))
    layers = list(range(subject.n_layers)) if layers is None else [subject.site(f"pattern.{l}").layer for l in layers]
    n, p = full.input_ids.shape
    per_row = len(layers) * subject.n_heads * p * p * 4 * 2 + len(kinds) * p * p * 4 + forward_bytes(subject, 1, p)
    bs = batch_size or rows_per_batch(per_row, max_bytes, n)
    sites = [f"pattern.{l}" for l in layers]
    special = set(getattr(subject.tokenizer, "all_special_ids", []) or [])
    gen = torch.Generator().manual_seed(seed)

    def run(ids_all: torch.Tensor) -> np.ndarray:
        per = np.zeros((n, len(kinds), len(layers), subject.n_heads), dtype=np.float32)
        for start in range(0, n, bs):
            sl = slice(start, start + bs)
            batch = subject.as_batch({**full[sl].kwargs(), "input_ids": ids_all[sl]})
            targets = target_masks(batch.input_ids, batch.attention_mask, kinds, pattern, convention=convention)
            acts = subject.cache(batch, sites)
            # every layer's scores [b, kind, layer, head] in one transfer per batch
            per[sl] = torch.stack([score_patterns(acts[s], targets, mask=batch.attention_mask, convention=convention)
                                   for s in sites], dim=2).cpu().numpy()
        return per

    per = run(full.input_ids)
    score, lo, hi = bootstrap_mean(per, n_boot, seed)
    ctrl = np.full_like(score, np.nan)
    if control:
        shuffled = shuffled_control(full.input_ids.cpu(), full.attention_mask.cpu(), special, gen).to(full.input_ids.device)
        ctrl_per = run(shuffled)
        ctrl = bootstrap_mean(ctrl_per, 0, seed)[0]
    n_valid = (~np.isnan(per)).sum(0).astype(np.int64)
    params = {"kinds": kinds, "layers": layers, "n_boot": n_boot, "control": control, "seed": seed,
              "n_prompts": n, "user_pattern": pattern is not None, "convention": convention}
    dims = {"kind": kinds, "layer": layers, "head": list(range(subject.n_heads)), "prompt": list(range(n))}
    kh = ("kind", "layer", "head")
    return HeadScores(
        dims=dims,
        data={"score": (kh, score), "ci_low": (kh, lo), "ci_high": (kh, hi), "control": (kh, ctrl),
              "n_prompts": (kh, n_valid), "per_prompt": (("prompt",) + kh, per)},
        attrs=params,
        provenance=provenance(subject, seed=seed, params=params),
    )
