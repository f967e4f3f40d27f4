"""Looking at single features and acting on them.

- :func:`feature_summary`: top-activating contexts by activation quantile, an activation
  histogram and the logit effect (decoder direction through the unembedding);
- :func:`feature_flow`: decoder cosines between the features of two SAEs (e.g. at
  consecutive layers, as in "Analyze Feature Flow ...");
- :func:`steer`: add a feature's decoder direction times a strength at its site;
- :func:`ablate_features`: zero- or mean-ablate chosen features (SHIFT), metric before and after.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from workbench.circuits.attribution import Metric, ordered_saes, spliced_run
from workbench.circuits.buffer import flat, token_mask, unflat
from workbench.circuits.evaluation import resolve_site
from workbench.errors import WorkbenchError
from workbench.metrics import resolve_metric
from workbench.effects import as_inputs
from workbench.results import Result, provenance, register
from workbench.tokens import token_strings


def _check_feature(sae, feature: int) -> int:
    if not 0 <= int(feature) < sae.d_sae:
        raise WorkbenchError(f"feature {feature} out of range: this SAE has features 0..{sae.d_sae - 1}")
    return int(feature)


def output_direction(subject, sae, feature: int, site: str) -> torch.Tensor:
    """The feature's decoder direction in the residual stream [d_model] (``z`` sites go
    through each head's W_O)."""
    d = sae.W_dec[_check_feature(sae, feature)].detach()
    s = subject.site(site)
    if s.kind == "z":
        W_O = subject.W_O(s.layer).detach()  # [head, d_head, d_model]
        return torch.einsum("hk,hkd->d", d.reshape(subject.n_heads, subject.d_head).to(W_O.dtype), W_O)
    return d


@register("feature_summary")
class FeatureSummary(Result):
    """One feature: activation histogram (dimension ``bin``), logit effects (dimension
    ``rank``: top promoted and suppressed tokens), and ``attrs['examples']``: contexts
    with per-token activations, grouped by activation quantile (highest first)."""

    @property
    def examples(self) -> list[dict]:
        return self.attrs["examples"]


@torch.no_grad()
def feature_summary(
    subject,
    sae,
    feature: int,
    texts: Sequence[str],
    *,
    site: str | None = None,
    quantiles: int = 4,
    per_quantile: int = 3,
    context: int = 10,
    bins: int = 30,
    top_tokens: int = 10,
    batch_size: int = 32,
) -> FeatureSummary:
    """Dashboard data for ``feature`` of ``sae`` over ``texts``."""
    subject.require_local("feature_summary (its logit effects multiply by W_U)")
    site = resolve_site(subject, sae, site)
    j = _check_feature(sae, feature)
    texts = list(texts)
    if not texts:
        raise WorkbenchError("no texts to find activating contexts in")
    s = subject.site(site)
    acts_per_text: list[np.ndarray] = []
    ids_per_text: list[list[int]] = []
    n_tokens = 0
    for i in range(0, len(texts), batch_size):
        batch = subject.tokenize(texts[i : i + batch_size])
        x = flat(subject.cache(batch, [site])[site], s)
        a = sae.encode(x)[..., j].float()
        m = token_mask(batch, sae.skip_first)
        n_tokens += int(m.sum())
        a = torch.where(m, a, torch.zeros_like(a)).cpu()
        lengths = batch.attention_mask.sum(-1).tolist()
        ids = batch.input_ids.tolist()  # one read per batch, not one per text
        for r, n in enumerate(lengths):
            acts_per_text.append(a[r, :n].numpy())
            ids_per_text.append(ids[r][:n])
    allacts = np.concatenate(acts_per_text)
    positive = allacts[allacts > 0]
    # quantile groups of the active tokens, highest first
    where = [(t, p, float(v)) for t, arr in enumerate(acts_per_text) for p, v in enumerate(arr) if v > 0]
    where.sort(key=lambda e: -e[2])
    examples = []
    if where:
        edges = np.quantile(positive, np.linspace(0, 1, quantiles + 1))
        for q in range(quantiles - 1, -1, -1):
            lo, hi = edges[q], edges[q + 1]
            inq = [e for e in where if (lo <= e[2] <= hi if q == quantiles - 1 else lo <= e[2] < hi)]
            for t, p, v in inq[:per_quantile]:
                start = max(0, p - context + 1)
                end = min(len(ids_per_text[t]), p + 3)
                examples.append({
                    "quantile": q, "range": [float(lo), float(hi)], "text": t, "position": p, "activation": v,
                    "tokens": token_strings(subject.tokenizer, ids_per_text[t][start:end]),
                    "acts": [float(x) for x in acts_per_text[t][start:end]], "focus": p - start,
                })
    hist_edges = np.linspace(0, float(positive.max()) if len(positive) else 1.0, bins + 1)
    counts, _ = np.histogram(positive, bins=hist_edges)
    # logit effect
    data = {"count": (("bin",), counts.astype(np.int64)),
            "bin_left": (("bin",), hist_edges[:-1]), "bin_right": (("bin",), hist_edges[1:])}
    promoted, suppressed = [], []
    if subject.has_logits:
        direction = output_direction(subject, sae, j, site)
        effect = (direction.to(subject.W_U.dtype) @ subject.W_U.detach()).float().cpu()
        k = min(top_tokens, effect.numel())
        top, bot = effect.topk(k), (-effect).topk(k)
        promoted = token_strings(subject.tokenizer, top.indices.tolist())
        suppressed = token_strings(subject.tokenizer, bot.indices.tolist())
        data["promoted_logit"] = (("rank",), top.values.numpy())
        data["suppressed_logit"] = (("rank",), -bot.values.numpy())
        data["promoted_id"] = (("rank",), top.indices.numpy())
        data["suppressed_id"] = (("rank",), bot.indices.numpy())
    params = {"site": site, "feature": j, "n_texts": len(texts), "quantiles": quantiles}
    return FeatureSummary(
        dims={"bin": list(range(bins)), "rank": list(range(len(promoted)))},
        data=data,
        attrs={**params, "examples": examples, "promoted": promoted, "suppressed": suppressed,
               "frequency": float(len(positive) / max(1, n_tokens)),
               "max_activation": float(positive.max()) if len(positive) else 0.0},
        provenance=provenance(subject, params=params),
    )


