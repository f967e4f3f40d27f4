"""Every tutorial notebook runs offline on the CPU, within its memory budget.

Each notebook ends with cells that check its own scientific claims, so running it is
the test. A cell appended here reads the kernel's peak memory.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9]*.py"))
MEMORY_BUDGET = 2 * 2**30  # Binder's 2 GB
REPORT = ROOT / "tests" / "ui" / "artifacts" / "notebooks.json"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_and_checks_itself(path):
    import jupytext
    import nbformat
    from nbclient import NotebookClient

    nb = jupytext.read(path)
    assert "assert" in nb.cells[-1].source, "a notebook ends by checking its own claims"
    nb.cells.append(nbformat.v4.new_code_cell(
        "import resource; print('WB-MAXRSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"))
    client = NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(ROOT / "notebooks")}})
    start = time.time()
    client.execute()
    seconds = time.time() - start
    text = "".join(o.get("text", "") for o in nb.cells[-1].outputs)
    peak = int(text.split("WB-MAXRSS")[1].split()[0])
    REPORT.parent.mkdir(parents=True, exist_ok=True)
    report = json.loads(REPORT.read_text()) if REPORT.exists() else {}
    report[path.stem] = {"seconds": round(seconds, 1), "peak_bytes": peak}
    REPORT.write_text(json.dumps(report, indent=1))
    print(f"{path.stem}: {seconds:.0f} s, peak {peak / 2**20:.0f} MB")
    assert peak < MEMORY_BUDGET, f"{path.stem} peaked at {peak / 2**30:.2f} GB (budget 2 GB)"
