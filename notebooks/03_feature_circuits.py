# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Sparse feature circuits for subject-verb agreement
#
# The zoo decoder `tasklm` learned subject-verb agreement: after `the keys near the
# cabinet` it prefers `are` over `is`, whatever the number of the distractor noun. Here
# we find *how*, in the vocabulary of sparse autoencoder (SAE) features, following
# "Sparse Feature Circuits" (Marks et al.):
#
# 1. train TopK SAEs at three sites on activations of agreement sentences and evaluate
#    them (sparsity, reconstruction, language-model loss recovered);
# 2. measure every feature's (and every site's error node's) effect on the agreement
#    logit difference when the subject's number is flipped, by attribution patching,
#    by integrated gradients and by exact activation patching, and compare them;
# 3. build the circuit graph and measure its faithfulness and completeness;
# 4. look at the top features, steer with one, and ablate a handful to remove the
#    behaviour (SHIFT).
#
# Offline, on the CPU, in a couple of minutes.

# %%
import numpy as np
import plotly.graph_objects as go
import torch
from scipy.stats import spearmanr

import workbench
from widgets import CircuitExplorer
from workbench.circuits import (
    SAE, ablate_features, collect, evaluate_sae, faithfulness, feature_means, feature_summary, find_circuit,
    node_effects, output_direction, steer, train_sae,
)
from workbench.data import agreement_pairs, agreement_sentences
from workbench.metrics import logit_diff

torch.manual_seed(0)
lm = workbench.load("tasklm")
lm

# %% [markdown]
# ## 1. Dictionaries
#
# Three sites: the residual stream after layer 0 (`resid_post.0`), and the attention and
# MLP outputs of layer 1. At each: 256 features, TopK with k = 8, trained for 1200
# steps of 256 tokens on 3000 agreement sentences (position 0, the BOS token, left out;
# an auxiliary loss revives dead features). Evaluation on held-out sentences.

# %%
SITES = ["resid_post.0", "attn_out.1", "mlp_out.1"]
train_texts = agreement_sentences(3000, seed=0, split="train")
eval_texts = agreement_sentences(300, seed=1, split="test")
saes, evals, logs = {}, {}, {}
for site in SITES:
    acts = collect(lm, site, train_texts)
    sae = SAE(acts.shape[-1], 256, kind="topk", k=8, site=site, model="tasklm")
    logs[site] = train_sae(sae, acts, steps=1200, batch_size=256, lr=2e-3, dead_after=20_000, progress=False)
    saes[site] = sae
    evals[site] = evaluate_sae(lm, sae, eval_texts)
    del acts
{s: {k: round(float(v), 4) for k, v in e.metrics.items() if k in ("l0", "fvu", "dead_fraction", "loss_clean", "loss_sae",
                                                            "loss_mean", "loss_recovered_mean")}
 for s, e in evals.items()}

# %% [markdown]
# Each SAE keeps exactly k = 8 features per token and explains nearly all the variance;
# splicing it in leaves the language-model loss where it was (loss recovered against
# mean-ablating the site, near 1). Many features die at `attn_out.1`: on these
# templatic sentences layer 1's attention writes few distinct directions.

# %% [markdown]
# ## 2. Node effects: attribution against exact patching
#
# Clean prompts end where the verb should come (`the pilots behind the girls`); their
# corrupted twins flip the subject's number (`the pilot behind the girls`). The metric is
# the logit difference between the clean answer and the corrupted one (`are` minus `is`
# here). A node's effect is the change in the metric when it alone takes its corrupted
# value. Attribution patching estimates all 771 effects (3 x 256 features + 3 error
# nodes) from one forward and one backward pass; integrated gradients refine it with 10
# steps per site; exact patching runs one forward pass per node.

# %%
pairs = agreement_pairs(48, seed=3, split="test", tokenizer=lm.tokenizer)
clean, corrupted = list(pairs["clean"]), list(pairs["corrupted"])
good, bad = list(pairs["clean_answer_id"]), list(pairs["corrupted_answer_id"])


def metric(logits, batch):
    return logit_diff(logits, batch, good, bad)


attrib = node_effects(lm, saes, clean, corrupted, metric, method="attribution")
ig = node_effects(lm, saes, clean, corrupted, metric, method="ig", ig_steps=10)
exact = node_effects(lm, saes, clean, corrupted, metric, method="exact")
e = exact["effect"]
top50 = np.argsort(-np.abs(e))[:50]
agreement = {name: {"spearman_top50": float(spearmanr(r["effect"][top50], e[top50])[0]),
                    "top10_overlap": len(set(np.argsort(-np.abs(r["effect"]))[:10]) & set(top50[:10])) / 10}
             for name, r in (("attrib", attrib), ("ig", ig))}
