"""No host round-trip per node: the number of device -> host reads (and blocking uploads)
a hot path makes does not grow with the number of heads, features, sets or steps.

Counted on the CPU with :mod:`tests.workbench.host_syncs` (the same calls that would stall
a GPU); each test runs a path at two sizes and asserts equal counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from tests.workbench.host_syncs import SyncCounter, count_syncs

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def subject():
    return workbench.load("tasklm", device="cpu")


@pytest.fixture(scope="module")
def texts():
    from workbench.data import agreement_sentences

    return agreement_sentences(8, seed=3)


def same_count(small, large, what: str) -> None:
    assert small.total == large.total, (
        f"{what}: {small.total} host round-trips at the small size, {large.total} at the large one\n"
        f"small: {small.by_site}\nlarge: {large.by_site}")


def test_counter_sees_every_kind_of_host_read():
    t = torch.arange(6.0)
    with SyncCounter() as c:
        t[0].item()
        float(t[1])
        bool((t > 2).any())
        t.tolist()
        t.numpy()
        np.asarray(t)
        t[t > 2]
        t.nonzero()
        torch.tensor([1, 2])
        t + 1  # not a host read
    assert c.by_kind == {"item": 3, "tolist": 1, "numpy": 1, "__array__": 1, "bool index": 1, "nonzero": 1,
                         "upload": 1}
    assert all(site.startswith("tests/workbench/test_host_syncs.py:") for site in c.by_site)


@pytest.mark.parametrize("method", ["exact", "attribution", "ig"])
@pytest.mark.parametrize("replacement", ["zero", "mean"])
def test_effects_on_heads_do_not_read_per_head(subject, texts, method, replacement):
    from workbench.effects import Heads, effects

    small, a = count_syncs(effects, subject, texts, Heads(None, [0]), method=method, replacement=replacement)
    large, b = count_syncs(effects, subject, texts, Heads(None), method=method, replacement=replacement)
    assert len(a["effect"]) == subject.n_layers and len(b["effect"]) == subject.n_layers * subject.n_heads
    assert np.isfinite(b["effect"]).all() and np.abs(b["effect"]).max() > 0
    same_count(small, large, f"{method} on 2 vs {len(b['effect'])} heads")


@pytest.mark.parametrize("method", ["exact", "attribution", "ig"])
def test_effects_on_features_do_not_read_per_feature(subject, texts, method):
    from workbench.circuits import SAE
    from workbench.effects import Features, effects

    counts = []
    for width in (16, 256):
        sae = SAE(subject.d_model, width, kind="topk", k=8, site="resid_post.0", seed=2)
        c, r = count_syncs(effects, subject, texts, Features({"resid_post.0": sae}), method=method,
                           replacement="mean")
        assert len(r["effect"]) == width + 1 and np.isfinite(r["effect"]).all()
        counts.append(c)
    same_count(*counts, f"{method} on 16 vs 256 features")


def test_patched_metrics_reads_once_per_chunk(subject, texts):
    from workbench.effects import Heads, Patching

    pt = Patching(subject, texts, Heads(None), replacement="mean")
    pt.clean()
    few = [["z.0/1", "z.1/0"]]
    many = [["z.0/1", "z.1/0"], ["z.0/0"], ["z.1/3", "z.0/2"], [], ["z.1/1"], ["z.0/3", "z.1/2"]]
    small, a = count_syncs(pt.patched_metrics, few)
    large, b = count_syncs(pt.patched_metrics, many)
    assert a[0] == b[0] and b[3] == pytest.approx(pt.base())
    same_count(small, large, "patched_metrics on 1 vs 6 sets")


def neox(word_tokenizer, n_heads: int):
    """A tiny random GPT-NeoX with ``n_heads`` heads (2 layers, width 32)."""
    import transformers

    from workbench import from_model

    cfg = transformers.GPTNeoXConfig(vocab_size=len(word_tokenizer), pad_token_id=0, bos_token_id=2, eos_token_id=2,
                                     num_hidden_layers=2, hidden_size=32, num_attention_heads=n_heads,
                                     intermediate_size=64, max_position_embeddings=64)
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM._from_config(cfg, attn_implementation="eager").eval()
    return from_model(model, word_tokenizer, name=f"neox-{n_heads}")


@pytest.fixture(scope="module")
def few_and_many_heads(word_tokenizer):
    return neox(word_tokenizer, 2), neox(word_tokenizer, 8)


def test_head_scores_read_once_per_batch(few_and_many_heads, texts):
    from workbench.attention import head_scores

    counts = []
    for subj in few_and_many_heads:
        c, r = count_syncs(head_scores, subj, texts, n_boot=10, control=True)
        assert np.isfinite(r["score"]).all() and r["score"].shape[-1] == subj.n_heads
        counts.append(c)
    same_count(*counts, "head_scores with 2 vs 8 heads a layer")
    small, _ = count_syncs(head_scores, few_and_many_heads[1], texts, layers=[0], n_boot=10, control=True)
    same_count(small, counts[1], "head_scores on 1 vs 2 layers")


@pytest.mark.parametrize("ig_steps", [0, 3])
def test_scan_heads_does_not_read_per_head(few_and_many_heads, texts, ig_steps):
    from workbench.attention import scan_heads

    counts = []
    for subj in few_and_many_heads:
        c, r = count_syncs(scan_heads, subj, texts, replacement="mean", ig_steps=ig_steps)
        assert r["effect"].shape == (2, subj.n_heads) and np.isfinite(r["attribution"]).all()
        counts.append(c)
    same_count(*counts, "scan_heads with 2 vs 8 heads a layer")


def test_ablate_heads_and_prune_curve_do_not_read_per_head_or_draw(subject, few_and_many_heads, texts):
    from workbench.attention import ablate_heads, prune_curve

    small, a = count_syncs(ablate_heads, subject, texts, [(0, 1), (1, 0)], n_random=2, replacement="mean")
    large, b = count_syncs(ablate_heads, subject, texts, [(0, 1), (1, 0)], n_random=12, replacement="mean")
    assert a.summary["effect"] == b.summary["effect"] and len(b["control_effect"]) == 12
    same_count(small, large, "ablate_heads with 2 vs 12 random draws")
    counts = [count_syncs(prune_curve, subj, texts, max_heads=2)[0] for subj in few_and_many_heads]
    same_count(*counts, "prune_curve (gradient importance) with 2 vs 8 heads a layer")


@pytest.mark.parametrize("method", ["attribution", "exact"])
def test_node_effects_do_not_read_per_feature(subject, method):
    from workbench.circuits import SAE, node_effects
    from workbench.data import agreement_pairs

    ds = agreement_pairs(8, seed=1, tokenizer=subject.tokenizer)
    counts = []
    for width in (16, 256):
        saes = {f"resid_post.{l}": SAE(subject.d_model, width, kind="topk", k=8, site=f"resid_post.{l}", seed=l)
                for l in range(2)}
        c, r = count_syncs(node_effects, subject, saes, list(ds["clean"]), list(ds["corrupted"]), "loss", method=method)
        assert len(r["effect"]) == 2 * (width + 1) and np.isfinite(r["effect"]).all()
        counts.append(c)
    same_count(*counts, f"node_effects ({method}) on 16 vs 256 features a site")


@pytest.mark.parametrize("kind", ["topk", "batchtopk", "relu"])
def test_train_sae_reads_a_constant_per_step(kind):
    from workbench.circuits import SAE, train_sae

    x = torch.randn(512, 32, generator=torch.Generator().manual_seed(0))
    kw = {"k": 4} if kind != "relu" else {}
    extra = {"resample_every": 3} if kind == "relu" else {}
    counts = {}
    for width in (64, 1024):
        for steps in (4, 8):
            sae = SAE(32, width, kind=kind, seed=0, **kw)
            counts[width, steps], log = count_syncs(train_sae, sae, x, steps=steps, batch_size=64, dead_after=64,
                                                    progress=False, **extra)
            assert np.isfinite(log["loss"]).all()
    same_count(counts[64, 8], counts[1024, 8], f"train_sae ({kind}) with 64 vs 1024 features")
    per_step = (counts[64, 8].total - counts[64, 4].total) / 4
    # one read of the step's numbers and one of the dead count (TopK's auxiliary loss)
    assert per_step <= 2, counts[64, 8].by_site


def test_feature_flow_reads_once(subject):
    from workbench.circuits import SAE
    from workbench.circuits.features import feature_flow

    counts = []
    for width in (64, 1024):
        a, b = SAE(32, width, kind="topk", k=4, seed=0), SAE(32, width, kind="topk", k=4, seed=1)
        c, r = count_syncs(feature_flow, a, b, top_k=3, chunk=16)
        assert r["match"].shape == (width, 3) and (np.abs(r["cosine"]) <= 1 + 1e-6).all()
        counts.append(c)
    same_count(*counts, "feature_flow over 64 vs 1024 features (4 vs 64 chunks)")


def test_function_vector_does_not_read_per_head(few_and_many_heads):
    from workbench.taskvec import function_vector

    counts = []
    for subj in few_and_many_heads:
        c, fv = count_syncs(function_vector, subj, "capitalize", n_demos=2, n_prompts=6)
        assert fv["indirect_effect"].shape == (2, subj.n_heads) and np.isfinite(fv["indirect_effect"]).all()
        counts.append(c)
    same_count(*counts, "function_vector with 2 vs 8 heads a layer")


@pytest.mark.parametrize("method,kw", [("task_arithmetic", {"lam": 0.5}), ("ties", {"density": 0.3}),
                                       ("dare_ties", {"density": 0.3, "p": 0.5})])
def test_merge_reads_per_tensor_not_per_entry(method, kw):
    from workbench.taskvec import TaskVector, merge

    g = torch.Generator().manual_seed(0)
    counts = []
    for n in (1_000, 100_000):
        base = {"a.weight": torch.randn(n, generator=g), "b.weight": torch.randn(8, n // 8, generator=g)}
        tvs = [TaskVector(base, {k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()})
               for _ in range(3)]
        c, merged = count_syncs(merge, base, tvs, method, **kw)
        assert merged["a.weight"].shape == (n,) and torch.isfinite(merged["a.weight"]).all()
        counts.append(c)
    same_count(*counts, f"{method} merge of tensors of 1e3 vs 1e5 entries")
    # a few reads per tensor (finiteness checks, TIES thresholds), none per entry
    assert counts[1].total <= 2 * 12, counts[1].by_site


class _Heads(torch.nn.Module):
    """A shared trunk and one linear head per task (regression on a fixed random target)."""

    def __init__(self, n_tasks: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16))
        self.heads = torch.nn.ModuleList(torch.nn.Linear(16, 1) for _ in range(n_tasks))

    def forward(self, batch):
        h = self.trunk(batch["x"])
        return {f"t{i}": head(h)[:, 0] for i, head in enumerate(self.heads)}


def _task_losses(n_tasks: int) -> dict:
    return {f"t{i}": (lambda out, b, i=i: (out - b["y"][:, i]).pow(2).mean()) for i in range(n_tasks)}


def _data(step: int) -> dict:
    g = torch.Generator().manual_seed(step)
    return {"x": torch.randn(32, 8, generator=g), "y": torch.randn(32, 8, generator=g)}


def test_task_gradients_read_once_for_every_task_and_block():
    from workbench.mtl import task_gradients

    counts = []
    for n_tasks in (2, 6):
        model = _Heads(n_tasks)
        b = _data(0)
        out = model(b)
        losses = [fn(out[t], b) for t, fn in _task_losses(n_tasks).items()]
        c, tg = count_syncs(task_gradients, losses, list(model.trunk.named_parameters()), mode="gramian")
        assert tg["gramian"].shape == (n_tasks, n_tasks) and np.isfinite(tg["block_cosine"]).all()
        counts.append(c)
    same_count(*counts, "task_gradients of 2 vs 6 tasks")


@pytest.mark.parametrize("aggregator", ["equal", "pcgrad", "mgda", "cagrad", "nash_mtl", "gradnorm"])
def test_mtl_trainer_step_reads_do_not_grow_with_tasks(aggregator):
    from workbench.mtl.trainer import MultiTaskTrainer

    counts = []
    for n_tasks in (2, 6):
        tr = MultiTaskTrainer(_Heads(n_tasks), _task_losses(n_tasks), _data, aggregator=aggregator,
                              shared_prefix="trunk", monitor_every=2, lr=1e-2)
        tr.train_step()  # Adam's state appears on the first step
        c, _ = count_syncs(lambda: [tr.train_step() for _ in range(2)])  # one monitored, one plain step
        assert np.isfinite(tr.history["loss"]).all()
        counts.append(c)
    same_count(*counts, f"MultiTaskTrainer ({aggregator}) steps with 2 vs 6 tasks")


def test_find_circuit_edges_read_once_per_site_pair(subject):
    from workbench.circuits import SAE, find_circuit
    from workbench.data import agreement_pairs

    ds = agreement_pairs(8, seed=1, tokenizer=subject.tokenizer)
    counts = []
    for width in (8, 32):
        saes = {f"resid_post.{l}": SAE(subject.d_model, width, kind="relu", site=f"resid_post.{l}", seed=l)
                for l in range(2)}
        c, g = count_syncs(find_circuit, subject, saes, list(ds["clean"]), list(ds["corrupted"]), "loss",
                           node_threshold=0.0, edge_threshold=0.0)
        assert len(g["edge_weight"]) > width and np.isfinite(g["edge_weight"]).all()
        counts.append(c)
    same_count(*counts, "find_circuit over 8 vs 32 features a site (every node kept)")


def test_a_checked_batch_is_not_checked_again(subject, texts):
    from workbench import WorkbenchError
    from workbench.subject import Batch

    batch = subject.tokenize(texts)
    first, _ = count_syncs(subject.as_batch, Batch(batch.input_ids, batch.attention_mask))
    assert first.by_kind.get("item", 0) >= 2  # the ids' range and the mask are read once
    for b in (batch, batch.repeat(3), batch[2:5], batch[torch.tensor([0, 3])]):
        again, _ = count_syncs(subject.as_batch, b)
        assert again.total == 0, again.by_site
    bad = Batch(batch.input_ids.clone(), batch.attention_mask, _max_id=None)
    bad.input_ids[0, 0] = subject.d_vocab  # a hand-made batch is checked
    with pytest.raises(WorkbenchError, match="outside this model's vocabulary"):
        subject.as_batch(bad)


def test_traces_run_without_a_key_value_cache(subject, texts):
    seen = []
    handle = subject.model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("use_cache")), with_kwargs=True)
    try:
        batch = subject.tokenize(texts)
        logits = subject.logits(batch)
        with subject.trace(batch, use_cache=True):  # asked for, it is kept
            pass
    finally:
        handle.remove()
    assert seen == [False, True]
    with torch.no_grad():
        ref = subject.model(**batch.kwargs()).logits
    assert torch.equal(logits, ref)  # the cache never changed one forward's numbers


def test_attention_patterns_do_not_read_per_head_or_layer(few_and_many_heads, texts):
    from workbench.attention import attention_patterns

    counts = [count_syncs(attention_patterns, subj, texts[:4])[0] for subj in few_and_many_heads]
    same_count(*counts, "attention_patterns with 2 vs 8 heads a layer")
    small, r = count_syncs(attention_patterns, few_and_many_heads[1], texts[:4], layers=[0])
    same_count(small, counts[1], "attention_patterns of 1 vs 2 layers")
    assert np.allclose(r["pattern"].sum(-1)[r["pattern"].sum(-1) > 0], 1, atol=1e-5)  # rows of real queries


def test_answer_id_metrics_send_their_ids_once(subject):
    import functools

    from workbench.effects import Heads, effects
    from workbench.metrics import answer_logprob, logit_diff

    from workbench.data import agreement_pairs

    ds = agreement_pairs(8, seed=1, tokenizer=subject.tokenizer)
    good, bad = list(ds["clean_answer_id"]), list(ds["corrupted_answer_id"])
    batch = subject.tokenize(list(ds["clean"]))
    for metric in (functools.partial(logit_diff, good=good, bad=bad), functools.partial(answer_logprob, answers=good)):
        metric(subject.logits(batch), batch)  # the ids go to the device here, once
        small, a = count_syncs(effects, subject, batch, Heads(None, [0]), metric, replacement="mean")
        large, b = count_syncs(effects, subject, batch, Heads(None), metric, replacement="mean")
        assert a["effect"][0] == b["effect"][0] and not any(w.startswith("metrics.py") for w in large.by_site)
        same_count(small, large, f"exact effects of 2 vs 8 heads on {metric.func.__name__}")
