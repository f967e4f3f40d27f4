"""Memory estimates taken before large activation caches are built."""

from __future__ import annotations

import os

DEFAULT_BUDGET_BYTES = int(os.environ.get("WORKBENCH_CACHE_BUDGET", 512 * 2**20))


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def rows_per_batch(bytes_per_row: int, budget: int, n_rows: int) -> int:
    """How many rows fit in ``budget`` bytes (at least one, at most ``n_rows``)."""
    if bytes_per_row <= 0:
        return n_rows
    return max(1, min(n_rows, budget // bytes_per_row))
