#!/usr/bin/env python3
"""Set up and run interp-workbench. The two commands of the README:

    python3 dev.py lab     # set up .venv, then open JupyterLab on the quickstart notebook
    python3 dev.py test    # set up .venv (and Chromium), then run the whole test suite

Needs only Python 3.10+ and the ability to install packages. Setting up creates
``.venv`` beside this file, installs a pinned torch and the package with its pinned
dependencies (``constraints.txt``), and turns the tutorial ``notebooks/*.py`` into
``.ipynb``. ``test`` (and ``bench``) also install the reference libraries and test
tools of ``bench/requirements.txt`` in the same pip run, resolved against
``constraints.txt`` (so no pin moves), for the conformance tests and the benchmarks.
A second run skips what is already installed. Extra arguments after ``test`` go to
pytest (``python3 dev.py test -k subject``); after ``lab`` to JupyterLab.

    python3 dev.py bench [name ...]   # prints every benchmark's ratios against the references
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
TORCH = "torch==2.13.0"  # CPU build where a local wheel exists; PyPI's build elsewhere
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
REFERENCES = "bench/requirements.txt"  # reference libraries and test tools: installed with the dev extras


def run(cmd: list, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, cwd=ROOT, **kw)


def setup(extras: str) -> None:
    if sys.version_info < (3, 10):
        sys.exit(f"interp-workbench needs Python 3.10 or newer; this is {sys.version.split()[0]}")
    if not PY.exists():
        run([sys.executable, "-m", "venv", VENV])
    files = ["pyproject.toml", "constraints.txt"] + ([REFERENCES] if extras == "dev" else [])
    key = hashlib.sha256(b"".join((ROOT / f).read_bytes() for f in files) + (TORCH + extras).encode()).hexdigest()
    stamp = VENV / f".stamp-{extras}"
    if not (stamp.exists() and stamp.read_text() == key):
        run([PY, "-m", "pip", "install", "--disable-pip-version-check", TORCH])
        refs = ["-r", REFERENCES] if extras == "dev" else []
        run([PY, "-m", "pip", "install", "--disable-pip-version-check", "-c", "constraints.txt", "-e", f".[{extras}]",
             *refs])
        stamp.write_text(key)
    notebooks = sorted((ROOT / "notebooks").glob("[0-9]*.py"))
    if notebooks:
        run([PY, "-m", "jupytext", "--quiet", "--to", "ipynb", *notebooks])


def chromium() -> str:
    """Debian's Chromium for the real-browser tests, installed when missing."""
    for cand in (os.environ.get("WORKBENCH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).exists():
            return cand
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if not shutil.which("apt-get") or (sudo and not shutil.which("sudo")):
        sys.exit("the UI tests need Chromium: install it (Debian/Ubuntu: apt-get install chromium) "
                 "or point WORKBENCH_CHROMIUM at a Chromium or Chrome binary")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    run(sudo + ["apt-get", "update", "-q"], env=env)
    run(sudo + ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"], env=env)
    return "/usr/bin/chromium"


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("lab", "test", "setup", "bench"):
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "lab":
        setup("lab")
        nb = ROOT / "notebooks" / "00_quickstart.ipynb"
        os.environ.update(OFFLINE)
        os.execv(str(BIN / "jupyter"), [str(BIN / "jupyter"), "lab", str(nb), *rest])
    setup("dev")
    if cmd == "setup":
        return 0
    if cmd == "bench":
        os.environ.update(OFFLINE)
        return subprocess.run([str(PY), "bench/run.py", *rest], cwd=ROOT).returncode
    env = {**os.environ, **OFFLINE, "WORKBENCH_CHROMIUM": chromium()}
    workers = ["-n", os.environ.get("WORKBENCH_TEST_WORKERS", "2")]
    # everything but the browser tests on the workers; then the browser tests one at a time,
    # on an otherwise idle machine (a browser that starts many widget models at once beside
    # busy test workers can miss a front-end start-up deadline: anywidget allows 2 s)
    first = subprocess.run([str(PY), "-m", "pytest", *workers, "-m", "not ui", *rest], cwd=ROOT, env=env).returncode
    second = subprocess.run([str(PY), "-m", "pytest", "-m", "ui", *rest], cwd=ROOT, env=env).returncode
    no_tests = 5  # pytest's code when a selection (-k, a path) leaves no test in one of the two runs
    codes = [c for c in (first, second) if c != no_tests]
    return max(codes) if codes else no_tests


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
