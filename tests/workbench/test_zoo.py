"""The zoo: both models load offline, and tasklm holds the mechanisms its card claims,
measured on held-out data."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import workbench
from workbench import zoo
from workbench.data import task_names
from workbench.zoo import checks


@pytest.fixture(scope="module")
def card():
    return (zoo.TASKLM_DIR / "README.md").read_text()


@pytest.fixture(scope="module")
def measured():
    return json.loads((zoo.TASKLM_DIR / "measurements.json").read_text())


@pytest.fixture(scope="module")
def induction(tasklm):
    return checks.induction(tasklm)


def test_zoo_names_and_offline_loading(tasklm, minilm):
    assert zoo.names() == ["tasklm", "minilm"]
    assert tasklm.family.name == "gpt_neox" and tasklm.causal and tasklm.has_logits
    assert (minilm.n_layers, minilm.n_heads, minilm.d_model) == (6, 12, 384) and not minilm.causal
    assert tasklm.provenance()["weights_sha256"] == zoo.get("tasklm").weights_sha256()
    ids = tasklm.tokenizer("France -> Paris").input_ids
    assert tasklm.tokenizer.convert_ids_to_tokens(ids) == ["<bos>", "France", "->", "Paris"]


def test_minilm_is_the_real_pretrained_model(minilm):
    """Mean-pooled, normalised MiniLM embeddings from the Subject equal sentence-transformers'."""
    from sentence_transformers import SentenceTransformer

    sentences = ["The keys to the cabinet are on the table.", "A cat sat on the mat."]
    ref = SentenceTransformer(str(zoo.get("minilm").path()), device="cpu").encode(sentences, convert_to_tensor=True)
    batch = minilm.tokenize(sentences)
    h = minilm.cache(batch, ["resid_post.5"])["resid_post.5"]
    m = batch.attention_mask[..., None].float()
    ours = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert float(torch.cosine_similarity(ours[0], ours[1], dim=0)) < 0.9  # different sentences differ


def test_induction_loss_on_the_repeat_is_far_below_the_first_occurrence(induction):
    assert induction["loss_first"] > 5.0  # random tokens: about ln(vocab)
    assert induction["loss_repeat"] < 0.1 * induction["loss_first"]


def test_a_previous_token_head_feeds_an_induction_head(tasklm, induction):
    (pl, ph), (il, ih) = induction["prev_token_head"], induction["induction_head"]
    assert pl < il, "the previous-token head sits below the induction head"
    assert induction["prev_token_score"] > 0.5 and induction["induction_score"] > 0.5
    # knock out the previous-token heads of that layer: the induction head loses its
    # target and the repeat stops being predictable; the layer's other heads, knocked out
    # together as a control, matter far less
    def ablate(heads):
        def fn(z):
            z = z.clone()
            z[:, :, heads] = 0
            return z
        return fn

    from workbench.data import repeated_sequences

    ds = repeated_sequences(tasklm.tokenizer, 100, 20, seed=checks.EVAL_SEED)
    ids = torch.tensor(ds["input_ids"])

    def repeat_loss_and_score(patch):
        acts = tasklm.cache(ids, [f"pattern.{il}", "logits"], patch=patch)
        nll = -acts["logits"].log_softmax(-1)[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
        q = torch.arange(21, 41)
        return float(nll[:, 21:40].mean()), float(acts[f"pattern.{il}"][:, ih, q, q - 19].mean())

    prev = [h for h in range(tasklm.n_heads) if induction["prev_token_scores"][pl][h] > 0.3]
    others = [h for h in range(tasklm.n_heads) if h not in prev]
    assert ph in prev and others, (prev, others)
    base_loss, base_score = repeat_loss_and_score(None)
    cut_loss, cut_score = repeat_loss_and_score({f"z.{pl}": ablate(prev)})
    control_loss, _ = repeat_loss_and_score({f"z.{pl}": ablate(others)})
    assert base_loss < 0.5
    assert cut_score < 0.5 * base_score
    assert cut_loss > base_loss + 2.0
    assert control_loss < cut_loss - 1.0


def test_in_context_task_inference_beats_zero_shot_on_every_task(tasklm):
    icl = checks.icl_accuracy(tasklm, n_demos=4)
    zero = checks.icl_accuracy(tasklm, n_demos=0)
    for task in task_names():
        assert icl[task] >= 0.8, (task, icl[task])
        assert icl[task] - zero[task] >= 0.35, (task, icl[task], zero[task])
    assert np.mean(list(zero.values())) < 0.6


def test_number_agreement_across_a_distractor(tasklm):
    agr = checks.agreement_accuracy(tasklm)
    assert agr["n"] >= 900
    assert agr["accuracy"] >= 0.9 and agr["accuracy_attractor"] >= 0.85


def test_the_card_states_the_measured_numbers(tasklm, card, measured, induction):
    """The card is written from measurements.json, and re-measuring the shipped weights
    gives the same numbers."""
    assert f"{measured['induction']['loss_repeat']:.3f} nats" in card
    h = measured["induction"]["induction_head"]
    assert f"induction head: L{h[0]}H{h[1]}" in card
    for task, acc in measured["icl_k4"].items():
        row = re.search(rf"\| {task} \| ([0-9.]+) \| ([0-9.]+) \| ([0-9.]+) \|", card)
        assert row and float(row.group(3)) == pytest.approx(acc, abs=0.005)
    assert induction["loss_repeat"] == pytest.approx(measured["induction"]["loss_repeat"], abs=1e-4)
    assert tuple(induction["induction_head"]) == tuple(h)
    fresh = checks.agreement_accuracy(tasklm)
    assert fresh["accuracy"] == pytest.approx(measured["agreement"]["accuracy"], abs=1e-6)
    assert "python -m workbench.zoo.train" in card


def test_recipe_is_recorded(measured):
    recipe = json.loads((zoo.TASKLM_DIR / "recipe.json").read_text())
    assert recipe["recipe"]["seed"] == 0 and recipe["history"][-1]["loss"] == pytest.approx(measured["final_loss"])


def test_recipe_is_seeded_and_resumes_exactly(tmp_path):
    """Same seed, same weights; an interrupted run resumed from its checkpoint ends
    with the same weights as an uninterrupted one."""
    from safetensors.torch import load_file

    from workbench.zoo.train import Recipe, train

    recipe = Recipe(steps=6, batch_size=8, first_steps=2, first_batch_size=4, warmup=2, threads=1, agreement_pool=200)
    train(recipe, tmp_path / "a", measure_after=False, checkpoint_every=2)
    assert train(recipe, tmp_path / "b", measure_after=False, checkpoint_every=2, stop_after=3) == {"interrupted_at": 3}
    assert (tmp_path / "b" / "checkpoint.pt").exists()
    train(recipe, tmp_path / "b", measure_after=False, checkpoint_every=2)
    a, b = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "b" / "checkpoint.pt").exists()
    other = Recipe(steps=6, batch_size=8, first_steps=2, first_batch_size=4, warmup=2, threads=1, agreement_pool=200, seed=1)
    train(other, tmp_path / "c", measure_after=False)
    c = load_file(tmp_path / "c" / "model.safetensors")
    assert any(not torch.equal(a[k], c[k]) for k in a)
