"""Weight-space task vectors: each merge method against its definition on hand-made
tensors, lazy checkpoint reading, bad input (nothing written), output that never
replaces what it did not write, diagnostics with known answers that save and load."""

from __future__ import annotations

import math
import os

import pytest
import torch
import yaml

from tests.conftest import make_tiny
from workbench.errors import WorkbenchError
from workbench.results import Result
from workbench.taskvec import TaskVector, diagnose, load_state, merge, to_mergekit_yaml, trim_topk
from workbench.taskvec.checkpoint import Checkpoint, save_pretrained
from workbench.taskvec.merging import dare_keep, drop, elect_and_mean, merge_tensor

T = torch.tensor


def _tvs(*deltas, key="w"):
    base = {key: torch.zeros(len(deltas[0]))}
    return base, [TaskVector(base, {key: base[key] + T(d)}, name=f"t{i}") for i, d in enumerate(deltas)]


D1 = [3.0, -1.0, 0.5, 2.0, -4.0, 1.0]
D2 = [-2.0, 2.0, 1.0, -3.0, -1.0, 0.2]
D3 = [2.5, -3.0, -2.0, 1.0, 5.0, 0.1]


def test_trim_keeps_top_k_by_magnitude():
    assert torch.equal(trim_topk(T(D1), 0.5), T([3.0, 0, 0, 2.0, -4.0, 0]))
    assert torch.equal(trim_topk(T(D2), 0.5), T([-2.0, 2.0, 0, -3.0, 0, 0]))
    assert torch.equal(trim_topk(T(D3), 0.5), T([2.5, -3.0, 0, 0, 5.0, 0]))
    # ties at the threshold are all kept (documented): k = 2 but three entries share |1|
    assert torch.equal(trim_topk(T([1.0, -1.0, 1.0, 0.5]), 0.5), T([1.0, -1.0, 1.0, 0.0]))
    assert torch.equal(trim_topk(T([1.0, 2.0]), 1.0), T([1.0, 2.0]))
    # k = max(1, int(0.6)) = 1: a positive density keeps at least the largest entry (mergekit 0.1.5)
    assert torch.equal(trim_topk(T([1.0, -3.0, 2.0]), 0.2), T([0.0, -3.0, 0.0]))
    assert torch.equal(trim_topk(T([1.0, -3.0, 2.0]), 0.0), torch.zeros(3))
    x = torch.randn(7, 11, generator=torch.Generator().manual_seed(0))
    kept = trim_topk(x, 0.3)
    k = int(0.3 * 77)
    assert int((kept != 0).sum()) == k
    assert kept.abs().max() == x.abs().max() and set(kept[kept != 0].tolist()) == set(x.flatten()[x.abs().flatten().argsort(descending=True)[:k]].tolist())


def test_ties_trim_elect_disjoint_mean():
    base, tvs = _tvs(D1, D2, D3)
    out = merge(base, tvs, "ties", density=0.5)["w"]
    # trimmed: [3,0,0,2,-4,0], [-2,2,0,-3,0,0], [2.5,-3,0,0,5,0]; sums [3.5,-1,0,-1,1,0]
    # elected [+,-,+(0),-,+,+(0)]; agreeing means: (3+2.5)/2, -3, 0, -3, 5, 0
    assert torch.allclose(out, T([2.75, -3.0, 0.0, -3.0, 5.0, 0.0]))
    # weights enter the election and the divisor: weighted [3,0,0,2,-4,0], [-4,4,0,-6,0,0], [2.5,-3,0,0,5,0]
    out = merge(base, tvs, "ties", density=0.5, weights=[1, 2, 1], lam=0.5)["w"]
    assert torch.allclose(out, 0.5 * T([2.75, 2.0, 0.0, -3.0, 5.0, 0.0]))
    # density 1: no trim, only election: sums [3.5,-2,-0.5,0,0,1.3] elect [+,-,-,+,+,+]
    out = merge(base, tvs, "ties", density=1.0)["w"]
    assert torch.allclose(out, T([2.75, -2.0, -2.0, 1.5, 5.0, (1.0 + 0.2 + 0.1) / 3]))


