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
# # Attention heads: what does each head do, and does it matter?
#
# Offline, on the CPU, in a few minutes. On the zoo decoder `tasklm` (whose mechanisms
# are known) we score every head for several head types, confirm by ablation against
# random heads, check attribution patching against exact ablation, prune greedily, and
# probe head outputs. Then we survey the 72 heads of the real pretrained MiniLM.
#
# Every claim is backed by a number this notebook measures, and the last cell checks them.

# %%
import functools

import numpy as np
import torch

import workbench
from workbench import metrics
from workbench.attention import ablate_heads, head_scores, probe, prune_curve, scan_heads
from workbench.data import agreement_pairs, icl_prompts, repeated_sequences
from workbench.zoo import checks
from widgets import AttentionExplorer

torch.manual_seed(0)
lm = workbench.load("tasklm")
lm

# %% [markdown]
# ## 1. Score every head, with intervals and a control
#
# 128 repeated random sequences (`<bos> s s`, 20 tokens each). One batched forward per
# batch reads only the attention probabilities. Each score comes with a 95% bootstrap
# interval over prompts and the same score on a control: the prompt's tokens shuffled.

# %%
rep = repeated_sequences(lm.tokenizer, 128, 20, seed=1)
rep_ids = torch.tensor(rep["input_ids"])
scores = head_scores(lm, {"input_ids": rep_ids}, n_boot=1000)
frame = scores.to_frame()
frame.sort_values("score", ascending=False).groupby("kind").head(2).style.format(precision=2).hide(axis="index")

# %%
prev_head, ind_head = scores.best("previous_token"), scores.best("induction")
truth = checks.induction(lm)  # the zoo's ground truth, measured on held-out sequences
k = scores.coord("kind").index("induction")
print(f"previous-token head L{prev_head[0]}H{prev_head[1]}, induction head L{ind_head[0]}H{ind_head[1]}")
print(f"induction score {scores['score'][k][ind_head]:.3f} "
      f"[{scores['ci_low'][k][ind_head]:.3f}, {scores['ci_high'][k][ind_head]:.3f}], "
      f"control {scores['control'][k][ind_head]:.3f}")

# %% [markdown]
# The interval is over prompts. The control column is the same score with each prompt's
# tokens shuffled (repeats kept, order lost): an induction head follows repeats wherever
# they occur, so it scores high there too; a score that collapses on the control would
# depend on the prompts' structure rather than on a general rule of the head.

# %%
prev_set = [(l, h) for l in range(lm.n_layers) for h in range(lm.n_heads)
            if scores["score"][scores.coord("kind").index("previous_token")][l, h] > 0.5]
ind_set = [(l, h) for l in range(lm.n_layers) for h in range(lm.n_heads) if scores["score"][k][l, h] > 0.5]
print("previous-token heads (score > 0.5):", prev_set, "| induction heads:", ind_set)

# %% [markdown]
# ## 2. Does it matter? Ablation against random heads
#
# Zero-ablate the previous-token heads and measure the next-token loss on the repeated
# sequences, beside 20 random draws of as many other heads. The induction heads read
# from them (K-composition), so knocking them out should break induction although they
# never attend to the answer themselves.

# %%
abl_prev = ablate_heads(lm, rep_ids[:64], prev_set, n_random=20)
abl_prev.summary

# %% [markdown]
# One induction head alone matters little: this model has several, and they back each
# other up. All of them together:

# %%
abl_one = ablate_heads(lm, rep_ids[:64], [ind_head], n_random=20)
abl = ablate_heads(lm, rep_ids[:64], ind_set, n_random=20)
print("one induction head:", round(abl_one.summary["effect"], 3), "| all of them:", round(abl.summary["effect"], 3),
      "| random sets of as many:", round(abl.summary["control_mean"], 3))

# %% [markdown]
# ## 3. Every head at once: exact ablation vs attribution patching
#
# The exact scan ablates each head in its own copy of the batch (batched per layer); the
# attribution estimate takes one forward and one backward pass. On repeated sequences the
# loss of the repeat is saturated near zero, so the clean gradient says almost nothing;
# integrated gradients along the path to the ablated outputs (4 steps per layer) recover
# the ranking.

# %%
scan_plain = scan_heads(lm, rep_ids[:64])
scan = scan_heads(lm, rep_ids[:64], ig_steps=4)
print("exact effect per head:\n", np.round(scan["effect"], 2))
print("attribution (clean gradient):\n", np.round(scan_plain["attribution"], 2))
print("attribution (integrated gradients):\n", np.round(scan["attribution"], 2))
print("Spearman: clean gradient", round(scan_plain.attrs["spearman"], 3), "| integrated", round(scan.attrs["spearman"], 3))

# %% [markdown]
# On a task prompt instead of repeated tokens: in-context antonyms, metric = log-prob of
# the right answer.

