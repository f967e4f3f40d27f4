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
# # interp-workbench quickstart
#
# Everything here runs offline on a CPU in well under a minute. We load the two zoo
# models, read activations through a **Subject**, and look at attention with a live
# widget and with a plain figure built from a saved result.
#
# - `tasklm`: a tiny Pythia-style GPT-NeoX trained by this project on the task suite. It has known
#   mechanisms (a previous-token head feeding an induction head, in-context task
#   inference, number agreement) so every tool can be checked against ground truth.
# - `minilm`: all-MiniLM-L6-v2, a real pretrained BERT encoder (6 layers x 12 heads).
#
# Any Hugging Face hub id or local path works wherever a zoo name does, e.g.
# `workbench.load("gpt2")` when you have a network.

# %%
import torch

import workbench
from workbench.attention import attention_patterns
from workbench.data import icl_prompts, repeated_sequences
from widgets import AttentionView, pattern_heatmap

torch.manual_seed(0)
tasklm = workbench.load("tasklm")
tasklm

# %% [markdown]
# ## Sites: one vocabulary for every architecture
#
# A site is `kind.layer`: `resid_pre`, `pattern`, `z` (per-head output before the output
# projection), `attn_out`, `mlp_out`, `resid_post`, plus `embed` and `logits`. The same
# names work on GPT-2, Pythia, Llama, Qwen2, Mistral, Gemma-2 and BERT.

# %%
print(tasklm.sites)
acts = tasklm.cache(["hot -> cold ; big -> small ; tall ->"], ["z.1", "pattern.1", "resid_post.1", "logits"])
{name: tuple(value.shape) for name, value in acts.items()}

# %% [markdown]
# ## In-context task inference
#
# Two demonstrations tell the model which task is meant; the bare query would be
# ambiguous (`tall` could be capitalized, or mapped to its first letter).

# %%
def top_tokens(subject, prompt, k=3):
    batch = subject.tokenize([prompt])
    logits = subject.logits(batch)[0, batch.last[0]]
    probs = logits.softmax(-1)
    top = probs.topk(k)
    return [(subject.tokenizer.decode([int(i)]), round(float(p), 3)) for p, i in zip(top.values, top.indices)]


for prompt in ["hot -> cold ; big -> small ; tall ->", "cat -> Cat ; dog -> Dog ; tall ->", "tall ->"]:
    print(f"{prompt!r:45} {top_tokens(tasklm, prompt)}")

# %% [markdown]
# ## Attention: a live view
#
# Repeated random tokens make the induction mechanism visible: in the second copy an
# induction head attends to the token *after* the earlier occurrence of the current
# token. Pick a layer and head; click a row of the heatmap to see that query's
# attention over the tokens.

# %%
seqs = repeated_sequences(tasklm.tokenizer, 2, 10, seed=0)
prompts = [tasklm.tokenizer.decode(ids[1:]) for ids in seqs["input_ids"]]
prompts.append("the keys near the cabinet are")
patterns = attention_patterns(tasklm, prompts)

# score every head: mean attention to the previous token, and to the token after the
# previous occurrence (on the repeated half)
L = 10
pat = torch.tensor(patterns["pattern"][:2])  # [prompt, layer, head, q, k]
q = torch.arange(1 + L, 1 + 2 * L)
prev_score = pat[..., torch.arange(1, 2 * L + 1), torch.arange(0, 2 * L)].mean((0, -1))
induction_score = pat[..., q, q - L + 1].mean((0, -1))
ind_layer, ind_head = divmod(int(induction_score.argmax()), tasklm.n_heads)
prev_layer, prev_head = divmod(int(prev_score.argmax()), tasklm.n_heads)
print(f"previous-token head L{prev_layer}H{prev_head} ({float(prev_score.max()):.2f}), "
      f"induction head L{ind_layer}H{ind_head} ({float(induction_score.max()):.2f})")

view = AttentionView(patterns, layer=ind_layer, head=ind_head)
view

# %% [markdown]
# ## A plain figure, from a saved result
#
# Results save to one safetensors file and load back exactly; figures are built from
# results, never from the live model.

# %%
import tempfile, os

path = patterns.save(os.path.join(tempfile.mkdtemp(), "patterns.safetensors"))
again = workbench.Result.load(path)
assert again.equals(patterns)
fig = pattern_heatmap(again, prompt=0, layer=ind_layer, head=ind_head)
fig.show()
again.to_frame(["lengths"])

# %% [markdown]
# ## A real pretrained encoder: MiniLM
#
# BERT-family attention is bidirectional. Many MiniLM heads park their attention on
# `[CLS]` or `[SEP]` when they have nothing better to do.

# %%
minilm = workbench.load("minilm")
print(minilm)
enc = attention_patterns(minilm, ["The keys to the cabinet are on the table."])
p = torch.tensor(enc["pattern"][0])  # [layer, head, q, k]
n = int(enc["lengths"][0])
special = p[..., :n, [0, n - 1]].sum(-1).mean(-1)  # share of attention on [CLS] + [SEP]
print("mean attention on [CLS]/[SEP] per layer:", [round(float(x), 2) for x in special.mean(-1)])
AttentionView(enc, layer=3, head=0)

# %% [markdown]
# ## Checks
#
# The notebook ends by checking what it claimed.

# %%
assert tasklm.n_layers >= 2 and minilm.n_layers == 6 and minilm.n_heads == 12
assert top_tokens(tasklm, "hot -> cold ; big -> small ; tall ->")[0][0] == "short"
assert top_tokens(tasklm, "cat -> Cat ; dog -> Dog ; tall ->")[0][0] == "Tall"
assert ind_layer > prev_layer, "the induction head sits above the previous-token head"
assert float(induction_score.max()) > 0.5 and float(prev_score.max()) > 0.5
assert float(special.max()) > 0.5, "some MiniLM layer parks most attention on [CLS]/[SEP]"
assert torch.allclose(p[..., :n, :n].sum(-1), torch.ones(6, 12, n), atol=1e-4), "rows are distributions"
print("all quickstart checks passed")