def test_elect_zero_sum_picks_plus_and_zeros_never_agree():
    w = T([1.0, 1.0])
    assert torch.equal(elect_and_mean(T([[2.0, 0.0], [-2.0, 0.0]]), w), T([2.0, 0.0]))


def test_task_arithmetic_definition_and_algebra():
    base = {"a": T([1.0, 2.0]), "b": T([[0.5]]), "steps": T([3])}
    fa = {"a": T([2.0, 2.0]), "b": T([[1.5]]), "steps": T([3])}
    fb = {"a": T([1.0, 0.0]), "b": T([[0.0]]), "steps": T([3])}
    ta, tb = TaskVector(base, fa, name="A"), TaskVector(base, fb, name="B")
    assert ta.keys() == ["a", "b"]  # integer buffers are not part of a task vector
    assert torch.equal((ta + tb)["a"], T([1.0, -2.0]))
    assert torch.equal((ta - tb)["b"], T([[1.5]]))
    assert torch.equal((-ta)["a"], T([-1.0, 0.0])) and torch.equal((2 * ta)["b"], T([[2.0]]))
    assert torch.equal((ta * 0.5 + tb / 2)["a"], T([0.5, -1.0]))
    out = merge(base, [ta, tb], weights=[0.5, 2.0], lam=2.0)
    assert torch.allclose(out["a"], base["a"] + 2.0 * (0.5 * T([1.0, 0.0]) + 2.0 * T([0.0, -2.0])))
    assert torch.equal(out["steps"], base["steps"])
    assert torch.equal(ta.apply_to(base)["a"], fa["a"])
    # per-tensor weights (aTLAS style)
    out = merge(base, [ta, tb], weights={"a": [1.0, 0.0], "b": [0.0, 1.0]})
    assert torch.equal(out["a"], fa["a"]) and torch.equal(out["b"], fb["b"])
    assert ta.norm() == pytest.approx(math.sqrt(1 + 1))


def test_dare_keeps_the_expectation():
    n = 200_000
    base = {"w": torch.zeros(n)}
    tv = TaskVector(base, {"w": torch.full((n,), 2.0)})
    out = merge(base, [tv], "dare", p=0.9, seed=1)["w"]
    kept = out != 0
    assert set(out.unique().tolist()) == {0.0, 20.0}  # survivors rescaled by 1/(1-p)
    assert abs(float(kept.float().mean()) - 0.1) < 4 * math.sqrt(0.09 / n)
    # entry std is 2*sqrt(p/(1-p)) = 6, so the mean's is 6/sqrt(n)
    assert abs(float(out.mean()) - 2.0) < 4 * 6 / math.sqrt(n)
    # seeded: same seed same mask, other seed another mask
    assert torch.equal(out, merge(base, [tv], "dare", p=0.9, seed=1)["w"])
    assert not torch.equal(out, merge(base, [tv], "dare", p=0.9, seed=2)["w"])
    # averaged over many seeds each entry's expectation is its delta
    d = T([1.0, -2.0, 3.0])
    mean = torch.stack([drop(d, dare_keep(3, 0.5, seed=s, key="w", t=0), 0.5) for s in range(4000)]).mean(0)
    assert torch.allclose(mean, d, atol=4 * 3.0 / math.sqrt(4000))


def test_dare_mask_does_not_depend_on_slicing():
    n = 3 * (1 << 16) + 5  # four blocks, the last one short
    whole = dare_keep(n, 0.3, seed=7, key="w", t=2)
    assert whole.dtype == torch.bool and whole.shape == (n,)
    for lo, hi in [(0, 10), (65530, 65546), (1 << 17, n), (n - 3, n + 10)]:
        assert torch.equal(dare_keep(n, 0.3, seed=7, key="w", t=2, lo=lo, hi=hi), whole[lo:hi]), (lo, hi)
    assert abs(float(whole.float().mean()) - 0.7) < 4 * math.sqrt(0.21 / n)
    # another task position, tensor or seed: another mask
    for kw in (dict(seed=7, key="w", t=3), dict(seed=7, key="v", t=2), dict(seed=8, key="w", t=2)):
        assert not torch.equal(dare_keep(n, 0.3, **kw), whole), kw


