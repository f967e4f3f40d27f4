"""The task suite: named word-level tasks shared by every lens.

A task is a function from input words to output words. The same tasks appear as
in-context prompts, zero-shot prompts, fine-tuning data and multi-task batches, so the
four lenses answer questions about the same behaviours.

Splits are deterministic: a pair belongs to ``"test"`` when a hash of (task, input)
falls in the test fraction, so adding words never moves existing ones between splits.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from workbench.data import words as W
from workbench.errors import WorkbenchError

Split = Literal["train", "test", "all"]
TEST_FRACTION = 0.2


@dataclass(frozen=True)
class Task:
    """A named word-level mapping. ``pairs`` holds (input, output) with unique inputs."""

    name: str
    pairs: tuple[tuple[str, str], ...]
    description: str

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise WorkbenchError(f"a task's name must be a non-empty string, got {self.name!r}")
        for i, p in enumerate(self.pairs):
            if not (isinstance(p, (tuple, list)) and len(p) == 2 and all(isinstance(w, str) and w.strip() for w in p)):
                raise WorkbenchError(f"task {self.name!r}: pair {i} must be (input, output), two non-empty strings, "
                                     f"got {p!r}")
        inputs = [x for x, _ in self.pairs]
        dup = sorted({x for x in inputs if inputs.count(x) > 1})
        if dup:
            raise WorkbenchError(f"task {self.name!r} maps {dup} to more than one output")

    def split(self, split: Split = "all") -> list[tuple[str, str]]:
        """The pairs of one split: ``"train"``, ``"test"`` (about 20%) or ``"all"``."""
        if split == "all":
            return list(self.pairs)
        if split not in ("train", "test"):
            raise WorkbenchError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
        return [p for p in self.pairs if in_test_split(self.name, p[0]) == (split == "test")]

    @property
    def inputs(self) -> list[str]:
        return [x for x, _ in self.pairs]

    @property
    def outputs(self) -> list[str]:
        return [y for _, y in self.pairs]


def in_test_split(task: str, x: str) -> bool:
    digest = hashlib.sha256(f"{task}\x00{x}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < TEST_FRACTION


def _symmetric(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return pairs + [(b, a) for a, b in pairs]


def _base_words() -> list[str]:
    """Every lowercase word of the mapping lists (inputs of capitalize / first-letter)."""
    seen: dict[str, None] = {}
    for a, b in W.ANTONYMS:
        seen.setdefault(a)
        seen.setdefault(b)
    for a, _ in W.PRESENT_PAST:
        seen.setdefault(a)
    for a, _ in W.SINGULAR_PLURAL:
        seen.setdefault(a)
    return list(seen)


@lru_cache(maxsize=1)
def _registry() -> dict[str, Task]:
    base = _base_words()
    letters = list(W.LETTERS)
    tasks = [
        Task("antonym", tuple(_symmetric(W.ANTONYMS)), "a word to its opposite: hot -> cold"),
        Task(
            "capitalize",
            tuple((w, w.capitalize()) for w in base + letters),
            "a lowercase word or letter to its capitalized form: cat -> Cat",
        ),
        Task("country_capital", tuple(W.COUNTRY_CAPITAL), "a country to its capital: France -> Paris"),
        Task(
            "next_letter",
            tuple(zip(letters[:-1], letters[1:])),
            "a letter to the next letter of the alphabet: c -> d",
        ),
        Task("present_past", tuple(W.PRESENT_PAST), "a verb to its past tense: go -> went"),
        Task("singular_plural", tuple(W.SINGULAR_PLURAL), "a noun to its plural: cat -> cats"),
        Task(
            "lowercase",
            tuple((w.capitalize(), w) for w in base + letters),
            "a capitalized word or letter to lowercase: Cat -> cat",
        ),
        Task(
            "first_letter",
            tuple((w, w[0].lower()) for w in base + [w.capitalize() for w in base] + [c for c, _ in W.COUNTRY_CAPITAL]),
            "a word to its first letter, in lowercase: Cat -> c",
        ),
    ]
    return {t.name: t for t in tasks}


def task_names() -> list[str]:
    """Names of the word-level mapping tasks, in a fixed order."""
    return list(_registry())


def get_task(name: str | Task) -> Task:
    """The task called ``name``; an unknown name gets an error listing the valid ones."""
    if isinstance(name, Task):
        return name
    reg = _registry()
    if not isinstance(name, str) or name not in reg:
        raise WorkbenchError(f"unknown task {name!r}; valid tasks: {', '.join(reg)}")
    return reg[name]


def agreement_nouns(split: Split = "all") -> list[tuple[str, str]]:
    """(singular, plural) nouns usable as agreement subjects and distractors."""
    if split not in ("train", "test", "all"):
        raise WorkbenchError(f"unknown split {split!r}; use 'train', 'test' or 'all'")
    pairs = list(W.SINGULAR_PLURAL)
    if split == "all":
        return pairs
    return [p for p in pairs if in_test_split("agreement", p[0]) == (split == "test")]


def vocabulary() -> list[str]:
    """Every word the suite can produce, in a stable order (used to build word tokenizers)."""
    seen: dict[str, None] = {}
    for task in _registry().values():
        for x, y in task.pairs:
            seen.setdefault(x)
            seen.setdefault(y)
    for s, p in W.AGREEMENT_VERBS:
        seen.setdefault(s)
        seen.setdefault(p)
    for w in W.AGREEMENT_PREPOSITIONS:
        seen.setdefault(w)
    for w in W.AGREEMENT_ADJECTIVES:
        seen.setdefault(w)
    for ws in W.AGREEMENT_COMPLETIONS.values():
        for w in ws:
            seen.setdefault(w)
    for c in W.LETTERS:
        seen.setdefault(c)
        seen.setdefault(c.upper())
    for w in ("->", ";", "the", "that", "."):
        seen.setdefault(w)
    return list(seen)