@register("feature_flow")
class FeatureFlow(Result):
    """For each feature of SAE A, its best-matching features of SAE B by decoder cosine."""


def feature_flow(sae_a, sae_b, *, top_k: int = 5, chunk: int = 4096) -> FeatureFlow:
    """Decoder cosine similarities between the features of two SAEs over the same width
    (consecutive layers of the residual stream, say): for each feature of A, the ``top_k``
    features of B with the highest cosine. Computed in chunks (memory stays bounded)."""
    if sae_a.d_in != sae_b.d_in:
        raise WorkbenchError(f"feature flow needs SAEs of the same width; got d_in={sae_a.d_in} and d_in={sae_b.d_in}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise WorkbenchError(f"top_k must be a positive integer, got {top_k!r}")
    top = min(top_k, sae_b.d_sae)
    a = torch.nn.functional.normalize(sae_a.W_dec.detach().float(), dim=1)
    b = torch.nn.functional.normalize(sae_b.W_dec.detach().float(), dim=1)
    vals, idx = [], []
    for i in range(0, len(a), chunk):
        v, ix = (a[i : i + chunk] @ b.T).topk(top, dim=1)
        vals.append(v)
        idx.append(ix)
    v, ix = torch.cat(vals), torch.cat(idx)
    params = {"site_a": sae_a.site, "site_b": sae_b.site, "top": top}
    return FeatureFlow(
        dims={"feature": list(range(sae_a.d_sae)), "rank": list(range(top))},
        data={"cosine": (("feature", "rank"), v.cpu().numpy()), "match": (("feature", "rank"), ix.cpu().numpy())},
        attrs=params, provenance=provenance(params=params),
    )


@register("intervention")
class Intervention(Result):
    """A metric per prompt before and after an intervention (steering, ablation)."""

    @property
    def change(self) -> float:
        return float(self["after"].mean() - self["before"].mean())


def _per_prompt(metric: Metric | str, logits, batch) -> np.ndarray:
    v = resolve_metric(metric)(logits, batch)
    v = v if v.ndim else v.expand(len(batch))
    return v.detach().float().cpu().numpy()


@torch.no_grad()
def steer(
    subject,
    sae,
    feature: int,
    strength: float,
    prompts,
    metric: Metric,
    *,
    site: str | None = None,
    positions: str = "all",
    top_k: int = 0,
    max_new_tokens: int = 0,
) -> Intervention:
    """Add ``strength`` x the feature's (unit) decoder direction at its site, at every
    real token (``positions="all"``) or only the last one (``"last"``); the metric per
    prompt before and after. ``top_k`` > 0: also what the model now says, the ``top_k``
    next tokens at each prompt's last position by probability averaged over the prompts,
    before and after (``attrs["top_before"]``, ``attrs["top_after"]``: [[token, prob], ...]).
    ``max_new_tokens`` > 0: also each prompt's greedy continuation of that many tokens,
    without and with the steering (applied at every step: to every token with
    ``positions="all"``, to the newest with ``"last"``): ``attrs["text_before"]``,
    ``attrs["text_after"]``, one string per prompt."""
    site = resolve_site(subject, sae, site)
    j = _check_feature(sae, feature)
    if positions not in ("all", "last"):
        raise WorkbenchError(f"positions must be 'all' or 'last', got {positions!r}")
    batch = subject.as_batch(as_inputs(prompts))
    s = subject.site(site)
    direction = sae.W_dec[j].detach()
    mask = batch.attention_mask.bool() if positions == "all" else torch.zeros_like(batch.attention_mask, dtype=torch.bool)
    if positions == "last":
        mask[torch.arange(len(batch), device=mask.device), batch.last] = True

    def adder(where: torch.Tensor):
        def patch(x):
            xf = flat(x, s)
            xf = xf + strength * where[..., None].to(xf.dtype) * direction.to(xf.dtype)
            return unflat(xf, s, subject)
        return patch

    patch = adder(mask)
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise WorkbenchError(f"top_k must be an integer >= 0 (0: no next-token lists), got {top_k!r}")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not 0 <= max_new_tokens <= 256:
        raise WorkbenchError(f"max_new_tokens must be an integer in 0..256 (0: no continuation), got {max_new_tokens!r}")
    clean_logits = subject.logits(batch)
    steered_logits = subject.logits(batch, patch={site: patch})
    before = _per_prompt(metric, clean_logits, batch)
    after = _per_prompt(metric, steered_logits, batch)
    params = {"site": site, "feature": j, "strength": strength, "positions": positions}
    extra = {}
    if top_k:
        extra = {"top_before": _top_next(subject, clean_logits, batch, top_k),
                 "top_after": _top_next(subject, steered_logits, batch, top_k)}
    if max_new_tokens:
        extra["text_before"] = _greedy(subject, batch, max_new_tokens, None)
        extra["text_after"] = _greedy(subject, batch, max_new_tokens, lambda ids: {
            site: adder(torch.ones_like(ids, dtype=torch.bool) if positions == "all"
                        else torch.arange(ids.shape[1], device=ids.device)[None] == ids.shape[1] - 1)})
    return Intervention(dims={"prompt": list(range(len(batch)))},
                        data={"before": (("prompt",), before), "after": (("prompt",), after)},
                        attrs={**params, "kind": "steer", **extra}, provenance=provenance(subject, params=params))


def _greedy(subject, batch, n: int, patch_for) -> list[str]:
    """Each prompt's greedy continuation of ``n`` tokens (one prompt at a time, so no
    padding sits between a prompt and its new tokens); ``patch_for(ids)`` gives the patch
    of each step (None: no patch)."""
    out = []
    for row in range(len(batch)):
        ids = batch.input_ids[row, : int(batch.last[row]) + 1][None]
        start = ids.shape[1]
        for _ in range(n):
            logits = subject.logits(ids, patch=patch_for(ids) if patch_for else None)
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).to(ids.dtype)], dim=1)
        out.append(subject.tokenizer.decode(ids[0, start:].tolist()))
    return out