def test_dare_ties_is_drop_then_election():
    base, tvs = _tvs(D1, D2, D3)
    dropped = torch.stack([drop(T(d), dare_keep(6, 0.5, seed=3, key="w", t=t), 0.5) for t, d in enumerate((D1, D2, D3))])
    # mergekit's default for dare_ties: no normalisation, the agreeing entries' sum
    out = merge(base, tvs, "dare_ties", p=0.5, seed=3)["w"]
    assert torch.equal(out, elect_and_mean(dropped, torch.ones(3), normalize=False))
    out = merge(base, tvs, "dare_ties", p=0.5, seed=3, normalize=True)["w"]
    assert torch.equal(out, elect_and_mean(dropped, torch.ones(3), normalize=True))
    assert torch.allclose(merge(base, tvs, "dare", p=0.0)["w"], T(D1) + T(D2) + T(D3))


def test_negative_weights_subtract():
    """A negative weight votes with -d in the election and subtracts its task vector;
    with TIES's normalisation the divisor is the signed sum of the agreeing weights
    (mergekit's definition, documented in workbench.taskvec.merging)."""
    base, tvs = _tvs(D1, D2)
    a, b = T(D1), T(D2)
    assert torch.equal(merge(base, tvs, "task_arithmetic", weights=[1.0, -1.0])["w"], a - b)
    # ties without normalisation, density 1: elect the sign of a - b, sum the agreeing entries
    out = merge(base, tvs, "ties", weights=[1.0, -1.0], normalize=False)["w"]
    weighted = torch.stack([a, -b])
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0)
    want = (weighted * (weighted.sign() == sign)).sum(0)
    assert torch.equal(out, want)
    assert out[1] == -3.0  # D1 -1, D2 +2: both vote "-" once weighted, so they add up (not +1 or +3)
    # normalised: agreeing weights 1 and -1 cancel (divisor 0 -> 1); alone, -1 divides back
    out = merge(base, tvs, "ties", weights=[1.0, -1.0])["w"]
    div = (torch.tensor([1.0, -1.0])[:, None] * (weighted.sign() == sign)).sum(0)
    div[div == 0] = 1
    assert torch.equal(out, want / div)
    # dare_ties (p = 0: nothing dropped) does not normalise by default, so -1 subtracts
    assert torch.equal(merge(base, tvs, "dare_ties", weights=[1.0, -1.0])["w"], want)
    assert torch.equal(merge(base, tvs[:1], "dare_ties", weights=[-0.5])["w"], -0.5 * a)


@pytest.mark.parametrize("bad,match", [
    (dict(weights=[1.0, float("nan")]), "weight 1 must be finite"),
    (dict(weights={"w": [1.0, float("inf")]}), "weight 1 for 'w' must be finite"),
    (dict(lam=float("inf")), "lam must be finite"),
    (dict(lam=float("nan")), "lam must be finite"),
    (dict(density=float("nan")), "density must be finite"),
    (dict(p=float("nan")), "p must be finite"),
    (dict(weights=[1.0, "x"]), "must be a real number"),
])
def test_bad_numbers_raise_before_anything_is_written(bad, match, tmp_path):
    base, tvs = _tvs(D1, D2)
    for method in ("task_arithmetic", "ties", "dare_ties"):
        with pytest.raises(WorkbenchError, match=match):
            merge(base, tvs, method, out=tmp_path / "m.safetensors", **bad)
    assert os.listdir(tmp_path) == []


