"""Token strings for display, shared by every lens."""

from __future__ import annotations

from typing import Sequence


def token_strings(tokenizer, ids: Sequence[int]) -> list[str]:
    """Readable token strings (each id decoded on its own; not HTML-escaped)."""
    return [tokenizer.decode([int(i)]) for i in ids]


__all__ = ["token_strings"]
