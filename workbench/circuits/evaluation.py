"""How good is a dictionary? Sparsity, reconstruction, and the language-model loss
recovered when the SAE's reconstruction replaces the site (through ``Subject.write``).

    L0                 mean number of active features per token
    MSE                mean squared error per token (summed over the width)
    FVU                sum ||x - x_hat||^2 / sum ||x - mean x||^2
    dead / dense       fractions of features never active / active on > dense_threshold of tokens
    loss recovered     (L_ablate - L_sae) / (L_ablate - L_clean) for zero- and mean-ablation
"""

from __future__ import annotations

import math
import numbers
from typing import Sequence

import numpy as np
import torch

from workbench.circuits.buffer import check_int, check_texts, check_vector_site, flat, token_mask, unflat
from workbench.errors import WorkbenchError
from workbench.metrics import next_token_loss
from workbench.results import Result, provenance, register

METRICS = ("l0", "mse", "fvu", "dead_fraction", "dense_fraction", "loss_clean", "loss_sae", "loss_zero",
           "loss_mean", "loss_recovered_zero", "loss_recovered_mean")


@register("sae_evaluation")
class SAEEvaluation(Result):
    """Scalar metrics (dimension ``metric``) and each feature's firing frequency."""

    @property
    def metrics(self) -> dict[str, float]:
        return {m: float(v) for m, v in zip(self.coord("metric"), self["value"])}

    def __getattr__(self, name: str):
        if name in METRICS:
            return self.metrics[name]
        raise AttributeError(name)


def check_sae(sae) -> None:
    """A workbench SAE (or anything with its interface) with finite weights."""
    needed = ("encode", "decode", "d_in", "d_sae", "skip_first", "check_subject", "config", "site")
    lacking = [a for a in needed if not hasattr(sae, a)]
    if lacking:
        raise WorkbenchError(f"expected a workbench SAE (SAE(...) or SAE.load(path)), got {type(sae).__name__} "
                             f"(it has no {', '.join(lacking[:3])})")
    if isinstance(sae, torch.nn.Module):
        bad = [n for n, t in list(sae.named_parameters()) + list(sae.named_buffers()) if not torch.isfinite(t).all()]
        if bad:
            raise WorkbenchError(f"the SAE's {', '.join(bad)} hold NaN or inf: its weights are damaged")


def resolve_site(subject, sae, site: str | None) -> str:
    site = site or sae.site
    if site is None:
        raise WorkbenchError("this SAE does not record its site; pass site='resid_post.0' (or another site)")
    s = check_vector_site(subject, site)
    sae.check_subject(subject, s.name)
    return s.name


def replace_fn(sae, site: str, subject, mask: torch.Tensor | None = None, fn=None):
    """A patch function for ``site``: x -> SAE reconstruction (or ``fn(x_flat)``), only where
    ``mask`` [batch, pos] is True (elsewhere x is kept)."""

    def patch(x):
        xf = flat(x, subject.site(site))
        new = (sae(xf) if fn is None else fn(xf)).to(xf.dtype)
        if mask is not None:
            new = torch.where(mask[..., None].to(new.device), new, xf)
        return unflat(new, subject.site(site), subject)

    return patch


