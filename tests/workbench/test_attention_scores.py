"""Head-type scores: exact values on hand-built patterns, every layout family, the zoo's
ground-truth heads, and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from workbench.attention.scores import (
    KINDS,
    bootstrap_mean,
    head_scores,
    score_patterns,
    shuffled_control,
    target_masks,
)
from workbench.errors import WorkbenchError

IDS = torch.tensor([[2, 5, 6, 7, 5, 6, 7]])  # <bos> A B C A B C
N = IDS.shape[1]


def _heads() -> torch.Tensor:
    """Three hand-built heads on IDS: previous-token, induction, uniform causal."""
    prev = torch.zeros(N, N)
    prev[0, 0] = 1
    for q in range(1, N):
        prev[q, q - 1] = 1
    ind = torch.zeros(N, N)
    for q in range(N):
        ind[q, 0] = 1
    for q, k in [(4, 2), (5, 3), (6, 4)]:  # the token after the earlier occurrence
        ind[q] = 0
        ind[q, k] = 1
    uni = torch.tril(torch.ones(N, N))
    uni = uni / uni.sum(-1, keepdim=True)
    return torch.stack([prev, ind, uni])[None]  # [1, 3, q, k]


def _scores(ids=IDS, attn=None, mask=None, kinds=KINDS, pattern=None):
    mask = torch.ones_like(ids) if mask is None else mask
    attn = _heads() if attn is None else attn
    per = score_patterns(attn, target_masks(ids, mask, kinds, pattern))  # [b, kind, head]
    return {k: per[:, i] for i, k in enumerate(kinds)}


def test_every_kind_scores_exactly_on_hand_built_patterns():
    s = _scores()
    uniform_prev = np.mean([1 / (q + 1) for q in range(1, N)])
    expected = {  # head: previous-token, induction, uniform
        "previous_token": [1.0, 1 / 6, uniform_prev],
        "self": [1 / 7, 1 / 7, np.mean([1 / (q + 1) for q in range(N)])],
        "bos": [1 / 6, 3 / 6, uniform_prev],
        "duplicate": [0.0, 0.0, np.mean([1 / 5, 1 / 6, 1 / 7])],
        "induction": [0.0, 1.0, np.mean([1 / 5, 1 / 6, 1 / 7])],
    }
    for kind, want in expected.items():
        assert s[kind][0].tolist() == pytest.approx(want, abs=1e-6), kind


def test_padding_is_ignored_and_prompts_without_targets_give_nan():
    ids = torch.tensor([[2, 5, 5, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 0, 0]])
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0, 0] = 1
    attn[0, 0, 1, 0] = attn[0, 0, 2, 1] = 1
    attn[0, 0, 3:, :] = 0.5  # junk on padded query rows must not count
    s = _scores(ids, attn, mask)
    assert float(s["previous_token"][0, 0]) == 1.0
    assert float(s["duplicate"][0, 0]) == 1.0  # query 2 ("5") on key 1 ("5")
    assert np.isnan(float(s["induction"][0, 0]))  # no key follows an earlier "5" before query 2


def test_user_pattern_scores_attention_mass_on_its_targets():
    def two_back(ids):
        n = len(ids)
        return torch.diag(torch.ones(n - 2), -2)

    attn = torch.zeros(1, 1, N, N)
    for q in range(N):
        attn[0, 0, q, max(0, q - 2)] = 0.75
        attn[0, 0, q, q] += 0.25
    s = _scores(attn=attn, kinds=("pattern",), pattern=two_back)
    assert float(s["pattern"][0, 0]) == pytest.approx(0.75)
    with pytest.raises(WorkbenchError, match="pattern="):
        target_masks(IDS, torch.ones_like(IDS), ["pattern"])


def test_transformer_lens_convention_on_hand_built_patterns():
    # <bos> A A: each query attends only to itself
    ids, attn = torch.tensor([[2, 5, 5]]), torch.eye(3)[None, None]
    tl = _tl_scores(ids, attn)
    # detect_head's induction target holds (2, 2): the token before query 2 is its own token
    assert float(tl["induction"][0, 0]) == pytest.approx(1 / 3)
    assert np.isnan(float(_scores(ids, attn)["induction"][0, 0]))  # ours: no key after an earlier "A"
    assert float(tl["self"][0, 0]) == pytest.approx(1.0)
    assert float(tl["previous_token"][0, 0]) == 0.0 and float(tl["duplicate"][0, 0]) == 0.0
    # the hand-built heads on IDS: a mean over all 7 query rows, 0 where a row has no target
    s = _tl_scores()
    assert s["previous_token"][0].tolist() == pytest.approx([6 / 7, 1 / 7, np.mean([1 / (q + 1) for q in range(1, N)]) * 6 / 7])
    assert s["induction"][0].tolist() == pytest.approx([0.0, 3 / 7, (1 / 5 + 1 / 6 + 1 / 7) / 7])
    # padded rows and keys count in neither the targets nor the total
    ids, mask = torch.tensor([[2, 5, 5, 0, 0]]), torch.tensor([[1, 1, 1, 0, 0]])
    attn = torch.zeros(1, 1, 5, 5)
    attn[0, 0, 0, 0] = attn[0, 0, 1, 0] = attn[0, 0, 2, 1] = 1
    attn[0, 0, 3:, :] = 0.5
    s = _tl_scores(ids, attn, mask)
    assert float(s["previous_token"][0, 0]) == pytest.approx(2 / 3) and float(s["duplicate"][0, 0]) == pytest.approx(1 / 3)


def _tl_scores(ids=IDS, attn=None, mask=None, kinds=KINDS):
    mask = torch.ones_like(ids) if mask is None else mask
    attn = _heads() if attn is None else attn
    t = target_masks(ids, mask, kinds, convention="transformer_lens")
    per = score_patterns(attn, t, mask=mask, convention="transformer_lens")
    return {k: per[:, i] for i, k in enumerate(kinds)}


def test_documented_relation_to_detect_head_holds_on_random_patterns():
    """head_scores' docstring: W = D n / |Q| per kind, minus detect_head's induction self-target."""
    g = torch.Generator().manual_seed(0)
    n = 12
    ids = torch.randint(3, 7, (40, n), generator=g)  # four tokens: many repeats, adjacent ones too
    ids[:, 0] = 2
    causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
    logits = torch.randn(40, 3, n, n, generator=g) * 3
    attn = logits.masked_fill(~causal, float("-inf")).softmax(-1)
    w, d = _scores(ids, attn), _tl_scores(ids, attn)
    mask = torch.ones_like(ids)
    has = {k: (t.sum(-1) > 0).sum(-1).float()[:, None] for k, t in target_masks(ids, mask, KINDS).items()}  # |Q|
    assert (has["previous_token"] == n - 1).all() and (has["self"] == n).all()
    for kind in ("previous_token", "bos", "self", "duplicate"):
        ok = has[kind][:, 0] > 0
        assert torch.allclose(w[kind][ok] * has[kind][ok] / n, d[kind][ok], atol=1e-6), kind
        assert (d[kind][~ok] == 0).all() and torch.isnan(w[kind][~ok]).all(), kind
    adjacent = (ids[:, 1:] == ids[:, :-1]).float()  # query q repeats token q-1
    diag = attn.diagonal(dim1=-2, dim2=-1)[..., 1:]  # [b, head, q >= 1]
    self_target = (diag * adjacent[:, None]).sum(-1) / n
    assert (self_target > 0.01).any()  # the correction is exercised
    ind = torch.nan_to_num(w["induction"]) * has["induction"] / n
    assert torch.allclose(ind, d["induction"] - self_target, atol=1e-6)
    assert not torch.allclose(ind, d["induction"], atol=1e-3)


def test_bootstrap_interval_brackets_the_mean_and_ignores_nan():
    rng = np.random.default_rng(0)
    per = rng.normal(0.5, 0.1, size=(400, 2)).astype(np.float32)
    per[:50, 1] = np.nan
    mean, lo, hi = bootstrap_mean(per, 2000, seed=0)
    assert mean[0] == pytest.approx(per[:, 0].mean(), abs=1e-6)
    assert mean[1] == pytest.approx(np.nanmean(per[:, 1]), abs=1e-6)
    assert (lo < mean).all() and (mean < hi).all()
    # the 95% interval of a mean of 400 draws with sd 0.1 spans about 2 * 1.96 * 0.1 / 20
    assert hi[0] - lo[0] == pytest.approx(2 * 1.96 * 0.1 / 20, rel=0.2)
    const = np.full((10, 1), 0.3)
    m, l, h = bootstrap_mean(const, 100, seed=0)
    assert [m[0], l[0], h[0]] == pytest.approx([0.3, 0.3, 0.3])


def test_control_keeps_specials_and_the_token_multiset():
    ids = torch.tensor([[2, 5, 6, 7, 8, 9, 0], [2, 5, 6, 5, 0, 0, 0]])
    mask = (ids != 0).long()
    out = shuffled_control(ids, mask, {0, 2}, torch.Generator().manual_seed(0))
    assert (out[:, 0] == 2).all() and (out[mask == 0] == 0).all()
    for a, b in zip(ids, out):
        assert sorted(a.tolist()) == sorted(b.tolist())
    assert not torch.equal(out[0], ids[0])


def test_head_scores_on_every_layout_family(tiny):
    arch, subject = tiny
    prompts = ["hot -> cold ; big -> small ; hot -> cold", "the keys near the cabinet are old .", "cat dog cat dog"]
    kinds = [k for k in KINDS if subject.causal or k != "induction"]
    r = head_scores(subject, prompts, kinds=kinds, n_boot=200)
    frame = r.to_frame()
    assert {"kind", "layer", "head", "score", "ci_low", "ci_high", "control"} <= set(frame.columns)
    assert len(frame) == len(kinds) * subject.n_layers * subject.n_heads
    ok = frame.dropna(subset=["score"])
    assert ((ok.score >= -1e-6) & (ok.score <= 1 + 1e-6)).all()
    assert ((ok.ci_low <= ok.score + 1e-6) & (ok.score <= ok.ci_high + 1e-6)).all()
    # the batched scores equal scoring each prompt's own full pattern
    one = subject.tokenize([prompts[2]])
    acts = subject.cache(one, [f"pattern.{l}" for l in range(subject.n_layers)])
    targets = target_masks(one.input_ids, one.attention_mask, kinds)
    for layer in range(subject.n_layers):
        want = score_patterns(acts[f"pattern.{layer}"], targets)[0]  # [kind, head]
        got = torch.as_tensor(r["per_prompt"][2, :, layer])
        assert torch.allclose(got, want, atol=1e-5, equal_nan=True), (arch, layer)
    if not subject.causal:
        with pytest.raises(WorkbenchError, match="causal"):
            head_scores(subject, prompts, kinds=["induction"])


def test_zoo_ground_truth_heads_rank_first_and_beat_the_control(tasklm):
    from workbench.data import repeated_sequences
    from workbench.zoo import checks

    truth = checks.induction(tasklm)
    ds = repeated_sequences(tasklm.tokenizer, 64, 20, seed=checks.EVAL_SEED)
    r = head_scores(tasklm, {"input_ids": torch.tensor(ds["input_ids"])}, n_boot=300)
    assert r.best("previous_token") == tuple(truth["prev_token_head"])
    assert r.best("induction") == tuple(truth["induction_head"])
    k = r.coord("kind").index("induction")
    il, ih = truth["induction_head"]
    assert r["ci_low"][k, il, ih] > 0.5
    # the control keeps each prompt's tokens (so its repeats) in a random order: an
    # induction head follows repeats wherever they are, so it still scores high there,
    # while heads that do something else stay low on both
    assert r["control"][k, il, ih] > 0.5
    others = [(l, h) for l in range(tasklm.n_layers) for h in range(tasklm.n_heads) if r["score"][k, l, h] < 0.2]
    assert others and all(r["control"][k, l, h] < 0.2 for l, h in others)
    # the control is the same scoring on explicitly shuffled ids
    from workbench.attention.scores import shuffled_control
    import torch as _t

    sh = shuffled_control(r_ids := _t.tensor(ds["input_ids"]), _t.ones_like(r_ids), set(tasklm.tokenizer.all_special_ids),
                          _t.Generator().manual_seed(0))
    again = head_scores(tasklm, {"input_ids": sh}, n_boot=0, control=False)
    assert np.allclose(again["score"], r["control"], atol=1e-6, equal_nan=True)


def test_bad_input_is_named(tasklm):
    with pytest.raises(WorkbenchError, match="unknown score kind 'copying'.*previous_token"):
        head_scores(tasklm, ["a b c"], kinds=["copying"])
    with pytest.raises(WorkbenchError, match="empty prompt list"):
        head_scores(tasklm, [])
    with pytest.raises(WorkbenchError, match="context holds"):
        head_scores(tasklm, {"input_ids": torch.full((1, 500), 5)})
    with pytest.raises(WorkbenchError, match="layer"):
        head_scores(tasklm, ["a b c"], layers=[7])
    with pytest.raises(WorkbenchError, match="convention 'tl'.*transformer_lens"):
        head_scores(tasklm, ["a b c"], convention="tl")