# %%
icl = icl_prompts("antonym", 4, 64, seed=3, tokenizer=lm.tokenizer)
logprob = functools.partial(metrics.answer_logprob, answers=list(icl["answer_id"]))
scan_icl = scan_heads(lm, list(icl["prompt"]), metric=logprob)
print("antonym ICL, effect on log p(answer):\n", np.round(scan_icl["effect"], 2))
print("Spearman:", round(scan_icl.attrs["spearman"], 3))

# %% [markdown]
# ## 4. Greedy pruning ("Are Sixteen Heads Really Better than One?")
#
# Michel et al. rank heads by the gradient of the loss with respect to a gate on each
# head. Where the loss saturates (the repeats are predicted almost perfectly) that
# gradient is near zero for every head, so we also rank by the exact effect of removing
# each remaining head (one forward per head per step, cheap on a small model).

# %%
curve = prune_curve(lm, rep_ids[:64])
curve_exact = prune_curve(lm, rep_ids[:64], importance="exact")
import plotly.graph_objects as go

fig = go.Figure()
fig.add_scatter(x=curve["heads_removed"], y=curve["metric"], mode="lines+markers", name="gradient importance")
fig.add_scatter(x=curve_exact["heads_removed"], y=curve_exact["metric"], mode="lines+markers", name="exact importance")
fig.update_layout(title="loss on repeated sequences as heads are pruned", xaxis_title="heads removed",
                  yaxis_title="loss", height=300)

# %%
print("pruning order, gradient:", [f"L{l}H{h}" for l, h in curve.attrs["order"]])
print("pruning order, exact:   ", [f"L{l}H{h}" for l, h in curve_exact.attrs["order"]])
survivors = [tuple(h) for h in curve_exact.attrs["order"][-2:]]
print("the last two standing (exact):", survivors)

# %% [markdown]
# ## 5. Probes on head outputs, with a control task
#
# Per token: is this token in the repeated copy? A linear probe on each head's output,
# 5-fold cross-validated, beside a control task that gives every word type a random label
# (Hewitt & Liang). Selectivity = accuracy - control.

# %%
short = repeated_sequences(lm.tokenizer, 60, 12, seed=5)
labels = [[None] + ["first"] * 12 + ["repeat"] * 12 for _ in range(60)]
probes = probe(lm, torch.tensor(short["input_ids"]), labels, per="token", components="both")
probes.to_frame().sort_values("selectivity", ascending=False).head(6)

# %% [markdown]
# ## 6. Retrieval heads, reuse across tasks, token attribution
#
# Needle in a haystack: a random needle hidden in random tokens, the prompt ending with
# its first two tokens. While the model copies the rest greedily, a head scores when its
# most-attended position is the needle token being copied (Wu et al., 2024).

# %%
from workbench.attention import head_overlap, needle_prompts, retrieval_scores, token_attribution
from widgets.figures import tokens_html
from workbench.attention.attribution import normalised

ret = retrieval_scores(lm, needle_prompts(lm.tokenizer, 24, seed=7))
print("copy accuracy", ret["copy_accuracy"].mean().round(3), "| retrieval scores:\n", np.round(ret["score"], 2))

# %% [markdown]
# Which heads matter for two in-context tasks, and how many do they share?

# %%
cap = icl_prompts("capitalize", 4, 64, seed=3, tokenizer=lm.tokenizer)
scan_cap = scan_heads(lm, list(cap["prompt"]), metric=functools.partial(metrics.answer_logprob, answers=list(cap["answer_id"])),
                      attribution=False)
overlap = head_overlap(scan_icl["effect"], scan_cap["effect"], top_k=3)
overlap

# %% [markdown]
# Integrated gradients (captum) of the prediction, per input token:

# %%
ig = token_attribution(lm, "hot -> cold ; big -> small ; tall ->")
from IPython.display import HTML

HTML(f"prediction <b>{ig.attrs['target']}</b>" + tokens_html(ig.attrs["tokens"], normalised(ig)))

# %% [markdown]
# ## 7. The explorer
#
# Click a cell of the score grid (or a thumbnail of the all-heads overview below it) to see
# that head's pattern; pick a query row; "ablate" measures the loss change on the selected
# prompt beside random heads. Choosing a score kind moves the selection to its top head.

# %%
explore_prompts = [lm.tokenizer.decode(ids[1:]) for ids in rep["input_ids"][:3]] + [
    "hot -> cold ; big -> small ; tall ->", "the keys near the cabinet are"]
explorer = AttentionExplorer.from_subject(lm, explore_prompts, n_random=10)
explorer.kind = "induction"  # the selection is traits: set it here, or link it to another widget
explorer

# %% [markdown]
# The explorer is a view over two results. Saved and loaded back, they rebuild it without
# the model; "ablate" and "attribute" are then off, and say why.

# %%
import os
import tempfile

folder = tempfile.mkdtemp()
saved = {name: workbench.Result.load(getattr(explorer, name).save(os.path.join(folder, f"{name}.safetensors")))
         for name in ("scores", "patterns")}
offline = AttentionExplorer(saved["scores"], saved["patterns"], kind="induction", layer=ind_head[0], head=ind_head[1])
offline

