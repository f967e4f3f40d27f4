"""Drive a real JupyterLab in headless Chromium (Debian's, through Playwright).

``running_lab()`` starts JupyterLab on 127.0.0.1 with a random token; ``open_and_run``
opens a notebook, runs every cell and waits until all have executed. The widget
tests of every lens reuse these helpers.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "ui" / "artifacts"
CHROMIUM_ARGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage",
]


def chromium_path() -> str | None:
    for cand in (os.environ.get("WORKBENCH_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium")):
        if cand and Path(cand).exists():
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_lab(root_dir: Path):
    """Yield (base_url, token) of a JupyterLab serving ``root_dir``."""
    port, token = _free_port(), secrets.token_hex(16)
    log = open(ARTIFACTS / f"lab-{port}.log", "w")
    root_flag = ["--allow-root"] if hasattr(os, "geteuid") and os.geteuid() == 0 else []
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyter", "lab", *root_flag, "--no-browser", f"--port={port}", "--ServerApp.ip=127.0.0.1",
         f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root_dir}",
         "--LabApp.expose_app_in_browser=True", "--ServerApp.disable_check_xsrf=False",
         "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
        stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "JUPYTER_PLATFORM_DIRS": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2)
                break
            except Exception:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"JupyterLab did not start; see {log.name}")
                time.sleep(0.5)
        yield base, token
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


WIDTHS = (1024, 1440)  # the page widths every widget must fit


@contextlib.contextmanager
def browser_page(width: int = 1440, height: int = 1000):
    """A Chromium page of ``width`` px; ``page.console_log`` collects every console message
    (serialization warnings from the widget manager land there)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": width, "height": height})
        page.console_log = []
        page.on("console", lambda msg: page.console_log.append(f"{msg.type}: {msg.text}"))
        try:
            yield page
        finally:
            browser.close()


def overflow_problems(page, tolerance: float = 1.0) -> list[str]:
    """Figures, widget boxes and images that stick out of their output area (clipped or
    scrolled away at this page width), and plot titles hidden under the plotly toolbar."""
    return page.evaluate(
        """(tol) => {
            const out = [];
            for (const area of document.querySelectorAll('.jp-OutputArea-output')) {
                const a = area.getBoundingClientRect();
                if (a.width === 0) continue;
                const items = area.querySelectorAll('.js-plotly-plot, .widget-box, .widget-hbox, .widget-vbox, img, table');
                for (const el of items) {
                    const r = el.getBoundingClientRect();
                    if (r.width === 0) continue;
                    if (r.right > a.right + tol || r.left < a.left - tol) {
                        const label = el.className.baseVal ?? el.className;
                        out.push(`${el.tagName.toLowerCase()}.${String(label).split(' ')[0]} spans ${Math.round(r.left)}..`
                                 + `${Math.round(r.right)} px, its output area ${Math.round(a.left)}..${Math.round(a.right)}`);
                    }
                }
            }
            for (const plot of document.querySelectorAll('.js-plotly-plot')) {
                const bar = plot.querySelector('.modebar');
                const title = plot.querySelector('.gtitle');
                if (!bar || !title || !title.textContent) continue;
                const b = bar.getBoundingClientRect(), t = title.getBoundingClientRect();
                const overlap = !(t.right < b.left || t.left > b.right || t.bottom < b.top || t.top > b.bottom);
                if (overlap && b.width > 0) out.push(`title "${title.textContent.slice(0, 40)}" lies under the plot toolbar`);
            }
            return out;
        }""",
        tolerance,
    )


def serialization_warnings(page) -> list[str]:
    """Console messages of values the widget manager could not send (NaN in JSON, ...)."""
    keys = ("Message serialization failed", "not JSON compliant", "Out of range float")
    return [m for m in getattr(page, "console_log", []) if any(k in m for k in keys)]


def open_and_run(page, base: str, token: str, notebook: str, timeout_s: float = 480) -> None:
    """Open ``notebook`` (relative to the lab's root), run all cells, wait for them all."""
    page.goto(f"{base}/lab/tree/{notebook}?token={token}&reset", wait_until="domcontentloaded")
    page.wait_for_selector(".jp-NotebookPanel .jp-Cell", timeout=90_000)
    page.wait_for_function(
        "() => { const s = document.querySelector('.jp-Notebook-ExecutionIndicator');"
        " return window.jupyterapp && document.querySelector('.jp-NotebookPanel'); }",
        timeout=90_000,
    )
    # wait for the kernel to be ready, then run everything
    page.wait_for_function(
        "() => { const w = window.jupyterapp.shell.currentWidget;"
        " return w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel"
        " && w.sessionContext.session.kernel.connectionStatus === 'connected'"
        " && w.sessionContext.session.kernel.status === 'idle'; }",
        timeout=120_000,
    )
    page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    n_code = page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.widgets.filter(c => c.model.type === 'code').length")
    page.wait_for_function(
        """(n) => {
            const cells = window.jupyterapp.shell.currentWidget.content.widgets.filter(c => c.model.type === 'code');
            const done = cells.filter(c => c.model.executionCount !== null && !c.promptNode?.textContent?.includes('*'));
            const k = window.jupyterapp.shell.currentWidget.sessionContext.session.kernel;
            return done.length === n && k.status === 'idle';
        }""",
        arg=n_code,
        timeout=timeout_s * 1000,
    )


def page_problems(page) -> list[str]:
    """Widget render errors and tracebacks visible on the page."""
    problems = []
    body = page.inner_text(".jp-NotebookPanel")
    if "Error displaying widget" in body:
        problems.append("Error displaying widget")
    for err in page.query_selector_all(".jp-RenderedText[data-mime-type='application/vnd.jupyter.stderr']"):
        text = err.inner_text()
        if "Traceback" in text or "Error" in text.split("\n")[0]:
            problems.append(text[:500])
    for err in page.query_selector_all(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']"):
        problems.append(err.inner_text()[:500])
    for err in page.query_selector_all(".jp-RenderedText[data-mime-type='application/vnd.jupyter.error']"):
        problems.append(err.inner_text()[:500])
    return problems


def require_chromium() -> None:
    """Fail (not skip) without Chromium: a browser test that cannot run must not pass."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    if chromium_path() is None:
        import pytest

        pytest.fail("no Chromium found: run the tests through `python3 dev.py test`, which installs it")


def build_ipynb(stem: str) -> str:
    """(Re)build ``notebooks/<stem>.ipynb`` from its paired .py as dev.py and binder/postBuild
    do (the jupytext CLI keeps the pairing metadata consistent); returns its name."""
    source = ROOT / "notebooks" / f"{stem}.py"
    subprocess.run([sys.executable, "-m", "jupytext", "--quiet", "--to", "ipynb", str(source)], check=True)
    return f"{stem}.ipynb"


def ensure_ipynb(stem: str) -> str:
    """Build ``notebooks/<stem>.ipynb`` from its paired .py when missing; returns its name."""
    target = ROOT / "notebooks" / f"{stem}.ipynb"
    if not target.exists():
        import jupytext

        jupytext.write(jupytext.read(ROOT / "notebooks" / f"{stem}.py"), target)
    return target.name
