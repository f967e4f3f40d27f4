"""Linear probes on every head's output and every layer's residual stream, cross-validated,
with a control task so that selectivity is reported, not only accuracy.

The control task follows Hewitt & Liang ("Designing and Interpreting Probes with Control
Tasks"): every word type (token id at the probed position) gets a random label, drawn
from the real labels' distribution, and keeps it wherever it occurs. A probe that
reaches high accuracy on the control memorises word identity; selectivity = accuracy -
control accuracy says how much of the real accuracy the representation adds.

Labels are per prompt (probed at one position, by default each prompt's last real
token) or per token (a list of labels per prompt, one per real token, ``None`` to skip).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register


@register("probe_scores")
class ProbeScores(Result):
    """Cross-validated probe accuracy per component (``L{layer}H{head}`` for a head's
    output, ``resid.{layer}`` for the residual stream after the layer), the control
    task's accuracy, and selectivity."""

    def best(self, n: int = 5) -> list[tuple[str, float]]:
        comps, sel = self.coord("component"), self["selectivity"]
        order = np.argsort(np.nan_to_num(sel, nan=-np.inf))[::-1][:n]
        return [(comps[i], float(sel[i])) for i in order]


def fit_probe(x: np.ndarray, y: np.ndarray, *, folds: int = 5, seed: int = 0, c: float = 1.0) -> tuple[float, float]:
    """Mean and std of held-out accuracy of a logistic-regression probe over stratified folds."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise WorkbenchError(f"a probe needs at least two label values, got only {classes.tolist()}")
    k = int(min(folds, counts.min()))
    if k < 2:
        raise WorkbenchError(f"label {classes[counts.argmin()]!r} occurs once; each label needs at least 2 examples "
                             "for cross-validation")
    accs = []
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, y):
        clf = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=500))
        clf.fit(x[train], y[train])
        accs.append(float((clf.predict(x[test]) == y[test]).mean()))
    return float(np.mean(accs)), float(np.std(accs))


def control_labels(types: np.ndarray, y: np.ndarray, seed: int = 0) -> np.ndarray:
    """One random label per word type, drawn from the empirical label distribution."""
    rng = np.random.default_rng(seed)
    values, counts = np.unique(y, return_counts=True)
    uniq = np.unique(types)
    drawn = rng.choice(values, size=len(uniq), p=counts / counts.sum())
    table = dict(zip(uniq.tolist(), drawn.tolist()))
    return np.asarray([table[t] for t in types.tolist()])


def _features(subject, inputs, labels, per: str, position: int | None, components: str, batch_size: int):
    """(features by component name, labels, word types) gathered batch by batch."""
    layers = range(subject.n_layers)
    sites = []
    if components in ("heads", "both"):
        sites += [f"z.{l}" for l in layers]
    if components in ("resid", "both"):
        sites += [f"resid_post.{l}" for l in layers]
    if not sites:
        raise WorkbenchError(f"components must be 'heads', 'resid' or 'both', got {components!r}")
    full = subject.as_batch(inputs)
    n = len(full)
    if len(labels) != n:
        raise WorkbenchError(f"{len(labels)} labels for {n} prompts; give one label (or one list) per prompt")
    feats: dict[str, list[np.ndarray]] = {}
    ys, types = [], []
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        batch = full[sl]
        acts = subject.cache(batch, sites)
        lengths = batch.attention_mask.sum(-1).tolist()
        rows, cols = [], []
        for i, lab in enumerate(labels[sl]):
            if per == "prompt":
                pos = lengths[i] - 1 if position is None else (position if position >= 0 else lengths[i] + position)
                if not 0 <= pos < lengths[i]:
                    raise WorkbenchError(f"position {position} is outside prompt {start + i} ({lengths[i]} tokens)")
                rows.append(i), cols.append(pos), ys.append(lab)
            else:
                if len(lab) != lengths[i]:
                    raise WorkbenchError(f"prompt {start + i} has {lengths[i]} tokens but {len(lab)} token labels")
                for pos, t in enumerate(lab):
                    if t is not None:
                        rows.append(i), cols.append(pos), ys.append(t)
        dev = batch.input_ids.device
        r, c = torch.tensor(rows, dtype=torch.long, device=dev), torch.tensor(cols, dtype=torch.long, device=dev)
        types.extend(batch.input_ids[r, c].tolist())
        for s in sites:
            a = acts[s][r, c].float().cpu()
            if s.startswith("z."):
                for h in range(subject.n_heads):
                    feats.setdefault(f"L{s[2:]}H{h}", []).append(a[:, h].numpy())
            else:
                feats.setdefault(s.replace("resid_post", "resid"), []).append(a.numpy())
    return {k: np.concatenate(v) for k, v in feats.items()}, np.asarray(ys), np.asarray(types)


def probe(
    subject,
    prompts,
    labels: Sequence,
    *,
    per: str = "prompt",
    position: int | None = None,
    components: str = "both",
    folds: int = 5,
    control: bool = True,
    seed: int = 0,
    c: float = 1.0,
    batch_size: int = 64,
) -> ProbeScores:
    """Probe every head output and/or layer residual for ``labels``.

    ``per="prompt"``: one label per prompt, probed at ``position`` (default: the last real
    token; negative counts from the end). ``per="token"``: per prompt a list with one label
    per real token (``None`` skips a token).
    """
    if per not in ("prompt", "token"):
        raise WorkbenchError(f"per must be 'prompt' or 'token', got {per!r}")
    if isinstance(prompts, (list, tuple)) and not prompts:
        raise WorkbenchError("empty prompt list; pass at least one prompt")
    feats, y, types = _features(subject, prompts, list(labels), per, position, components, batch_size)
    y = np.asarray([str(v) for v in y])
    y_ctrl = control_labels(types, y, seed) if control else None
    names = list(feats)
    acc, std, ctrl = (np.full(len(names), np.nan) for _ in range(3))
    for i, name in enumerate(names):
        acc[i], std[i] = fit_probe(feats[name], y, folds=folds, seed=seed, c=c)
        if control:  # a single control label (one word type) is trivially predictable
            ctrl[i] = fit_probe(feats[name], y_ctrl, folds=folds, seed=seed, c=c)[0] if len(np.unique(y_ctrl)) > 1 else 1.0
    values, counts = np.unique(y, return_counts=True)
    params = {"per": per, "position": position, "components": components, "folds": folds, "seed": seed, "c": c}
    layer = [int(nm[1:].split("H")[0]) if nm.startswith("L") else int(nm.split(".")[1]) for nm in names]
    head = [int(nm.split("H")[1]) if nm.startswith("L") else -1 for nm in names]
    return ProbeScores(
        dims={"component": names},
        data={"layer": (("component",), np.asarray(layer)), "head": (("component",), np.asarray(head)),
              "accuracy": (("component",), acc), "accuracy_std": (("component",), std),
              "control": (("component",), ctrl), "selectivity": (("component",), acc - ctrl)},
        attrs={**params, "n_examples": int(len(y)), "majority": float(counts.max() / counts.sum()),
               "labels": values.tolist()},
        provenance=provenance(subject, seed=seed, params=params),
    )
