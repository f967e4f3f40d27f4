"""The task-relatedness atlas: one task suite through all four lenses, checked against
what happens when tasks are merged or trained together.

For every pair of tasks (28 pairs for the 8 word tasks) it measures

**ground truth** (each with a bootstrap interval over held-out queries):

- ``merge_ta`` / ``merge_ties``: the pair's task vectors merged (task arithmetic, TIES at
  ``density``), the scale ``lam`` tuned per pair on training queries; the mean over the
  two tasks of held-out accuracy relative to each task's own fine-tuned model;
- ``cotrain``: both tasks fine-tuned together (alternating batches, starting with the
  task first in alphabetical order, the same number of steps on each task as alone)
  against each alone; the mean over the two tasks of the
  held-out accuracy gain (``cotrain_directed[a, b]`` is what training with b does to a);

**relatedness from every lens** (higher = more shared), overall and per block
(``embed``, ``layer.L``, ``final_norm``, ``unembed``; NaN where a measure has no
per-block form):

- attention heads: ``heads_ie`` (cosine of the function-vector indirect effects of every
  head, per layer too) and ``heads_top`` (Jaccard overlap of the ``top_k`` heads);
- weight space: ``weight_cosine`` (task-vector cosine, per block) and
  ``weight_sign`` (1 - the rate of opposite signs where both vectors move);
- activation space: ``icl_cosine`` (in-context task vectors, per layer; overall on the
  concatenation) and ``fv_cosine`` (function vectors of the top heads);
- feature circuits: ``feature_overlap``: weighted Jaccard ``sum min / sum max`` of the
  absolute node effects (SAE features and the error node of every site, so what the
  dictionary misses counts too) of each task's clean-versus-shuffled-labels circuit;
- gradients: ``grad_cosine`` (per-task gradient cosine at the base model, per block) and
  ``tag_affinity`` (TAG lookahead affinity, symmetrised).

``task_atlas`` returns all of it as one :class:`TaskAtlas` (dims measure, task, task_b,
block). :meth:`TaskAtlas.agreement` gives the Spearman of every lens measure against
every ground truth over pairs, with bootstrap intervals over pairs, and between lenses;
:func:`recommend_groups` splits tasks into groups from any measure and scores the split
against the measured ground truth, beside random splits and the exhaustive best.

The work is cached stage by stage in ``cache_dir`` (results and fine-tuned weights as
safetensors), so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import itertools
import os
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from workbench.blocks import block_order, layer_block
from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register
from workbench.stats import bootstrap_spearman, cosine, spearman

TRUTHS = ("merge_ta", "merge_ties", "cotrain")
LENSES = {
    "heads_ie": "attention heads", "heads_top": "attention heads", "weight_cosine": "weight space",
    "weight_sign": "weight space", "icl_cosine": "activation space", "fv_cosine": "activation space",
    "feature_overlap": "feature circuits", "grad_cosine": "gradients", "tag_affinity": "gradients",
}
DEFAULT_TASKS = ("antonym", "capitalize", "country_capital", "next_letter", "present_past", "singular_plural",
                 "lowercase", "first_letter")


@dataclass
class AtlasConfig:
    """Budgets shared by every pair (the same seeds and budgets for all of them)."""

    steps: int = 3  # fine-tuning steps per task (alone); co-training takes as many on each
    lr: float = 1e-4
    batch_size: int = 16
    seeds: tuple[int, ...] = (0, 1)
    n_eval: int = 64  # held-out queries per task (at most; some tasks hold fewer test pairs)
    lams: tuple[float, ...] = (0.5, 0.75, 1.0, 1.25)
    density: float = 0.2
    n_demos: int = 4
    n_prompts: int = 32  # in-context prompts per task for the activation and head lenses
    top_k: int = 2  # heads kept per task for the overlap (tasklm has 8 heads in all)
    sae_sites: tuple[str, ...] = ("resid_post.0", "mlp_out.1")
    d_sae: int = 256
    sae_k: int = 8
    sae_steps: int = 600
    tag_lr: float = 1e-3
    n_boot: int = 500


def _pairs(tasks: Sequence[str]) -> list[tuple[int, int]]:
    return list(itertools.combinations(range(len(tasks)), 2))


def _boot_ci(fn: Callable[[np.random.Generator | None], float], n_boot: int, seed: int) -> tuple[float, float, float]:
    """Point estimate and 95% percentile interval of ``fn`` (fn(None) = the estimate)."""
    rng = np.random.default_rng(seed)
    draws = np.array([fn(rng) for _ in range(n_boot)])
    draws = draws[np.isfinite(draws)]
    lo, hi = (np.percentile(draws, [2.5, 97.5]) if len(draws) else (np.nan, np.nan))
    return fn(None), float(lo), float(hi)


# ---------------------------------------------------------------------- the cache


class StageCache:
    """Stage results in a folder (or in memory when there is none)."""

    def __init__(self, folder: str | os.PathLike | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, object] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def result(self, name: str, make: Callable[[], Result]) -> Result:
        if name in self.memory:
            return self.memory[name]
        path = self.folder / f"{name}.safetensors" if self.folder is not None else None
        if path is not None and path.exists():
            res = Result.load(path)
        else:
            res = make()
            if path is not None:
                res.save(path)
        self.memory[name] = res
        return res

    def weights(self, name: str, make: Callable[[], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        from workbench.safetensors_io import read_file, write_file

        path = self.folder / f"{name}.safetensors" if self.folder is not None else None
        if path is not None and path.exists():
            return read_file(path)[0]
        sd = make()
        if path is not None:
            write_file({k: v.contiguous() for k, v in sd.items()}, path, overwrite=True)
        return sd


# ---------------------------------------------------------------------- ground truth


@register("atlas_ground_truth")
class GroundTruth(Result):
    """Per-pair ground truth with intervals: ``value``, ``low``, ``high`` [truth, task,
    task_b]; ``cotrain_directed`` [task, task_b] (what co-training with task_b does to
    task's accuracy); the tuned merge scales ``lam_ta`` / ``lam_ties``."""


def ground_truth(subject, tasks: Sequence[str], cfg: AtlasConfig, cache: StageCache, *, progress: bool = True) -> GroundTruth:
    """Fine-tune every task alone and every pair together (each seed), merge every pair;
    per-prompt correctness on held-out queries gives every number its interval (prompts
    resampled within each task, the same draw for every seed)."""
    from workbench.taskvec.finetune import MergeEvaluator, finetune

    tasks = list(tasks)
    T, S = len(tasks), len(cfg.seeds)
    pairs = _pairs(tasks)
    bar = _bar(progress, S * (T + len(pairs)), "atlas: fine-tuning")
    n_val = 32

    def tune(ev_val, names, method):
        best, best_lam = -np.inf, cfg.lams[0]
        for lam in cfg.lams:
            acc = ev_val.accuracy(method, [1.0] * len(names), lam=lam, **_method_kwargs(method, cfg))
            score = float(np.mean([acc[t] for t in names]))
            if score > best:
                best, best_lam = score, lam
        return best_lam

    # correctness [seed, prompt] per task (alone) and per ordered pair (x scored, y partner)
    alone_c: dict[int, list] = {a: [] for a in range(T)}
    merge_c = {m: {} for m in ("merge_ta", "merge_ties")}
    pair_c: dict[tuple[int, int], list] = {}
    lams = {m: np.zeros((T, T, S)) for m in merge_c}
    for si, seed in enumerate(cfg.seeds):
        alone = {}
        for t in tasks:
            alone[t] = cache.weights(f"alone-{t}-s{seed}", lambda t=t: finetune(
                subject, t, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed))
            bar.update(1)
        ev = MergeEvaluator(subject, alone, tasks=tasks, n=cfg.n_eval, split="test", seed=0)
        for ti, t in enumerate(tasks):
            alone_c[ti].append(ev.correct_of(alone[t])[t])
        for a, b in pairs:
            ta, tb = tasks[a], tasks[b]
            two = {ta: alone[ta], tb: alone[tb]}
            pair_ev = MergeEvaluator(subject, two, tasks=[ta, tb], n=cfg.n_eval, split="test", seed=0)
            val_ev = MergeEvaluator(subject, two, tasks=[ta, tb], n=n_val, split="train", seed=0)
            for m, method in (("merge_ta", "task_arithmetic"), ("merge_ties", "ties")):
                lam = tune(val_ev, [ta, tb], method)
                lams[m][a, b, si] = lams[m][b, a, si] = lam
                got = pair_ev.correct_of(pair_ev.merged(method, [1.0, 1.0], lam=lam, **_method_kwargs(method, cfg)))
                merge_c[m].setdefault((a, b), []).append(got[ta])
                merge_c[m].setdefault((b, a), []).append(got[tb])
            first, second = sorted((ta, tb))  # batches alternate from the first name: one order for every task list
            both = cache.weights(f"pair-{first}-{second}-s{seed}", lambda f=first, s=second: finetune(
                subject, [f, s], steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed))
            got = pair_ev.correct_of(both)
            pair_c.setdefault((a, b), []).append(got[ta])
            pair_c.setdefault((b, a), []).append(got[tb])
            bar.update(1)
    bar.close()
    alone_a = {a: np.stack(v) for a, v in alone_c.items()}  # [S, n_a]
    merge_a = {m: {k: np.stack(v) for k, v in d.items()} for m, d in merge_c.items()}
    pair_a = {k: np.stack(v) for k, v in pair_c.items()}

    value = np.full((len(TRUTHS), T, T), np.nan)
    low, high = value.copy(), value.copy()
    directed = np.full((T, T), np.nan)
    for a, b in pairs:
        for gi, g in enumerate(TRUTHS):
            def stat(rng, a=a, b=b, g=g):
                out = []
                for x, y in ((a, b), (b, a)):
                    idx = None if rng is None else rng.integers(0, alone_a[x].shape[-1], alone_a[x].shape[-1])
                    pick = (lambda arr: arr) if idx is None else (lambda arr: arr[..., idx])
                    base = pick(alone_a[x]).mean()
                    if g == "cotrain":
                        out.append(pick(pair_a[x, y]).mean() - base)
                    else:
                        out.append(pick(merge_a[g][x, y]).mean() / base if base > 0 else np.nan)
                return float(np.mean(out))

            v, lo, hi = _boot_ci(stat, cfg.n_boot, seed=1000 * a + b)
            value[gi, a, b] = value[gi, b, a] = v
            low[gi, a, b] = low[gi, b, a] = lo
            high[gi, a, b] = high[gi, b, a] = hi
        directed[a, b] = pair_a[a, b].mean() - alone_a[a].mean()
        directed[b, a] = pair_a[b, a].mean() - alone_a[b].mean()
    params = {"tasks": tasks, **asdict(cfg)}
    return GroundTruth(
        dims={"truth": list(TRUTHS), "task": tasks, "task_b": tasks},
        data={"value": (("truth", "task", "task_b"), value), "low": (("truth", "task", "task_b"), low),
              "high": (("truth", "task", "task_b"), high),
              "cotrain_directed": (("task", "task_b"), directed),
              "lam_ta": (("task", "task_b"), lams["merge_ta"].mean(-1)),
              "lam_ties": (("task", "task_b"), lams["merge_ties"].mean(-1))},
        attrs={"finetuned_accuracy": {t: float(alone_a[i].mean()) for i, t in enumerate(tasks)},
               "n_eval": {t: int(alone_a[i].shape[-1]) for i, t in enumerate(tasks)}},
        provenance=provenance(subject, seed=cfg.seeds[0], params=params),
    )


def _method_kwargs(method: str, cfg: AtlasConfig) -> dict:
    return {"density": cfg.density} if method == "ties" else {}


def _bar(progress: bool, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not progress)


# ---------------------------------------------------------------------- the lenses


def _sym(m: np.ndarray) -> np.ndarray:
    return (m + np.swapaxes(m, -1, -2)) / 2


def _pairwise(vecs: Sequence[np.ndarray], fn) -> np.ndarray:
    T = len(vecs)
    out = np.full((T, T), np.nan)
    for a in range(T):
        for b in range(T):
            out[a, b] = fn(vecs[a], vecs[b])
    return out


def weighted_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """``sum min(|a|, |b|) / sum max(|a|, |b|)`` (NaN when both are zero)."""
    a, b = np.abs(np.asarray(a, dtype=np.float64)), np.abs(np.asarray(b, dtype=np.float64))
    den = np.maximum(a, b).sum()
    return float(np.minimum(a, b).sum() / den) if den > 0 else float("nan")


def _top_jaccard(a: np.ndarray, b: np.ndarray, k: int) -> float:
    ta, tb = set(np.argsort(-a.ravel())[:k]), set(np.argsort(-b.ravel())[:k])
    return len(ta & tb) / len(ta | tb)


@register("atlas_lenses")
class LensMeasures(Result):
    """Relatedness from every lens: ``value`` [measure, task, task_b] and ``by_block``
    [measure, block, task, task_b]; per-task inputs kept for the pair details:
    ``head_ie`` [task, layer, head], ``node_effect`` [task, node]."""


def lens_measures(subject, tasks: Sequence[str], cfg: AtlasConfig, cache: StageCache, *, progress: bool = True) -> LensMeasures:
    """Every lens's relatedness of every pair, at the base model (and, for weight space,
    the first seed's fine-tuned task vectors)."""
    from workbench.taskvec.activations import function_vector, fv_cosines, icl_task_vectors
    from workbench.taskvec.diagnostics import diagnose
    from workbench.taskvec.vectors import TaskVector

    tasks = list(tasks)
    T, L = len(tasks), subject.n_layers
    blocks = block_order(["embed", "final_norm", "unembed"] + [layer_block(l) for l in range(L)])
    bi = {b: i for i, b in enumerate(blocks)}
    names = list(LENSES)
    value = np.full((len(names), T, T), np.nan)
    by_block = np.full((len(names), len(blocks), T, T), np.nan)
    mi = {m: i for i, m in enumerate(names)}
    bar = _bar(progress, 5, "atlas: lenses")

    # attention heads and function vectors
    fvs = {t: function_vector(subject, t, n_demos=cfg.n_demos, n_prompts=cfg.n_prompts, seed=cfg.seeds[0])
           for t in tasks}
    ie = np.stack([fvs[t]["indirect_effect"] for t in tasks])  # [T, L, H]
    value[mi["heads_ie"]] = _pairwise(list(ie.reshape(T, -1)), cosine)
    value[mi["heads_top"]] = _pairwise(list(ie), lambda a, b: _top_jaccard(a, b, cfg.top_k))
    for l in range(L):
        by_block[mi["heads_ie"], bi[layer_block(l)]] = _pairwise(list(ie[:, l]), cosine)
    value[mi["fv_cosine"]] = fv_cosines(fvs, top_k=cfg.top_k)["fv_cosine"]
    bar.update(1)

    # in-context task vectors
    icl = icl_task_vectors(subject, tasks, n_demos=cfg.n_demos, n_prompts=cfg.n_prompts, mode="add",
                           seed=cfg.seeds[0])
    delta = icl["delta"]  # [T, layer, dim]
    value[mi["icl_cosine"]] = _pairwise(list(delta.reshape(T, -1)), cosine)
    for li, l in enumerate(icl.coord("layer")):
        by_block[mi["icl_cosine"], bi[layer_block(l)]] = _pairwise(list(delta[:, li]), cosine)
    bar.update(1)

    # weight space: the first seed's task vectors
    base = {k: v.detach() for k, v in subject.model.state_dict().items()}
    seed = cfg.seeds[0]
    from workbench.taskvec.finetune import finetune

    tvs = [TaskVector(base, cache.weights(f"alone-{t}-s{seed}", lambda t=t: finetune(
        subject, t, steps=cfg.steps, lr=cfg.lr, batch_size=cfg.batch_size, seed=seed)), name=t) for t in tasks]
    diag = diagnose(tvs, family=subject.family, densities=())
    value[mi["weight_cosine"]] = diag["cosine"]
    value[mi["weight_sign"]] = 1.0 - diag["sign_conflict"]
    for b in diag.coord("block"):
        if b in bi:
            by_block[mi["weight_cosine"], bi[b]] = diag["cosine_by_block"][diag.coord("block").index(b)]
    bar.update(1)

    # gradients at the base model
    grads, tag = task_gradient_relatedness(subject, tasks, n_prompts=cfg.n_prompts, lr=cfg.tag_lr, seed=cfg.seeds[0])
    value[mi["grad_cosine"]] = grads["cosine"]
    for b in grads.coord("block"):
        if b in bi:
            by_block[mi["grad_cosine"], bi[b]] = grads["block_cosine"][grads.coord("block").index(b)]
    value[mi["tag_affinity"]] = _sym(tag)
    bar.update(1)

    # feature circuits
    nodes, node_names, node_site = feature_circuit_effects(subject, tasks, cfg, cache)
    value[mi["feature_overlap"]] = _pairwise(list(nodes), weighted_jaccard)
    from workbench.blocks import site_block

    for s in cfg.sae_sites:
        keep = np.array([ns == s for ns in node_site])
        by_block[mi["feature_overlap"], bi[site_block(s)]] = _pairwise(list(nodes[:, keep]), weighted_jaccard)
    bar.update(1)
    bar.close()

    L_, H = ie.shape[1:]
    params = {"tasks": tasks, **asdict(cfg)}
    return LensMeasures(
        dims={"measure": names, "block": blocks, "task": tasks, "task_b": tasks, "layer": list(range(L_)),
              "head": list(range(H)), "node": node_names},
        data={"value": (("measure", "task", "task_b"), value),
              "by_block": (("measure", "block", "task", "task_b"), by_block),
              "head_ie": (("task", "layer", "head"), ie), "node_effect": (("task", "node"), nodes)},
        attrs={"lens": LENSES}, provenance=provenance(subject, seed=cfg.seeds[0], params=params),
    )


def _zero_shot_loss_batches(subject, tasks, n_prompts, seed):
    from workbench.data import zero_shot_prompts

    out = {}
    for t in tasks:
        ds = zero_shot_prompts(t, n_prompts, split="train", seed=seed, tokenizer=subject.tokenizer)
        b = subject.tokenize(ds["prompt"])
        out[t] = (b, torch.tensor(ds["answer_id"], device=b.input_ids.device))
    return out


def task_gradient_relatedness(subject, tasks: Sequence[str], *, n_prompts: int = 32, lr: float = 1e-3, seed: int = 0):
    """Per-task gradient cosines at the subject (answer cross-entropy on zero-shot
    training prompts), overall and per block, and the TAG lookahead affinity [task, task_b]."""
    from workbench.mtl.gradients import task_gradients
    from workbench.mtl.trainer import lookahead_affinity

    batches = _zero_shot_loss_batches(subject, tasks, n_prompts, seed)
    model = subject.model
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]

    def losses():
        out = []
        for t in tasks:
            b, ans = batches[t]
            logits = model(**b.kwargs()).logits
            rows = torch.arange(len(b), device=logits.device)
            out.append(torch.nn.functional.cross_entropy(logits[rows, b.last.to(logits.device)].float(), ans))
        return out

    with torch.enable_grad():
        tg = task_gradients(dict(zip(tasks, losses())), named, family=subject.family)
    tag = lookahead_affinity(losses, [p for _, p in named], tg.jacobian, lr)
    return tg, tag


