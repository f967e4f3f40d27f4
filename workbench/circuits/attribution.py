"""Sparse feature circuits (Marks et al. 2024): node and edge effects over SAE features
and error nodes, circuit graphs, faithfulness and completeness.

Every dictionary is spliced into its site as ``x = decode(f) + err`` with
``f = encode(x)`` and ``err = x - decode(f)``: the model's output is unchanged, and each
feature and each site's error term becomes a node whose effect on a metric can be
measured (the nodes ``Features(saes)`` of :mod:`workbench.effects`, which computes every
effect here). For a clean / corrupted pair and a metric ``m(logits, batch)`` (on the
clean run), a node ``a``'s indirect effect is the change in ``m`` when ``a`` takes its
corrupted value:

- ``attribution``  attribution patching, ``(a_corr - a_clean) . dm/da`` at the clean
  run: one forward and one backward for every node at once;
- ``ig``      integrated gradients along ``a_clean -> a_corr`` (per site, ``ig_steps``
  points): exact for a site whose downstream is linear, and the effects of a site's
  nodes add up to the effect of corrupting the whole site;
- ``exact``   activation patching, one batch copy per node (the ground truth to check
  the others against).

Effects are summed over positions and averaged over prompts: a node's effect is the change
in the batch-mean metric when it is patched in every prompt. Edges link nodes of
consecutive sites: ``dm/dd . dd/du . (u_corr - u_clean)``, one vector-Jacobian product
per kept downstream node.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from workbench.circuits.buffer import check_vector_site, flat, unflat
from workbench.effects import Features, NodeEffects, Patching, as_inputs, node_means, pair_batches
from workbench.effects import effects as measure_effects
from workbench.errors import WorkbenchError, one_of
from workbench.memory import DEFAULT_BUDGET_BYTES
from workbench.metrics import Metric, mean_metric, resolve_metric
from workbench.results import Result, provenance, register
from workbench.subject import Batch, save

METHODS = ("attribution", "ig", "exact")


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
    if leaves or grad:
        subject.require_local("gradients between SAE nodes (find_circuit's edges)")
    ctx = torch.enable_grad() if (grad or leaves) else torch.no_grad()
    with ctx, subject.trace(batch):
        nodes, lv = {}, {}
        for site, sae in saes.items():
            s = subject.site(site)
            x = subject.read(s)
            xf = flat(x, s)
            f = sae.encode(xf)
            err = xf - sae.decode(f)
            if edit is not None and site in edit:
                f, err = edit[site](f, err)
            if leaves:
                df = torch.zeros_like(f).requires_grad_(True)
                de = torch.zeros_like(err).requires_grad_(True)
                f, err = f + df, err + de
                lv[site] = (df, de)
            # back in the model's dtype (a float32 SAE on a half-precision model)
            subject.write(s, unflat(sae.decode(f) + err, s, subject).to(x.dtype))
            nodes[site] = (f, err)
        logits = subject.read("logits")
        nodes, lv, logits = save(nodes), save(lv), save(logits)
    return nodes, lv, logits


@torch.no_grad()
def node_values(subject, batch, saes):
    """({site: (features, error)} node values, logits) of ``batch`` with the SAEs spliced in."""
    nodes, _, logits = spliced_run(subject, batch, saes)
    return {k: (f.detach(), e.detach()) for k, (f, e) in nodes.items()}, logits


# ---------------------------------------------------------------------- node effects


def node_effects(
    subject,
    saes: Mapping[str, object],
    clean,
    corrupted,
    metric: str | Metric,
    *,
    method: str = "attribution",
    ig_steps: int = 10,
    features: Mapping[str, Sequence[int]] | None = None,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> NodeEffects:
    """Effect on ``metric`` of moving each node from its clean to its corrupted value.

    ``method``: ``"attribution"``, ``"ig"`` (``ig_steps`` points) or ``"exact"`` (one
    batch copy per node; ``features`` limits it to some features per site, the rest
    reported as NaN, and features whose value does not change are 0 without a forward).
    ``attrs``: ``metric_clean`` and ``metric_corrupted`` besides the engine's.
    """
    if method not in METHODS:
        raise one_of("attribution method", method, METHODS)
    if ig_steps < 1:
        raise WorkbenchError(f"ig_steps must be >= 1, got {ig_steps}")
    saes = ordered_saes(subject, saes)
    only = None
    if features is not None:
        only = []
        for site, sae in saes.items():
            wanted = features.get(site, range(sae.d_sae))
            for j in wanted:
                if not 0 <= int(j) < sae.d_sae:
                    raise WorkbenchError(f"feature {j} out of range for the SAE at {site} (0..{sae.d_sae - 1})")
            only += [f"{site}/{int(j)}" for j in wanted] + [f"{site}/err"]
    r = measure_effects(subject, clean, Features(saes), metric, method=method, replacement="corrupted", corrupted=corrupted,
                ig_steps=ig_steps, only=only, max_bytes=max_bytes)
    r.attrs.update({"metric_clean": r.attrs["base"], "widths": [sae.d_sae for sae in saes.values()]})
    return r


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
    metric: str | Metric,
    *,
    node_threshold: float = 0.1,
    edge_threshold: float = 0.01,
    method: str = "attribution",
    ig_steps: int = 10,
    effects: NodeEffects | None = None,
) -> CircuitGraph:
    """Node effects (``method``), then edges by vector-Jacobian products between the nodes
    of consecutive sites whose |effect| >= ``node_threshold``; edges with |weight| <
    ``edge_threshold`` are dropped. Pass ``effects`` to reuse computed node effects."""
    subject.require_local("find_circuit (its edges are gradients between SAE nodes across sites)")
    saes = ordered_saes(subject, saes)
    metric = resolve_metric(metric)
    cb, xb = pair_batches(subject, clean, corrupted)
    if effects is None:
        effects = node_effects(subject, saes, cb, xb, metric, method=method, ig_steps=ig_steps)
    elif effects.attrs["sites"] != list(saes):
        raise WorkbenchError(f"effects were computed for sites {effects.attrs['sites']}, not {list(saes)}")
    eff = effects["effect"]
    corr, _ = node_values(subject, xb, saes)
    nodes, lv, logits = spliced_run(subject, cb, saes, leaves=True)
    m = mean_metric(metric, logits, cb)
    flat_leaves = [t for site in lv for t in lv[site]]
    g = torch.autograd.grad(m, flat_leaves, retain_graph=True, allow_unused=True)
    g = [torch.zeros_like(t) if gi is None else gi.detach() for t, gi in zip(flat_leaves, g)]
    grads = {site: (g[2 * i], g[2 * i + 1]) for i, site in enumerate(lv)}
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
        up_f = [j for j in up_ids if j < saes[u].d_sae]  # upstream features, then (maybe) the error node
        up_err = len(up_f) < len(up_ids)
        idx = torch.tensor(up_f, dtype=torch.long, device=du_f.device)
        pairs, vals = [], []  # the edge weights stay on the device; one read for every edge of the site pair
        for jd in down_ids:
            if jd < saes[d].d_sae:
                target = (gfd[..., jd] * fd[..., jd]).sum()
            else:
                target = (ged * ed).sum()
            if not target.requires_grad:
                continue
            g_f, g_e = torch.autograd.grad(target, lv[u], retain_graph=True, allow_unused=True)
            zero = du_f.new_zeros(())
            # one row per upstream feature: each feature's sum over prompts and positions
            vf = ((g_f[..., idx] * du_f[..., idx]).movedim(-1, 0).flatten(1).sum(1)
                  if g_f is not None else zero.expand(len(up_f)))
            parts = [vf] + ([((g_e * du_e).sum() if g_e is not None else zero)[None]] if up_err else [])
            vals.append(torch.cat(parts))
            pairs.append(jd)
        if vals:
            table = torch.stack(vals).tolist()  # [down, up]
            for jd, row in zip(pairs, table):
                for ju, val in zip(up_ids, row):
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


def feature_means(subject, saes: Mapping[str, object], prompts, *, skip_first: bool = True) -> dict[str, tuple]:
    """Mean of each feature and of each site's error vector over the real tokens of
    ``prompts`` (position 0 left out with ``skip_first``): the values mean-ablation uses."""
    saes = ordered_saes(subject, saes)
    return node_means(subject, prompts, Features(saes), skip_first=skip_first)


def circuit_nodes(saes, circuit: Mapping[str, Sequence], *, complement: bool = False) -> list[str]:
    """Names of the nodes outside ``circuit`` ({site: feature indices and "err"}), or
    inside it when ``complement``."""
    unknown = [s for s in circuit if s not in saes]
    if unknown:
        raise one_of("circuit site", unknown[0], list(saes))
    out = []
    for site, sae in saes.items():
        chosen = circuit.get(site, [])
        feats = [j for j in chosen if j != "err"]
        bad = [j for j in feats if not 0 <= int(j) < sae.d_sae]
        if bad:
            raise WorkbenchError(f"features {bad} out of range for the SAE at {site} (0..{sae.d_sae - 1})")
        keep = np.zeros(sae.d_sae + 1, dtype=bool)
        keep[[int(j) for j in feats]] = True
        keep[sae.d_sae] = "err" in chosen
        pick = keep if complement else ~keep
        out += [f"{site}/{'err' if j == sae.d_sae else j}" for j in np.nonzero(pick)[0]]
    return out


def _mean_patching(subject, saes, batch, means, skip_first: bool) -> Patching:
    return Patching(subject, batch, Features(saes), replacement={s: means[s] for s in saes}, skip_first=skip_first)


@torch.no_grad()
def ablated_metric(subject, saes, batch, metric: str | Metric, circuit: Mapping[str, Sequence], means, *,
                   complement: bool = False, skip_first: bool = True) -> float:
    """Metric with every node outside ``circuit`` (inside it, when ``complement``) set to its
    mean (position 0 never ablated with ``skip_first``). ``circuit`` maps sites to feature
    indices and "err"."""
    saes = ordered_saes(subject, saes)
    ablate = circuit_nodes(saes, circuit, complement=complement)
    pt = _mean_patching(subject, saes, as_inputs(batch), means, skip_first)
    return float(pt.patched_metrics([ablate], resolve_metric(metric))[0])


@register("faithfulness")
class Faithfulness(Result):
    """Faithfulness and completeness of circuits of growing size (dimension ``threshold``)."""


def faithfulness(
    subject,
    saes: Mapping[str, object],
    clean,
    metric: str | Metric,
    effects: NodeEffects,
    *,
    thresholds: Sequence[float] | None = None,
    means=None,
    skip_first: bool = True,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> Faithfulness:
    """For each node threshold: the circuit of nodes with |effect| >= threshold, its size,
    its faithfulness ``(m(C) - m(empty)) / (m(M) - m(empty))`` with everything outside C
    mean-ablated, and the faithfulness of its complement (``completeness``: near 0 when
    the circuit holds all that matters). Every ablated run is one batch copy."""
    saes = ordered_saes(subject, saes)
    metric = resolve_metric(metric)
    batch = subject.as_batch(as_inputs(clean))
    if means is None:
        means = feature_means(subject, saes, batch, skip_first=skip_first)
    sites = effects.attrs["sites"]
    if sites != list(saes):
        raise WorkbenchError(f"effects were computed for sites {sites}, not {list(saes)}")
    eff = np.abs(effects["effect"])
    if thresholds is None:
        positive = np.sort(eff[eff > 0])[::-1]
        picks = np.unique(np.geomspace(1, max(1, len(positive)), 12).astype(int)) - 1 if len(positive) else []
        thresholds = [float(positive[i]) for i in picks] + [0.0]
    circuits = []
    for t in thresholds:
        keep = eff >= t if t > 0 else np.ones_like(eff, dtype=bool)
        circuit: dict[str, list] = {s: [] for s in sites}
        for i in np.nonzero(keep)[0]:
            f = int(effects["feature"][i])
            circuit[sites[int(effects["site"][i])]].append("err" if f < 0 else f)
        circuits.append((int(keep.sum()), circuit))
    pt = _mean_patching(subject, saes, batch, means, skip_first)
    sets = [circuit_nodes(saes, {})]
    for _, circuit in circuits:
        sets += [circuit_nodes(saes, circuit), circuit_nodes(saes, circuit, complement=True)]
    values = pt.patched_metrics(sets, metric, max_bytes=max_bytes)
    m_full, m_empty = pt.base(metric), float(values[0])
    gap = m_full - m_empty
    rows = {"size": [], "metric": [], "faithfulness": [], "complement_metric": [], "completeness": []}
    for i, (size, _) in enumerate(circuits):
        mc, mcc = float(values[1 + 2 * i]), float(values[2 + 2 * i])
        rows["size"].append(size)
        rows["metric"].append(mc)
        rows["faithfulness"].append((mc - m_empty) / gap if gap else float("nan"))
        rows["complement_metric"].append(mcc)
        rows["completeness"].append((mcc - m_empty) / gap if gap else float("nan"))
    params = {"thresholds": list(thresholds), "sites": sites, "skip_first": skip_first}
    return Faithfulness(
        dims={"threshold": [float(t) for t in thresholds]},
        data={k: (("threshold",), np.asarray(v, dtype=np.float64)) for k, v in rows.items()},
        attrs={"metric_full": m_full, "metric_empty": m_empty, "sites": sites},
        provenance=provenance(subject, params=params),
    )
