"""Benchmark harness: this project beside its anchors, measured in the same run.

Every entry measures the workbench way and one or more anchors (the plain or
established way of doing the same thing) on the same model and inputs, and reports
ratios, never absolute targets. ``python bench/run.py`` runs them all.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

RESULTS = Path(__file__).resolve().parent / "results"


def timeit(fn: Callable[[], object], *, repeat: int = 7, warmup: int = 2, min_time: float = 0.2) -> float:
    """Median seconds of one call of ``fn`` (each sample loops until ``min_time``)."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeat):
        n, start = 0, time.perf_counter()
        while True:
            fn()
            n += 1
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        samples.append(elapsed / n)
    return statistics.median(samples)


@dataclass
class Table:
    """Rows of (case, measurements...) with ratios against a named anchor column."""

    title: str
    columns: list[str]
    unit: str = "ms"
    rows: list[tuple[str, list[float]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, case: str, *values: float) -> None:
        self.rows.append((case, list(values)))

    def ratio(self, row: int, num: int, den: int) -> float:
        values = self.rows[row][1]
        return values[num] / values[den]

    def render(self, ratios: list[tuple[int, int, str]]) -> str:
        head = ["case", *[f"{c} ({self.unit})" for c in self.columns], *[r[2] for r in ratios]]
        body = []
        for case, vals in self.rows:
            body.append([case, *[f"{v:.3g}" for v in vals], *[f"{vals[a] / vals[b]:.2f}x" for a, b, _ in ratios]])
        widths = [max(len(str(r[i])) for r in [head, *body]) for i in range(len(head))]
        line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths))  # noqa: E731
        out = [f"\n## {self.title}", line(head), line(["-" * w for w in widths]), *map(line, body)]
        out += [f"  note: {n}" for n in self.notes]
        return "\n".join(out)

    def save(self, name: str, ratios: list[tuple[int, int, str]]) -> Path:
        RESULTS.mkdir(parents=True, exist_ok=True)
        path = RESULTS / f"{name}.json"
        data = {
            "title": self.title, "unit": self.unit, "columns": self.columns, "notes": self.notes,
            "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
            "rows": [{"case": c, "values": v, **{label: v[a] / v[b] for a, b, label in ratios}} for c, v in self.rows],
        }
        path.write_text(json.dumps(data, indent=1))
        return path
