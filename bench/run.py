"""Run the benchmarks: ``python bench/run.py [name ...]`` (default: all), one CPU thread.

Each prints a side-by-side table with ratios against the anchors measured in the same
run, and writes bench/results/<name>.json.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
for _k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_k, "1")

BENCHMARKS = ["trace_overhead", "head_scores", "task_gradients", "aggregators", "merge", "circuits", "tutorials", "scale",
              "ui_latency"]


def main(names: list[str]) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    for name in names or BENCHMARKS:
        if name not in BENCHMARKS:
            sys.exit(f"unknown benchmark {name!r}; choose from {', '.join(BENCHMARKS)}")
        mod = importlib.import_module(f"bench.{name}")
        table = mod.run()
        print(table.render(mod.RATIOS), flush=True)
        table.save(name, mod.RATIOS)


if __name__ == "__main__":
    main(sys.argv[1:])