@torch.no_grad()
def evaluate_sae(
    subject,
    sae,
    texts: Sequence[str],
    *,
    site: str | None = None,
    batch_size: int = 32,
    dense_threshold: float = 0.1,
) -> SAEEvaluation:
    """Evaluate ``sae`` at ``site`` (default: the SAE's own) over ``texts``.

    Positions the SAE was not trained on (position 0 when ``sae.skip_first``) and padding
    are left out of every statistic and are never replaced.
    """
    check_sae(sae)
    site = resolve_site(subject, sae, site)
    s = subject.site(site)
    texts = check_texts(texts, "no texts to evaluate on")
    batch_size = check_int(batch_size, "batch_size")
    if (isinstance(dense_threshold, bool) or not isinstance(dense_threshold, numbers.Real)
            or not math.isfinite(dense_threshold) or not 0 <= dense_threshold < 1):
        raise WorkbenchError(f"dense_threshold must be a share of tokens in [0, 1), got {dense_threshold!r}")
    batches = [subject.tokenize(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]
    # pass 1: activations, reconstruction stats, mean activation, clean loss
    n_tok = 0
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64)
    sum_x2 = torch.zeros((), dtype=torch.float64)
    sse = torch.zeros((), dtype=torch.float64)
    l0 = torch.zeros((), dtype=torch.float64)
    freq = torch.zeros(sae.d_sae, dtype=torch.float64)
    for batch in batches:
        x = flat(subject.cache(batch, [site])[site], s)
        m = token_mask(batch, sae.skip_first)
        xs = x[m].float()
        f = sae.encode(xs)
        err = (sae.decode(f) - xs).double()
        n_tok += len(xs)
        sum_x += xs.double().sum(0).cpu()
        sum_x2 += xs.double().pow(2).sum().cpu()
        sse += err.pow(2).sum().cpu()
        active = (f > 0).double()
        l0 += active.sum().cpu()
        freq += active.sum(0).cpu()
    if n_tok == 0:
        raise WorkbenchError("the texts hold no tokens to evaluate (after dropping position 0)")
    if not math.isfinite(float(sse)) or not math.isfinite(float(sum_x2)):
        raise WorkbenchError(f"the activations at {site} or the SAE's reconstruction of them hold NaN or inf; "
                             "check the model's dtype (float16 overflow) and the SAE")
    mean = (sum_x / n_tok).float()
    total_var = float(sum_x2 - n_tok * (sum_x / n_tok).pow(2).sum())
    # pass 2: losses with the site replaced
    losses = {"clean": [], "sae": [], "zero": [], "mean": []}
    weights = []
    for batch in batches:
        m = token_mask(batch, sae.skip_first)
        fns = {
            "clean": None,
            "sae": replace_fn(sae, site, subject, m),
            "zero": replace_fn(sae, site, subject, m, fn=lambda xf: torch.zeros_like(xf)),
            "mean": replace_fn(sae, site, subject, m, fn=lambda xf: mean.to(xf.device, xf.dtype).expand_as(xf)),
        }
        for name, fn in fns.items():
            logits = subject.logits(batch, patch=None if fn is None else {site: fn})
            losses[name].append(next_token_loss(logits, batch).double().cpu())
        weights.append((batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).sum(-1).double().cpu())
    w = torch.cat(weights)
    if float(w.sum()) == 0:
        raise WorkbenchError("no text has two real tokens, so there is no next-token loss to compare; "
                             "pass texts of at least two tokens")
    loss = {k: float((torch.cat(v) * w).sum() / w.sum()) for k, v in losses.items()}
    freq = (freq / n_tok).numpy()

    def recovered(abl: float) -> float:
        gap = abl - loss["clean"]
        return float("nan") if abs(gap) < 1e-12 else (abl - loss["sae"]) / gap

    values = {
        "l0": float(l0) / n_tok,
        "mse": float(sse) / n_tok,
        "fvu": float(sse) / total_var if total_var > 0 else float("nan"),
        "dead_fraction": float((freq == 0).mean()),
        "dense_fraction": float((freq > dense_threshold).mean()),
        "loss_clean": loss["clean"], "loss_sae": loss["sae"], "loss_zero": loss["zero"], "loss_mean": loss["mean"],
        "loss_recovered_zero": recovered(loss["zero"]),
        "loss_recovered_mean": recovered(loss["mean"]),
    }
    params = {"site": site, "n_texts": len(texts), "tokens": n_tok, "dense_threshold": dense_threshold,
              "sae": sae.config()}
    return SAEEvaluation(
        dims={"metric": list(METRICS), "feature": list(range(sae.d_sae))},
        data={"value": (("metric",), np.array([values[m] for m in METRICS])),
              "frequency": (("feature",), freq)},
        attrs=params, provenance=provenance(subject, params=params),
    )
