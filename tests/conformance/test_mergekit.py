"""Conformance with mergekit 0.1.5: the workbench's merges are mergekit's merges.

Two levels, on seeded random inputs (tiny tensors at low density, negative weights,
float32 / bfloat16 / float16 / float64):

- tensors: ``workbench.taskvec.merge`` on state dicts against mergekit's own merge
  methods applied to the same tensors (``mergekit.merge_methods.api.merge_tensors``);
- checkpoints: the recipe :func:`~workbench.taskvec.to_mergekit_yaml` writes, run by
  mergekit's Python API (``run_merge``) on small saved Llama checkpoints, offline,
  against ``merge`` on the same folders.

Known, documented differences, and how each is handled here:

- TIES ties: where several magnitudes tie exactly at the trim threshold the workbench
  keeps all of them, mergekit the first ones of its ``argsort``. Random float32 /
  float64 inputs have no such ties (asserted); for float16 / bfloat16 checkpoints the
  deltas lie on a grid, so the entries of tie groups that straddle the threshold are
  excluded from the comparison and counted in the message; one test pins the rule.
- DARE's drop masks are random in both and drawn differently (mergekit: torch's global
  generator, whole tensors; workbench: per-block seeded generators, so a mask does not
  depend on how a tensor is streamed and the interactive evaluator draws the same one).
  At the tensor level mergekit's masks are reproduced by re-seeding torch and drawing
  them exactly as mergekit's ``bernoulli`` does, then handed to the workbench's
  arithmetic (``merge_tensor(..., keeps=...)``): the merges must then agree. At the
  checkpoint level the masks cannot be recovered, so the test checks the defining
  equation instead: every surviving entry equals ``lam * w * d / (1 - p)`` in both, the
  survival rate is 1 - p in both (binomial bounds), and where both keep an entry the
  values agree. mergekit's ``rescale: true`` (L1-norm matching) is not the workbench's
  1/(1-p); the recipe writes ``rescale: false`` and folds 1/(1-p) into ``lambda``.

Every assertion message reports the measured largest absolute difference.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

mergekit = pytest.importorskip("mergekit")

from mergekit.merge_methods.api import merge_tensors  # noqa: E402
from mergekit.sparsify import magnitude  # noqa: E402

from workbench.taskvec import TaskVector, merge, to_mergekit_yaml  # noqa: E402
from workbench.taskvec.checkpoint import Checkpoint  # noqa: E402
from workbench.taskvec.merging import merge_tensor, trim_count  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
SHAPES = [(1,), (2,), (3,), (5,), (7, 11), (64, 33)]
MK = {"task_arithmetic": "task_arithmetic", "ties": "ties", "dare": "dare_linear", "dare_ties": "dare_ties"}


def _work(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _tol(out: torch.Tensor) -> float:
    """Two units in the last place of the output dtype at the output's scale."""
    return 2 * torch.finfo(out.dtype).eps * max(1.0, float(out.float().abs().max()))


def _tied(deltas, density: float) -> torch.Tensor:
    """Entries (flat) where some delta's magnitude ties at its trim threshold with a tie
    group that straddles it: there the two libraries may legitimately keep different
    entries (see the module docstring)."""
    out = torch.zeros(deltas[0].numel(), dtype=torch.bool)
    for d in deltas:
        mag = d.abs().reshape(-1).float()
        n = mag.numel()
        k = trim_count(n, density)
        if 0 < k < n:
            thr = mag.kthvalue(n - k + 1).values
            if int((mag >= thr).sum()) > k:
                out |= mag == thr
    return out


def _inputs(shape, dtype, n_models, seed):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g, dtype=torch.float64).to(dtype)
    fts = [(base.to(torch.float64) + 0.5 * torch.randn(shape, generator=g, dtype=torch.float64)).to(dtype)
           for _ in range(n_models)]
    return base, fts


def _ours(base, fts, method, weights, **kw):
    b = {"w": base}
    return merge(b, [TaskVector(b, {"w": f}, name=f"m{i}") for i, f in enumerate(fts)], method, weights=weights, **kw)["w"]


