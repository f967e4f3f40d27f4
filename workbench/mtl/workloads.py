"""Ready-made multi-task workloads: MultiDigits (two real scikit-learn digits side by
side, one task per digit) on a small shared network."""

from __future__ import annotations

import numbers

import torch
from torch import nn

from workbench.data import multidigits
from workbench.errors import WorkbenchError


def check_int(value, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (not a bool), or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise WorkbenchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_split(split, valid=("train", "test")) -> str:
    if split not in valid:
        raise WorkbenchError(f"unknown split {split!r}; use {' or '.join(repr(v) for v in valid)}")
    return split


class MultiDigitsNet(nn.Module):
    """Shared MLP trunk over the 8x16 image, one linear head per task (left, right)."""

    def __init__(self, hidden: int = 64, seed: int = 0) -> None:
        super().__init__()
        hidden = check_int(hidden, "hidden")
        torch.manual_seed(check_int(seed, "seed", 0))
        self.trunk = nn.Sequential(nn.Flatten(), nn.Linear(128, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.heads = nn.ModuleDict({"left": nn.Linear(hidden, 10), "right": nn.Linear(hidden, 10)})

    def forward(self, batch):
        h = self.trunk(batch["image"])
        return {name: head(h) for name, head in self.heads.items()}


def multidigits_tensors(split: str = "train", n: int | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    ds = multidigits(split, n=n, seed=seed)
    return {"image": torch.tensor(ds["image"]), "left": torch.tensor(ds["left"]), "right": torch.tensor(ds["right"])}


def batch_sampler(data: dict[str, torch.Tensor], batch_size: int, seed: int = 0):
    """``step -> batch``: a seeded function of the step, so resumed runs see the same batches."""
    if not isinstance(data, dict) or not data or not all(isinstance(v, torch.Tensor) for v in data.values()):
        got = (type(data).__name__ if not isinstance(data, dict) else "an empty dict" if not data
               else f"values {sorted({type(v).__name__ for v in data.values()})}")
        raise WorkbenchError(f"data must be a non-empty dict name -> tensor (rows first), e.g. multidigits_tensors(); "
                             f"got {got}")
    lengths = {k: (len(v) if v.ndim else 0) for k, v in data.items()}
    if len(set(lengths.values())) != 1:
        raise WorkbenchError(f"the tensors of data must have the same number of rows, got {lengths}")
    n = next(iter(lengths.values()))
    if n < 1:
        raise WorkbenchError("data holds no rows to sample batches from")
    batch_size = check_int(batch_size, "batch_size")
    seed = check_int(seed, "seed", 0)

    def sample(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        idx = torch.randint(0, n, (batch_size,), generator=g)
        return {k: v[idx] for k, v in data.items()}

    return sample


def digit_losses() -> dict:
    ce = nn.functional.cross_entropy
    return {"left": lambda out, b: ce(out, b["left"]), "right": lambda out, b: ce(out, b["right"])}


def accuracy(model: nn.Module, data: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per task, the share of rows whose arg-max class is the label ``data[task]``."""
    model.eval()
    with torch.no_grad():
        out = model(data)
    missing = [t for t in out if t not in data]
    if missing:
        raise WorkbenchError(f"data has no labels for task(s) {missing} (it holds {list(data)}); "
                             "pass a dict with one label tensor per task, e.g. multidigits_tensors('test')")
    return {t: float((out[t].argmax(-1) == data[t]).float().mean()) for t in out}


# --------------------------------------------------------------------------- text tasks

#: The default text workload: four word tasks of the suite as zero-shot prompts (``cat ->``).
TEXT_TASKS = ("capitalize", "first_letter", "present_past", "singular_plural")
#: Same prompts, contradicting answers (``cat ->`` must give ``Cat`` for one and ``c`` for
#: the other): a conflict built in on purpose.
CONFLICTING_PAIR = ("capitalize", "first_letter")
#: Both inflect a word (``go -> went``, ``cat -> cats``); their gradients agree.
COMPATIBLE_PAIR = ("present_past", "singular_plural")


class TextTasksNet(nn.Module):
    """A causal LM as the shared trunk of several next-token tasks.

    ``trunk`` is the whole decoder including its (tied) unembedding, so every parameter is
    shared; a task's "head" is its answer tokens. ``forward(batch)`` runs the rows of all
    tasks in one pass and returns, per task, the logits at the last real position of that
    task's rows.
    """

    def __init__(self, lm: nn.Module, names: tuple[str, ...]) -> None:
        super().__init__()
        self.trunk = lm
        self.names = tuple(names)

    def forward(self, batch):
        logits = self.trunk(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = logits[torch.arange(len(logits), device=logits.device), batch["attention_mask"].sum(-1) - 1]
        return {name: last[batch["task"] == i] for i, name in enumerate(self.names)}


class TextTasks:
    """Several text tasks of the suite as one multi-task problem on a zoo decoder.

    Every prompt is zero-shot (``x ->``), so a prompt does not say which task it belongs to.
    Tasks named together in ``same_prompts`` are restricted to their common input words and
    each batch gives them the *same* words: they are asked different answers for identical
    prompts (a deliberate conflict). Train and test words never overlap: for the
    same-prompt tasks a word is held out when either task's suite split holds it out.

    ``model()`` gives a fresh copy of the pretrained decoder wrapped as a
    :class:`TextTasksNet`; ``losses()`` the per-task cross-entropy on the answer token;
    ``sampler(batch_per_task)`` a seeded ``step -> batch``; ``accuracy(model)`` the
    per-task exact-match accuracy of the answer token on the test words.
    """

    def __init__(self, tasks=TEXT_TASKS, *, same_prompts=CONFLICTING_PAIR, model: str = "tasklm") -> None:
        import copy
        import warnings

        import workbench
        from workbench.data.builders import finetune_data

        if isinstance(tasks, str) or isinstance(same_prompts, str):
            raise WorkbenchError(f"tasks and same_prompts must be lists of task names, got the string "
                                 f"{tasks if isinstance(tasks, str) else same_prompts!r}; e.g. ('capitalize', 'first_letter')")
        self.names = tuple(tasks)
        same = tuple(same_prompts or ())
        if len(self.names) < 2 or len(set(self.names)) != len(self.names):
            raise WorkbenchError(f"need at least two distinct tasks, got {list(self.names)}")
        if any(t not in self.names for t in same) or len(same) == 1:
            raise WorkbenchError(f"same_prompts must name two or more of the tasks {list(self.names)}, got {list(same)}")
        from workbench.data import get_task

        for t in self.names:  # unknown names are refused before the model loads
            get_task(t)
        subject = workbench.load(model, device="cpu")
        if not subject.has_logits:
            raise WorkbenchError(f"the text workload needs a model with an LM head; {model!r} has none "
                                 "(use 'tasklm' or a causal LM)")
        self.tokenizer = subject.tokenizer
        #: the decoder's layout family: its parameters group into the blocks ``embed``,
        #: ``layer.L``, ``final_norm`` (pass it as ``task_gradients(..., family=text.family)``;
        #: the trainer finds it in the model itself)
        self.family = subject.family
        self._lm = copy.deepcopy(subject.model).float().eval()
        self.same_prompts = same
        pairs = {}
        with warnings.catch_warnings():  # answers that are not one token are dropped, by count
            warnings.simplefilter("ignore")
            for t in self.names:
                pairs[t] = {s: {q: a for q, a in zip(d["query"], d["answer_id"])}
                            for s in ("train", "test")
                            for d in [finetune_data(t, split=s, tokenizer=self.tokenizer)]}
        if same:
            held_out = set().union(*(pairs[t]["test"] for t in same))
            common_train = sorted(set.intersection(*(set(pairs[t]["train"]) for t in same)) - held_out)
            common_test = sorted(set.intersection(*(set(pairs[t]["train"]) | set(pairs[t]["test"]) for t in same)))
            common_test = [w for w in common_test if w in held_out]
            for t in same:
                both = {**pairs[t]["train"], **pairs[t]["test"]}
                pairs[t] = {"train": {w: both[w] for w in common_train}, "test": {w: both[w] for w in common_test}}
        empty = [f"{t} ({s})" for t in self.names for s in ("train", "test") if not pairs[t][s]]
        if empty:
            raise WorkbenchError(f"no words left for {', '.join(empty)}"
                                 f"{f': the same-prompt tasks {list(same)} share no input words' if same else ''}; "
                                 "pick tasks over the same words (e.g. capitalize and first_letter) or same_prompts=()")
        self.words = {t: {s: list(pairs[t][s]) for s in ("train", "test")} for t in self.names}
        self._data = {s: self._tensors({t: pairs[t][s] for t in self.names}) for s in ("train", "test")}

    def _tensors(self, per_task: dict[str, dict[str, int]]) -> dict:
        prompts, answers, task = [], [], []
        for i, t in enumerate(self.names):
            prompts += [f"{q} ->" for q in per_task[t]]
            answers += list(per_task[t].values())
            task += [i] * len(per_task[t])
        enc = self.tokenizer(prompts, return_tensors="pt", padding=True)
        rows = {t: torch.nonzero(torch.tensor(task) == i)[:, 0] for i, t in enumerate(self.names)}
        return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                "answer": torch.tensor(answers), "task": torch.tensor(task), "rows": rows}

    def model(self) -> TextTasksNet:
        import copy

        return TextTasksNet(copy.deepcopy(self._lm), self.names)

    def losses(self) -> dict:
        def loss(i):
            return lambda out, b: nn.functional.cross_entropy(out, b["answer"][b["task"] == i])

        return {t: loss(i) for i, t in enumerate(self.names)}

    def sampler(self, batch_per_task: int = 16, seed: int = 0, split: str = "train"):
        """``step -> batch`` of ``batch_per_task`` rows per task, a seeded function of the
        step; the same-prompt tasks get the same words."""
        d = self._data[check_split(split)]
        batch_per_task = check_int(batch_per_task, "batch_per_task")
        seed = check_int(seed, "seed", 0)
        keys = ("input_ids", "attention_mask", "answer", "task")

        def sample(step: int) -> dict[str, torch.Tensor]:
            g = torch.Generator().manual_seed(seed * 1_000_003 + step)
            shared = None
            idx = []
            for t in self.names:
                rows = d["rows"][t]
                if t in self.same_prompts:
                    if shared is None:
                        shared = torch.randint(0, len(rows), (batch_per_task,), generator=g)
                    pick = shared
                else:
                    pick = torch.randint(0, len(rows), (batch_per_task,), generator=g)
                idx.append(rows[pick])
            idx = torch.cat(idx)
            return {k: d[k][idx] for k in keys}

        return sample

    def batch(self, split: str = "test") -> dict[str, torch.Tensor]:
        """Every row of a split as one batch."""
        d = self._data[check_split(split)]
        return {k: d[k] for k in ("input_ids", "attention_mask", "answer", "task")}

    def accuracy(self, model: nn.Module, split: str = "test") -> dict[str, float]:
        b = self.batch(split)
        model.eval()
        with torch.no_grad():
            out = model(b)
        return {t: float((out[t].argmax(-1) == b["answer"][b["task"] == i]).float().mean())
                for i, t in enumerate(self.names)}