def feature_circuit_effects(subject, tasks: Sequence[str], cfg: AtlasConfig, cache: StageCache):
    """Absolute node effects [task, node] (every SAE feature and every site's error node)
    of each task's clean in-context prompts against the same prompts with shuffled
    demonstration labels, on the log-probability of the right answer."""
    from functools import partial

    from workbench.circuits import SAE, collect, node_effects, train_sae
    from workbench.data import DEFAULT_FORMAT, icl_prompts
    from workbench.metrics import answer_logprob

    saes = {}
    train = icl_prompts(list(tasks), cfg.n_demos, 96, seed=cfg.seeds[0] + 7, split="train", tokenizer=subject.tokenizer)
    for site in cfg.sae_sites:
        def make(site=site):
            acts = collect(subject, site, train["prompt"])
            sae = SAE(acts.shape[-1], cfg.d_sae, kind="topk", k=cfg.sae_k, site=site, model=subject.name)
            train_sae(sae, acts, steps=cfg.sae_steps, batch_size=256, lr=2e-3, seed=cfg.seeds[0], progress=False)
            return sae.state_dict()

        state = cache.weights(f"sae-{site}", make)
        sae = SAE(subject.d_model, cfg.d_sae, kind="topk", k=cfg.sae_k, site=site, model=subject.name)
        sae.load_state_dict(state)
        saes[site] = sae
    rows = []
    names = None
    for t in tasks:
        ds = icl_prompts(t, cfg.n_demos, cfg.n_prompts, seed=cfg.seeds[0], split="test", tokenizer=subject.tokenizer)
        rng = random.Random(cfg.seeds[0])
        corrupted = []
        for demos, q in zip(ds["demos"], ds["query"]):
            ys = [y for _, y in demos]
            rng.shuffle(ys)
            corrupted.append(DEFAULT_FORMAT.prompt([(x, y) for (x, _), y in zip(demos, ys)], q))
        metric = partial(answer_logprob, answers=list(ds["answer_id"]))
        eff = node_effects(subject, saes, list(ds["prompt"]), corrupted, metric, method="attribution")
        rows.append(np.abs(eff["effect"]))
        names = eff.coord("node")
    node_site = [n.rsplit("/", 1)[0] for n in names]
    return np.stack(rows), names, node_site


