"""Tutorials on a shared CPU: each notebook alone, and beside one busy process.

Anchor: the same notebook run alone, in the same run of this bench. The notebooks'
kernels get no WORKBENCH_THREADS, so ``import workbench`` picks the thread count itself
(workbench.threads): the ratio says what a student pays when something else keeps a
core busy. Set ``BENCH_TUTORIALS_TORCH_DEFAULT=1`` to add torch's own thread count beside
the busy process (what the tutorials did before; it can take many times longer, so each
run is cut at ``BENCH_TUTORIALS_TIMEOUT`` seconds, default 600).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.harness import Table

ROOT = Path(__file__).resolve().parents[1]
RATIOS = [(1, 0, "busy / alone")]


def run_notebook(path: Path, threads: str | None, timeout: float) -> float:
    """Seconds to execute ``path`` in a fresh kernel (inf past ``timeout``)."""
    import jupytext
    from nbclient import NotebookClient

    env = {k: v for k, v in os.environ.items() if k != "WORKBENCH_THREADS"}
    if threads is not None:
        env["WORKBENCH_THREADS"] = threads
    nb = jupytext.read(path)
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(env)  # the kernel inherits this process's environment
    try:
        client = NotebookClient(nb, timeout=int(timeout), kernel_name="python3",
                                resources={"metadata": {"path": str(path.parent)}})
        start = time.perf_counter()
        try:
            client.execute()
        except Exception as err:  # a timeout (or a failing check) is reported, not hidden
            print(f"  {path.stem}: {type(err).__name__} after {time.perf_counter() - start:.0f} s", flush=True)
            return float("inf")
        return time.perf_counter() - start
    finally:
        os.environ.clear()
        os.environ.update(old)


def busy():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def run() -> Table:
    timeout = float(os.environ.get("BENCH_TUTORIALS_TIMEOUT", 600))
    names = os.environ.get("BENCH_TUTORIALS", "")
    paths = sorted((ROOT / "notebooks").glob("[0-9]*.py"))
    if names:
        paths = [p for p in paths if any(p.stem.startswith(n) for n in names.split(","))]
    extra = os.environ.get("BENCH_TUTORIALS_TORCH_DEFAULT") == "1"
    table = Table("Tutorials alone and beside one busy process (auto threads)",
                  ["alone", "beside busy"] + (["busy, torch default threads"] if extra else []), unit="s")
    for path in paths:
        alone = run_notebook(path, None, timeout)
        hog = busy()
        try:
            shared = run_notebook(path, None, timeout)
            torch_default = run_notebook(path, "torch", timeout) if extra else None
        finally:
            hog.kill()
        table.add(path.stem, alone, shared, *([torch_default] if extra else []))
        print(f"  {path.stem}: alone {alone:.0f} s, beside busy {shared:.0f} s", flush=True)
    table.notes.append(f"{os.cpu_count()} CPUs seen; kernels choose their threads with workbench.available_cpus()")
    return table
