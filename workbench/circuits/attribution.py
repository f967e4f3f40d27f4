"""Sparse feature circuits (Marks et al. 2024): node and edge effects over SAE features
and error nodes, circuit graphs, faithfulness and completeness.

Every dictionary is spliced into its site as ``x = decode(f) + err`` with
``f = encode(x)`` and ``err = x - decode(f)``: the model's output is unchanged, and each
feature and each site's error term becomes a node whose effect on a metric can be
measured. For a clean / corrupted pair and a metric ``m(logits, batch)`` (on the clean
run), a node ``a``'s indirect effect is the change in ``m`` when ``a`` takes its
corrupted value:

- ``attrib``  attribution patching, ``(a_corr - a_clean) . dm/da`` at the clean run:
  one forward and one backward for every node at once;
- ``ig``      integrated gradients along ``a_clean -> a_corr`` (per site, ``steps``
  points): exact for a site whose downstream is linear, and the effects of a site's
  nodes add up to the effect of corrupting the whole site;
- ``exact``   activation patching, one forward per node (the ground truth to check the
  others against).

Effects are summed over positions and averaged over prompts: a node's effect is the change
in the batch-mean metric when it is patched in every prompt. Edges link nodes of
consecutive sites: ``dm/dd . dd/du . (u_corr - u_clean)``, one vector-Jacobian product
per kept downstream node.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from workbench.circuits.buffer import check_vector_site, flat, unflat
from workbench.errors import WorkbenchError, one_of
from workbench.memory import DEFAULT_BUDGET_BYTES, rows_per_batch
from workbench.results import Result, provenance, register
from workbench.subject import Batch, _save

Metric = Callable[[torch.Tensor, Batch], torch.Tensor]
METHODS = ("attrib", "ig", "exact")


# ---------------------------------------------------------------------- inputs


def ordered_saes(subject, saes: Mapping[str, object]) -> dict[str, object]:
    """Check each SAE against its site and order the sites as the forward pass reaches them."""
    if not saes:
        raise WorkbenchError("no dictionaries given; pass {site: SAE} for at least one site")
    out = {}
    for name, sae in saes.items():
        s = check_vector_site(subject, name)
        sae.check_subject(subject, s.name)
        sae.eval()
        out[s] = sae
    return {s.name: out[s] for s in sorted(out, key=lambda s: s.order())}


def pair_batches(subject, clean, corrupted) -> tuple[Batch, Batch]:
    """Tokenize clean and corrupted prompts; they must align token for token."""
    c, x = subject.as_batch(_inputs(clean)), subject.as_batch(_inputs(corrupted))
    if len(c) != len(x):
        raise WorkbenchError(f"{len(c)} clean prompts but {len(x)} corrupted ones; pass one corrupted prompt per clean one")
    lc, lx = c.attention_mask.sum(-1), x.attention_mask.sum(-1)
    bad = (lc != lx).nonzero()
    if len(bad) or c.input_ids.shape != x.input_ids.shape:
        i = int(bad[0, 0]) if len(bad) else 0
        raise WorkbenchError(
            f"clean and corrupted prompts must have the same number of tokens (activations are patched position by "
            f"position); pair {i} has {int(lc[i])} clean and {int(lx[i])} corrupted tokens"
        )
    return c, x


def _inputs(inputs):
    """Prompt columns (a datasets Column, a tuple, a generator) become lists of strings."""
    if isinstance(inputs, (Batch, torch.Tensor, Mapping, str, list)):
        return inputs
    return list(inputs)


def _metric_value(metric: Metric, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    v = metric(logits, batch)
    return v.mean() if v.ndim else v


def node_names(sites: Sequence[str], widths: Sequence[int]) -> list[str]:
    names = []
    for s, w in zip(sites, widths):
        names += [f"{s}/{j}" for j in range(w)] + [f"{s}/err"]
    return names


# ---------------------------------------------------------------------- the spliced run


def spliced_run(subject, batch: Batch, saes: Mapping[str, object], *, edit=None, leaves: bool = False,
                grad: bool = False):
    """Run ``batch`` with every SAE spliced in. ``edit[site](f, err) -> (f, err)`` changes a
    site's nodes; ``leaves`` adds zero leaves to every node (their ``.grad`` is then dm/dnode).

    Returns ({site: (f, err)} node values, {site: (df, derr)} leaves or {}, logits)."""
    ctx = torch.enable_grad() if (grad or leaves) else torch.no_grad()
    with ctx, subject.trace(batch):
        nodes, lv = {}, {}
        for site, sae in saes.items():
            s = subject.site(site)
            xf = flat(subject.read(s), s)
            f = sae.encode(xf)
            err = xf - sae.decode(f)
            if edit is not None and site in edit:
                f, err = edit[site](f, err)
            if leaves:
                df = torch.zeros_like(f).requires_grad_(True)
                de = torch.zeros_like(err).requires_grad_(True)
                f, err = f + df, err + de
                lv[site] = (df, de)
            subject.write(s, unflat(sae.decode(f) + err, s, subject))
            nodes[site] = (f, err)
        logits = subject.read("logits")
        nodes, lv, logits = _save(nodes), _save(lv), _save(logits)
    return nodes, lv, logits


@torch.no_grad()
def _values(subject, batch, saes):
    nodes, _, logits = spliced_run(subject, batch, saes)
    return {k: (f.detach(), e.detach()) for k, (f, e) in nodes.items()}, logits


# ---------------------------------------------------------------------- node effects


@register("node_effects")
class NodeEffects(Result):
    """Effect of each node (SAE feature or a site's error term) on a metric.

    Dimension ``node`` named ``site/feature`` or ``site/err``; variables ``effect``,
    ``site`` (index into ``attrs['sites']``) and ``feature`` (-1 for error nodes)."""

    def at(self, site: str) -> np.ndarray:
        """Effects of ``site``'s features (error node last)."""
        i = self.attrs["sites"].index(site)
        return self["effect"][self["site"] == i]

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        order = np.argsort(-np.abs(self["effect"]))[:n]
        names = self.coord("node")
        return [(names[i], float(self["effect"][i])) for i in order]


def _effects_result(subject, saes, per_site: dict[str, tuple[torch.Tensor, torch.Tensor]], attrs, params):
    sites = list(saes)
    widths = [saes[s].d_sae for s in sites]
    effect = np.concatenate([np.append(per_site[s][0].cpu().numpy(), float(per_site[s][1])) for s in sites])
    site_idx = np.concatenate([np.full(w + 1, i) for i, w in enumerate(widths)])
    feature = np.concatenate([np.append(np.arange(w), -1) for w in widths])
    return NodeEffects(
        dims={"node": node_names(sites, widths)},
        data={"effect": (("node",), effect.astype(np.float64)), "site": (("node",), site_idx.astype(np.int64)),
              "feature": (("node",), feature.astype(np.int64))},
        attrs={**attrs, "sites": sites, "widths": widths}, provenance=provenance(subject, params=params),
    )


def node_effects(
    subject,
    saes: Mapping[str, object],
    clean,
    corrupted,
    metric: Metric,
    *,
    method: str = "attrib",
    steps: int = 10,
    features: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> NodeEffects:
    """Effect on ``metric`` of moving each node from its clean to its corrupted value.

    ``method``: ``"attrib"``, ``"ig"`` (``steps`` points) or ``"exact"`` (one forward per
    node; ``features`` limits it to some features per site, the rest reported as NaN,
    and features whose value does not change are 0 without a forward).
    """
    if method not in METHODS:
        raise one_of("attribution method", method, METHODS)
    if steps < 1:
        raise WorkbenchError(f"steps must be >= 1, got {steps}")
    saes = ordered_saes(subject, saes)
    cb, xb = pair_batches(subject, clean, corrupted)
    corr, corr_logits = _values(subject, xb, saes)
    n = len(cb)
    params = {"method": method, "steps": steps, "sites": list(saes), "n": n}
    if method == "attrib":
        per_site, m_clean = _attrib(subject, saes, cb, corr, metric)
    elif method == "ig":
        per_site, m_clean = _ig(subject, saes, cb, corr, metric, steps)
    else:
        per_site, m_clean = _exact(subject, saes, cb, corr, metric, features, max_bytes)
    m_corr = float(_metric_value(metric, corr_logits, cb))
    return _effects_result(subject, saes, per_site, {**params, "metric_clean": m_clean, "metric_corrupted": m_corr},
                           params)


def _attrib(subject, saes, cb, corr, metric):
    nodes, lv, logits = spliced_run(subject, cb, saes, leaves=True)
    m = _metric_value(metric, logits, cb)
    m.backward()
    n = len(cb)
    out = {}
    for site, (df, de) in lv.items():
        f, e = nodes[site]
        dfv = corr[site][0] - f.detach()
        dev = corr[site][1] - e.detach()
        gf = df.grad if df.grad is not None else torch.zeros_like(df)
        ge = de.grad if de.grad is not None else torch.zeros_like(de)
        out[site] = ((dfv * gf).sum((0, 1)), (dev * ge).sum())  # dm (of the batch mean) already has 1/n
    return out, float(m.detach())


def _ig(subject, saes, cb, corr, metric, steps):
    clean, logits = _values(subject, cb, saes)
    m_clean = float(_metric_value(metric, logits, cb))
    n = len(cb)
    out = {}
    alphas = (torch.arange(steps, dtype=torch.float32) + 0.5) / steps  # midpoint rule
    for site in saes:
        fc, ec = clean[site]
        fx, ex = corr[site]
        gsum_f, gsum_e = torch.zeros_like(fc), torch.zeros_like(ec)
        for a in alphas.tolist():
            fi, ei = fc + a * (fx - fc), ec + a * (ex - ec)
            _, lv, lg = spliced_run(subject, cb, {site: saes[site]}, leaves=True,
                                    edit={site: lambda f, e, fi=fi, ei=ei: (fi, ei)})
            _metric_value(metric, lg, cb).backward()
            df, de = lv[site]
            gsum_f += df.grad if df.grad is not None else 0
            gsum_e += de.grad if de.grad is not None else 0
        out[site] = (((fx - fc) * gsum_f / steps).sum((0, 1)), ((ex - ec) * gsum_e / steps).sum())
    return out, m_clean


@torch.no_grad()
def _exact(subject, saes, cb, corr, metric, features, max_bytes):
    clean, logits = _values(subject, cb, saes)
    m0 = _metric_value(metric, logits, cb)
    n, p = cb.input_ids.shape
    out = {}
    for site, sae in saes.items():
        s = subject.site(site)
        fc, ec = clean[site]
        fx, ex = corr[site]
        xc = sae.decode(fc) + ec  # the clean activation (flat)
        delta = fx - fc
        eff = torch.full((sae.d_sae,), float("nan"), dtype=torch.float64)
        wanted = range(sae.d_sae) if features is None or site not in features else features[site]
        todo = []
        for j in wanted:
            if not 0 <= int(j) < sae.d_sae:
                raise WorkbenchError(f"feature {j} out of range for the SAE at {site} (0..{sae.d_sae - 1})")
            if bool((delta[..., int(j)] == 0).all()):
                eff[int(j)] = 0.0
            else:
                todo.append(int(j))
        # patch several features per forward: the batch repeated, one copy per feature
        per_copy = n * p * (xc.shape[-1] * 4 * 8 + subject.d_vocab * 4)
        chunk = rows_per_batch(per_copy, max_bytes, max(1, len(todo)))
        for start in range(0, len(todo), chunk):
            js = todo[start : start + chunk]
            new = xc[None] + delta[..., js].permute(2, 0, 1)[..., None] * sae.W_dec[js][:, None, None, :]
            vals = _patched_metrics(subject, cb, site, new, metric)
            for j, v in zip(js, vals):
                eff[j] = float(v - m0)
        # the error node
        new = (xc - ec + ex)[None]
        err_eff = _patched_metrics(subject, cb, site, new, metric)[0] - m0
        out[site] = (eff, err_eff)
    return out, float(m0)


def _patched_metrics(subject, cb: Batch, site: str, new: torch.Tensor, metric) -> list[float]:
    """Metric with ``site`` set to each of ``new`` [copies, batch, pos, width]."""
    c = new.shape[0]
    big = Batch(cb.input_ids.repeat(c, 1), cb.attention_mask.repeat(c, 1), {k: v.repeat(c, 1) for k, v in cb.extra.items()})
    s = subject.site(site)
    value = unflat(new.reshape(-1, *new.shape[2:]), s, subject)
    logits = subject.logits(big, patch={site: value})
    n = len(cb)
    return [float(_metric_value(metric, logits[i * n : (i + 1) * n], cb)) for i in range(c)]


# ---------------------------------------------------------------------- circuits


@register("circuit_graph")
class CircuitGraph(Result):
    """Nodes (every feature and error node with its effect) and edges between kept nodes
    of consecutive sites. ``subgraph(node_threshold, edge_threshold)`` prunes further."""

    @property
    def sites(self) -> list[str]:
        return self.attrs["sites"]

    def node_table(self):
        return self.to_frame(["effect", "site", "feature"])

    def subgraph(self, node_threshold: float | None = None, edge_threshold: float | None = None):
        """(node indices, edge indices) with |effect| >= node_threshold and |weight| >=
        edge_threshold between kept nodes. Edges exist only for nodes kept at build time."""
        nt = self.attrs["node_threshold"] if node_threshold is None else node_threshold
        et = self.attrs["edge_threshold"] if edge_threshold is None else edge_threshold
        keep = np.abs(self["effect"]) >= nt
        src, dst, w = self["edge_src"], self["edge_dst"], self["edge_weight"]
        edges = np.nonzero(keep[src] & keep[dst] & (np.abs(w) >= et))[0] if len(src) else np.zeros(0, dtype=int)
        return np.nonzero(keep)[0], edges

    def circuit(self, node_threshold: float | None = None) -> dict[str, list]:
        """{site: kept feature indices, with "err" for a kept error node}."""
        nodes, _ = self.subgraph(node_threshold, 0.0)
        out: dict[str, list] = {s: [] for s in self.sites}
        for i in nodes:
            f = int(self["feature"][i])
            out[self.sites[int(self["site"][i])]].append("err" if f < 0 else f)
        return out


def find_circuit(
    subject,
    saes: Mapping[str, object],
    clean,
    corrupted,
    metric: Metric,
    *,
    node_threshold: float = 0.1,
    edge_threshold: float = 0.01,
    method: str = "attrib",
    steps: int = 10,
    effects: NodeEffects | None = None,
) -> CircuitGraph:
    """Node effects (``method``), then edges by vector-Jacobian products between the nodes
    of consecutive sites whose |effect| >= ``node_threshold``; edges with |weight| <
    ``edge_threshold`` are dropped. Pass ``effects`` to reuse computed node effects."""
    saes = ordered_saes(subject, saes)
    cb, xb = pair_batches(subject, clean, corrupted)
    if effects is None:
        effects = node_effects(subject, saes, cb, xb, metric, method=method, steps=steps)
    elif effects.attrs["sites"] != list(saes):
        raise WorkbenchError(f"effects were computed for sites {effects.attrs['sites']}, not {list(saes)}")
    eff = effects["effect"]
    corr, _ = _values(subject, xb, saes)
    nodes, lv, logits = spliced_run(subject, cb, saes, leaves=True)
    m = _metric_value(metric, logits, cb)
    grads = {}
    (m.backward(retain_graph=True))
    for site, (df, de) in lv.items():
        grads[site] = (df.grad.detach().clone() if df.grad is not None else torch.zeros_like(df),
                       de.grad.detach().clone() if de.grad is not None else torch.zeros_like(de))
    sites = list(saes)
    offsets = np.cumsum([0] + [saes[s].d_sae + 1 for s in sites])
    n = len(cb)
    src, dst, w = [], [], []
    for i in range(len(sites) - 1):
        u, d = sites[i], sites[i + 1]
        up_ids = [j for j in range(saes[u].d_sae + 1) if abs(eff[offsets[i] + j]) >= node_threshold]
        down_ids = [j for j in range(saes[d].d_sae + 1) if abs(eff[offsets[i + 1] + j]) >= node_threshold]
        if not up_ids or not down_ids:
            continue
        fu, eu = nodes[u]
        du_f = (corr[u][0] - fu.detach())
        du_e = (corr[u][1] - eu.detach())
        fd, ed = nodes[d]
        gfd, ged = grads[d]
        for jd in down_ids:
            if jd < saes[d].d_sae:
                target = (gfd[..., jd] * fd[..., jd]).sum()
            else:
                target = (ged * ed).sum()
            if not target.requires_grad:
                continue
            g_f, g_e = torch.autograd.grad(target, lv[u], retain_graph=True, allow_unused=True)
            for ju in up_ids:
                if ju < saes[u].d_sae:
                    val = 0.0 if g_f is None else float((g_f[..., ju] * du_f[..., ju]).sum())
                else:
                    val = 0.0 if g_e is None else float((g_e * du_e).sum())
                if abs(val) >= edge_threshold:
                    src.append(offsets[i] + ju)
                    dst.append(offsets[i + 1] + jd)
                    w.append(val)
    params = {"method": effects.attrs["method"], "node_threshold": node_threshold, "edge_threshold": edge_threshold,
              "sites": sites}
    attrs = {**effects.attrs, "node_threshold": node_threshold, "edge_threshold": edge_threshold}
    return CircuitGraph(
        dims={"node": effects.coord("node"), "edge": list(range(len(w)))},
        data={"effect": (("node",), eff), "site": (("node",), effects["site"]), "feature": (("node",), effects["feature"]),
              "edge_src": (("edge",), np.asarray(src, dtype=np.int64)),
              "edge_dst": (("edge",), np.asarray(dst, dtype=np.int64)),
              "edge_weight": (("edge",), np.asarray(w, dtype=np.float64))},
        attrs=attrs, provenance=provenance(subject, params=params),
    )


# ---------------------------------------------------------------------- faithfulness


@torch.no_grad()
def feature_means(subject, saes: Mapping[str, object], prompts, *, keep_first: bool = True) -> dict[str, tuple]:
    """Mean of each feature and of each site's error vector over the real tokens of
    ``prompts`` (position 0 left out when ``keep_first``): the values mean-ablation uses."""
    saes = ordered_saes(subject, saes)
    batch = subject.as_batch(_inputs(prompts))
    nodes, _ = _values(subject, batch, saes)
    mask = batch.attention_mask.bool().clone()
    if keep_first:
        mask[:, 0] = False
    return {s: (f[mask].mean(0), e[mask].mean(0)) for s, (f, e) in nodes.items()}


def _keep_masks(saes, circuit: Mapping[str, Sequence]) -> dict[str, tuple[torch.Tensor, bool]]:
    out = {}
    for site, sae in saes.items():
        chosen = circuit.get(site, [])
        feats = [j for j in chosen if j != "err"]
        bad = [j for j in feats if not 0 <= int(j) < sae.d_sae]
        if bad:
            raise WorkbenchError(f"features {bad} out of range for the SAE at {site} (0..{sae.d_sae - 1})")
        keep = torch.zeros(sae.d_sae, dtype=torch.bool)
        keep[[int(j) for j in feats]] = True
        out[site] = (keep, "err" in chosen)
    unknown = [s for s in circuit if s not in saes]
    if unknown:
        raise one_of("circuit site", unknown[0], list(saes))
    return out


@torch.no_grad()
def ablated_metric(subject, saes, batch, metric: Metric, circuit: Mapping[str, Sequence], means, *,
                   complement: bool = False, keep_first: bool = True) -> float:
    """Metric with every node outside ``circuit`` (inside it, when ``complement``) set to its
    mean. ``circuit`` maps sites to feature indices and "err"."""
    keeps = _keep_masks(saes, circuit)

    def editor(site):
        keep_f, keep_e = keeps[site]
        mf, me = means[site]

        def edit(f, e):
            kf = keep_f.to(f.device)
            ke = keep_e
            if complement:
                kf, ke = ~kf, not ke
            pos = torch.ones(f.shape[:2], dtype=torch.bool, device=f.device)
            if keep_first:
                pos[:, 0] = False  # position 0 is never ablated
            f2 = torch.where(kf | ~pos[..., None], f, mf.to(f.dtype))
            e2 = e if ke else torch.where(pos[..., None], me.to(e.dtype).expand_as(e), e)
            return f2, e2

        return edit

    _, _, logits = spliced_run(subject, batch, saes, edit={s: editor(s) for s in saes})
    return float(_metric_value(metric, logits, batch))


@register("faithfulness")
class Faithfulness(Result):
    """Faithfulness and completeness of circuits of growing size (dimension ``threshold``)."""


def faithfulness(
    subject,
    saes: Mapping[str, object],
    clean,
    metric: Metric,
    effects: NodeEffects,
    *,
    thresholds: Sequence[float] | None = None,
    means=None,
    keep_first: bool = True,
) -> Faithfulness:
    """For each node threshold: the circuit of nodes with |effect| >= threshold, its size,
    its faithfulness ``(m(C) - m(empty)) / (m(M) - m(empty))`` with everything outside C
    mean-ablated, and the faithfulness of its complement (``completeness``: near 0 when
    the circuit holds all that matters)."""
    saes = ordered_saes(subject, saes)
    batch = subject.as_batch(_inputs(clean))
    if means is None:
        means = feature_means(subject, saes, batch, keep_first=keep_first)
    sites = effects.attrs["sites"]
    if sites != list(saes):
        raise WorkbenchError(f"effects were computed for sites {sites}, not {list(saes)}")
    eff = np.abs(effects["effect"])
    if thresholds is None:
        positive = np.sort(eff[eff > 0])[::-1]
        picks = np.unique(np.geomspace(1, max(1, len(positive)), 12).astype(int)) - 1 if len(positive) else []
        thresholds = [float(positive[i]) for i in picks] + [0.0]
    _, _, logits = spliced_run(subject, batch, saes)
    m_full = float(_metric_value(metric, logits, batch))
    m_empty = ablated_metric(subject, saes, batch, metric, {}, means, keep_first=keep_first)
    gap = m_full - m_empty
    rows = {"size": [], "metric": [], "faithfulness": [], "complement_metric": [], "completeness": []}
    for t in thresholds:
        keep = eff >= t if t > 0 else np.ones_like(eff, dtype=bool)
        circuit: dict[str, list] = {s: [] for s in sites}
        for i in np.nonzero(keep)[0]:
            f = int(effects["feature"][i])
            circuit[sites[int(effects["site"][i])]].append("err" if f < 0 else f)
        mc = ablated_metric(subject, saes, batch, metric, circuit, means, keep_first=keep_first)
        mcc = ablated_metric(subject, saes, batch, metric, circuit, means, complement=True, keep_first=keep_first)
        rows["size"].append(int(keep.sum()))
        rows["metric"].append(mc)
        rows["faithfulness"].append((mc - m_empty) / gap if gap else float("nan"))
        rows["complement_metric"].append(mcc)
        rows["completeness"].append((mcc - m_empty) / gap if gap else float("nan"))
    params = {"thresholds": list(thresholds), "sites": sites}
    return Faithfulness(
        dims={"threshold": [float(t) for t in thresholds]},
        data={k: (("threshold",), np.asarray(v, dtype=np.float64)) for k, v in rows.items()},
        attrs={"metric_full": m_full, "metric_empty": m_empty, "sites": sites},
        provenance=provenance(subject, params=params),
    )