def _theirs(base, fts, method, weights, *, density=1.0, lam=1.0, normalize=None, p=0.0):
    params = {"weight": list(weights), "lambda": lam}
    if method == "ties":
        params["density"] = [density] * len(fts)
    if method in ("dare", "dare_ties"):
        params.update(density=[1.0 - p] * len(fts), rescale=False, **{"lambda": lam / (1.0 - p)})
    if normalize is not None:
        params["normalize"] = normalize
    return merge_tensors([base, *fts], MK[method], parameters=params, base_index=0, dtype=_work(base.dtype),
                         out_dtype=base.dtype)


# ---------------------------------------------------------------------- tensors


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_task_arithmetic_and_ties_match_mergekit_on_tensors(method, dtype):
    cases = 0
    for si, shape in enumerate(SHAPES):
        for density in ((1.0,) if method == "task_arithmetic" else (0.01, 0.1, 0.3, 0.7, 1.0)):
            for wi, weights in enumerate(([1.0, 1.0, 1.0], [0.7, -1.3, 0.4], [-1.0, -0.5, 2.0], [0.0, 1.0, -1.0])):
                for normalize in (None, True, False):
                    lam = (1.0, 0.6, 1.7)[wi % 3]
                    base, fts = _inputs(shape, dtype, 3, seed=100 * si + wi)
                    ours = _ours(base, fts, method, weights, density=density, lam=lam, normalize=normalize)
                    theirs = _theirs(base, fts, method, weights, density=density, lam=lam, normalize=normalize)
                    assert ours.dtype == theirs.dtype == dtype and ours.shape == theirs.shape
                    work = _work(dtype)
                    tied = _tied([f.to(work) - base.to(work) for f in fts], density) if method == "ties" else None
                    if tied is not None and dtype in (torch.float32, torch.float64):
                        assert not bool(tied.any()), "random float32/float64 deltas should have no ties"
                    keep = ~tied if tied is not None else torch.ones(base.numel(), dtype=torch.bool)
                    diff = (ours.double() - theirs.double()).abs().reshape(-1)[keep]
                    worst = float(diff.max()) if diff.numel() else 0.0
                    assert worst <= _tol(theirs), (
                        f"{method} {dtype} shape {shape} density {density} weights {weights} lam {lam} "
                        f"normalize {normalize}: max |workbench - mergekit| = {worst:.3g} "
                        f"({int((~keep).sum())} tied entries excluded)"
                    )
                    cases += 1
    assert cases >= 24


def test_tiny_tensors_at_low_density_keep_their_largest_entry():
    """density * size < 1: both keep exactly one entry (int() alone would trim all)."""
    for n in (1, 2, 3, 5, 9):
        base, fts = _inputs((n,), torch.float32, 2, seed=n)
        for density in (0.01, 0.1):
            ours = _ours(base, fts, "ties", [1.0, -0.5], density=density)
            theirs = _theirs(base, fts, "ties", [1.0, -0.5], density=density)
            worst = float((ours - theirs).abs().max())
            assert worst == 0.0, f"n={n} density={density}: max |workbench - mergekit| = {worst:.3g}"
            for f in fts:  # each trimmed delta kept one entry, the largest
                d = f - base
                kept = magnitude(d, density)
                assert int((kept != 0).sum()) == 1 and float(kept.abs().max()) == float(d.abs().max())
    assert trim_count(3, 0.2) == 1 and trim_count(3, 0.0) == 0 and trim_count(3, 1.0) == 3


def test_ties_tie_rule_keeps_every_tied_entry_where_mergekit_keeps_k():
    """The one documented difference: magnitudes tied exactly at the threshold."""
    d = torch.tensor([1.0, -1.0, 1.0, 0.5, 2.0, -1.0])
    density = 0.4  # k = 2: |2| and then one of the four |1|
    base = torch.zeros(6)
    ours = _ours(base, [d], "ties", [1.0], density=density)
    theirs = _theirs(base, [d], "ties", [1.0], density=density)
    ours_kept, theirs_kept = set(ours.nonzero().flatten().tolist()), set(theirs.nonzero().flatten().tolist())
    assert ours_kept == {0, 1, 2, 4, 5} and len(theirs_kept) == 2 and theirs_kept <= ours_kept
    assert 4 in theirs_kept  # the largest entry is kept by both
    same = sorted(theirs_kept | ({3}))  # where both agree: the kept-by-both entries and the trimmed 0.5
    worst = float((ours[same] - theirs[same]).abs().max())
    assert worst == 0.0, f"max |workbench - mergekit| off the tie = {worst:.3g}"


