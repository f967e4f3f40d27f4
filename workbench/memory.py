"""Memory estimates taken before large activation caches are built, and the one check
that refuses a request over its budget (``max_bytes``) before any work."""

from __future__ import annotations

import os

import torch

from workbench.errors import WorkbenchError

DEFAULT_BUDGET_BYTES = int(os.environ.get("WORKBENCH_CACHE_BUDGET", 512 * 2**20))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def forward_bytes(subject, rows: int, length: int, *, width: int = 0, grad: bool = False) -> int:
    """Activation bytes of one forward over ``rows`` x ``length`` tokens: per token a
    layer's working tensors (12 x d_model), a row of every head's pattern, the logits and
    a metric's log-softmax of them (2 x d_vocab) and ``width`` more entries, at 4 bytes at
    least. With ``grad`` (a forward kept for a backward pass) every layer's saved tensors
    (16 x d_model and two pattern rows per token), and the logits, their log-softmax and
    the gradients of both (4 x d_vocab)."""
    size = max(4, torch.finfo(subject.dtype).bits // 8 if subject.dtype.is_floating_point else 4)
    d, heads = subject.d_model, subject.n_heads * length
    if grad:
        return rows * length * (subject.n_layers * (16 * d + 2 * heads) + 4 * subject.d_vocab + width) * size
    return rows * length * (12 * d + heads + 2 * subject.d_vocab + width) * size


def rows_per_batch(bytes_per_row: int, budget: int, n_rows: int) -> int:
    """How many rows fit in ``budget`` bytes (at least one, at most ``n_rows``)."""
    if bytes_per_row <= 0:
        return n_rows
    return max(1, min(n_rows, budget // bytes_per_row))


def check_budget(estimate: int, max_bytes: int | None, what: str, advice: str) -> None:
    """Raise a WorkbenchError stating ``estimate`` when it exceeds ``max_bytes`` (None: no
    limit); called before any work, so a request that cannot fit fails at once."""
    if max_bytes is None:
        return
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise WorkbenchError(f"max_bytes must be a positive integer (bytes) or None, got {max_bytes!r}")
    if estimate > max_bytes:
        raise WorkbenchError(f"{what} needs about {fmt_bytes(estimate)}, over the budget max_bytes="
                             f"{fmt_bytes(max_bytes)}; {advice}")