def test_non_finite_task_vector_or_overflow_raises_before_writing(tmp_path):
    base = {"w": torch.zeros(3)}
    for method in ("task_arithmetic", "ties", "dare", "dare_ties"):
        tv = TaskVector.from_deltas({"w": T([1.0, float("nan"), 0.0])}, name="bad")
        with pytest.raises(WorkbenchError, match=r"tensor 'w' of checkpoint 'bad' holds 1 NaN"):
            merge(base, [tv], method, p=0.5 if "dare" in method else 0.0, out=tmp_path / "m.safetensors")
        tv = TaskVector.from_deltas({"w": T([1.0, float("-inf"), 0.0])}, name="bad")
        with pytest.raises(WorkbenchError, match=r"holds 0 NaN and 1 infinite"):
            merge(base, [tv], method, out=tmp_path / "m")
    big = TaskVector.from_deltas({"w": T([3e38, 0.0, 1.0])})
    with pytest.raises(WorkbenchError, match="merged tensor 'w' holds non-finite values"):
        merge(base, [big], lam=10.0, out=tmp_path / "m.safetensors")
    assert os.listdir(tmp_path) == []


def test_output_is_never_replaced_unless_asked(tmp_path):
    base, tvs = _tvs(D1, D2)
    out = tmp_path / "m.safetensors"
    out.write_bytes(b"precious")
    with pytest.raises(WorkbenchError, match="already exists and is not empty; nothing was written"):
        merge(base, tvs, "ties", density=0.5, out=out)
    assert out.read_bytes() == b"precious" and sorted(os.listdir(tmp_path)) == ["m.safetensors"]
    merged = merge(base, tvs, "ties", density=0.5, out=out, overwrite=True)
    assert torch.equal(Checkpoint(str(out)).get("w"), merged["w"])
    # a folder: refused when it holds anything, written in one rename otherwise
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(WorkbenchError, match="already exists and is not empty"):
        merge(base, tvs, out=folder)
    assert os.listdir(folder) == ["notes.txt"]
    merge(base, tvs, out=tmp_path / "fresh")
    assert os.listdir(tmp_path / "fresh") == ["model.safetensors"]
    assert torch.equal(Checkpoint(str(tmp_path / "fresh")).get("w"), T(D1) + T(D2))
    merge(base, tvs, weights=[1.0, 0.0], out=folder, overwrite=True)
    assert os.listdir(folder) == ["model.safetensors"] and torch.equal(Checkpoint(str(folder)).get("w"), T(D1))
    assert sorted(os.listdir(tmp_path)) == ["fresh", "m.safetensors", "model"]  # no temporary left behind
    with pytest.raises(WorkbenchError, match="no directory"):
        merge(base, tvs, out=tmp_path / "missing" / "m.safetensors")


def test_key_and_shape_mismatch_are_named():
    base = {"a": torch.zeros(2), "b": torch.zeros(3)}
    with pytest.raises(WorkbenchError, match=r"only in 'base': \['b'\].*only in 'ft': \['c'\]"):
        TaskVector(base, {"a": torch.zeros(2), "c": torch.zeros(3)}, name="ft")
    with pytest.raises(WorkbenchError, match=r"tensor 'b' has shape \[3\] in 'base' but \[4\] in 'ft'"):
        TaskVector(base, {"a": torch.zeros(2), "b": torch.zeros(4)}, name="ft")
    tv = TaskVector(base, {"a": torch.ones(2), "b": torch.ones(3)})
    with pytest.raises(WorkbenchError, match="hold different tensors"):
        tv + TaskVector.from_deltas({"a": torch.ones(2)})
    with pytest.raises(WorkbenchError, match="unknown merge method 'avg'; valid: task_arithmetic, ties, dare, dare_ties"):
        merge(base, [tv], "avg")
    with pytest.raises(WorkbenchError, match="unknown merge parameters"):
        merge(base, [tv], "ties", dens=0.2)
    with pytest.raises(WorkbenchError, match="one weight per task vector"):
        merge(base, [tv], weights=[1, 2])


