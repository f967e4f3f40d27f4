"""The task atlas: ground truth, lens measures, agreement and the grouping recommender."""

from __future__ import annotations

import numpy as np
import pytest

from workbench import WorkbenchError
from workbench.atlas import (
    LENSES, TRUTHS, AtlasConfig, GroundTruth, LensMeasures, combine, partitions, recommend_groups, task_atlas,
    weighted_jaccard,
)
from workbench.results import Result

TASKS = ["capitalize", "first_letter", "present_past", "singular_plural"]


def synthetic(tasks=TASKS, seed=0, truth=None):
    """A TaskAtlas from seeded numbers of the right shapes (no model)."""
    rng = np.random.default_rng(seed)
    T, M, B = len(tasks), len(LENSES), 3
    sym = lambda x: (x + np.swapaxes(x, -1, -2)) / 2  # noqa: E731
    value = sym(rng.normal(size=(len(TRUTHS), T, T)))
    if truth is not None:
        value[2] = truth
    gt = GroundTruth(dims={"truth": list(TRUTHS), "task": tasks, "task_b": tasks},
                     data={"value": (("truth", "task", "task_b"), value),
                           "low": (("truth", "task", "task_b"), value - 0.1),
                           "high": (("truth", "task", "task_b"), value + 0.1),
                           "cotrain_directed": (("task", "task_b"), value[2])},
                     attrs={"finetuned_accuracy": {t: 1.0 for t in tasks}})
    lv = sym(rng.normal(size=(M, T, T)))
    lv[list(LENSES).index("grad_cosine")] = value[2]  # one lens predicts co-training exactly
    lens = LensMeasures(
        dims={"measure": list(LENSES), "block": ["embed", "layer.0", "layer.1"][:B], "task": tasks, "task_b": tasks,
              "layer": [0, 1], "head": [0, 1], "node": ["a/0", "a/err"]},
        data={"value": (("measure", "task", "task_b"), lv),
              "by_block": (("measure", "block", "task", "task_b"), sym(rng.normal(size=(M, B, T, T)))),
              "head_ie": (("task", "layer", "head"), rng.normal(size=(T, 2, 2))),
              "node_effect": (("task", "node"), np.abs(rng.normal(size=(T, 2))))},
        attrs={"lens": LENSES})
    return combine(gt, lens)


def test_partitions_count_every_split_once():
    assert len(partitions(range(8), 2)) == 105 and len(partitions(range(8), 4)) == 35
    splits = {frozenset(frozenset(g) for g in s) for s in partitions(range(6), 3)}
    assert len(splits) == 10
    with pytest.raises(WorkbenchError, match="do not split into groups of 3"):
        partitions(range(8), 3)


def test_weighted_jaccard():
    assert weighted_jaccard([1, 0, 2], [1, 0, 2]) == 1.0
    assert weighted_jaccard([1, 0], [0, 1]) == 0.0
    assert weighted_jaccard([-2, 1], [1, 1]) == pytest.approx(2 / 3)
    assert np.isnan(weighted_jaccard([0, 0], [0, 0]))


def test_agreement_finds_the_predictive_lens_and_round_trips(tmp_path):
    atlas = synthetic()
    back = Result.load(atlas.save(tmp_path / "atlas.safetensors"))
    assert back.equals(atlas) and type(back).__name__ == "TaskAtlas"
    ag = back.agreement(n_boot=200, seed=0)
    rho = ag["spearman"][ag.coord("measure").index("grad_cosine"), ag.coord("truth").index("cotrain")]
    assert rho == pytest.approx(1.0)
    assert ag["low"].shape == ag["spearman"].shape and np.all(ag["low"][np.isfinite(ag["low"])] <= 1.0)
    assert len(atlas.pairs_frame()) == 6 and set(atlas.block_frame()["block"]) <= {"embed", "layer.0", "layer.1"}


def test_recommender_against_random_and_exhaustive():
    tasks = [f"t{i}" for i in range(6)]
    truth = np.full((6, 6), -1.0)
    for a, b in ((0, 3), (1, 4), (2, 5)):  # the right pairing
        truth[a, b] = truth[b, a] = 1.0
    atlas = synthetic(tasks, truth=truth)
    g = recommend_groups(atlas, "grad_cosine", truth="cotrain", group_size=2)
    assert sorted(map(sorted, g.attrs["recommended"])) == [["t0", "t3"], ["t1", "t4"], ["t2", "t5"]]
    assert g.attrs["recommended_value"] == g.attrs["best_value"] == 1.0 and g.attrs["percentile"] == 1.0
    assert g.attrs["random_mean"] == pytest.approx(np.mean(g["truth_value"])) and g.attrs["random_mean"] < 0
    with pytest.raises(WorkbenchError, match="not a ground truth"):
        recommend_groups(atlas, "grad_cosine", truth="heads_ie")


def test_pair_details_and_bad_measure():
    atlas = synthetic()
    d = atlas.pair_details("capitalize", "first_letter", top_k=1)
    assert set(TRUTHS) | set(LENSES) <= set(d) and "shared_heads" in d and "shared_nodes" in d
    with pytest.raises(WorkbenchError, match="no measure 'nope'"):
        atlas.matrix("nope")


def test_atlas_refuses_too_few_or_repeated_tasks():
    with pytest.raises(WorkbenchError, match="at least 3 tasks"):
        task_atlas(None, ["antonym", "capitalize"])
    with pytest.raises(WorkbenchError, match="distinct"):
        task_atlas(None, ["antonym", "antonym", "capitalize"])


def test_ground_truth_on_the_zoo_model(tasklm, tmp_path):
    """Real fine-tuning on three tasks: intervals bracket the values, co-training the two
    verb/noun inflection tasks costs nothing while pairing either with first_letter costs
    accuracy, and a rerun from the stage cache gives the same numbers."""
    from workbench.atlas import StageCache, ground_truth

    cfg = AtlasConfig(seeds=(0,), n_boot=100, lams=(1.0,))
    tasks = ["first_letter", "present_past", "singular_plural"]
    gt = ground_truth(tasklm, tasks, cfg, StageCache(tmp_path), progress=False)
    v, lo, hi = gt["value"], gt["low"], gt["high"]
    iu = np.triu_indices(3, 1)
    assert np.all(lo[:, iu[0], iu[1]] <= v[:, iu[0], iu[1]] + 1e-12)
    assert np.all(v[:, iu[0], iu[1]] <= hi[:, iu[0], iu[1]] + 1e-12)
    cot = v[TRUTHS.index("cotrain")]
    assert cot[1, 2] > cot[0, 1] + 0.1, f"present_past+singular_plural {cot[1, 2]:.3f} vs first_letter+present_past {cot[0, 1]:.3f}"
    assert cot[1, 2] > -0.05
    d = gt["cotrain_directed"]
    assert cot[0, 1] == pytest.approx((d[0, 1] + d[1, 0]) / 2)
    again = ground_truth(tasklm, tasks, cfg, StageCache(tmp_path), progress=False)
    assert np.allclose(again["value"], v, equal_nan=True)