print("exact top nodes:", [(n, round(float(v), 3)) for n, v in exact.top(8)])
agreement

# %% [markdown]
# ## 3. The circuit and its faithfulness
#
# Nodes with |effect| >= 0.1 (integrated gradients), edges between consecutive sites by
# vector-Jacobian products. Faithfulness: mean-ablate every node outside the circuit and
# keep the fraction of the metric (1 = the circuit alone does it); completeness: ablate
# the circuit alone (near 0 = nothing outside it matters).

# %%
graph = find_circuit(lm, saes, clean, corrupted, metric, node_threshold=0.1, edge_threshold=0.01, effects=ig)
nodes, edges = graph.subgraph()
means = feature_means(lm, saes, eval_texts)
faith = faithfulness(lm, saes, clean, metric, ig, means=means)
print(f"circuit at |effect| >= 0.1: {len(nodes)} nodes, {len(edges)} edges")
faith.to_frame()[["size", "faithfulness", "completeness"]].round(3)

# %% [markdown]
# Two things show at once. A handful of nodes is **necessary**: ablating the top 7
# alone takes the logit difference to what it is with everything ablated (completeness
# near 0). But they are not **sufficient**: with everything else mean-ablated, the top
# nodes keep little of the metric, and it takes a couple of hundred nodes to keep 80%.
# Node effects rank what *differs* between clean and corrupted prompts (the subject's
# number); the features that tell the model that a verb comes next at all do not differ,
# so they rank low, yet mean-ablating them breaks the prediction.

# %%
fig = go.Figure([go.Scatter(x=faith["size"], y=faith["faithfulness"], mode="lines+markers", name="faithfulness (circuit kept)"),
                 go.Scatter(x=faith["size"], y=faith["completeness"], mode="lines+markers", name="completeness (circuit ablated)")])
fig.update_layout(xaxis_type="log", xaxis_title="circuit size (nodes)", yaxis_title="fraction of the metric", height=320,
                  title="faithfulness against circuit size")
fig.show()
necessary = int(faith["size"][np.argmax(faith["completeness"] < 0.05)])
sufficient = int(faith["size"][np.argmax(faith["faithfulness"] >= 0.8)])
print(f"{necessary} nodes are necessary (completeness < 0.05); {sufficient} of 771 keep >= 80% of the metric")

# %% [markdown]
# ## 4. What the top features are
#
# The two strongest nodes sit at layer 1's attention output. Their dashboards: the
# contexts where they fire most, and the tokens their decoder directions promote.

# %%
top_attn = [int(n.split("/")[1]) for n, _ in ig.top(40) if n.startswith("attn_out.1/") and not n.endswith("err")][:6]
W_U = lm.W_U.detach()
plural_dir = W_U[:, lm.tokenizer.convert_tokens_to_ids("are")] - W_U[:, lm.tokenizer.convert_tokens_to_ids("is")]
number = {f: float(output_direction(lm, saes["attn_out.1"], f, "attn_out.1") @ plural_dir) for f in top_attn}
plural_f, singular_f = max(number, key=number.get), min(number, key=number.get)
summaries = {f: feature_summary(lm, saes["attn_out.1"], f, eval_texts) for f in (plural_f, singular_f)}
for f, s in summaries.items():
    print(f"attn_out.1/{f}: promotes {s.attrs['promoted'][:5]}, fires on {s.attrs['frequency']:.1%} of tokens; "
          f"top context {' '.join(s.examples[0]['tokens'])!r}")

# %% [markdown]
# One feature promotes the plural verbs (`are`, `were`, `have`) and fires at the last
# token of plural-subject prompts; its partner promotes `is` / `was` / `has` after
# singular subjects. Layer 1's attention moves the subject's number to the position
# where the verb is predicted.
#
# **Steering.** On singular-subject prompts, add the plural feature's direction at the
# last position with growing strength and watch `logit(plural verb) - logit(singular verb)`.

# %%
sg = [i for i, p in enumerate(pairs["subject_plural"]) if not p]
sg_prompts = [clean[i] for i in sg]
plural_ids = [bad[i] for i in sg]  # for singular subjects the corrupted answer is the plural verb
singular_ids = [good[i] for i in sg]


def plural_pref(logits, batch):
    return logit_diff(logits, batch, plural_ids, singular_ids)