def _top_next(subject, logits, batch, k: int) -> list[list]:
    """The ``k`` most probable next tokens at each prompt's last position, by probability
    averaged over the prompts: [[token, probability], ...]."""
    last = logits[torch.arange(len(batch), device=logits.device), batch.last.to(logits.device)].float()
    probs = torch.softmax(last, dim=-1).mean(0)
    top = probs.topk(min(k, probs.numel()))
    return [[t, float(p)] for t, p in zip(token_strings(subject.tokenizer, top.indices.tolist()), top.values.tolist())]


@torch.no_grad()
def ablate_features(
    subject,
    saes: Mapping[str, object],
    features: Mapping[str, Sequence[int]],
    prompts,
    metric: Metric,
    *,
    replacement: str = "zero",
    means=None,
) -> Intervention:
    """SHIFT-style ablation: set ``features`` ({site: [feature, ...]}) to zero (or to their
    mean, ``replacement="mean"``; ``means`` from :func:`feature_means`) with the SAEs spliced in
    and error terms kept, so nothing else changes; the metric per prompt before and after."""
    saes = ordered_saes(subject, saes)
    if replacement not in ("zero", "mean"):
        raise WorkbenchError(f"replacement must be 'zero' or 'mean', got {replacement!r}")
    value = replacement
    unknown = [s for s in features if subject.site(s).name not in saes]
    if unknown:
        raise WorkbenchError(f"no SAE given for site {unknown[0]!r}; sites with SAEs: {list(saes)}")
    batch = subject.as_batch(as_inputs(prompts))
    if value == "mean" and means is None:
        from workbench.circuits.attribution import feature_means

        means = feature_means(subject, saes, batch)
    chosen = {subject.site(s).name: [_check_feature(saes[subject.site(s).name], j) for j in js]
              for s, js in features.items()}

    def editor(site):
        idx = torch.tensor(chosen.get(site, []), dtype=torch.long, device=saes[site].W_dec.device)

        def edit(f, e):
            if len(idx) == 0:
                return f, e
            f = f.clone()
            f[..., idx] = 0.0 if value == "zero" else means[site][0][idx].to(f.dtype)
            return f, e

        return edit

    before = _per_prompt(metric, subject.logits(batch), batch)
    _, _, logits = spliced_run(subject, batch, saes, edit={s: editor(s) for s in saes})
    after = _per_prompt(metric, logits, batch)
    params = {"features": chosen, "value": value}
    return Intervention(dims={"prompt": list(range(len(batch)))},
                        data={"before": (("prompt",), before), "after": (("prompt",), after)},
                        attrs={**params, "kind": "ablate"}, provenance=provenance(subject, params=params))