# %% [markdown]
# ## 8. A real pretrained encoder: MiniLM's 72 heads
#
# Bidirectional, so no induction score. We add two user patterns: the *next* token
# (positional heads look either way) and the special tokens `[CLS]` / `[SEP]`.

# %%
mini = workbench.load("minilm")
pairs = agreement_pairs(96, seed=2)
sentences = [f"{s} {a} here ." for s, a in zip(pairs["clean"], pairs["clean_answer"])]


def next_token(ids):
    n = len(ids)
    return torch.diag(torch.ones(n - 1), 1)


def specials(ids):
    n = len(ids)
    t = torch.zeros(n, n)
    t[:, 0] = t[:, n - 1] = 1  # [CLS] first, [SEP] last
    return t


survey = {kind: head_scores(mini, sentences, kinds=["pattern"], pattern=fn, n_boot=200)
          for kind, fn in [("next_token", next_token), ("special", specials)]}
base = head_scores(mini, sentences, kinds=["previous_token", "self", "duplicate"], n_boot=200)
prev_m = base["score"][0]
next_m = survey["next_token"]["score"][0]
spec_m = survey["special"]["score"][0]
positional = np.maximum(prev_m, next_m) > 0.3  # about 0.12 is uniform on these ~9-token sentences
special_heads = (spec_m > 0.5) & ~positional
content = ~(positional | special_heads)
print(f"positional heads: {positional.sum()}, [CLS]/[SEP] heads: {special_heads.sum()}, other (content) heads: {content.sum()}")
print("layer by layer (P positional, S special, c content):")
for layer in range(mini.n_layers):
    print(layer, "".join("P" if positional[layer, h] else "S" if special_heads[layer, h] else "c"
                         for h in range(mini.n_heads)))

# %% [markdown]
# Probe a property: is the subject plural? One label per sentence (`the keys near the
# cabinet`), read at the preposition, right after the subject noun. The word-type control
# is uninformative here (a handful of prepositions: one random label each), so we compare
# with the majority baseline instead; on per-token probes over many word types (above)
# the control is what keeps a probe honest.

# %%
ds = agreement_pairs(240, seed=4)
tok = mini.tokenizer
number_labels = []
for sentence, prep, plural in zip(ds["clean"], ds["preposition"], ds["subject_plural"]):
    pieces = tok.convert_ids_to_tokens(tok(sentence).input_ids)
    lab = [None] * len(pieces)
    lab[pieces.index(prep)] = "plural" if plural else "singular"
    number_labels.append(lab)
mini_probe = probe(mini, list(ds["clean"]), number_labels, per="token", components="resid", control=False)
print("majority baseline:", round(mini_probe.attrs["majority"], 3))
mini_probe.to_frame()

# %% [markdown]
# ## Any hub model
#
# The same calls run on any supported hub model when you have a network, e.g.:
#
# ```python
# gpt2 = workbench.load("gpt2")                 # or "EleutherAI/pythia-70m", "Qwen/Qwen2-0.5B", ...
# rep = repeated_sequences(gpt2.tokenizer, 64, 20)
# head_scores(gpt2, {"input_ids": torch.tensor(rep["input_ids"])}).to_frame()
# ```

# %% [markdown]
# ## Checks

# %%
assert prev_head == tuple(truth["prev_token_head"]) and ind_head == tuple(truth["induction_head"])
assert prev_head[0] < ind_head[0], "the previous-token head sits below the induction head"
assert scores["ci_low"][k][ind_head] > 0.5
s = abl_prev.summary
assert s["effect"] > 2.0 and s["control_p"] <= 0.05, s  # far beyond random heads
assert abl.summary["effect"] > 2 * abl.summary["control_mean"] and abl.summary["effect"] > 5 * abl_one.summary["effect"]
assert scan.attrs["spearman"] > 0.5 > scan_plain.attrs["spearman"]
assert ret.best() in ind_set and ret["copy_accuracy"].mean() > 0.8, "induction heads do the retrieving"
assert overlap["n_shared"] >= 1, "in-context tasks reuse heads"
# pruning by exact effect leaves the circuit for last: one previous-token and one induction head
assert any(h in prev_set for h in survivors) and any(h in ind_set for h in survivors), survivors
assert curve_exact["metric"][2] < curve_exact["metric"][0] + 0.1  # the first two heads pruned hardly matter
i = probes.coord("component").index(f"L{ind_head[0]}H{ind_head[1]}")
assert probes["accuracy"][i] > 0.9 and probes["selectivity"][i] > 0.3
assert positional.sum() >= 3 and special_heads.sum() >= 10 and content.sum() >= 3, "MiniLM has all three kinds"
assert mini_probe["accuracy"].max() > 0.9 > mini_probe.attrs["majority"] + 0.3
# the explorer rebuilt from saved results draws the same grid, with the model's actions off
assert np.array_equal(np.asarray(offline.grid.data[0].z), np.asarray(explorer.grid.data[0].z), equal_nan=True)
assert offline.ablate_button.disabled and not explorer.ablate_button.disabled
print("all attention-head checks passed")