max_act = summaries[plural_f].attrs["max_activation"]
steering = {s: steer(lm, saes["attn_out.1"], plural_f, s * max_act, sg_prompts, plural_pref, positions="last")
            for s in (0.0, 1.0, 2.0, 3.0)}
flipped = {s: float((r["after"] > 0).mean()) for s, r in steering.items()}
print({s: round(float(r["after"].mean()), 2) for s, r in steering.items()}, "fraction preferring plural:", flipped)

# %% [markdown]
# **SHIFT-style ablation.** Mean-ablate the circuit's top features (no error nodes)
# and the agreement logit difference collapses; the same number of random features,
# as a control, leave it where it was.

# %%
top_feats: dict[str, list[int]] = {}
for name, _ in ig.top(12):
    site, j = name.split("/")
    if j != "err" and sum(map(len, top_feats.values())) < 6:
        top_feats.setdefault(site, []).append(int(j))
shift = ablate_features(lm, saes, top_feats, clean, metric, replacement="mean", means=means)
rng = np.random.default_rng(0)
random_changes = []
for draw in range(5):
    feats = {s: rng.choice(256, len(js), replace=False).tolist() for s, js in top_feats.items()}
    random_changes.append(ablate_features(lm, saes, feats, clean, metric, replacement="mean", means=means).change)
print(f"ablating {top_feats}: logit diff {shift['before'].mean():.2f} -> {shift['after'].mean():.2f}; "
      f"random features: {np.mean(random_changes):+.3f} +- {np.std(random_changes):.3f}")

# %% [markdown]
# ## The explorer
#
# Slide the thresholds to grow or prune the circuit (below the threshold the graph was
# built at, the explorer computes the edges of the new nodes first); hover an edge for its
# weight; click a feature node for its dashboard (contexts with the activation of each
# token on hover, the activation histogram, top and bottom logits; type any feature id
# and press "show" to jump to it), then "ablate" or "steer" it and read the metric change
# (steering also lists what the model now says next); "faithfulness" checks the nodes on
# screen; "export" saves the view as one HTML file that opens offline.

# %%
explorer = CircuitExplorer(graph, subject=lm, saes=saes, clean=clean, corrupted=corrupted, metric=metric,
                           texts=eval_texts, means=means, node=f"attn_out.1/{plural_f}")
explorer

# %% [markdown]
# ## Checks
#
# The claims above, verified with the numbers measured in this run.

# %%
for site, ev in evals.items():
    assert abs(ev.metrics["l0"] - 8) < 0.05, (site, ev.metrics)          # TopK keeps k features
    assert ev.metrics["fvu"] < 0.05, (site, ev.metrics)                  # reconstructs the site
    assert ev.metrics["loss_recovered_mean"] > 0.95, (site, ev.metrics)  # and keeps the LM's loss
# attribution patching ranks the strongest nodes as exact patching does; IG does at least as well
assert agreement["attrib"]["spearman_top50"] >= 0.8, agreement
assert agreement["ig"]["spearman_top50"] >= agreement["attrib"]["spearman_top50"] - 0.02, agreement
# the full graph is exactly faithful; a few nodes are necessary, many more are needed to be sufficient
assert abs(faith["faithfulness"][-1] - 1) < 1e-6 and abs(faith["completeness"][-1]) < 1e-6
assert necessary <= 10, faith.to_frame()
assert faith["faithfulness"][list(faith["size"]).index(necessary)] < 0.5, faith.to_frame()
assert sufficient <= 771 // 2, faith.to_frame()
# the two top attention features carry the subject's number, in opposite directions
assert number[plural_f] > 0 > number[singular_f], number
assert set(summaries[plural_f].attrs["promoted"][:5]) & {"are", "were", "have"}
assert set(summaries[singular_f].attrs["promoted"][:5]) & {"is", "was", "has"}
# steering with the plural feature flips most singular prompts to the plural verb, monotonically
means_after = [float(steering[s]["after"].mean()) for s in sorted(steering)]
assert all(a < b for a, b in zip(means_after, means_after[1:])), means_after
assert flipped[0.0] < 0.1 and max(flipped.values()) >= 0.8, flipped
# SHIFT: six features remove most of the behaviour; six random ones do not
assert shift["after"].mean() < 0.2 * shift["before"].mean(), shift.to_frame()
assert abs(np.mean(random_changes)) < 0.1 * shift["before"].mean(), random_changes
# the explorer opened on the plural feature's dashboard
assert explorer.dashboard.feature == plural_f
print("all feature-circuit checks passed")
