"""Causal checks on heads: ablation against random-head controls, a full scan of every
head's effect (exact, batched across heads) beside its attribution-patching estimate
(one backward pass), and greedy pruning as in "Are Sixteen Heads Really Better than One?".

A head is ablated by replacing its output before the output projection (site ``z.L``):

- ``zero``: by zeros;
- ``mean``: by its mean over the real tokens of ``reference`` prompts (default: the
  prompts themselves);
- ``resample``: by its output on another prompt of the batch (a fixed random
  derangement), position by position; the prompts must then have equal lengths.

A metric is ``"loss"`` (next-token loss) or any ``fn(logits, batch) -> [batch]`` from
:mod:`workbench.metrics` (``functools.partial(metrics.logit_diff, good=..., bad=...)``,
``partial(metrics.correct, answers=...)``); effects are metric(ablated) - metric(clean),
averaged over prompts.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from workbench import metrics as _metrics
from workbench.errors import WorkbenchError, one_of
from workbench.memory import DEFAULT_BUDGET_BYTES, rows_per_batch
from workbench.results import Result, provenance, register

METHODS = ("zero", "mean", "resample")
Metric = Callable[[torch.Tensor, object], torch.Tensor]
Head = tuple[int, int]


def resolve_metric(metric: str | Metric) -> Metric:
    if callable(metric):
        return metric
    if metric == "loss":
        return _metrics.next_token_loss
    raise WorkbenchError(f"unknown metric {metric!r}; pass 'loss' or a function (logits, batch) -> [batch] "
                         "such as functools.partial(workbench.metrics.logit_diff, good=..., bad=...)")


def _check_heads(subject, heads: Sequence[Head]) -> list[Head]:
    out = []
    for h in heads:
        try:
            layer, head = int(h[0]), int(h[1])
        except (TypeError, ValueError, IndexError):
            raise WorkbenchError(f"a head is a (layer, head) pair, got {h!r}") from None
        if not 0 <= layer < subject.n_layers:
            raise WorkbenchError(f"head {h}: layer {layer} out of range 0..{subject.n_layers - 1}")
        if not 0 <= head < subject.n_heads:
            raise WorkbenchError(f"head {h}: head {head} out of range 0..{subject.n_heads - 1}")
        out.append((layer, head))
    return out


def head_means(subject, inputs, layers: Sequence[int]) -> dict[int, torch.Tensor]:
    """Mean output [head, d_head] of every head of ``layers`` over the real tokens."""
    batch = subject.as_batch(inputs)
    acts = subject.cache(batch, [f"z.{l}" for l in layers])
    m = batch.attention_mask.to(torch.float32)[..., None, None]
    return {l: (acts[f"z.{l}"].float() * m).sum((0, 1)) / m.sum((0, 1)) for l in layers}


def _derangement(n: int, seed: int) -> torch.Tensor:
    if n < 2:
        raise WorkbenchError("resample ablation needs at least two prompts to draw from")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == torch.arange(n)).any():
            return perm


def _ablated(z: torch.Tensor, head: int, method: str, mean: torch.Tensor | None, perm: torch.Tensor | None) -> torch.Tensor:
    """``z`` [b, p, H, d] with ``head`` replaced (in a copy)."""
    z = z.clone()
    if method == "zero":
        z[:, :, head] = 0
    elif method == "mean":
        z[:, :, head] = mean[head].to(z.dtype)
    else:
        z[:, :, head] = z[perm.to(z.device), :, head]
    return z


class _Ablator:
    """Builds patches for a method on one batch (means / permutation computed once)."""

    def __init__(self, subject, batch, method: str, reference=None, seed: int = 0) -> None:
        if method not in METHODS:
            raise one_of("ablation method", method, METHODS)
        self.subject, self.batch, self.method = subject, batch, method
        self.means = head_means(subject, reference if reference is not None else batch, range(subject.n_layers)) \
            if method == "mean" else {}
        self.perm = None
        if method == "resample":
            lengths = batch.attention_mask.sum(-1)
            if not bool((lengths == lengths[0]).all()):
                raise WorkbenchError("resample ablation takes another prompt's head output position by position, "
                                     "so prompts must have equal lengths; use templated prompts or method='mean'")
            self.perm = _derangement(len(batch), seed)

    def patch(self, heads: Sequence[Head]) -> dict:
        by_layer: dict[int, list[int]] = {}
        for layer, head in heads:
            by_layer.setdefault(layer, []).append(head)

        def fn_for(layer: int, hs: list[int]):
            def fn(z):
                for h in hs:
                    z = _ablated(z, h, self.method, self.means.get(layer), self.perm)
                return z
            return fn

        return {f"z.{l}": fn_for(l, hs) for l, hs in by_layer.items()}

    def replacement(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """What every head of ``layer`` would be replaced by [b, p, H, d]."""
        if self.method == "zero":
            return torch.zeros_like(z)
        if self.method == "mean":
            return self.means[layer].to(z.dtype).expand_as(z)
        return z[self.perm.to(z.device)]


def _metric_value(subject, batch, metric: Metric, patch=None) -> float:
    logits = subject.logits(batch, patch=patch)
    return float(metric(logits, batch).to(torch.float64).mean())


@register("head_ablation")
class HeadAblation(Result):
    """The metric with chosen heads ablated, beside random draws of as many other heads."""

    @property
    def summary(self) -> dict:
        return dict(self.attrs["summary"])


def ablate_heads(
    subject,
    inputs,
    heads: Sequence[Head],
    *,
    metric: str | Metric = "loss",
    method: str = "zero",
    reference=None,
    n_random: int = 20,
    seed: int = 0,
) -> HeadAblation:
    """Ablate ``heads`` together and measure ``metric``; as a control, ablate ``n_random``
    random sets of as many heads (drawn from the other heads) the same way."""
    heads = _check_heads(subject, heads)
    if not heads:
        raise WorkbenchError("no heads to ablate; pass (layer, head) pairs")
    metric = resolve_metric(metric)
    batch = subject.as_batch(inputs)
    ab = _Ablator(subject, batch, method, reference, seed)
    base = _metric_value(subject, batch, metric)
    value = _metric_value(subject, batch, metric, ab.patch(heads))
    others = [(l, h) for l in range(subject.n_layers) for h in range(subject.n_heads) if (l, h) not in set(heads)]
    rng = np.random.default_rng(seed)
    draws, controls = [], []
    if len(others) >= len(heads):
        for _ in range(n_random):
            pick = [others[i] for i in rng.choice(len(others), size=len(heads), replace=False)]
            draws.append(pick)
            controls.append(_metric_value(subject, batch, metric, ab.patch(pick)))
    effect = value - base
    ctrl = np.asarray(controls) - base
    summary = {
        "base": base, "ablated": value, "effect": effect,
        "control_mean": float(ctrl.mean()) if len(ctrl) else float("nan"),
        "control_std": float(ctrl.std(ddof=1)) if len(ctrl) > 1 else float("nan"),
        # share of random draws whose effect is at least as large in magnitude
        "control_p": float((np.abs(ctrl) >= abs(effect)).mean()) if len(ctrl) else float("nan"),
    }
    params = {"heads": heads, "method": method, "n_random": n_random, "seed": seed}
    return HeadAblation(
        dims={"draw": list(range(len(controls)))},
        data={"control_effect": (("draw",), ctrl.astype(np.float64))},
        attrs={**params, "summary": summary, "control_heads": draws},
        provenance=provenance(subject, seed=seed, params=params),
    )


@register("head_effects")
class HeadEffects(Result):
    """Per-head ablation effect [layer, head]: exact (``effect``) and estimated by
    attribution patching (``attribution``); ``attrs['spearman']`` is their agreement."""


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    ok = ~(np.isnan(a) | np.isnan(b))
    if ok.sum() < 3 or np.std(a[ok]) == 0 or np.std(b[ok]) == 0:
        return float("nan")
    return float(spearmanr(a[ok], b[ok]).statistic)


def attribution_effects(subject, batch, metric: Metric, ab: _Ablator, steps: int = 0) -> np.ndarray:
    """Estimate of every head's ablation effect [layer, head] by attribution patching:
    sum over positions of (replacement - z) . dmetric/dz.

    ``steps=0``: the gradient at the clean run (one forward and one backward pass).
    ``steps=k``: integrated gradients, the gradient averaged at k points on the straight
    path from the clean to the ablated outputs of one layer's heads at a time (k passes
    per layer); it follows the metric through saturation, where the clean gradient is
    near zero although ablating matters."""
    sites = [f"z.{l}" for l in range(subject.n_layers)]
    n = len(batch)
    m = batch.attention_mask[..., None]
    out = np.zeros((subject.n_layers, subject.n_heads))
    if steps <= 0:
        acts, grads, _ = subject.gradients(batch, sites, metric)
        for l, s in enumerate(sites):
            z, g = _metrics.upcast(acts[s]), _metrics.upcast(grads[s])
            out[l] = (((ab.replacement(l, z) - z) * g).sum(-1) * m).sum((0, 1)).cpu().numpy() / n
        return out
    clean = subject.cache(batch, sites)
    for l, s in enumerate(sites):
        z = _metrics.upcast(clean[s])
        delta = ab.replacement(l, z) - z
        total = torch.zeros_like(z)
        for k in range(steps):
            alpha = (k + 0.5) / steps
            point = (z + alpha * delta).to(clean[s].dtype)
            _, grads, _ = subject.gradients(batch, [s], metric, patch={s: point})
            total += _metrics.upcast(grads[s])
        out[l] = ((delta * total / steps).sum(-1) * m).sum((0, 1)).cpu().numpy() / n
    return out


def scan_heads(
    subject,
    inputs,
    *,
    metric: str | Metric = "loss",
    method: str = "zero",
    reference=None,
    attribution: bool = True,
    ig_steps: int = 0,
    seed: int = 0,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> HeadEffects:
    """Every head's ablation effect, exactly: for each layer the batch is repeated once per
    head (as many copies per pass as fit in ``max_bytes``) and copy h has head h ablated.
    With ``attribution``, the attribution-patching estimate (one backward pass, or
    ``ig_steps`` integrated-gradient steps per layer) and its Spearman agreement too."""
    metric = resolve_metric(metric)
    batch = subject.as_batch(inputs)
    ab = _Ablator(subject, batch, method, reference, seed)
    base = _metric_value(subject, batch, metric)
    b, p = batch.input_ids.shape
    H = subject.n_heads
    per_copy = b * p * (subject.d_model * 12 + subject.n_heads * p) * 4
    chunk = rows_per_batch(per_copy, max_bytes, H)
    exact = np.zeros((subject.n_layers, H))
    for layer in range(subject.n_layers):
        for h0 in range(0, H, chunk):
            hs = list(range(h0, min(H, h0 + chunk)))
            c = len(hs)
            rep = subject.as_batch({"input_ids": batch.input_ids.repeat(c, 1),
                                    "attention_mask": batch.attention_mask.repeat(c, 1),
                                    **{k: v.repeat(c, *[1] * (v.ndim - 1)) for k, v in batch.extra.items()}})

            def fn(z, hs=hs, layer=layer):
                z = z.clone()
                for i, h in enumerate(hs):
                    rows = slice(i * b, (i + 1) * b)
                    z[rows] = _ablated(z[rows], h, method, ab.means.get(layer), ab.perm)
                return z

            logits = subject.logits(rep, patch={f"z.{layer}": fn})
            # the metric sees each copy with the original batch (per-prompt answers line up)
            vals = torch.stack([metric(chunk, batch).to(torch.float64).mean() for chunk in logits.split(b)])
            exact[layer, hs] = vals.cpu().numpy() - base
    data = {"effect": (("layer", "head"), exact)}
    attrs = {"base": base, "method": method, "seed": seed}
    if attribution:
        est = attribution_effects(subject, batch, metric, ab, steps=ig_steps)
        data["attribution"] = (("layer", "head"), est)
        attrs["spearman"] = _spearman(exact.ravel(), est.ravel())
        attrs["ig_steps"] = ig_steps
    return HeadEffects(
        dims={"layer": list(range(subject.n_layers)), "head": list(range(H))},
        data=data, attrs=attrs, provenance=provenance(subject, seed=seed, params={"method": method}),
    )


@register("prune_curve")
class PruneCurve(Result):
    """The metric against the number of heads removed, in greedy order."""


def prune_curve(
    subject,
    inputs,
    *,
    metric: str | Metric = "loss",
    step: int = 1,
    max_heads: int | None = None,
    importance: str = "gradient",
) -> PruneCurve:
    """Greedy pruning (Michel et al., 2019), ``step`` heads at a time, with the metric
    measured after each step. Importance, re-estimated with the heads pruned so far
    masked:

    - ``"gradient"`` (the paper's): |d metric / d gate| for a gate multiplying each head's
      output, one forward and backward pass per step; near zero for every head where the
      metric saturates;
    - ``"exact"``: the metric with each remaining head removed too, one forward per
      remaining head per step."""
    if importance not in ("gradient", "exact"):
        raise WorkbenchError(f"importance must be 'gradient' or 'exact', got {importance!r}")
    metric = resolve_metric(metric)
    batch = subject.as_batch(inputs)
    if step < 1:
        raise WorkbenchError(f"step must be >= 1, got {step}")
    total = subject.n_layers * subject.n_heads
    max_heads = total - 1 if max_heads is None else min(max_heads, total - 1)
    ab = _Ablator(subject, batch, "zero")
    removed: list[Head] = []
    counts, values, order = [0], [_metric_value(subject, batch, metric)], []
    sites = [f"z.{l}" for l in range(subject.n_layers)]
    m = batch.attention_mask[..., None]
    while len(removed) < max_heads:
        imp = np.full((subject.n_layers, subject.n_heads), np.inf)
        if importance == "gradient":
            patch = ab.patch(removed) if removed else None
            acts, grads, _ = subject.gradients(batch, sites, metric, patch=patch)
            for l, s in enumerate(sites):
                # d metric / d gate_h at gate 1 = sum over positions of z_h . g_h
                imp[l] = (((_metrics.upcast(acts[s]) * _metrics.upcast(grads[s])).sum(-1) * m).sum(1)).abs().mean(0).cpu().numpy()
        else:
            for l in range(subject.n_layers):
                for h in range(subject.n_heads):
                    if (l, h) not in removed:
                        imp[l, h] = abs(_metric_value(subject, batch, metric, ab.patch(removed + [(l, h)])) - values[-1])
        for l, h in removed:
            imp[l, h] = np.inf
        take = np.argsort(imp, axis=None)[: min(step, max_heads - len(removed))]
        for i in take:
            head = (int(i // subject.n_heads), int(i % subject.n_heads))
            removed.append(head)
            order.append(head)
        counts.append(len(removed))
        values.append(_metric_value(subject, batch, metric, ab.patch(removed)))
    return PruneCurve(
        dims={"point": list(range(len(counts)))},
        data={"heads_removed": (("point",), np.asarray(counts)), "metric": (("point",), np.asarray(values))},
        attrs={"order": order, "step": step, "importance": importance},
        provenance=provenance(subject, params={"step": step, "max_heads": max_heads, "importance": importance}),
    )