def test_different_architectures_rejected(word_tokenizer):
    gpt2, llama = make_tiny("gpt2", word_tokenizer), make_tiny("llama", word_tokenizer)
    with pytest.raises(WorkbenchError, match="different architectures.*model_type: 'gpt2' vs 'llama'"):
        TaskVector(gpt2, llama)
    # without configs, the key sets give it away
    with pytest.raises(WorkbenchError, match="look like different architectures"):
        TaskVector(dict(gpt2.state_dict()), dict(llama.state_dict()))


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "qwen2", "gemma2", "bert"])
def test_tiny_models_round_trip_through_files(arch, word_tokenizer, tmp_path):
    base = make_tiny(arch, word_tokenizer, seed=0)
    ft = make_tiny(arch, word_tokenizer, seed=1)
    base.save_pretrained(tmp_path / "base")
    ft.save_pretrained(tmp_path / "ft")
    lazy = TaskVector(str(tmp_path / "base"), str(tmp_path / "ft"))
    eager = TaskVector(base, ft)
    common = set(lazy.keys()) & set(eager.keys())  # files may rename (lm_head -> embed_out) or drop tied tensors
    assert len(common) >= len(eager.keys()) - 2
    for k in common:
        assert torch.equal(lazy[k], eager[k])
    # merged from files, written as a model directory, loaded by transformers: it is the fine-tune
    merged = merge(str(tmp_path / "base"), [lazy], "task_arithmetic")
    save_pretrained(merged, tmp_path / "base", tmp_path / "merged")
    back = type(ft).from_pretrained(tmp_path / "merged")
    for k, v in ft.state_dict().items():
        assert torch.allclose(back.state_dict()[k], v, atol=1e-6), k
    # merged from modules, copied into a module in place
    fresh = make_tiny(arch, word_tokenizer, seed=2)
    load_state(fresh, merge(base, [0.5 * eager], "task_arithmetic"))
    for k, v in ft.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(fresh.state_dict()[k], (base.state_dict()[k] + v) / 2, atol=1e-6), k
    lazy.save(tmp_path / "tv.safetensors")
    again = TaskVector.load(tmp_path / "tv.safetensors")
    assert all(torch.equal(again[k], lazy[k]) for k in lazy.keys())


def test_nan_checkpoint_is_a_clear_error_and_nothing_is_written(tmp_path):
    from safetensors.torch import save_file

    base = {"a": torch.zeros(4), "b": torch.zeros(2)}
    bad = {"a": T([0.0, float("nan"), 1.0, 0.0]), "b": torch.ones(2)}
    save_file(bad, tmp_path / "bad.safetensors")
    tv = TaskVector(base, str(tmp_path / "bad.safetensors"))
    out = tmp_path / "merged.safetensors"
    with pytest.raises(WorkbenchError, match=r"tensor 'a' of checkpoint .*bad.safetensors' holds 1 NaN"):
        merge(base, [tv], "ties", density=0.5, out=out)
    assert sorted(os.listdir(tmp_path)) == ["bad.safetensors"]
    model = torch.nn.Linear(2, 1)
    before = model.weight.detach().clone()
    with pytest.raises(WorkbenchError, match="holds 0 NaN and 1 infinite"):
        load_state(model, {"weight": T([[1.0, float("inf")]]), "bias": T([0.0])})
    assert torch.equal(model.weight, before)
    with pytest.raises(WorkbenchError, match="no checkpoint at"):
        Checkpoint(str(tmp_path / "missing"))


