"""Causal checks on heads: ablation against random-head controls, a full scan of every
head's effect (exact, batched across heads) beside its attribution-patching estimate
(one backward pass), and greedy pruning as in "Are Sixteen Heads Really Better than One?".

All of it runs on :mod:`workbench.effects` with the nodes ``Heads()``: a head is ablated
by replacing its output before the output projection (site ``z.L``) with its
``replacement``:

- ``zero``: zeros;
- ``mean``: its mean over the real tokens of ``reference`` prompts (default: the
  prompts themselves; position 0 left out, and never ablated, with ``skip_first``);
- ``resample``: its output on another prompt of the batch (a fixed random
  derangement), position by position; the prompts must then have equal lengths.

A metric is ``"loss"`` (next-token loss) or any ``fn(logits, batch) -> [batch]`` from
:mod:`workbench.metrics` (``functools.partial(metrics.logit_diff, good=..., bad=...)``,
``partial(metrics.correct, answers=...)``); effects are metric(ablated) - metric(clean),
averaged over prompts.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workbench.effects import Heads, Patching
from workbench.errors import WorkbenchError, one_of
from workbench.memory import DEFAULT_BUDGET_BYTES
from workbench.metrics import Metric, resolve_metric, upcast
from workbench.results import Result, provenance, register
from workbench.stats import spearman

REPLACEMENTS = ("zero", "mean", "resample")
Head = tuple[int, int]


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


def _patching(subject, prompts, replacement: str, reference, seed: int, skip_first: bool) -> Patching:
    if replacement not in REPLACEMENTS:
        raise one_of("ablation replacement", replacement, REPLACEMENTS)
    return Patching(subject, prompts, Heads(), replacement=replacement, reference=reference, seed=seed,
                    skip_first=skip_first)


def _name(head: Head) -> str:
    return f"z.{head[0]}/{head[1]}"


@register("head_ablation")
class HeadAblation(Result):
    """The metric with chosen heads ablated, beside random draws of as many other heads."""

    @property
    def summary(self) -> dict:
        return dict(self.attrs["summary"])


def ablate_heads(
    subject,
    prompts,
    heads: Sequence[Head],
    *,
    metric: str | Metric = "loss",
    replacement: str = "zero",
    reference=None,
    n_random: int = 20,
    seed: int = 0,
    skip_first: bool = False,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> HeadAblation:
    """Ablate ``heads`` together and measure ``metric``; as a control, ablate ``n_random``
    random sets of as many heads (drawn from the other heads) the same way. The chosen set
    and the controls run as copies of the batch (as many per forward as fit in ``max_bytes``)."""
    heads = _check_heads(subject, heads)
    if not heads:
        raise WorkbenchError("no heads to ablate; pass (layer, head) pairs")
    metric = resolve_metric(metric)
    pt = _patching(subject, prompts, replacement, reference, seed, skip_first)
    others = [(l, h) for l in range(subject.n_layers) for h in range(subject.n_heads) if (l, h) not in set(heads)]
    rng = np.random.default_rng(seed)
    draws = []
    if len(others) >= len(heads):
        for _ in range(n_random):
            draws.append([others[i] for i in rng.choice(len(others), size=len(heads), replace=False)])
    base = pt.base(metric)
    values = pt.patched_metrics([[_name(h) for h in hs] for hs in [heads, *draws]], metric, max_bytes=max_bytes)
    value, controls = float(values[0]), values[1:]
    effect = value - base
    ctrl = np.asarray(controls) - base
    summary = {
        "base": base, "ablated": value, "effect": effect,
        "control_mean": float(ctrl.mean()) if len(ctrl) else float("nan"),
        "control_std": float(ctrl.std(ddof=1)) if len(ctrl) > 1 else float("nan"),
        # share of random draws whose effect is at least as large in magnitude
        "control_p": float((np.abs(ctrl) >= abs(effect)).mean()) if len(ctrl) else float("nan"),
    }
    params = {"heads": heads, "replacement": replacement, "n_random": n_random, "seed": seed, "skip_first": skip_first}
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


def scan_heads(
    subject,
    prompts,
    *,
    metric: str | Metric = "loss",
    replacement: str = "zero",
    reference=None,
    attribution: bool = True,
    ig_steps: int = 0,
    seed: int = 0,
    skip_first: bool = False,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> HeadEffects:
    """Every head's ablation effect, exactly: the batch is repeated once per head (as many
    copies per forward as fit in ``max_bytes``) and copy h has head h ablated. With
    ``attribution``, the attribution-patching estimate (one backward pass; with
    ``ig_steps`` > 0, integrated gradients with that many points per layer, which follow
    the metric through saturation where the clean gradient is near zero although
    ablating matters) and its Spearman agreement too."""
    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 0:
        raise WorkbenchError(f"ig_steps must be 0 (plain attribution patching) or a positive integer, got {ig_steps!r}")
    metric = resolve_metric(metric)
    pt = _patching(subject, prompts, replacement, reference, seed, skip_first)
    L, H = subject.n_layers, subject.n_heads
    exact = pt.exact(metric, max_bytes=max_bytes).reshape(L, H)
    data = {"effect": (("layer", "head"), exact)}
    attrs = {"base": pt.base(metric), "replacement": replacement, "seed": seed, "skip_first": skip_first}
    if attribution:
        est = pt.ig(metric, ig_steps, max_bytes=max_bytes) if ig_steps > 0 else pt.attribution(metric, max_bytes=max_bytes)[0]
        est = est.reshape(L, H)
        data["attribution"] = (("layer", "head"), est)
        attrs["spearman"] = spearman(exact, est)
        attrs["ig_steps"] = ig_steps
    return HeadEffects(
        dims={"layer": list(range(L)), "head": list(range(H))},
        data=data, attrs=attrs,
        provenance=provenance(subject, seed=seed, params={"replacement": replacement, "ig_steps": ig_steps}),
    )


@register("prune_curve")
class PruneCurve(Result):
    """The metric against the number of heads removed, in greedy order."""


def prune_curve(
    subject,
    prompts,
    *,
    metric: str | Metric = "loss",
    step: int = 1,
    max_heads: int | None = None,
    importance: str = "gradient",
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> PruneCurve:
    """Greedy pruning (Michel et al., 2019), ``step`` heads at a time, with the metric
    measured after each step. Importance, re-estimated with the heads pruned so far
    masked:

    - ``"gradient"`` (the paper's): |d metric / d gate| for a gate multiplying each head's
      output, one forward and backward pass per step; near zero for every head where the
      metric saturates;
    - ``"exact"``: the metric with each remaining head removed too (one batch copy per
      remaining head per step)."""
    if importance not in ("gradient", "exact"):
        raise WorkbenchError(f"importance must be 'gradient' or 'exact', got {importance!r}")
    metric = resolve_metric(metric)
    if step < 1:
        raise WorkbenchError(f"step must be >= 1, got {step}")
    total = subject.n_layers * subject.n_heads
    max_heads = total - 1 if max_heads is None else min(max_heads, total - 1)
    pt = _patching(subject, prompts, "zero", None, 0, False)
    batch = pt.batch
    removed: list[Head] = []
    counts, values, order = [0], [pt.base(metric)], []
    sites = [f"z.{l}" for l in range(subject.n_layers)]
    m = batch.attention_mask[..., None]
    while len(removed) < max_heads:
        imp = np.full((subject.n_layers, subject.n_heads), np.inf)
        if importance == "gradient":
            patch = pt.patch([_name(h) for h in removed]) if removed else None
            acts, grads, _ = subject.gradients(batch, sites, metric, patch=patch)
            # d metric / d gate_h at gate 1 = sum over positions of z_h . g_h; every layer in one transfer
            imp[:] = torch.stack([(((upcast(acts[s]) * upcast(grads[s])).sum(-1) * m).sum(1)).abs().mean(0)
                                  for s in sites]).cpu().numpy()
        else:
            rest = [(l, h) for l in range(subject.n_layers) for h in range(subject.n_heads) if (l, h) not in removed]
            vals = pt.patched_metrics([[_name(h) for h in removed + [hd]] for hd in rest], metric, max_bytes=max_bytes)
            for (l, h), v in zip(rest, vals):
                imp[l, h] = abs(v - values[-1])
        for l, h in removed:
            imp[l, h] = np.inf
        take = np.argsort(imp, axis=None, kind="stable")[: min(step, max_heads - len(removed))]
        for i in take:
            head = (int(i // subject.n_heads), int(i % subject.n_heads))
            removed.append(head)
            order.append(head)
        counts.append(len(removed))
        values.append(float(pt.patched_metrics([[_name(h) for h in removed]], metric, max_bytes=max_bytes)[0]))
    return PruneCurve(
        dims={"point": list(range(len(counts)))},
        data={"heads_removed": (("point",), np.asarray(counts)), "metric": (("point",), np.asarray(values))},
        attrs={"order": order, "step": step, "importance": importance},
        provenance=provenance(subject, params={"step": step, "max_heads": max_heads, "importance": importance}),
    )