def _mergekit_masks(base, fts, p, seed):
    """The keep masks mergekit 0.1.5's DARE draws after ``torch.manual_seed(seed)``: one
    ``torch.bernoulli`` of the delta's shape per model, in model order, in float32 (what
    ``sparsify.bernoulli`` does on the CPU for every dtype but bfloat16)."""
    torch.manual_seed(seed)
    return [torch.bernoulli(torch.full(f.shape, 1.0 - p, dtype=torch.float32)).bool() for f in fts]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_arithmetic_matches_mergekit_given_its_masks(method, dtype):
    for si, shape in enumerate(SHAPES):
        for p, weights, lam, normalize in [(0.5, [1.0, 1.0, 1.0], 1.0, None), (0.9, [0.7, -1.3, 0.4], 0.6, None),
                                           (0.3, [-1.0, -0.5, 2.0], 1.7, True), (0.5, [1.0, -1.0, 0.5], 1.0, False)]:
            base, fts = _inputs(shape, dtype, 3, seed=7 + si)
            torch.manual_seed(1234)
            theirs = _theirs(base, fts, method, weights, p=p, lam=lam, normalize=normalize)
            keeps = _mergekit_masks(base, fts, p, 1234)
            work = _work(dtype)
            ours = merge_tensor(base, [f.to(work) - base.to(work) for f in fts], weights, method=method, p=p, lam=lam,
                                normalize=normalize, keeps=keeps)
            # 1/(1-p) is applied to the deltas here and folded into lambda in the recipe: rounding only;
            # mergekit's bernoulli also rounds float64 deltas through float32 (its CPU work dtype)
            worst = float((ours.double() - theirs.double()).abs().max())
            tol = 4 * _tol(theirs.float() if dtype == torch.float64 else theirs)
            assert worst <= tol, (
                f"{method} {dtype} shape {shape} p {p} weights {weights} lam {lam} normalize {normalize}: "
                f"max |workbench - mergekit| = {worst:.3g}"
            )


