"""A model larger than the memory given to it: tasklm loaded through accelerate's
``device_map`` with a ``max_memory`` cap smaller than its weights, so that some layers
live on disk (``offload_folder``) and are loaded for each forward. The lenses that read
activations (``subject.cache``, ``head_scores``, attribution patching through
``scan_heads``) give the numbers of the model held whole in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import workbench
from workbench import WorkbenchError

pytest.importorskip("accelerate")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

@pytest.fixture(scope="module")
def whole():
    return workbench.load("tasklm", device="cpu")


@pytest.fixture(scope="module")
def offloaded(whole, tmp_path_factory):
    n_bytes = sum(p.numel() * p.element_size() for p in whole.model.parameters())
    cap = n_bytes * 3 // 4  # the embedding fits under the cap; the layers do not, and go to disk
    folder = tmp_path_factory.mktemp("offload")
    subject = workbench.load("tasklm", device_map="auto", max_memory={"cpu": cap}, offload_folder=str(folder))
    return subject, n_bytes, cap


def test_weights_really_offloaded(offloaded):
    subject, n_bytes, cap = offloaded
    dmap = subject.model.hf_device_map
    assert set(dmap.values()) == {"cpu", "disk"}, dmap
    assert any(k.startswith("gpt_neox.layers") and v == "disk" for k, v in dmap.items()), dmap
    # the module holds no layer weights: accelerate loads them from disk for each forward (a
    # safetensors checkpoint is read in place, so offload_folder stays empty)
    layer_params = [p for n, p in subject.model.named_parameters() if ".layers." in n]
    assert layer_params and all(p.device.type == "meta" for p in layer_params)
    assert subject.device == torch.device("cpu")


def test_cache_matches_the_whole_model(whole, offloaded):
    subject = offloaded[0]
    texts = ["the keys near the cabinet are old .", "the dog by the doors was happy ."]
    sites = ["embed", "pattern.0", "z.1", "resid_post.1", "logits"]
    a, b = whole.cache(texts, sites), subject.cache(texts, sites)
    for s in sites:
        assert torch.allclose(a[s], b[s], atol=1e-5), s


def test_head_scores_match_the_whole_model(whole, offloaded):
    from workbench.attention import head_scores
    from workbench.data import repeated_sequences

    ids = {"input_ids": torch.tensor(repeated_sequences(whole.tokenizer, 8, 10, seed=0)["input_ids"])}
    a = head_scores(whole, ids, n_boot=50, control=True)
    b = head_scores(offloaded[0], ids, n_boot=50, control=True)
    for var in ("score", "ci_low", "ci_high", "control"):
        np.testing.assert_allclose(b[var], a[var], atol=1e-5, err_msg=var)


def test_scan_heads_attribution_matches_the_whole_model(whole, offloaded):
    from workbench.attention import scan_heads
    from workbench.data import agreement_sentences

    texts = agreement_sentences(6, seed=2)
    a = scan_heads(whole, texts, replacement="mean")
    b = scan_heads(offloaded[0], texts, replacement="mean")
    assert np.abs(a["attribution"]).max() > 1e-3
    np.testing.assert_allclose(b["attribution"], a["attribution"], atol=1e-5)
    np.testing.assert_allclose(b["effect"], a["effect"], atol=1e-5)


def test_dispatch_arguments_are_checked(tmp_path):
    with pytest.raises(WorkbenchError, match="only apply with device_map"):
        workbench.load("tasklm", max_memory={"cpu": "1MB"})
    with pytest.raises(WorkbenchError, match="only apply with device_map"):
        workbench.load("tasklm", offload_folder=str(tmp_path))
    with pytest.raises(WorkbenchError, match="max_memory must be a dict"):
        workbench.load("tasklm", device_map="auto", max_memory="1MB")
    with pytest.raises(WorkbenchError, match="device_map must be"):
        workbench.load("tasklm", device_map=["cpu"])
