"""The MTL tutorial in a real JupyterLab, in headless Chromium: the ConflictMonitor renders
its figures, reacts to start / stop, and the page shows no "Error displaying widget" and
no traceback."""

from __future__ import annotations

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, browser_page, ensure_ipynb, open_and_run, page_problems, require_chromium, running_lab,
)

pytestmark = [pytest.mark.ui]


def test_conflict_monitor_renders_and_reacts_in_jupyterlab():
    require_chromium()
    name = ensure_ipynb("04_mtl_gradient_conflicts")
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, name, timeout_s=400)
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        assert page_problems(page) == []
        assert "all MTL checks passed" in page.inner_text(".jp-NotebookPanel")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.widget-html-content')].some(t => t.textContent.includes('step 200/200'))",
            timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "conflict-monitor.png"), full_page=True)
        # react: raise nothing, but "start" on a finished run keeps it finished and idle;
        # the status reflects the trainer (200 steps, idle) after the click round-trip
        page.locator("button.jupyter-button", has_text="start").last.click()
        page.locator("button.jupyter-button", has_text="stop").last.click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.widget-html-content')].some(t => /step 200\\/200 \\(idle\\)/.test(t.textContent))",
            timeout=30_000)
        assert len(page.query_selector_all(".js-plotly-plot")) >= 3
        assert page_problems(page) == []