def test_merge_writes_atomically(tmp_path):
    base, tvs = _tvs(D1, D2)
    out = tmp_path / "m.safetensors"
    merged = merge(base, tvs, "ties", density=0.5, out=out)
    back = Checkpoint(str(out))
    assert torch.equal(back.get("w"), merged["w"]) and sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_mergekit_recipe(tmp_path, word_tokenizer):
    for i, name in enumerate(["base", "ft_a", "ft_b"]):
        make_tiny("llama", word_tokenizer, seed=i).save_pretrained(tmp_path / name)
    a = TaskVector(str(tmp_path / "base"), str(tmp_path / "ft_a"))
    b = TaskVector(str(tmp_path / "base"), str(tmp_path / "ft_b"))
    rec = yaml.safe_load(to_mergekit_yaml(str(tmp_path / "base"), [a, b], "ties", density=0.3, weights=[1.0, -0.5]))
    assert rec["merge_method"] == "ties" and rec["base_model"] == str(tmp_path / "base")
    assert [m["model"] for m in rec["models"]] == [str(tmp_path / "ft_a"), str(tmp_path / "ft_b")]
    assert [m["parameters"] for m in rec["models"]] == [{"weight": 1.0, "density": 0.3}, {"weight": -0.5, "density": 0.3}]
    assert rec["parameters"] == {"normalize": True, "lambda": 1.0}
    # a negated task vector folds its sign into the weight only where that is the same merge
    with pytest.raises(WorkbenchError, match="scaled by -1; with normalize"):
        to_mergekit_yaml(str(tmp_path / "base"), [a, -b], "ties", density=0.3)
    rec = yaml.safe_load(to_mergekit_yaml(str(tmp_path / "base"), [a, -b], "ties", density=0.3, normalize=False))
    assert [m["parameters"]["weight"] for m in rec["models"]] == [1.0, -1.0]
    with pytest.raises(WorkbenchError, match="combines 2 checkpoints"):
        to_mergekit_yaml(str(tmp_path / "base"), [a - b], "dare", p=0.5)
    rec = yaml.safe_load(to_mergekit_yaml(str(tmp_path / "base"), [a - b], "task_arithmetic", lam=0.5))
    assert [m["parameters"]["weight"] for m in rec["models"]] == [1.0, -1.0]
    # DARE: mergekit's own rescale matches L1 norms, so 1/(1-p) goes into lambda
    rec = yaml.safe_load(to_mergekit_yaml(str(tmp_path / "base"), [a], "dare", p=0.9, lam=0.5))
    assert rec["merge_method"] == "dare_linear" and rec["models"][0]["parameters"]["density"] == pytest.approx(0.1)
    assert rec["parameters"]["normalize"] is False and rec["parameters"]["rescale"] is False
    assert rec["parameters"]["lambda"] == pytest.approx(5.0)
    assert yaml.safe_load(to_mergekit_yaml(str(tmp_path / "base"), [a], "dare_ties", p=0.5))["parameters"]["normalize"] is False
    with pytest.raises(WorkbenchError, match="not on disk"):
        to_mergekit_yaml({"w": torch.zeros(1)}, [a])
    with pytest.raises(WorkbenchError, match="weights must be finite"):
        to_mergekit_yaml(str(tmp_path / "base"), [a], weights=[float("nan")])


