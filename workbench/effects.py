"""Effects of interventions on nodes: one engine for every lens.

A *node* is one part of a site's activation:

- a head of ``z.L`` (node ``z.L/h``), from :class:`Heads`;
- an SAE feature at a site (``site/j``) or the site's SAE error term (``site/err``),
  from :class:`Features`: the dictionary is spliced in as ``x = decode(f) + err``;
- a neuron (one coordinate) of a [batch, pos, dim] site (``site/i``), from :class:`Neurons`.

A node's *effect* on a metric ``m(logits, batch) -> [batch]`` is the change in the batch
mean of ``m`` when the node takes its ``replacement`` value at the intervened positions
(every real token, or ``positions="last"`` / a boolean mask [batch, pos]; position 0 left
alone with ``skip_first``):

- ``"zero"``;
- ``"mean"``: the node's mean over the real tokens of ``reference`` prompts (default the
  prompts themselves; position 0 left out with ``skip_first``);
- ``"resample"``: its value on another prompt of the batch (a fixed derangement drawn
  with ``seed``), position by position: the prompts must have equal lengths;
- ``"corrupted"``: its value on the ``corrupted`` prompts, position by position (they
  must align token for token with the prompts);
- explicit values ``{site: tensor}`` (a tuple of tensors for an SAE site: features and
  error) broadcastable to the node values [batch, pos, ...] of that site.

Methods:

- ``"exact"``: activation patching. The batch is repeated once per node and copy k has
  node k replaced (as many copies per forward as fit in ``max_bytes``); nodes whose value
  does not change are 0 without a forward;
- ``"attribution"``: attribution patching, ``(r - v) . dm/dv`` at the clean run, one
  forward and one backward pass for every node at once;
- ``"ig"``: integrated gradients along ``v -> r``: each site's nodes move together and
  the gradient is averaged at ``ig_steps`` midpoints of the straight path (the points
  run as copies of the batch too). Exact for a site whose downstream is linear, and a
  site's effects add up to the effect of replacing the whole site.

Effects are summed over positions and averaged over prompts. :class:`Patching` holds the
prepared state (the nodes bound to a subject, the replacement values) for callers that
need more than one answer; :func:`effects` is the one-call form.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch

from workbench.errors import WorkbenchError, one_of
from workbench.memory import DEFAULT_BUDGET_BYTES, forward_bytes, rows_per_batch
from workbench.metrics import Metric, resolve_metric, upcast
from workbench.results import Result, provenance, register
from workbench.subject import Batch

METHODS = ("exact", "attribution", "ig")
REPLACEMENTS = ("zero", "mean", "resample", "corrupted")


# ---------------------------------------------------------------------- inputs


def as_inputs(prompts):
    """Prompt columns (a datasets Column, a tuple, a generator) become lists of strings;
    a Batch, tensor, dict, string or list passes through."""
    if isinstance(prompts, (Batch, torch.Tensor, Mapping, str, list)):
        return prompts
    return list(prompts)


def pair_batches(subject, clean, corrupted) -> tuple[Batch, Batch]:
    """Tokenize clean and corrupted prompts; they must align token for token."""
    c, x = subject.as_batch(as_inputs(clean)), subject.as_batch(as_inputs(corrupted))
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


def derangement(n: int, seed: int) -> torch.Tensor:
    """A permutation of ``range(n)`` that moves every element (drawn with ``seed``)."""
    if n < 2:
        raise WorkbenchError("resample replacement needs at least two prompts to draw from")
    g = torch.Generator().manual_seed(seed)
    while True:
        perm = torch.randperm(n, generator=g)
        if not (perm == torch.arange(n)).any():
            return perm


# ---------------------------------------------------------------------- nodes


class SiteNodes:
    """The nodes of one site. ``split(x)`` gives the node values (a tuple of parts, each
    [batch, pos, ...]) of the site activation ``x``; ``merge(x, parts)`` rebuilds the
    activation from (edited) parts; ``table`` marks, per part, which entries belong to
    each node (bool [node, ...], broadcastable to a part's trailing shape)."""

    site: str
    names: list[str]
    columns: dict[str, np.ndarray]  # layer, head, feature, neuron per node (-1: not that kind)
    table: tuple[torch.Tensor, ...]
    trailing: tuple[tuple[int, ...], ...]  # each part's shape after [batch, pos]

    def __len__(self) -> int:
        return len(self.names)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def merge(self, x: torch.Tensor, parts: Sequence[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def width(self) -> int:
        """Numbers per token across the parts (for memory estimates)."""
        raise NotImplementedError

    def replaced(self, x, v, r, masks, pos) -> torch.Tensor:
        """``x`` with the entries ``masks`` ([k, ...] per part) at positions ``pos`` [b, p]
        set to ``r``: [k * b, ...]. ``x`` and the parts ``v`` are [1 or k, b, ...]."""
        k = masks[0].shape[0]
        new = []
        for vp, rp, m in zip(v, r, masks):
            m = m.reshape(k, 1, 1, *m.shape[1:]) & pos.reshape(1, *pos.shape, *[1] * (m.ndim - 1))
            new.append(torch.where(m, rp.to(vp.dtype), vp).flatten(0, 1))
        xs = x.expand(k, *x.shape[1:]).reshape(-1, *x.shape[2:])
        return self.merge(xs, new)

    def single(self, x, v, r, nodes: torch.Tensor, pos) -> torch.Tensor:
        """Copy k of the clean ``x`` [b, ...] with node ``nodes[k]`` replaced: [k * b, ...]."""
        return self.replaced(x[None], tuple(p[None] for p in v), r, tuple(t[nodes] for t in self.table), pos)

    def _columns(self, n: int, **cols) -> dict[str, np.ndarray]:
        out = {k: np.full(n, -1, dtype=np.int64) for k in ("layer", "head", "feature", "neuron")}
        for k, v in cols.items():
            out[k][:] = v
        return out


class _HeadSite(SiteNodes):
    def __init__(self, subject, layer: int, heads: Sequence[int]) -> None:
        self.site, self.heads = f"z.{layer}", list(heads)
        self.names = [f"z.{layer}/{h}" for h in self.heads]
        self.columns = self._columns(len(self.heads), layer=layer, head=self.heads)
        t = torch.zeros(len(self.heads), subject.n_heads, 1, dtype=torch.bool)
        t[torch.arange(len(self.heads)), torch.tensor(self.heads, dtype=torch.long)] = True
        self.table = (t.to(subject.device),)
        self.trailing = ((subject.n_heads, subject.d_head),)
        self._width = subject.n_heads * subject.d_head

    def split(self, x):
        return (x,)

    def merge(self, x, parts):
        return parts[0]

    def width(self):
        return self._width


class _FeatureSite(SiteNodes):
    def __init__(self, subject, site, sae) -> None:
        self.subject, self.site, self.sae = subject, site.name, sae
        F = sae.d_sae
        self.names = [f"{self.site}/{j}" for j in range(F)] + [f"{self.site}/err"]
        self.columns = self._columns(F + 1, layer=-1 if site.layer is None else site.layer,
                                     feature=np.append(np.arange(F), -1))
        dev = sae.W_dec.device
        tf = torch.cat([torch.eye(F, dtype=torch.bool, device=dev), torch.zeros(1, F, dtype=torch.bool, device=dev)])
        te = torch.zeros(F + 1, 1, dtype=torch.bool, device=dev)
        te[F] = True
        self.table = (tf, te)
        self.trailing = ((F,), (sae.W_dec.shape[1],))

    def _flat(self, x):
        from workbench.layout import flat

        return flat(x, self.site)

    def _unflat(self, x):
        from workbench.layout import unflat

        return unflat(x, self.site, self.subject)

    def split(self, x):
        xf = self._flat(x)
        f = self.sae.encode(xf)
        return f, xf - self.sae.decode(f)

    def merge(self, x, parts):
        f, err = parts
        return self._unflat(self.sae.decode(f) + err)

    def width(self):
        return self.sae.d_sae + self.sae.W_dec.shape[1]

    def single(self, x, v, r, nodes, pos):
        # the decoder is linear: replacing feature j adds (r_j - f_j) W_dec[j]; replacing
        # the error term adds (r_err - err)
        (f, err), (rf, re) = v, r
        xf = self._flat(x)
        # Both terms are formed for every copy and weighted by whether its node is a
        # feature (1 or 0), so the host never reads which nodes are features (on a GPU
        # that read would wait for the device); adding an exact 0 leaves a copy unchanged.
        k, F = len(nodes), self.sae.d_sae
        out = xf.expand(k, *xf.shape).clone()
        posf = pos.to(xf.dtype)
        feat = (nodes < F).to(xf.dtype)  # [k]
        js = nodes.clamp(max=F - 1)
        d = (torch.broadcast_to(rf.to(f.dtype), f.shape)[..., js] - f[..., js]) * posf[..., None]  # [b, p, k]
        w = self.sae.W_dec[js].detach().to(xf.dtype) * feat[:, None]  # error copies add 0
        out += d.permute(2, 0, 1)[..., None] * w[:, None, None, :]
        out += ((re.to(err.dtype) - err) * posf[..., None])[None] * (1 - feat).reshape(k, 1, 1, 1)
        return self._unflat(out.flatten(0, 1))


class _NeuronSite(SiteNodes):
    def __init__(self, subject, site, idx: Sequence[int], width: int) -> None:
        self.subject, self.site = subject, site.name
        self.idx = torch.tensor(list(idx), dtype=torch.long, device=subject.device)
        self.names = [f"{self.site}/{i}" for i in idx]
        self.columns = self._columns(len(idx), layer=-1 if site.layer is None else site.layer, neuron=list(idx))
        self.table = (torch.eye(len(idx), dtype=torch.bool, device=subject.device),)
        self.trailing = ((len(idx),),)
        self._width = width

    def split(self, x):
        return (x.reshape(*x.shape[:2], -1)[..., self.idx],)

    def merge(self, x, parts):
        xf = x.reshape(*x.shape[:2], -1).clone()
        xf[..., self.idx] = parts[0].to(xf.dtype)
        return xf.reshape(x.shape)

    def width(self):
        return len(self.idx)


class Nodes:
    """A group of nodes; ``bind(subject)`` gives one :class:`SiteNodes` per site."""

    def bind(self, subject) -> list[SiteNodes]:
        raise NotImplementedError


class Heads(Nodes):
    """Every head (or ``heads``) of ``layers`` (default all): nodes ``z.L/h``."""

    def __init__(self, layers: Sequence[int] | None = None, heads: Sequence[int] | None = None) -> None:
        self.layers, self.heads = layers, heads

    def bind(self, subject):
        layers = range(subject.n_layers) if self.layers is None else self.layers
        heads = range(subject.n_heads) if self.heads is None else self.heads
        for h in heads:
            if not 0 <= int(h) < subject.n_heads:
                raise WorkbenchError(f"head {h} out of range 0..{subject.n_heads - 1}")
        return [_HeadSite(subject, subject.site(f"z.{int(l)}").layer, [int(h) for h in heads]) for l in layers]


class Features(Nodes):
    """The features and the error term of each SAE in ``saes`` ({site: SAE}): nodes
    ``site/j`` and ``site/err``."""

    def __init__(self, saes: Mapping[str, object]) -> None:
        if not saes:
            raise WorkbenchError("no dictionaries given; pass {site: SAE} for at least one site")
        self.saes = saes

    def bind(self, subject):
        from workbench.layout import check_vector_site

        out = []
        for name, sae in self.saes.items():
            s = check_vector_site(subject, name)
            sae.check_subject(subject, s.name)
            sae.eval()
            out.append(_FeatureSite(subject, s, sae))
        return out


class Neurons(Nodes):
    """Coordinates ``idx`` (default all) of a [batch, pos, dim] site (``z`` as heads x
    d_head concatenated): nodes ``site/i``."""

    def __init__(self, site: str, idx: Sequence[int] | None = None) -> None:
        self.site, self.idx = site, idx

    def bind(self, subject):
        from workbench.layout import VECTOR_KINDS, site_width

        s = subject.site(self.site)
        if s.kind not in VECTOR_KINDS:
            raise WorkbenchError(f"site {s.name!r} has no neurons to patch; use one of {', '.join(VECTOR_KINDS)}")
        width = site_width(subject, s.name)
        idx = list(range(width)) if self.idx is None else [int(i) for i in self.idx]
        bad = [i for i in idx if not 0 <= i < width]
        if bad:
            raise WorkbenchError(f"neuron {bad[0]} out of range for {s.name} (0..{width - 1})")
        return [_NeuronSite(subject, s, idx, width)]


def bind(subject, nodes: Nodes | Sequence[Nodes]) -> list[SiteNodes]:
    """The site nodes of one or more groups, in forward order; one group per site."""
    groups = [nodes] if isinstance(nodes, Nodes) else list(nodes)
    if not groups or not all(isinstance(g, Nodes) for g in groups):
        raise WorkbenchError("nodes must be Heads(...), Features(...), Neurons(...) or a list of them")
    sites = [sn for g in groups for sn in g.bind(subject)]
    seen = set()
    for sn in sites:
        if sn.site in seen:
            raise WorkbenchError(f"two node groups at site {sn.site}; give each site's nodes in one group")
        seen.add(sn.site)
    return sorted(sites, key=lambda sn: subject.site(sn.site).order())


def node_means(subject, prompts, nodes: Nodes | Sequence[Nodes], *, skip_first: bool = False) -> dict[str, tuple]:
    """Each site's node values (the parts of ``split``) averaged over the real tokens of
    ``prompts`` (position 0 left out with ``skip_first``), float32: {site: parts}."""
    sites = bind(subject, nodes)
    batch = subject.as_batch(as_inputs(prompts))
    acts = subject.cache(batch, [sn.site for sn in sites])
    mask = batch.attention_mask.bool().clone()
    if skip_first:
        mask[:, 0] = False
    rows = mask.flatten().nonzero()[:, 0]  # the real tokens, read once for every site
    if not len(rows):
        raise WorkbenchError("no tokens to average over (every prompt is one token long and skip_first is set)")
    with torch.no_grad():
        return {sn.site: tuple(p.flatten(0, 1).index_select(0, rows).float().mean(0) for p in sn.split(acts[sn.site]))
                for sn in sites}


# ---------------------------------------------------------------------- the engine


def _positions(batch: Batch, positions, skip_first: bool) -> torch.Tensor:
    real = batch.attention_mask.bool()
    if positions is None or (isinstance(positions, str) and positions == "all"):
        pos = real.clone()
    elif isinstance(positions, str) and positions == "last":
        pos = torch.zeros_like(real)
        pos[torch.arange(len(batch), device=real.device), batch.last] = True
    elif isinstance(positions, torch.Tensor) and positions.shape == real.shape:
        pos = positions.to(real.device).bool() & real
    else:
        raise WorkbenchError(f"positions must be None (every real token), 'last' or a boolean mask of shape "
                             f"{tuple(real.shape)}, got {positions!r}")
    if skip_first:
        pos[:, 0] = False
    return pos


class Patching:
    """Nodes bound to a subject and a batch, with their replacement values prepared once:
    ``exact``, ``attribution`` and ``ig`` give per-node effects, ``patched_metrics`` the
    metric with whole sets of nodes replaced (one batch copy per set), ``patch`` a patch
    dict for :meth:`Subject.logits` that replaces one set."""

    def __init__(
        self,
        subject,
        prompts,
        nodes: Nodes | Sequence[Nodes],
        *,
        replacement: str | Mapping = "zero",
        corrupted=None,
        reference=None,
        positions=None,
        skip_first: bool = False,
        seed: int = 0,
    ) -> None:
        self.subject, self.seed, self.skip_first = subject, seed, skip_first
        self.sites = bind(subject, nodes)
        if isinstance(replacement, Mapping):
            self.replacement = "explicit"
        elif replacement in REPLACEMENTS:
            self.replacement = replacement
        else:
            raise one_of("replacement", replacement, [*REPLACEMENTS, "{site: values}"])
        if self.replacement == "corrupted":
            if corrupted is None:
                raise WorkbenchError("replacement='corrupted' needs the corrupted prompts (corrupted=...)")
            self.batch, self.corrupted = pair_batches(subject, prompts, corrupted)
        else:
            if corrupted is not None:
                raise WorkbenchError(f"corrupted prompts given but replacement is {replacement!r}; "
                                     "use replacement='corrupted'")
            self.batch, self.corrupted = subject.as_batch(as_inputs(prompts)), None
        self.names = [n for sn in self.sites for n in sn.names]
        self.offsets = np.cumsum([0] + [len(sn) for sn in self.sites])
        self.index = {n: i for i, n in enumerate(self.names)}
        self.pos = _positions(self.batch, positions, skip_first)
        self.positions = positions if positions is None or isinstance(positions, str) else "mask"
        self.perm = None
        if self.replacement == "resample":
            lengths = self.batch.attention_mask.sum(-1)
            if not bool((lengths == lengths[0]).all()):
                raise WorkbenchError("resample replacement takes another prompt's value position by position, so "
                                     "prompts must have equal lengths; use templated prompts or replacement='mean'")
            self.perm = derangement(len(self.batch), seed).to(self.batch.input_ids.device)
        self._fixed: dict[str, tuple] = {}
        if self.replacement == "mean":
            self._fixed = node_means(subject, self.batch if reference is None else reference, nodes,
                                     skip_first=skip_first)
        elif self.replacement == "explicit":
            self._fixed = self._explicit(replacement)
        self._clean = None
        self._corr_cache = None
        self._parts: dict[str, tuple] = {}
        self._targets: dict[str, tuple] = {}

    # ------------------------------------------------------------------ values

    def _explicit(self, values: Mapping) -> dict[str, tuple]:
        known = {sn.site: sn for sn in self.sites}
        out = {}
        for name, v in values.items():
            site = self.subject.site(name).name
            if site not in known:
                raise one_of("replacement site", name, list(known))
            out[site] = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        missing = [s for s in known if s not in out]
        if missing:
            raise WorkbenchError(f"explicit replacement values for {list(out)} but nodes at {missing} too; "
                                 "give values for every site")
        return out

    def _cache(self, batch: Batch):
        acts = self.subject.cache(batch, [sn.site for sn in self.sites] + ["logits"])
        return {sn.site: acts[sn.site] for sn in self.sites}, acts["logits"]

    def clean(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """({site: activation}, logits) of the unpatched prompts (computed once)."""
        if self._clean is None:
            self._clean = self._cache(self.batch)
        return self._clean

    def clean_parts(self, sn: SiteNodes) -> tuple:
        """``sn``'s node values on the unpatched prompts (computed once)."""
        if sn.site not in self._parts:
            acts, _ = self.clean()
            with torch.no_grad():
                self._parts[sn.site] = sn.split(acts[sn.site])
        return self._parts[sn.site]

    def target(self, sn: SiteNodes) -> tuple:
        """The replacement values of ``sn``'s parts (broadcastable to [batch, pos, ...])."""
        if sn.site in self._targets:
            return self._targets[sn.site]
        if self.replacement == "zero":
            out = tuple(torch.zeros((), dtype=self.subject.dtype, device=self.subject.device) for _ in sn.table)
        elif self.replacement == "resample":
            out = tuple(p[self.perm.to(p.device)] for p in self.clean_parts(sn))
        elif self.replacement == "corrupted":
            if self._corr_cache is None:
                self._corr_cache, self._corr_logits = self._cache(self.corrupted)
            with torch.no_grad():
                out = sn.split(self._corr_cache[sn.site])
        else:
            out = tuple(torch.as_tensor(t).to(self.subject.device) for t in self._fixed[sn.site])
            if len(out) != len(sn.trailing):
                raise WorkbenchError(f"{sn.site} takes {len(sn.trailing)} replacement tensors, got {len(out)}")
            for t, shape in zip(out, sn.trailing):
                want = (*self.batch.input_ids.shape, *shape)
                try:
                    ok = torch.broadcast_shapes(t.shape, want) == want
                except RuntimeError:
                    ok = False
                if not ok:
                    raise WorkbenchError(f"replacement of shape {tuple(t.shape)} does not broadcast to the node "
                                         f"values {want} at {sn.site}")
        self._targets[sn.site] = out
        return out

    def base(self, metric: str | Metric = "loss") -> float:
        """The metric's batch mean on the unpatched prompts."""
        metric = resolve_metric(metric)
        _, logits = self.clean()
        return _mean64(metric, logits, self.batch)

    def corrupted_metric(self, metric: str | Metric) -> float:
        """The metric of the corrupted run's logits (against the clean batch)."""
        if self.corrupted is None:
            raise WorkbenchError("no corrupted prompts: replacement is not 'corrupted'")
        if self._corr_cache is None:
            self._corr_cache, self._corr_logits = self._cache(self.corrupted)
        return _mean64(resolve_metric(metric), self._corr_logits, self.batch)

    def _node_sums(self, sn: SiteNodes, prods: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per node of ``sn``: the sum of ``prods`` (per part, [b, p, ...]) over the
        intervened positions and the node's entries (float64)."""
        total = torch.zeros(len(sn), dtype=torch.float64, device=self.pos.device)
        for t, p in zip(sn.table, prods):
            s = (upcast(p) * self.pos.reshape(*self.pos.shape, *[1] * (p.ndim - 2))).sum((0, 1))  # [*trailing]
            total += (t.to(s.device) * s).reshape(len(sn), -1).sum(1).double()
        return total

    def _copy_bytes(self, grad: bool = False) -> int:
        b, p = self.batch.input_ids.shape
        return forward_bytes(self.subject, b, p, width=max(sn.width() for sn in self.sites), grad=grad)

    # ------------------------------------------------------------------ methods

    @torch.no_grad()
    def exact(self, metric: str | Metric = "loss", *, only: Sequence[str] | None = None,
              max_bytes: int = DEFAULT_BUDGET_BYTES) -> np.ndarray:
        """Each node's exact effect [node] (NaN outside ``only``, node names)."""
        metric = resolve_metric(metric)
        acts, logits = self.clean()
        base = _mean64(metric, logits, self.batch)
        eff = np.full(len(self.names), np.nan)
        wanted = np.zeros(len(self.names), dtype=bool)
        if only is None:
            wanted[:] = True
        else:
            wanted[[self._node(n) for n in only]] = True
        todo = []  # (site index, node index within the site)
        moved = torch.cat([self._node_sums(sn, [(rp.to(vp.dtype) - vp).abs()
                                                for vp, rp in zip(self.clean_parts(sn), self.target(sn))])
                           for sn in self.sites]).cpu().numpy()  # one transfer for every node
        for si, sn in enumerate(self.sites):
            for j in range(len(sn)):
                i = self.offsets[si] + j
                if not wanted[i]:
                    continue
                if moved[i] == 0:
                    eff[i] = 0.0
                else:
                    todo.append((si, j))
        chunk = rows_per_batch(self._copy_bytes(), max_bytes, max(1, len(todo)))
        for start in range(0, len(todo), chunk):
            group = todo[start:start + chunk]
            vals = self._run(group, metric, acts)
            for (si, j), val in zip(group, vals):
                eff[self.offsets[si] + j] = val - base
        return eff

    def _run(self, group, metric, acts) -> list[float]:
        """Batch means of the metric with copy k patched at node ``group[k]``."""
        c, n = len(group), len(self.batch)
        patch = {}
        copies = {si: [k for k, (s, _) in enumerate(group) if s == si] for si in range(len(self.sites))}
        # every site's node indices and batch copies in one upload
        idx = _upload([np.array(a, dtype=np.int64) for si in copies for a in ([group[k][1] for k in copies[si]],
                                                                             copies[si])], self.pos.device)
        for si, sn in enumerate(self.sites):
            if not copies[si]:
                continue
            x = acts[sn.site]
            nodes = idx[2 * si].to(sn.table[0].device)
            new = sn.single(x, self.clean_parts(sn), self.target(sn), nodes, self.pos)
            rows = idx[2 * si + 1].to(x.device)

            def fn(z, rows=rows, new=new):
                z = z.clone()
                z.view(c, n, *z.shape[1:])[rows] = new.reshape(len(rows), n, *z.shape[1:]).to(z.dtype)
                return z

            patch[sn.site] = fn
        logits = self.subject.logits(self.batch.repeat(c), patch=patch)
        return _copy_means(metric, logits, self.batch)

    def _node(self, name) -> int:
        if isinstance(name, (int, np.integer)):
            if not 0 <= int(name) < len(self.names):
                raise WorkbenchError(f"node {name} out of range 0..{len(self.names) - 1}")
            return int(name)
        if name not in self.index:
            raise one_of("node", name, self.names)
        return self.index[name]

    def _set_patch(self, sets: Sequence[Sequence], n: int) -> dict:
        """A patch dict for the batch repeated ``len(sets)`` times, copy k replacing ``sets[k]``."""
        c = len(sets)
        idx = [sorted({self._node(x) for x in s}) for s in sets]
        patch = {}
        # per site: the copies that replace some of its nodes, and the (copy row, node) pairs,
        # built on the host and sent in one upload for every site
        plan, arrays = [], []
        for si, sn in enumerate(self.sites):
            lo, hi = self.offsets[si], self.offsets[si + 1]
            copies = [k for k in range(c) if any(lo <= i < hi for i in idx[k])]
            pairs = [(row, i - lo) for row, k in enumerate(copies) for i in idx[k] if lo <= i < hi]
            plan.append(copies)
            arrays += [np.array(copies, dtype=np.int64), np.array(pairs, dtype=np.int64).reshape(-1, 2).T.ravel()]
        sent = _upload(arrays, self.pos.device)
        for si, sn in enumerate(self.sites):
            copies = plan[si]
            if not copies:
                continue
            dev = sn.table[0].device
            rows, pairs = sent[2 * si].to(dev), sent[2 * si + 1].to(dev).reshape(2, -1)
            inc = torch.zeros(len(copies), len(sn), device=dev)
            inc[pairs[0], pairs[1]] = 1
            masks = tuple((inc @ t.reshape(len(sn), -1).float()).reshape(len(copies), *t.shape[1:]) > 0
                          for t in sn.table)
            r = self.target(sn)  # outside the trace: resample and corrupted values need their own runs

            def fn(z, sn=sn, rows=rows, masks=masks, r=r):
                z = z.clone()
                zc = z.view(c, n, *z.shape[1:])
                rows_z = rows.to(z.device)
                xs = zc[rows_z]
                v = tuple(p.reshape(len(rows), n, *p.shape[1:]) for p in sn.split(xs.flatten(0, 1)))
                new = sn.replaced(xs, v, r, tuple(m.to(z.device) for m in masks), self.pos)
                zc[rows_z] = new.reshape(xs.shape).to(z.dtype)
                return z

            patch[sn.site] = fn
        return patch

    def patch(self, nodes: Sequence) -> dict:
        """A patch dict for ``subject.logits(batch, patch=...)`` / ``subject.gradients`` on
        this batch that replaces ``nodes`` (names or indices) together."""
        return self._set_patch([nodes], len(self.batch))

    @torch.no_grad()
    def patched_metrics(self, sets: Sequence[Sequence], metric: str | Metric = "loss", *,
                        max_bytes: int = DEFAULT_BUDGET_BYTES) -> np.ndarray:
        """The metric's batch mean with each set of nodes (names or indices) replaced
        together, one batch copy per set [set]. Values of a resample replacement come from
        the unpatched run."""
        metric = resolve_metric(metric)
        n = len(self.batch)
        out = np.zeros(len(sets))
        chunk = rows_per_batch(self._copy_bytes(), max_bytes, max(1, len(sets)))
        for start in range(0, len(sets), chunk):
            group = list(sets[start:start + chunk])
            patch = self._set_patch(group, n)
            logits = self.subject.logits(self.batch.repeat(len(group)), patch=patch)
            out[start:start + len(group)] = _copy_means(metric, logits, self.batch)
        return out

    def attribution(self, metric: str | Metric = "loss", *,
                    max_bytes: int = DEFAULT_BUDGET_BYTES) -> tuple[np.ndarray, float]:
        """Every node's attribution-patching estimate [node] (one forward and one
        backward pass) and the metric's batch mean.

        When the graph of the whole batch does not fit ``max_bytes``, the prompts run in
        chunks that fit (after one unpatched forward of the batch): a chunk's metric is
        taken on the whole batch's logits, the other prompts' from the unpatched run
        without a graph, so a metric that reads per-prompt answers of the whole batch
        still lines up, and the result is the same whenever each prompt's value depends
        on its own logits (as ``metric(logits, batch) -> [batch]`` means). Every chunk
        holds the whole batch's logits with their log-softmax and gradients: a budget
        below that runs one prompt at a time."""
        metric = resolve_metric(metric)
        n = len(self.batch)
        sites = [sn.site for sn in self.sites]
        need = self._copy_bytes(grad=True)  # the whole batch's graph
        rows = n
        if need > max_bytes:  # chunks, each also holding the whole batch's logits, their log-softmax and
            logits_bytes = 4 * self.batch.input_ids.numel() * self.subject.d_vocab * 4  # the gradients of both
            rows = rows_per_batch(need // n, max_bytes - logits_bytes, n)
        if rows >= n:
            acts, grads, value = self.subject.gradients(self.batch, sites, metric)
        else:
            _, full = self.clean()
            parts = []
            for start in range(0, n, rows):
                sl = slice(start, min(n, start + rows))

                def chunk_metric(logits, _batch, sl=sl):
                    return metric(torch.cat([full[:sl.start], logits, full[sl.stop:]]), self.batch)[sl]

                parts.append(self.subject.gradients(self.batch[sl], sites, chunk_metric))
            acts = {s: torch.cat([part[0][s] for part in parts]) for s in sites}
            grads = {s: torch.cat([part[1][s] for part in parts]) for s in sites}
            value = torch.cat([part[2].reshape(-1) for part in parts])
        out = []
        for sn in self.sites:
            x, g = acts[sn.site], grads[sn.site]
            v, gv = _part_grads(sn, x[None], tuple(p[None] for p in sn.split(x)), g)
            if self.replacement == "resample" and sn.site not in self._parts:
                self._parts[sn.site] = v  # the clean values, from this run
            r = self.target(sn)
            with torch.no_grad():
                out.append(self._node_sums(sn, [(rp.to(vp.dtype) - vp) * gp for vp, rp, gp in zip(v, r, gv)]) / n)
        return torch.cat(out).cpu().numpy(), float(value.to(torch.float64).mean())

    def ig(self, metric: str | Metric = "loss", ig_steps: int = 10, *,
           max_bytes: int = DEFAULT_BUDGET_BYTES) -> np.ndarray:
        """Every node's integrated-gradients effect [node]: per site, the gradient
        averaged at ``ig_steps`` midpoints of the path from the clean to the replaced
        values of all its nodes."""
        if ig_steps < 1:
            raise WorkbenchError(f"ig_steps must be >= 1, got {ig_steps}")
        metric = resolve_metric(metric)
        acts, _ = self.clean()
        batch, n = self.batch, len(self.batch)

        def per_copy(logits, _b):
            return torch.cat([metric(lg, batch) for lg in logits.split(n)])

        alphas = (torch.arange(ig_steps, dtype=torch.float64) + 0.5) / ig_steps  # midpoint rule
        chunk = rows_per_batch(self._copy_bytes(grad=True), max_bytes, ig_steps)
        out = []
        for sn in self.sites:
            x = acts[sn.site]
            with torch.no_grad():
                v, r = self.clean_parts(sn), self.target(sn)
                posb = [self.pos.reshape(*self.pos.shape, *[1] * (p.ndim - 2)) for p in v]
                d = [(rp.to(vp.dtype) - vp) * pb for vp, rp, pb in zip(v, r, posb)]
            total = [torch.zeros_like(vp, dtype=upcast(vp).dtype) for vp in v]
            for start in range(0, ig_steps, chunk):
                a = alphas[start:start + chunk]
                k = len(a)
                with torch.no_grad():
                    pts = tuple(vp[None] + a.to(vp.dtype).reshape(k, *[1] * vp.ndim).to(vp.device) * dp[None]
                                for vp, dp in zip(v, d))
                    point = sn.merge(x[None].expand(k, *x.shape).flatten(0, 1), [p.flatten(0, 1) for p in pts])
                _, grads, _ = self.subject.gradients(batch.repeat(k), [sn.site], per_copy, patch={sn.site: point})
                _, gv = _part_grads(sn, x[None].expand(k, *x.shape), pts, grads[sn.site])
                for t, g in zip(total, gv):
                    t += upcast(g).reshape(k, *t.shape).sum(0)
            with torch.no_grad():
                out.append(self._node_sums(sn, [dp * t / ig_steps for dp, t in zip(d, total)]) / n)
        return torch.cat(out).cpu().numpy()


def _part_grads(sn: SiteNodes, x, parts, g):
    """The gradient with respect to the node values, from the gradient ``g`` with respect
    to the site activation (a vector-Jacobian product through ``merge``). ``x`` and the
    parts are [k, b, ...]; returns (parts, grads) flattened to [k * b, ...]."""
    leaves = [p.flatten(0, 1).detach().clone().requires_grad_(True) for p in parts]
    xs = x.flatten(0, 1).detach()
    with torch.enable_grad():
        out = sn.merge(xs, leaves)
        grads = torch.autograd.grad(out, leaves, grad_outputs=g.to(out.dtype), allow_unused=True)
    return tuple(l.detach() for l in leaves), tuple(torch.zeros_like(l) if gr is None else gr
                                                  for l, gr in zip(leaves, grads))


def _upload(arrays: Sequence[np.ndarray], device) -> list[torch.Tensor]:
    """Host int64 arrays as tensors on ``device``, sent in one copy (a copy per array
    would wait for the device once per array)."""
    if not arrays:
        return []
    flat = torch.from_numpy(np.concatenate([a.ravel() for a in arrays]))
    return list(flat.to(device).split([a.size for a in arrays]))


def _mean64(metric: Metric, logits: torch.Tensor, batch) -> float:
    v = metric(logits, batch)
    return float(v.to(torch.float64).mean())


def _copy_means(metric: Metric, logits: torch.Tensor, batch) -> list[float]:
    """The metric's batch mean on each copy of ``batch`` in ``logits`` [copies * batch,
    ...], read to the host in one transfer (not one per copy). The metric sees one copy
    at a time, so a metric that holds per-prompt data (answer ids) works unchanged."""
    n = len(batch)
    return torch.stack([metric(lg, batch).to(torch.float64).mean() for lg in logits.split(n)]).tolist()


# ---------------------------------------------------------------------- result


@register("node_effects")
class NodeEffects(Result):
    """Effect of each node on a metric.

    Dimension ``node`` (named ``site/index``, ``site/err``); variables ``effect``,
    ``site`` (index into ``attrs['sites']``), ``layer``, ``head``, ``feature`` and
    ``neuron`` (-1 where the node is not of that kind; an error node has feature -1).
    ``attrs['base']``: the metric on the unpatched prompts."""

    def at(self, site: str) -> np.ndarray:
        """Effects of ``site``'s nodes (an SAE site's error node last)."""
        i = self.attrs["sites"].index(site)
        return self["effect"][self["site"] == i]

    def top(self, n: int = 10) -> list[tuple[str, float]]:
        """The ``n`` nodes of largest |effect|, as (name, effect)."""
        order = np.argsort(-np.abs(np.nan_to_num(self["effect"], nan=0.0)), kind="stable")[:n]
        names = self.coord("node")
        return [(names[i], float(self["effect"][i])) for i in order]


def effects_result(subject, pt: Patching, effect: np.ndarray, attrs: dict) -> NodeEffects:
    """A :class:`NodeEffects` over ``pt``'s nodes."""
    cols = {k: np.concatenate([sn.columns[k] for sn in pt.sites]) for k in ("layer", "head", "feature", "neuron")}
    site_idx = np.concatenate([np.full(len(sn), i, dtype=np.int64) for i, sn in enumerate(pt.sites)])
    params = {"method": attrs.get("method"), "replacement": pt.replacement, "sites": [sn.site for sn in pt.sites],
              "skip_first": pt.skip_first, "positions": pt.positions, "seed": pt.seed, "n": len(pt.batch)}
    all_attrs = {**params, **attrs}
    return NodeEffects(
        dims={"node": pt.names},
        data={"effect": (("node",), np.asarray(effect, dtype=np.float64)), "site": (("node",), site_idx),
              **{k: (("node",), v) for k, v in cols.items()}},
        attrs=all_attrs, provenance=provenance(subject, seed=pt.seed, params={**params, **attrs}),
    )


def effects(
    subject,
    prompts,
    nodes: Nodes | Sequence[Nodes],
    metric: str | Metric = "loss",
    *,
    method: str = "exact",
    replacement: str | Mapping = "zero",
    corrupted=None,
    reference=None,
    positions=None,
    skip_first: bool = False,
    ig_steps: int = 10,
    only: Sequence[str] | None = None,
    seed: int = 0,
    max_bytes: int = DEFAULT_BUDGET_BYTES,
) -> NodeEffects:
    """Effect of replacing each node on the batch mean of ``metric`` (see the module
    docstring): ``method`` ``"exact"`` | ``"attribution"`` | ``"ig"`` (``ig_steps``
    points); ``only`` (node names) limits the exact method to some nodes, the rest NaN.
    ``attrs`` hold ``base`` (the unpatched metric) and, for the corrupted replacement,
    ``metric_corrupted``."""
    if method not in METHODS:
        raise one_of("method", method, METHODS)
    if ig_steps < 1:
        raise WorkbenchError(f"ig_steps must be >= 1, got {ig_steps}")
    metric = resolve_metric(metric)
    pt = Patching(subject, prompts, nodes, replacement=replacement, corrupted=corrupted, reference=reference,
                  positions=positions, skip_first=skip_first, seed=seed)
    attrs: dict = {"method": method}
    if method == "exact":
        eff = pt.exact(metric, only=only, max_bytes=max_bytes)
        attrs["base"] = pt.base(metric)
    elif method == "attribution":
        eff, attrs["base"] = pt.attribution(metric, max_bytes=max_bytes)
    else:
        eff = pt.ig(metric, ig_steps, max_bytes=max_bytes)
        attrs["base"] = pt.base(metric)
        attrs["ig_steps"] = ig_steps
    if pt.replacement == "corrupted":
        attrs["metric_corrupted"] = pt.corrupted_metric(metric)
    return effects_result(subject, pt, eff, attrs)


__all__ = [
    "METHODS", "REPLACEMENTS", "Features", "Heads", "NodeEffects", "Nodes", "Neurons", "Patching", "SiteNodes",
    "as_inputs", "bind", "derangement", "effects", "effects_result", "node_means", "pair_batches",
]