# ---------------------------------------------------------------------- the atlas


@register("task_atlas")
class TaskAtlas(Result):
    """Ground truth and every lens's relatedness for every pair of tasks.

    ``value`` [measure, task, task_b] (ground truths first, then the lens measures),
    ``low`` / ``high`` (ground-truth intervals; NaN for lens measures), ``by_block``
    [measure, block, task, task_b]; ``attrs['kind'][measure]`` is ``"truth"`` or the
    lens's name."""

    @property
    def tasks(self) -> list[str]:
        return self.coord("task")

    @property
    def truths(self) -> list[str]:
        return [m for m in self.coord("measure") if self.attrs["kind"][m] == "truth"]

    @property
    def lens_measures(self) -> list[str]:
        return [m for m in self.coord("measure") if self.attrs["kind"][m] != "truth"]

    def matrix(self, measure: str) -> np.ndarray:
        if measure not in self.coord("measure"):
            raise WorkbenchError(f"no measure {measure!r}; measures: {self.coord('measure')}")
        return self["value"][self.coord("measure").index(measure)]

    def pairs_frame(self):
        """One row per pair (task < task_b) and one column per measure."""
        import pandas as pd

        T = len(self.tasks)
        rows = []
        for a, b in _pairs(self.tasks):
            row = {"task": self.tasks[a], "task_b": self.tasks[b]}
            row.update({m: float(self["value"][i, a, b]) for i, m in enumerate(self.coord("measure"))})
            rows.append(row)
        return pd.DataFrame(rows, columns=["task", "task_b", *self.coord("measure")]) if T else pd.DataFrame()

    def block_frame(self):
        """Tidy per-block frame: task, task_b, block, measure, value (pairs task < task_b)."""
        import pandas as pd

        rows = []
        for i, m in enumerate(self.coord("measure")):
            for j, blk in enumerate(self.coord("block")):
                for a, b in _pairs(self.tasks):
                    v = self["by_block"][i, j, a, b]
                    if np.isfinite(v):
                        rows.append((self.tasks[a], self.tasks[b], blk, m, float(v)))
        return pd.DataFrame(rows, columns=["task", "task_b", "block", "measure", "value"])

    def agreement(self, *, n_boot: int = 1000, seed: int = 0) -> "AtlasAgreement":
        return atlas_agreement(self, n_boot=n_boot, seed=seed)

    def pair_details(self, task: str, task_b: str, *, top_k: int = 4) -> dict:
        """What each lens says of one pair: every measure, the shared top heads and the
        shared top nodes (features and error nodes)."""
        a, b = self.tasks.index(task), self.tasks.index(task_b)
        out = {m: float(self["value"][i, a, b]) for i, m in enumerate(self.coord("measure"))}
        if "head_ie" in self:
            ie = self["head_ie"]
            H = ie.shape[-1]
            top = [set(int(i) for i in np.argsort(-ie[x].ravel())[:top_k]) for x in (a, b)]
            out["shared_heads"] = [(i // H, i % H) for i in sorted(top[0] & top[1])]
        if "node_effect" in self:
            ne, names = self["node_effect"], self.coord("node")
            top = [set(int(i) for i in np.argsort(-ne[x])[: 4 * top_k]) for x in (a, b)]
            out["shared_nodes"] = [names[i] for i in sorted(top[0] & top[1])]
        return out


def combine(truth: GroundTruth, lenses: LensMeasures) -> TaskAtlas:
    """One TaskAtlas from the two stages."""
    tasks = truth.coord("task")
    if lenses.coord("task") != tasks:
        raise WorkbenchError(f"the stages cover different tasks: {tasks} vs {lenses.coord('task')}")
    T = len(tasks)
    blocks = lenses.coord("block")
    measures = list(truth.coord("truth")) + list(lenses.coord("measure"))
    value = np.concatenate([truth["value"], lenses["value"]])
    nan = np.full_like(lenses["value"], np.nan)
    low, high = np.concatenate([truth["low"], nan]), np.concatenate([truth["high"], nan])
    by_block = np.concatenate([np.full((len(TRUTHS), len(blocks), T, T), np.nan), lenses["by_block"]])
    kind = {m: "truth" for m in truth.coord("truth")}
    kind.update({m: lenses.attrs["lens"][m] for m in lenses.coord("measure")})
    return TaskAtlas(
        dims={"measure": measures, "block": blocks, "task": tasks, "task_b": tasks,
              "layer": lenses.coord("layer"), "head": lenses.coord("head"), "node": lenses.coord("node")},
        data={"value": (("measure", "task", "task_b"), value), "low": (("measure", "task", "task_b"), low),
              "high": (("measure", "task", "task_b"), high),
              "by_block": (("measure", "block", "task", "task_b"), by_block),
              "cotrain_directed": (("task", "task_b"), truth["cotrain_directed"]),
              "head_ie": (("task", "layer", "head"), lenses["head_ie"]),
              "node_effect": (("task", "node"), lenses["node_effect"])},
        attrs={"kind": kind, "finetuned_accuracy": truth.attrs["finetuned_accuracy"]},
        provenance={**lenses.provenance, "ground_truth": truth.provenance},
    )


def task_atlas(subject, tasks: Sequence[str] | None = None, *, config: AtlasConfig | None = None,
               cache_dir: str | os.PathLike | None = None, progress: bool = True) -> TaskAtlas:
    """The whole atlas of ``tasks`` (default: the 8 word tasks) on ``subject``; stages
    cached in ``cache_dir`` so an interrupted run resumes."""
    cfg = config or AtlasConfig()
    tasks = list(tasks or DEFAULT_TASKS)
    if len(tasks) < 3:
        raise WorkbenchError(f"an atlas needs at least 3 tasks (pairs to rank), got {tasks}")
    if len(set(tasks)) != len(tasks):
        raise WorkbenchError(f"tasks must be distinct, got {tasks}")
    subject.require_local("task_atlas (it fine-tunes and merges the weights)")
    cache = StageCache(cache_dir)
    tag = "-".join(tasks)
    truth = cache.result(f"truth-{_digest(tag, cfg)}", lambda: ground_truth(subject, tasks, cfg, cache, progress=progress))
    lenses = cache.result(f"lenses-{_digest(tag, cfg)}", lambda: lens_measures(subject, tasks, cfg, cache, progress=progress))
    return combine(truth, lenses)


def _digest(tag: str, cfg: AtlasConfig) -> str:
    from workbench.results import params_hash

    return params_hash({"tasks": tag, **asdict(cfg)})


# ---------------------------------------------------------------------- agreement


@register("atlas_agreement")
class AtlasAgreement(Result):
    """``spearman`` / ``low`` / ``high`` [measure, truth]: each lens measure against each
    ground truth over pairs, with bootstrap intervals over pairs; ``between``
    [measure, measure_b]: Spearman between lens measures."""

    def table(self):
        return self.to_frame(["spearman", "low", "high"])


def atlas_agreement(atlas: TaskAtlas, *, n_boot: int = 1000, seed: int = 0) -> AtlasAgreement:
    pairs = _pairs(atlas.tasks)
    ia, ib = np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])
    lens, truths = atlas.lens_measures, atlas.truths
    vec = {m: atlas.matrix(m)[ia, ib] for m in lens + truths}
    rho = np.full((len(lens), len(truths)), np.nan)
    low, high = rho.copy(), rho.copy()
    for i, m in enumerate(lens):
        for j, g in enumerate(truths):
            rho[i, j], low[i, j], high[i, j] = bootstrap_spearman(vec[m], vec[g], n_boot=n_boot, seed=seed + 31 * i + j)
    between = np.array([[spearman(vec[a], vec[b]) for b in lens] for a in lens])
    return AtlasAgreement(
        dims={"measure": lens, "truth": truths, "measure_b": lens},
        data={"spearman": (("measure", "truth"), rho), "low": (("measure", "truth"), low),
              "high": (("measure", "truth"), high), "between": (("measure", "measure_b"), between)},
        attrs={"n_pairs": len(pairs), "n_boot": n_boot, "kind": {m: atlas.attrs["kind"][m] for m in lens}},
        provenance=provenance(seed=seed, params={"n_boot": n_boot, "tasks": atlas.tasks}),
    )