# ---------------------------------------------------------------------- checkpoints


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Small Llama checkpoints on disk: a base and three fine-tunes, float32 and bfloat16."""
    from transformers import LlamaConfig, LlamaForCausalLM

    root = tmp_path_factory.mktemp("mergekit")
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=32, tie_word_embeddings=False)
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = LlamaForCausalLM(cfg)
        name = str(dtype).split(".")[-1]
        model.to(dtype).save_pretrained(root / name / "base")
        paths = []
        for i in range(3):
            g = torch.Generator().manual_seed(10 + i)
            state = {k: (v.float() + 0.02 * torch.randn(v.shape, generator=g)).to(dtype)
                     for k, v in model.state_dict().items()}
            ft = LlamaForCausalLM(cfg).to(dtype)
            ft.load_state_dict(state)
            ft.save_pretrained(root / name / f"ft{i}")
            paths.append(str(root / name / f"ft{i}"))
        out[dtype] = (str(root / name / "base"), paths)
    return out


def _run_mergekit(recipe: str, out: Path) -> Checkpoint:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    run_merge(MergeConfiguration.model_validate(yaml.safe_load(recipe)), str(out),
              MergeOptions(copy_tokenizer=False, write_model_card=False, quiet=True, device="cpu", random_seed=0))
    return Checkpoint(str(out))


RECIPES = [
    ("task_arithmetic", dict(weights=[0.5, -1.0, 0.3], lam=0.7), False),
    ("task_arithmetic", dict(lam=1.0), True),  # a combination a - b: one model entry per checkpoint
    ("ties", dict(density=0.2, weights=[1.0, -0.5, 0.8]), False),
    ("ties", dict(density=0.01, weights=[0.3, 0.3, 0.4], lam=1.5), False),
    ("ties", dict(density=0.5, normalize=False), True),  # [a, -b, c]: the sign folds into mergekit's weight
    ("dare_ties", dict(p=0.0, weights=[1.0, -1.0, 0.5]), False),  # nothing dropped: election without normalising
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("method,kw,scaled", RECIPES)
def test_recipes_reproduce_the_merge(checkpoints, tmp_path, dtype, method, kw, scaled):
    base, paths = checkpoints[dtype]
    tvs = [TaskVector(base, p) for p in paths]
    if scaled:
        tvs = [tvs[0] - tvs[1], tvs[2]] if method == "task_arithmetic" else [tvs[0], -tvs[1], tvs[2]]
    out_dtype = "bfloat16" if dtype == torch.bfloat16 else None
    theirs = _run_mergekit(to_mergekit_yaml(base, tvs, method, out_dtype=out_dtype, **kw), tmp_path / "mk")
    ours = merge(base, tvs, method, **kw)
    assert set(theirs.all_keys()) == set(ours)
    excluded = worst = 0
    for key in theirs.all_keys():
        t, o = theirs.get(key), ours[key]
        assert t.dtype == o.dtype == dtype, key
        keep = torch.ones(o.numel(), dtype=torch.bool)
        if method == "ties":
            keep = ~_tied([tv[key] for tv in tvs], kw["density"])
            if dtype == torch.float32:
                assert bool(keep.all()), f"{key}: random float32 deltas should have no ties"
        diff = (o.double() - t.double()).abs().reshape(-1)[keep]
        d = float(diff.max()) if diff.numel() else 0.0
        excluded += int((~keep).sum())
        assert d <= _tol(t), f"{method} {dtype} {key}: max |workbench - mergekit| = {d:.3g}"
        worst = max(worst, d)
    total = sum(v.numel() for v in ours.values())
    assert excluded <= 0.01 * total, f"{excluded} of {total} entries tied at a threshold (max |diff| elsewhere {worst:.3g})"


@pytest.mark.parametrize("method", ["dare", "dare_ties"])
def test_dare_recipe_follows_the_defining_equation(checkpoints, tmp_path, method):
    """Masks cannot be matched through a recipe: check what defines DARE instead."""
    base, paths = checkpoints[torch.float32]
    p, w, lam = 0.6, -0.8, 0.9
    tv = TaskVector(base, paths[0])
    theirs = _run_mergekit(to_mergekit_yaml(base, [tv], method, weights=[w], p=p, lam=lam), tmp_path / "mk")
    ours = merge(base, [tv], method, weights=[w], p=p, lam=lam, seed=3)
    base_ck = Checkpoint(base)
    kept = {"workbench": 0, "mergekit": 0}
    n = worst_def = worst_both = 0
    for key in tv.keys():
        b, d = base_ck.get(key), tv[key]
        full = lam * w * d / (1 - p)  # a surviving entry's change, the same in both
        for name, m in (("workbench", ours[key]), ("mergekit", theirs.get(key))):
            change = m - b
            alive = change != 0
            kept[name] += int(alive.sum())
            err = float((change[alive] - full[alive]).abs().max()) if bool(alive.any()) else 0.0
            worst_def = max(worst_def, err)
            assert err <= _tol(full), f"{name} {key}: surviving entries off lam*w*d/(1-p) by {err:.3g}"
        both = (ours[key] != b) & (theirs.get(key) != b)
        if bool(both.any()):
            worst_both = max(worst_both, float((ours[key][both] - theirs.get(key)[both]).abs().max()))
        n += d.numel()
    assert worst_both <= 1e-6, f"where both keep an entry: max |workbench - mergekit| = {worst_both:.3g}"
    sd = math.sqrt(n * p * (1 - p))
    for name, k in kept.items():
        assert abs(k - n * (1 - p)) <= 5 * sd, (
            f"{name} kept {k} of {n} entries; DARE keeps {n * (1 - p):.0f} +- {sd:.0f} "
            f"(max |diff| from the defining equation {worst_def:.3g})"
        )
