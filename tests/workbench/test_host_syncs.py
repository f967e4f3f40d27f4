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
