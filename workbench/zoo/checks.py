"""Ground-truth checks of the zoo decoder's mechanisms, on held-out data.

Used by the training recipe (to write the model card) and by the tests (to prove the
shipped weights hold what the card says). Each check returns plain numbers.
"""

from __future__ import annotations

import torch

from workbench.data import agreement_pairs, icl_prompts, repeated_sequences, task_names
from workbench.metrics import last_logits

EVAL_SEED = 10_007  # held out: training draws its prompts from other seeds


def _last_logits(subject, prompts: list[str], batch_size: int = 256) -> torch.Tensor:
    return torch.cat([last_logits(subject.logits(b), b) for b in subject.batches(prompts, batch_size)])


def icl_accuracy(subject, *, n_demos: int = 4, n_prompts: int = 100, seed: int = EVAL_SEED, tasks=None,
                 split="all") -> dict[str, float]:
    """Top-1 accuracy of the answer after ``n_demos`` demonstrations, per task (0: zero-shot)."""
    out = {}
    for task in tasks or task_names():
        ds = icl_prompts(task, n_demos, n_prompts, seed=seed, split=split, tokenizer=subject.tokenizer)
        pred = _last_logits(subject, ds["prompt"]).argmax(-1)
        out[task] = float((pred == torch.tensor(ds["answer_id"], device=pred.device)).float().mean())
    return out


def agreement_accuracy(subject, *, n: int = 1000, seed: int = EVAL_SEED, split: str = "test") -> dict[str, float]:
    """How often the correct verb form outscores the wrong one on held-out sentences."""
    ds = agreement_pairs(n, seed=seed, split=split, tokenizer=subject.tokenizer)
    logits = _last_logits(subject, ds["clean"])
    rows = torch.arange(len(ds))
    good = logits[rows, torch.tensor(ds["clean_answer_id"])]
    bad = logits[rows, torch.tensor(ds["corrupted_answer_id"])]
    correct = good > bad
    attractor = torch.tensor(ds["attractor"])
    return {
        "accuracy": float(correct.float().mean()),
        "accuracy_attractor": float(correct[attractor].float().mean()),
        "accuracy_no_attractor": float(correct[~attractor].float().mean()),
        "mean_logit_diff": float((good - bad).mean()),
        "n": len(ds),
    }


def induction(subject, *, n: int = 200, length: int = 20, seed: int = EVAL_SEED) -> dict:
    """Loss on the first occurrence vs the repeat of random sequences, and the best
    previous-token and induction heads by attention score."""
    ds = repeated_sequences(subject.tokenizer, n, length, seed=seed)
    ids = torch.tensor(ds["input_ids"])
    sites = [f"pattern.{layer}" for layer in range(subject.n_layers)] + ["logits"]
    acts = subject.cache(ids, sites)
    logp = acts["logits"].log_softmax(-1)
    nll = -logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]  # [b, p-1], nll of token p+1
    off = ds["offset"][0]
    first = nll[:, off : off + length - 1].mean()  # predicting tokens 2..L of the first copy
    repeat = nll[:, off + length : off + 2 * length - 1].mean()  # tokens 2..L of the repeat
    q = torch.arange(off + length, off + 2 * length)  # query positions in the repeat
    prev_scores, ind_scores = [], []
    for layer in range(subject.n_layers):
        pat = acts[f"pattern.{layer}"]  # [b, h, q, k]
        pos = torch.arange(1, pat.shape[-1])
        prev_scores.append(pat[:, :, pos, pos - 1].mean((0, 2)))
        ind_scores.append(pat[:, :, q, q - length + 1].mean((0, 2)))
    prev = torch.stack(prev_scores)
    ind = torch.stack(ind_scores)
    pl, ph = divmod(int(prev.argmax()), subject.n_heads)
    il, ih = divmod(int(ind.argmax()), subject.n_heads)
    return {
        "loss_first": float(first),
        "loss_repeat": float(repeat),
        "prev_token_head": (pl, ph),
        "prev_token_score": float(prev.max()),
        "induction_head": (il, ih),
        "induction_score": float(ind.max()),
        "prev_token_scores": prev.tolist(),
        "induction_scores": ind.tolist(),
    }