# ---------------------------------------------------------------------- grouping


def partitions(items: Sequence[int], size: int) -> list[list[tuple[int, ...]]]:
    """Every split of ``items`` into groups of ``size`` (unordered groups)."""
    items = list(items)
    if size < 1 or len(items) % size:
        raise WorkbenchError(f"{len(items)} tasks do not split into groups of {size}")
    if not items:
        return [[]]
    first, rest = items[0], items[1:]
    out = []
    for mates in itertools.combinations(rest, size - 1):
        left = [x for x in rest if x not in mates]
        for tail in partitions(left, size):
            out.append([(first, *mates), *tail])
    return out


def _grouping_value(matrix: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    vals = [matrix[a, b] for g in groups for a, b in itertools.combinations(g, 2)]
    return float(np.mean(vals))


@register("task_grouping")
class Grouping(Result):
    """A recommended split of tasks and how it fares on the measured ground truth:
    ``truth_value`` of every possible split [split], attrs ``recommended`` (groups of task
    names), ``recommended_value``, ``random_mean``, ``best_value``, ``best`` and
    ``percentile`` (share of splits the recommendation beats or ties)."""


def recommend_groups(atlas: TaskAtlas, measure: str, *, truth: str = "cotrain", group_size: int = 2) -> Grouping:
    """Split the tasks into groups of ``group_size`` that maximise the mean within-group
    ``measure`` (exhaustively over every split), then score every split on ``truth``:
    the mean within-group pair ground truth. For groups of two this is exactly the
    measured outcome of merging or co-training each pair; for larger groups it is the
    pairwise approximation TAG also makes."""
    T = len(atlas.tasks)
    splits = partitions(range(T), group_size)
    rel, gt = atlas.matrix(measure), atlas.matrix(truth)
    if atlas.attrs["kind"].get(truth) != "truth":
        raise WorkbenchError(f"{truth!r} is not a ground truth; choose from {atlas.truths}")
    scores = np.array([_grouping_value(rel, s) for s in splits])
    values = np.array([_grouping_value(gt, s) for s in splits])
    pick = int(np.nanargmax(scores))
    best = int(np.nanargmax(values))
    name = lambda s: [[atlas.tasks[i] for i in g] for g in s]  # noqa: E731
    attrs = {
        "measure": measure, "truth": truth, "group_size": group_size, "recommended": name(splits[pick]),
        "recommended_value": float(values[pick]), "random_mean": float(np.nanmean(values)),
        "random_std": float(np.nanstd(values)), "best": name(splits[best]), "best_value": float(values[best]),
        "percentile": float(np.mean(values <= values[pick])),
    }
    return Grouping(dims={"split": list(range(len(splits)))},
                    data={"truth_value": (("split",), values), "measure_value": (("split",), scores)},
                    attrs=attrs, provenance=provenance(params={"measure": measure, "truth": truth,
                                                              "group_size": group_size}))


__all__ = [
    "AtlasAgreement", "AtlasConfig", "DEFAULT_TASKS", "GroundTruth", "Grouping", "LENSES", "LensMeasures", "StageCache",
    "TRUTHS",
    "TaskAtlas", "atlas_agreement", "combine", "feature_circuit_effects", "ground_truth", "lens_measures", "partitions",
    "recommend_groups", "task_atlas", "task_gradient_relatedness", "weighted_jaccard",
]


# ---------------------------------------------------------------------- the shipped atlas


def shipped_path() -> Path:
    """Where the package keeps the atlas of the zoo's tasklm (computed by ``python -m
    workbench.atlas``)."""
    from workbench.zoo import TASKLM_DIR

    return TASKLM_DIR / "atlas.safetensors"


def shipped_atlas() -> TaskAtlas:
    """The atlas of tasklm over the 8 word tasks with the default :class:`AtlasConfig`,
    as shipped (a few minutes of CPU to recompute: ``python -m workbench.atlas``)."""
    path = shipped_path()
    if not path.exists():
        raise WorkbenchError(f"no shipped atlas at {path}; compute it with `python -m workbench.atlas`")
    return Result.load(path)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m workbench.atlas [--cache DIR] [--out PATH]``: recompute the shipped atlas."""
    import argparse

    import workbench

    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--cache", default=None, help="stage cache folder (resumable)")
    ap.add_argument("--out", default=str(shipped_path()))
    args = ap.parse_args(argv)
    subject = workbench.load("tasklm")
    atlas = task_atlas(subject, cache_dir=args.cache)
    atlas.save(args.out)
    print(atlas.agreement().table().to_string())


if __name__ == "__main__":
    main()
