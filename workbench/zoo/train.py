"""Training recipe of the ``tasklm`` zoo model. One command rebuilds it::

    python -m workbench.zoo.train            # writes workbench/zoo/tasklm/
    python -m workbench.zoo.train --out DIR  # somewhere else

A small Pythia-style GPT-NeoX (rotary positions) with a word-level tokenizer is trained
from scratch (seeded), first on repeated random sequences alone (a previous-token head
feeding an induction head forms there), then on a mixture of three kinds of sequence
built from the task suite:

- in-context task prompts ``x -> y ; x -> y ; ...`` of the eight word tasks, 2-9 pairs;
- random token sequences seen twice at random places (so induction heads form);
- agreement sentences ``the keys near the cabinet are old .`` (train split only).

After training the recipe measures the mechanisms on held-out data
(:mod:`workbench.zoo.checks`) and writes the model card with those numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from workbench.data import DEFAULT_FORMAT, agreement_sentences, get_task, task_names, vocabulary
from workbench.zoo import TASKLM_DIR
from workbench.zoo.tokenizer import build_word_tokenizer


@dataclass
class Recipe:
    seed: int = 0
    arch: str = "gpt_neox"  # rotary positions: previous-token heads form fast; "gpt2" also works
    rotary_pct: float = 1.0  # gpt_neox only
    n_layer: int = 2
    n_embd: int = 128
    n_head: int = 4
    n_inner: int = 512
    n_positions: int = 128
    steps: int = 3500  # in all, the first phase included
    batch_size: int = 128
    lr: float = 1e-3
    warmup: int = 100
    weight_decay: float = 0.01
    min_pairs: int = 2  # pairs per in-context sequence (the first is a zero-shot query)
    max_pairs: int = 9
    rep_len: tuple[int, int] = (8, 24)
    rep_pad: int = 10  # up to this many random tokens before the sequence and between its copies
    mix: dict[str, float] = field(default_factory=lambda: {"icl": 0.4, "induction": 0.4, "agreement": 0.2})
    # A first phase on repeated sequences alone: a clean previous-token -> induction circuit
    # forms in it. Trained on the mixture from the start, the same model found a diffuse
    # positional solution instead (low repeat loss, no previous-token head).
    first_steps: int = 1000
    first_batch_size: int = 64
    first_mix: dict[str, float] = field(default_factory=lambda: {"induction": 1.0})
    balanced_first: float = 0.25  # share of in-context sequences whose first answer trains a zero-shot prior
    agreement_pool: int = 40_000
    threads: int = 1


class Sampler:
    """Draws training sequences (token id lists) for the mixture, deterministically."""

    def __init__(self, recipe: Recipe, tokenizer) -> None:
        self.r = recipe
        self.rng = random.Random(recipe.seed)
        self.vocab = tokenizer.get_vocab()
        self.bos = tokenizer.bos_token_id
        special = set(tokenizer.all_special_ids)
        self.pool = [i for i in range(len(tokenizer)) if i not in special]
        self.tasks = [get_task(t) for t in task_names()]
        self.sentences = agreement_sentences(recipe.agreement_pool, seed=recipe.seed + 1, split="train")
        self.maps = {t.name: dict(t.pairs) for t in self.tasks}
        self.owners: dict[str, list] = {}
        for t in self.tasks:
            for x in t.inputs:
                self.owners.setdefault(x, []).append(t)

    def ids(self, text: str) -> list[int]:
        return [self.bos] + [self.vocab[w] for w in text.split()]

    def icl(self) -> tuple[list[int], list[int]]:
        """In-context pairs of one task. Most sequences pick the task uniformly and do not
        train the first answer (so no zero-shot prior comes from task frequencies); a
        fraction pick the first input first (a uniform task's uniform input, so small
        input sets such as the letters are covered) and then a task among those that own
        it, which trains a zero-shot prior that is uniform over the input's tasks."""
        n = self.rng.randint(self.r.min_pairs, self.r.max_pairs)
        if self.rng.random() < self.r.balanced_first:
            x = self.rng.choice(self.rng.choice(self.tasks).inputs)
            task = self.rng.choice(self.owners[x])
            first = (x, self.maps[task.name][x])
            rest = self.rng.sample([p for p in task.pairs if p[0] != x], n - 1)
            ids = self.ids(DEFAULT_FORMAT.demos_only([first, *rest]))
            return ids, list(ids)
        task = self.rng.choice(self.tasks)
        ids = self.ids(DEFAULT_FORMAT.demos_only(self.rng.sample(task.pairs, n)))
        targets = list(ids)
        targets[3] = -100  # <bos> x1 -> [y1]: the first answer is a guess without demonstrations
        return ids, targets

    def induction(self) -> tuple[list[int], list[int]]:
        """A random sequence seen twice, at random places: ``<bos> prefix seq gap seq``.
        The random prefix and gap keep positions from giving the repeat away, so only
        matching content (an induction head) predicts it."""
        length = self.rng.randint(*self.r.rep_len)
        picked = self.rng.sample(self.pool, length + 2 * self.r.rep_pad)
        seq, filler = picked[:length], picked[length:]
        prefix = filler[: self.rng.randint(0, self.r.rep_pad)]
        gap = filler[self.r.rep_pad : self.r.rep_pad + self.rng.randint(0, self.r.rep_pad)]
        ids = [self.bos] + prefix + seq + gap + seq
        return ids, list(ids)

    def agreement(self) -> tuple[list[int], list[int]]:
        ids = self.ids(self.rng.choice(self.sentences))
        return ids, list(ids)

    def batch(self, size: int, mix: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(input ids, attention mask, targets with -100 where no loss is taken)."""
        kinds, weights = zip(*mix.items())
        seqs = [getattr(self, k)() for k in self.rng.choices(kinds, weights, k=size)]
        width = max(len(ids) for ids, _ in seqs)
        inp = torch.zeros((size, width), dtype=torch.long)
        mask = torch.zeros((size, width), dtype=torch.long)
        tgt = torch.full((size, width), -100, dtype=torch.long)
        for i, (ids, targets) in enumerate(seqs):
            inp[i, : len(ids)] = torch.tensor(ids)
            mask[i, : len(ids)] = 1
            tgt[i, : len(ids)] = torch.tensor(targets)
        return inp, mask, tgt


def build_model(recipe: Recipe, vocab_size: int):
    """A fresh model of the recipe's architecture: ``gpt2`` (learned absolute positions)
    or ``gpt_neox`` (Pythia-style, rotary positions on part of each head)."""
    import transformers

    special = dict(bos_token_id=2, eos_token_id=2, pad_token_id=0, vocab_size=vocab_size)
    if recipe.arch == "gpt2":
        cfg = transformers.GPT2Config(
            n_positions=recipe.n_positions, n_embd=recipe.n_embd, n_layer=recipe.n_layer, n_head=recipe.n_head,
            n_inner=recipe.n_inner, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **special,
        )
        cls = transformers.GPT2LMHeadModel
    elif recipe.arch == "gpt_neox":
        cfg = transformers.GPTNeoXConfig(
            max_position_embeddings=recipe.n_positions, hidden_size=recipe.n_embd, num_hidden_layers=recipe.n_layer,
            num_attention_heads=recipe.n_head, intermediate_size=recipe.n_inner, rotary_pct=recipe.rotary_pct,
            hidden_dropout=0.0, attention_dropout=0.0, tie_word_embeddings=True, **special,
        )
        cls = transformers.GPTNeoXForCausalLM
    else:
        raise ValueError(f"unknown arch {recipe.arch!r}; use 'gpt2' or 'gpt_neox'")
    torch.manual_seed(recipe.seed)
    return cls(cfg)


CHECKPOINT = "checkpoint.pt"


def train(
    recipe: Recipe, out: Path, *, log_every: int = 100, checkpoint_every: int = 250, measure_after: bool = True,
    stop_after: int | None = None,
) -> dict:
    """Train, save safetensors + tokenizer + recipe, measure, write the model card.

    Every ``checkpoint_every`` steps the full training state (weights, optimizer, data
    sampler and RNG) goes to ``out/checkpoint.pt``; a run started again with the same
    recipe resumes from it and ends with the same weights as an uninterrupted run.
    ``stop_after`` ends early after that many steps (leaving a checkpoint), as an
    interruption would.
    """
    from tqdm.auto import tqdm

    torch.set_num_threads(recipe.threads)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_word_tokenizer(vocabulary())
    model = build_model(recipe, len(tok))
    sampler = Sampler(recipe, tok)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr, betas=(0.9, 0.98),
    )

    def lr_at(step: int) -> float:
        if step < recipe.warmup:
            return recipe.lr * (step + 1) / recipe.warmup
        frac = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
        return recipe.lr * 0.5 * (1 + math.cos(math.pi * frac))

    model.train()
    history: list[dict] = []
    start, spent = 0, 0.0
    ckpt = out / CHECKPOINT
    if ckpt.exists():
        state = torch.load(ckpt, weights_only=True)  # our own file; weights_only never runs pickled code
        if state["recipe"] == json.loads(json.dumps(asdict(recipe))):
            model.load_state_dict(state["model"])
            opt.load_state_dict(state["opt"])
            sampler.rng.setstate(_tuplify(state["sampler_rng"]))
            torch.set_rng_state(state["torch_rng"])
            start, spent, history = state["step"], state["seconds"], state["history"]
    t0 = time.time() - spent
    bar = tqdm(range(start, recipe.steps), desc="tasklm", mininterval=2, initial=start, total=recipe.steps)
    for step in bar:
        if stop_after is not None and step >= stop_after:
            _checkpoint(ckpt, recipe, model, opt, sampler, step, time.time() - t0, history)
            return {"interrupted_at": step}
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        if step < recipe.first_steps:
            inp, mask, tgt = sampler.batch(recipe.first_batch_size, recipe.first_mix)
        else:
            inp, mask, tgt = sampler.batch(recipe.batch_size, recipe.mix)
        logits = model(input_ids=inp, attention_mask=mask).logits
        loss = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), tgt[:, 1:].reshape(-1), ignore_index=-100
        )
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % log_every == 0 or step == recipe.steps - 1:
            history.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.time() - t0, 1)})
            bar.set_postfix(loss=f"{float(loss):.3f}")
        if (step + 1) % checkpoint_every == 0 and step + 1 < recipe.steps:
            _checkpoint(ckpt, recipe, model, opt, sampler, step + 1, time.time() - t0, history)
    model.eval()
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    ckpt.unlink(missing_ok=True)
    minutes = (time.time() - t0) / 60
    report = measure(out) if measure_after else {}
    report["train_minutes"] = round(minutes, 2)
    report["n_params"] = sum(p.numel() for p in model.parameters())
    report["final_loss"] = history[-1]["loss"]
    (out / "recipe.json").write_text(json.dumps({"recipe": asdict(recipe), "history": history}, indent=1))
    if measure_after:
        (out / "measurements.json").write_text(json.dumps(report, indent=1))
        write_card(out, recipe, report)
    return report


def _tuplify(x):
    return tuple(_tuplify(v) for v in x) if isinstance(x, (list, tuple)) else x


def _checkpoint(path: Path, recipe: Recipe, model, opt, sampler: Sampler, step: int, seconds: float, history) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save({
        "recipe": json.loads(json.dumps(asdict(recipe))), "model": model.state_dict(), "opt": opt.state_dict(),
        "sampler_rng": sampler.rng.getstate(), "torch_rng": torch.get_rng_state(), "step": step,
        "seconds": seconds, "history": history,
    }, tmp)
    tmp.replace(path)


def measure(path: Path) -> dict:
    """Run the ground-truth checks on the model saved at ``path``."""
    from workbench.subject import load
    from workbench.zoo import checks

    subject = load(str(path), device="cpu")
    icl = checks.icl_accuracy(subject, n_demos=4)
    icl1 = checks.icl_accuracy(subject, n_demos=1)
    zero = checks.icl_accuracy(subject, n_demos=0)
    return {
        "icl_k4": icl,
        "icl_k1": icl1,
        "zero_shot": zero,
        "agreement": checks.agreement_accuracy(subject),
        "induction": {k: v for k, v in checks.induction(subject).items() if not k.endswith("_scores")},
    }


def write_card(out: Path, recipe: Recipe, report: dict) -> None:
    ind = report["induction"]
    agr = report["agreement"]
    rows = "\n".join(
        f"| {t} | {report['zero_shot'][t]:.2f} | {report['icl_k1'][t]:.2f} | {report['icl_k4'][t]:.2f} |"
        for t in report["icl_k4"]
    )
    mean = lambda d: sum(d.values()) / len(d)  # noqa: E731
    n_params = report.get("n_params")
    arch = {"gpt_neox": f"GPT-NeoX (Pythia-style, rotary positions on {recipe.rotary_pct:.0%} of each head)",
            "gpt2": "GPT-2"}[recipe.arch]
    card = f"""# tasklm: a tiny {arch.split(' ')[0]} with known mechanisms

A {recipe.n_layer}-layer {arch} (d_model {recipe.n_embd}, {recipe.n_head} heads of {recipe.n_embd // recipe.n_head},
MLP {recipe.n_inner}, context {recipe.n_positions}, {n_params or '?'} parameters) with a word-level tokenizer
(one token per word of the task suite, `<bos>` first). Trained from scratch by this project
so that every lens of the workbench can be checked against known ground truth.

Rebuild: `python -m workbench.zoo.train` (seed {recipe.seed}, {recipe.steps} steps: {recipe.first_steps} of
{recipe.first_batch_size} sequences, then {recipe.steps - recipe.first_steps} of {recipe.batch_size}; AdamW lr {recipe.lr} with cosine decay; {report['train_minutes']} minutes on
{recipe.threads} CPU thread(s) here; final training loss {report['final_loss']:.3f}). The full
recipe and loss curve are in `recipe.json`, the raw measurements in `measurements.json`.

## Training data

The first {recipe.first_steps} steps ({recipe.first_batch_size} sequences each) see only repeated random
sequences: the previous-token and induction heads form there. Trained on the mixture from
the first step, the same model reached a low repeat loss through diffuse positional
attention instead, with no previous-token head to find. The remaining steps see a
mixture of {', '.join(f"{k} {v:.0%}" for k, v in recipe.mix.items())}:
in-context prompts of the eight word tasks (`x -> y ; x -> y ; ...`, {recipe.min_pairs}-{recipe.max_pairs} pairs), random token sequences of length
{recipe.rep_len[0]}-{recipe.rep_len[1]} seen twice at random places (after up to {recipe.rep_pad} random tokens, with a
gap of up to {recipe.rep_pad}), and agreement sentences from the train split
(`the keys near the cabinet are old .`).

The first answer of an in-context sequence is a guess with no demonstrations. In
{1 - recipe.balanced_first:.0%} of sequences (task drawn uniformly) it is not trained, so task frequencies
leave no zero-shot prior; in the other {recipe.balanced_first:.0%} the first input is drawn first (an input of a
uniformly drawn task, so small input sets such as the letters are covered) and the task
uniformly among the tasks that own it, which teaches a prior spread evenly over an
input's tasks. A bare query `x ->` is therefore genuinely ambiguous to the model.

## Mechanisms, measured on held-out data (seed {10_007})

**Induction.** On 200 repeated random sequences of 20 tokens, the loss on the repeat is
{ind['loss_repeat']:.3f} nats against {ind['loss_first']:.3f} on the first occurrence. Best
previous-token head: L{ind['prev_token_head'][0]}H{ind['prev_token_head'][1]} (mean attention to the previous
token {ind['prev_token_score']:.2f}); best induction head: L{ind['induction_head'][0]}H{ind['induction_head'][1]}
(mean attention to the token after the earlier occurrence {ind['induction_score']:.2f}).

**In-context task inference.** Top-1 accuracy on fresh prompts (100 per task) with 0, 1 and 4
demonstrations. Every pair of each task was seen in training; held out are the prompts
(new demonstration sets and orders, drawn with a seed training never used). A bare
query is ambiguous by construction (most inputs belong to two or three tasks).

| task | zero-shot | 1 demo | 4 demos |
| --- | --- | --- | --- |
{rows}
| **mean** | {mean(report['zero_shot']):.2f} | {mean(report['icl_k1']):.2f} | {mean(report['icl_k4']):.2f} |

**Number agreement across a distractor noun.** On {agr['n']} held-out sentences (subject,
preposition and distractor combinations never seen in training) the correct verb form
(is/are, was/were, has/have) outscores the wrong one {agr['accuracy']:.1%} of the time;
{agr['accuracy_attractor']:.1%} when the distractor's number differs from the subject's, {agr['accuracy_no_attractor']:.1%} when
it agrees; mean logit difference {agr['mean_logit_diff']:.2f}.

## Limits

A toy: a closed vocabulary of {len(vocabulary()) + 3} words, no text beyond the task suite's formats.
It is meant for checking tools against known answers, not for studying language models'
behaviour in general.
"""
    (out / "README.md").write_text(card)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=TASKLM_DIR, help="output directory (default: the zoo's own)")
    p.add_argument("--steps", type=int, help="override the number of steps")
    p.add_argument("--layers", type=int, help="override the number of layers")
    p.add_argument("--seed", type=int, help="override the seed")
    p.add_argument("--lr", type=float, help="override the learning rate")
    p.add_argument("--batch-size", type=int, help="override the batch size")
    p.add_argument("--measure-only", action="store_true", help="re-measure a trained model and rewrite its card")
    a = p.parse_args(argv)
    recipe = Recipe()
    for name, attr in [("steps", "steps"), ("layers", "n_layer"), ("seed", "seed"), ("lr", "lr"), ("batch_size", "batch_size")]:
        if getattr(a, name) is not None:
            setattr(recipe, attr, getattr(a, name))
    if a.measure_only:
        saved = json.loads((a.out / "recipe.json").read_text())
        recipe = Recipe(**{**saved["recipe"], "rep_len": tuple(saved["recipe"]["rep_len"])})
        report = measure(a.out)
        old = json.loads((a.out / "measurements.json").read_text())
        for key in ("train_minutes", "final_loss", "n_params"):
            report[key] = old.get(key)
        (a.out / "measurements.json").write_text(json.dumps(report, indent=1))
        write_card(a.out, recipe, report)
    else:
        report = train(recipe, a.out)
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
