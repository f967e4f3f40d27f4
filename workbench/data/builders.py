"""Dataset builders over the task suite. Each returns a ``datasets.Dataset``.

Answer policy. When a tokenizer is given, each answer is tokenized as the continuation
of its prompt. An answer that is not exactly one known token (several sub-tokens, or
an unknown-token id) is handled by ``answer_policy``:

- ``"drop"`` (default): the row is removed; the count is recorded in
  ``dataset.info.description`` and a warning names how many rows went and why;
- ``"first_token"``: the row is kept and scored on the first answer token
  (``answer_id``); all answer tokens stay in ``answer_ids``;
- ``"error"``: a ``WorkbenchError`` lists the offending answers.

Rows whose prompt contains an unknown-token id are dropped under every policy but
``"error"``. An answer the tokenizer cannot write back exactly (its tokens decode to
something else: ``Win`` read as ``win`` by an uncased tokenizer) or that is not in its
vocabulary (``<unk>``) is never scored: the row is dropped under ``"drop"`` and
``"first_token"`` (the warning and ``dataset.info.description`` say how many and why)
and refused under ``"error"``; when no row is left, a ``WorkbenchError`` says why.
Nothing is ever silently scored wrong.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import random
import warnings
from dataclasses import dataclass
from typing import Iterable, Literal, Sequence

import numpy as np
from datasets import Dataset

from workbench.data import words as W
from workbench.data.tasks import Split, Task, in_test_split, agreement_nouns, get_task
from workbench.errors import WorkbenchError

AnswerPolicy = Literal["drop", "first_token", "error"]
_POLICIES = ("drop", "first_token", "error")


@dataclass(frozen=True)
class PromptFormat:
    """How demonstrations and the query are written: ``x -> y ; x -> y ; q ->``."""

    io_sep: str = " -> "
    demo_sep: str = " ; "

    def __post_init__(self) -> None:
        for name in ("io_sep", "demo_sep"):
            v = getattr(self, name)
            if not isinstance(v, str) or not v.strip():
                raise WorkbenchError(f"PromptFormat.{name} must be a string with a visible separator (e.g. ' -> '), "
                                     f"got {v!r}")

    def demo(self, x: str, y: str) -> str:
        return f"{x}{self.io_sep}{y}"

    def prompt(self, demos: Sequence[tuple[str, str]], query: str) -> str:
        head = "".join(self.demo(x, y) + self.demo_sep for x, y in demos)
        return f"{head}{query}{self.io_sep.rstrip()}"

    def demos_only(self, demos: Sequence[tuple[str, str]]) -> str:
        """Demonstrations with no query (the prompt of an in-context task vector)."""
        return self.demo_sep.join(self.demo(x, y) for x, y in demos)


DEFAULT_FORMAT = PromptFormat()


def check_int(value, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (not a bool), or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise WorkbenchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral):
        raise WorkbenchError(f"seed must be an integer, got {seed!r}")
    return int(seed)


def check_split(split) -> str:
    if split not in ("train", "test", "all"):
        raise WorkbenchError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
    return split


def check_tokenizer(tokenizer):
    """A Hugging Face tokenizer (``subject.tokenizer``), or an error naming what was given."""
    if not (callable(tokenizer) and hasattr(tokenizer, "decode") and hasattr(tokenizer, "unk_token_id")):
        hint = "; pass subject.tokenizer" if hasattr(tokenizer, "tokenizer") else ""
        raise WorkbenchError(f"tokenizer must be a Hugging Face tokenizer (e.g. subject.tokenizer), got "
                             f"{type(tokenizer).__name__}{hint}")
    return tokenizer


def task_list(tasks) -> list[Task]:
    """One task (a name or a Task) or several, each once; otherwise an error naming the culprit."""
    if isinstance(tasks, (str, Task)):
        tasks = [tasks]
    elif tasks is None or not hasattr(tasks, "__iter__"):
        raise WorkbenchError(f"tasks must be a task name, a Task or a list of them, got {type(tasks).__name__}")
    out = [get_task(t) for t in tasks]
    if not out:
        raise WorkbenchError("no tasks given; pass a task name or a list of them")
    names = [t.name for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise WorkbenchError(f"task(s) {dup} are listed more than once; list each task once")
    return out


def _seed_for(seed: int, *parts: str) -> int:
    h = hashlib.sha256(("\x00".join([str(seed), *parts])).encode()).digest()
    return int.from_bytes(h[:8], "big")


def icl_prompts(
    tasks: str | Task | Iterable[str | Task],
    n_demos: int,
    n_prompts: int,
    *,
    seed: int = 0,
    split: Split = "all",
    shuffle_labels: bool = False,
    tokenizer=None,
    answer_policy: AnswerPolicy = "drop",
    fmt: PromptFormat = DEFAULT_FORMAT,
) -> Dataset:
    """``n_prompts`` in-context prompts per task with ``n_demos`` demonstrations each.

    Queries and demonstrations come from ``split``; a query never appears among its own
    demonstrations. ``shuffle_labels=True`` permutes the demonstration outputs among
    themselves, breaking the mapping while keeping the output words (the corrupted
    prompts of function-vector analyses). Columns: task, n_demos, prompt, query, answer,
    demos (list of [x, y]) and, with a tokenizer, answer_id, answer_ids.
    """
    for v, what in ((n_demos, "n_demos"), (n_prompts, "n_prompts")):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise WorkbenchError(f"need integers n_demos >= 0 and n_prompts >= 1, got {what}={v!r}")
    k, n = int(n_demos), int(n_prompts)
    if k < 0 or n < 1:
        raise WorkbenchError(f"need n_demos >= 0 demonstrations and n_prompts >= 1 prompts, got n_demos={k}, n_prompts={n}")
    tasks = task_list(tasks)
    seed = check_seed(seed)
    check_split(split)
    check_format(fmt)
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    rows: dict[str, list] = {c: [] for c in ("task", "n_demos", "prompt", "query", "answer", "demos")}
    for task in tasks:
        pool = task.split(split)
        if len(pool) < k + 1:
            raise WorkbenchError(
                f"task {task.name!r} has {len(pool)} pairs in split {split!r}; n_demos={k} demonstrations need at least {k + 1}"
            )
        rng = random.Random(_seed_for(seed, task.name, str(k), split, str(shuffle_labels)))
        order = list(range(len(pool)))
        rng.shuffle(order)
        for i in range(n):
            qi = order[i % len(order)]
            others = [j for j in range(len(pool)) if j != qi]
            demos = [pool[j] for j in rng.sample(others, k)]
            if shuffle_labels and k > 1:
                ys = [y for _, y in demos]
                rng.shuffle(ys)
                demos = [(x, y) for (x, _), y in zip(demos, ys)]
            q, a = pool[qi]
            rows["task"].append(task.name)
            rows["n_demos"].append(k)
            rows["prompt"].append(fmt.prompt(demos, q))
            rows["query"].append(q)
            rows["answer"].append(a)
            rows["demos"].append([list(d) for d in demos])
    return _finish(rows, tokenizer, answer_policy)


def zero_shot_prompts(tasks, n_prompts: int, **kwargs) -> Dataset:
    """Bare queries ``x ->`` with no demonstrations (``icl_prompts`` with n_demos=0)."""
    if "n_demos" in kwargs:
        raise WorkbenchError(f"zero-shot prompts have no demonstrations, got n_demos={kwargs['n_demos']!r}; "
                             "use icl_prompts(tasks, n_demos, n_prompts) for demonstrations")
    return icl_prompts(tasks, 0, n_prompts, **kwargs)


def check_format(fmt) -> PromptFormat:
    if not isinstance(fmt, PromptFormat):
        raise WorkbenchError(f"fmt must be a PromptFormat (e.g. PromptFormat(io_sep=' -> ', demo_sep=' ; ')), "
                             f"got {type(fmt).__name__}")
    return fmt


def finetune_data(
    task: str | Task, *, split: Split = "train", fmt: PromptFormat = DEFAULT_FORMAT, tokenizer=None,
    answer_policy: AnswerPolicy = "drop",
) -> Dataset:
    """Every pair of a task's split as a zero-shot example: prompt ``x ->``, answer ``y``,
    text ``x -> y``. What a per-task fine-tune trains on."""
    t = get_task(task)
    check_format(fmt)
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    pairs = t.split(split)
    rows = {
        "task": [t.name] * len(pairs),
        "n_demos": [0] * len(pairs),
        "prompt": [fmt.prompt([], x) for x, _ in pairs],
        "query": [x for x, _ in pairs],
        "answer": [y for _, y in pairs],
        "demos": [[] for _ in pairs],
    }
    return _finish(rows, tokenizer, answer_policy)


def multitask_data(tasks: Iterable[str | Task], *, n_demos: int = 0, n_per_task: int = 64, seed: int = 0,
                   **kwargs) -> Dataset:
    """Prompts of several tasks in one dataset, shuffled, with a ``task`` column for batching."""
    ds = icl_prompts(task_list(tasks), n_demos, n_per_task, seed=seed, **kwargs)
    return ds.shuffle(seed=seed)


# --------------------------------------------------------------------------- answers


def _check_pairs(prompts, answers) -> tuple[list[str], list[str]]:
    if isinstance(prompts, str) or isinstance(answers, str):
        raise WorkbenchError("prompts and answers must be lists of strings (one answer per prompt), got a single string")
    prompts, answers = list(prompts), list(answers)
    if len(prompts) != len(answers):
        raise WorkbenchError(f"got {len(prompts)} prompts but {len(answers)} answers; give one answer per prompt")
    for what, vals in (("prompts", prompts), ("answers", answers)):
        for i, v in enumerate(vals):
            if not isinstance(v, str):
                raise WorkbenchError(f"{what}[{i}] is a {type(v).__name__}, not a string")
    return prompts, answers


def _raw_answer_ids(tokenizer, prompts: list[str], answers: list[str]) -> list[list[int]]:
    full = tokenizer([p + " " + a for p, a in zip(prompts, answers)]).input_ids
    pre = tokenizer(list(prompts)).input_ids
    out = []
    for f, p, a in zip(full, pre, answers):
        if f[: len(p)] == p:
            out.append(list(f[len(p):]))
        else:  # the boundary merged; fall back to the answer on its own
            out.append(list(tokenizer(" " + a, add_special_tokens=False).input_ids))
    return out


def answer_problem(tokenizer, answer: str, ids: list[int]) -> str | None:
    """Why the tokens ``ids`` cannot score ``answer`` (None when they can): no token, an
    unknown-token id, or tokens that decode to something else (an uncased tokenizer reads
    ``Win`` as ``win``). Several tokens are not a problem here (see ``answer_policy``)."""
    if not ids:
        return f"{answer!r} gives no token"
    unk = tokenizer.unk_token_id
    if unk is not None and unk in ids:
        return f"{answer!r} is not in the vocabulary (it becomes {tokenizer.unk_token!r})"
    back = tokenizer.decode(ids).strip()
    if back != answer.strip():
        why = ": the tokenizer is uncased" if back.lower() == answer.strip().lower() else ""
        return f"{answer!r} comes back as {back!r}{why}"
    return None


def answer_token_ids(tokenizer, prompts: Sequence[str], answers: Sequence[str]) -> list[list[int]]:
    """Token ids of each answer as the continuation of its prompt (``prompt + " " + answer``).

    An answer that would not be scored as itself is refused (a WorkbenchError lists them):
    one with no token, one not in the vocabulary (``<unk>``), one whose tokens decode to
    something else (``Win`` read as ``win`` by an uncased tokenizer). An answer of several
    tokens gets all of them."""
    check_tokenizer(tokenizer)
    prompts, answers = _check_pairs(prompts, answers)
    if not prompts:
        return []
    ids = _raw_answer_ids(tokenizer, prompts, answers)
    problems = [answer_problem(tokenizer, a, t) for a, t in zip(answers, ids)]
    bad = [p for p in problems if p is not None]
    if bad:
        shown = list(dict.fromkeys(bad))
        raise WorkbenchError(f"{len(bad)} of {len(answers)} answers cannot be scored with this tokenizer: "
                             f"{'; '.join(shown[:5])}{' ...' if len(shown) > 5 else ''}")
    return ids


def _finish(rows: dict[str, list], tokenizer, policy: AnswerPolicy) -> Dataset:
    if policy not in _POLICIES:
        raise WorkbenchError(f"unknown answer_policy {policy!r}; valid: {', '.join(_POLICIES)}")
    info = {"answer_policy": policy, "dropped": 0}
    if tokenizer is not None:
        unk = tokenizer.unk_token_id
        ids = _raw_answer_ids(tokenizer, rows["prompt"], rows["answer"])
        prompt_ids = tokenizer(rows["prompt"]).input_ids
        problems = [answer_problem(tokenizer, a, t) for a, t in zip(rows["answer"], ids)]
        several = [p is None and len(a) > 1 for a, p in zip(ids, problems)]
        bad_prompt = [unk is not None and unk in p for p in prompt_ids]
        reasons = {"several tokens": sum(several), "cannot be scored": sum(p is not None for p in problems),
                   "prompt holds an unknown token": sum(bad_prompt)}
        examples = list(dict.fromkeys(p for p in problems if p is not None))
        said = "; ".join(filter(None, [
            f"{reasons['several tokens']} answers are several tokens" if reasons["several tokens"] else "",
            f"{reasons['cannot be scored']} answers cannot be scored ({'; '.join(examples[:3])}"
            f"{' ...' if len(examples) > 3 else ''})" if examples else "",
            f"{reasons['prompt holds an unknown token']} prompts hold unknown tokens" if any(bad_prompt) else "",
        ]))
        if policy == "error" and (any(several) or examples or any(bad_prompt)):
            offending = sorted({rows["answer"][i] for i, (s, p) in enumerate(zip(several, problems)) if s or p})
            raise WorkbenchError(
                f"{sum(several) + len([p for p in problems if p])} answers are not one known token for this tokenizer "
                f"(e.g. {offending[:8]}); {sum(bad_prompt)} prompts hold unknown tokens. {said}. "
                "Use answer_policy='drop' or 'first_token'."
            )
        keep = [p is None and not bp and (policy == "first_token" or not s)
                for p, bp, s in zip(problems, bad_prompt, several)]
        dropped = len(keep) - sum(keep)
        if dropped == len(keep):
            raise WorkbenchError(f"no row can be scored with this tokenizer (answer_policy={policy!r}): {said}")
        if dropped:
            warnings.warn(f"answer_policy={policy!r}: dropped {dropped} of {len(keep)} rows: {said}", stacklevel=3)
        rows = {c: [v for v, kp in zip(vals, keep) if kp] for c, vals in rows.items()}
        ids = [a for a, kp in zip(ids, keep) if kp]
        rows["answer_id"] = [a[0] for a in ids]
        rows["answer_ids"] = ids
        info["dropped"] = dropped
        info["reasons"] = {k: v for k, v in reasons.items() if v}
    ds = Dataset.from_dict(rows)
    ds.info.description = json.dumps(info)
    return ds


# --------------------------------------------------------------------------- agreement


def _agreement_split(subject: str, prep: str, distractor: str) -> bool:
    return in_test_split("agreement", f"{subject}|{prep}|{distractor}")


def agreement_pairs(
    n: int,
    *,
    seed: int = 0,
    split: Split = "all",
    distractor: bool = True,
    tokenizer=None,
    same_length: bool = True,
) -> Dataset:
    """Clean/corrupted subject-verb agreement prompts.

    Clean ``the key near the cabinets`` (answer ``is``); corrupted flips the subject's
    number, ``the keys near the cabinets`` (answer ``are``). About 30% of nouns get an
    adjective (``the old key``) so the subject's position varies. With ``distractor=False``
    the sentences are ``the key`` / ``the keys``. Columns: clean, corrupted,
    clean_answer, corrupted_answer, subject, distractor_noun, preposition, verb_pair,
    subject_plural, attractor (distractor number differs from the subject's) and,
    with a tokenizer, clean_answer_id / corrupted_answer_id. ``same_length`` keeps only
    pairs whose clean and corrupted prompts have the same number of tokens.
    """
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise WorkbenchError(f"need n >= 1 pairs, got {n!r}")
    n = int(n)
    check_split(split)
    seed = check_seed(seed)
    if tokenizer is not None:
        check_tokenizer(tokenizer)
    rng = random.Random(_seed_for(seed, "agreement", split, str(distractor)))
    nouns = agreement_nouns("all")
    rows: dict[str, list] = {c: [] for c in (
        "clean", "corrupted", "clean_answer", "corrupted_answer", "subject", "distractor_noun",
        "preposition", "verb_pair", "subject_plural", "attractor")}
    tries = 0
    while len(rows["clean"]) < n:
        tries += 1
        if tries > 200 * n:
            raise WorkbenchError(f"could not draw {n} agreement pairs from split {split!r}")
        s_sg, s_pl = rng.choice(nouns)
        prep = rng.choice(W.AGREEMENT_PREPOSITIONS) if distractor else ""
        d_sg, d_pl = rng.choice(nouns) if distractor else ("", "")
        if distractor and d_sg == s_sg:
            continue
        in_test = _agreement_split(s_sg, prep, d_sg)
        if split != "all" and in_test != (split == "test"):
            continue
        plural = rng.random() < 0.5
        d_plural = rng.random() < 0.5
        vi = rng.randrange(len(W.AGREEMENT_VERBS))
        sg_verb, pl_verb = W.AGREEMENT_VERBS[vi]
        s_adj = rng.choice(W.AGREEMENT_ADJECTIVES) + " " if rng.random() < 0.3 else ""
        d_adj = rng.choice(W.AGREEMENT_ADJECTIVES) + " " if rng.random() < 0.3 else ""
        tail = f" {prep} the {d_adj}{d_pl if d_plural else d_sg}" if distractor else ""
        clean = f"the {s_adj}{s_pl if plural else s_sg}{tail}"
        corrupted = f"the {s_adj}{s_sg if plural else s_pl}{tail}"
        rows["clean"].append(clean)
        rows["corrupted"].append(corrupted)
        rows["clean_answer"].append(pl_verb if plural else sg_verb)
        rows["corrupted_answer"].append(sg_verb if plural else pl_verb)
        rows["subject"].append(s_sg)
        rows["distractor_noun"].append(d_sg)
        rows["preposition"].append(prep)
        rows["verb_pair"].append(vi)
        rows["subject_plural"].append(plural)
        rows["attractor"].append(distractor and plural != d_plural)
    if tokenizer is not None:
        ca = _raw_answer_ids(tokenizer, rows["clean"], rows["clean_answer"])
        xa = _raw_answer_ids(tokenizer, rows["corrupted"], rows["corrupted_answer"])
        problems = [answer_problem(tokenizer, va, a) or answer_problem(tokenizer, vb, b)
                    for va, vb, a, b in zip(rows["clean_answer"], rows["corrupted_answer"], ca, xa)]
        keep = [p is None and len(a) == 1 and len(b) == 1 for p, a, b in zip(problems, ca, xa)]
        if same_length:
            lc = [len(x) for x in tokenizer(rows["clean"]).input_ids]
            lx = [len(x) for x in tokenizer(rows["corrupted"]).input_ids]
            keep = [kp and a == b for kp, a, b in zip(keep, lc, lx)]
        dropped = len(keep) - sum(keep)
        examples = list(dict.fromkeys(p for p in problems if p))
        why = (f"multi-token verbs or unequal lengths"
               f"{'; verbs that cannot be scored: ' + '; '.join(examples[:3]) if examples else ''}")
        if dropped == len(keep):
            raise WorkbenchError(f"no agreement pair can be scored with this tokenizer: {why}")
        if dropped:
            warnings.warn(f"dropped {dropped} of {len(keep)} agreement pairs: {why}", stacklevel=2)
        rows = {c: [v for v, kp in zip(vals, keep) if kp] for c, vals in rows.items()}
        rows["clean_answer_id"] = [a[0] for a, kp in zip(ca, keep) if kp]
        rows["corrupted_answer_id"] = [a[0] for a, kp in zip(xa, keep) if kp]
    return Dataset.from_dict(rows)


def agreement_sentences(n: int, *, seed: int = 0, split: Split = "train") -> list[str]:
    """Whole sentences for language-model training: ``the keys near the cabinet are old .``
    About a third have no distractor."""
    n = check_int(n, "n")
    check_split(split)
    seed = check_seed(seed)
    rng = random.Random(_seed_for(seed, "agreement-sentences", split))
    with_d = agreement_pairs(max(1, n - n // 3), seed=seed, split=split)
    without = agreement_pairs(max(1, n // 3), seed=seed + 1, split="all", distractor=False)
    out = []
    for ds in (with_d, without):
        for prompt, verb, vi in zip(ds["clean"], ds["clean_answer"], ds["verb_pair"]):
            comp = rng.choice(W.AGREEMENT_COMPLETIONS[W.AGREEMENT_VERBS[vi][0]])
            out.append(f"{prompt} {verb} {comp} .")
    rng.shuffle(out)
    return out[:n]


# --------------------------------------------------------------------------- induction


def repeated_sequences(tokenizer, n: int, length: int, *, seed: int = 0, repeats: int = 2) -> Dataset:
    """Random token sequences repeated ``repeats`` times (the induction-head probe).

    Tokens are drawn uniformly from the tokenizer's non-special vocabulary. A BOS token
    is prepended when the tokenizer has one. Columns: input_ids, length, offset (index
    of the first random token).
    """
    check_tokenizer(tokenizer)
    for v in (n, length, repeats):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise WorkbenchError(f"need integers n >= 1, length >= 2 and repeats >= 2, got n={n!r}, length={length!r}, "
                                 f"repeats={repeats!r}")
    n, length, repeats = int(n), int(length), int(repeats)
    if n < 1 or length < 2 or repeats < 2:
        raise WorkbenchError(f"need n >= 1, length >= 2 and repeats >= 2, got n={n}, length={length}, repeats={repeats}")
    seed = check_seed(seed)
    special = set(tokenizer.all_special_ids)
    pool = np.array([i for i in range(len(tokenizer)) if i not in special])
    rng = np.random.default_rng(_seed_for(seed, "repeated", str(length)) % 2**63)
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    ids = []
    for _ in range(n):
        seq = rng.choice(pool, size=length, replace=False if length <= len(pool) else True).tolist()
        ids.append(bos + seq * repeats)
    return Dataset.from_dict({"input_ids": ids, "length": [length] * n, "offset": [len(bos)] * n})


# --------------------------------------------------------------------------- MultiDigits


def multidigits(split: Split = "train", *, n: int | None = None, seed: int = 0) -> Dataset:
    """Two scikit-learn 8x8 digits side by side (an 8x16 image), one task per digit.

    The 1,797 bundled digits are split by a hash of their index (about 20% test), so a
    test image never shares a digit image with training. Columns: image (8x16 floats in
    [0, 1]), left, right.
    """
    check_split(split)
    if n is not None:
        n = check_int(n, "n")
    seed = check_seed(seed)
    from sklearn.datasets import load_digits

    digits = load_digits()
    idx = [i for i in range(len(digits.target)) if split == "all" or in_test_split("digits", str(i)) == (split == "test")]
    rng = np.random.default_rng(_seed_for(seed, "multidigits", split) % 2**63)
    n = n if n is not None else len(idx)
    left = rng.choice(idx, size=n)
    right = rng.choice(idx, size=n)
    images = np.concatenate([digits.images[left], digits.images[right]], axis=2) / 16.0
    return Dataset.from_dict({
        "image": images.astype(np.float32).tolist(),
        "left": digits.target[left].tolist(),
        "right": digits.target[right].tolist(),
    })