def test_diagnostics_known_values(tmp_path):
    base = {"h.0.w": torch.zeros(4), "h.1.w": torch.zeros(2)}
    t1 = TaskVector(base, {"h.0.w": T([1.0, 2.0, 0.0, -1.0]), "h.1.w": T([3.0, 0.0])}, name="one")
    t2 = TaskVector(base, {"h.0.w": T([1.0, -2.0, 5.0, 1.0]), "h.1.w": T([3.0, 0.0])}, name="two")
    d = diagnose([t1, t2], densities=[0.25, 1.0])
    assert d.coord("block") == ["layer.0", "layer.1"]  # workbench.blocks names (GPT-2's layer path "h")
    assert d["cosine"][0, 1] == pytest.approx(5 / math.sqrt(15 * 40))
    assert d["cosine"][0, 0] == pytest.approx(1.0)
    assert d["cosine_by_block"][0, 0, 1] == pytest.approx(-4 / math.sqrt(6 * 31))
    assert d["cosine_by_block"][1, 0, 1] == pytest.approx(1.0)
    # co-non-zero entries: 4, of which 2 have opposite signs
    assert d["sign_conflict"][0, 1] == pytest.approx(0.5) and d["sign_conflict"][0, 0] == 0
    assert float(d["sign_conflict_all"]) == pytest.approx(0.5)
    # density 0.25: h.0 keeps its top 1 (|2|), h.1 keeps max(1, int(0.5)) = 1 (|3|) -> 5 of 7
    assert d["topk_mass"][0].tolist() == pytest.approx([5 / 7, 1.0])
    assert d["norm"].tolist() == pytest.approx([math.sqrt(15), math.sqrt(40)])
    frame = d.to_frame(["cosine", "sign_conflict"])
    assert len(frame) == 4
    # the result (its 0-d variable included) saves and loads exactly
    back = Result.load(d.save(tmp_path / "d.safetensors"))
    assert type(back) is type(d) and back.equals(d) and back["sign_conflict_all"].shape == ()
    # a zero task vector has no direction: NaN cosines, not 0
    zero = TaskVector(base, base, name="zero")
    dz = diagnose([t1, zero], densities=())
    assert math.isnan(dz["cosine"][0, 1]) and dz["cosine"][0, 0] == pytest.approx(1.0)
    # names without a known layout fall back to the module path
    other = {"trunk.blocks.2.fc.weight": torch.zeros(2), "head.bias": torch.zeros(1)}
    tv = TaskVector(other, {"trunk.blocks.2.fc.weight": T([1.0, 0.0]), "head.bias": T([2.0])})
    assert diagnose([tv], densities=()).coord("block") == ["head", "trunk.blocks.2"]


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare", "dare_ties"])
@pytest.mark.parametrize("chunk", [1, 7, 1 << 18])
def test_streamed_merge_equals_whole_tensor_merge(method, chunk, tmp_path, monkeypatch):
    """Tensors are merged in slices of ``CHUNK`` entries re-read from the checkpoints
    (TIES thresholds from a first pass over whole deltas, DARE masks drawn per block);
    every entry must equal ``merge_tensor`` on the whole tensors, including entries tied
    at the trim threshold, weights (negative too), lam, bf16."""
    from workbench.safetensors_io import write_file
    import workbench.taskvec.merging as M

    monkeypatch.setattr(M, "CHUNK", chunk)
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(9, 13, generator=g), "h": torch.randn(20, generator=g).to(torch.bfloat16),
            "n": torch.arange(5)}
    base["w"].view(-1)[:40] = 0.0
    fts = []
    for i in range(4):
        ft = {k: (v + torch.randn(v.shape, generator=g).to(v.dtype) * 0.1) if v.is_floating_point() else v
              for k, v in base.items()}
        ft["w"].view(-1)[:40] = 0.25 * (-1) ** i  # 40 deltas of magnitude exactly 0.25
        write_file(ft, tmp_path / f"ft{i}.safetensors")
        fts.append(ft)
    write_file(base, tmp_path / "base.safetensors")
    b = str(tmp_path / "base.safetensors")
    tvs = [TaskVector(b, str(tmp_path / f"ft{i}.safetensors")) for i in range(4)]
    tvs[3] = tvs[3] - TaskVector(b, str(tmp_path / "ft0.safetensors"))  # a combination of two checkpoints
    for density, weights, lam in [(0.2, [1.0, 1.0, 1.0, 1.0], 1.0), (0.3, [0.5, -2.0, 1.0, 0.7], 0.8), (0.0, None, 1.0),
                                  (1.0, None, 1.0), (0.05, [1, 1, 1, 1], 1.0)]:
        kw = dict(density=density) if method == "ties" else dict(p=min(density * 2, 0.9), seed=5)
        out = merge(b, tvs, method, weights=weights, lam=lam, **kw)
        ref = merge(base, [TaskVector(base, ft) for ft in fts[:3]] + [TaskVector(base, fts[3]) - TaskVector(base, fts[0])],
                    method, weights=weights, lam=lam, **kw)
        for k in ("w", "h"):
            keeps = None
            if "dare" in method:
                keeps = [M.dare_keep(base[k].numel(), kw["p"], seed=5, key=k, t=t) for t in range(4)]
            want = merge_tensor(base[k], [tv[k] for tv in tvs], weights or [1.0] * 4, method=method, lam=lam,
                                keeps=keeps, **{a: v for a, v in kw.items() if a != "seed"})
            assert out[k].dtype == base[k].dtype and torch.equal(out[k], want), (k, density)
            assert torch.equal(ref[k], want)
        assert torch.equal(out["n"], base["n"])
    if method == "ties":
        # the ties at the threshold are all kept: density 0.3 of 117 entries keeps k = 35, yet 40 share |0.25|
        d0 = tvs[0]["w"].reshape(-1)
        above = int((d0[40:].abs() > 0.25).sum())
        assert above < 35 and int((trim_topk(d0, 0.3) != 0).sum()) == 40 + above
        assert int((out["w"] != base["w"]).sum()) > 0
