"""The attention-heads tutorial in a real JupyterLab, in headless Chromium: the
AttentionExplorer renders, reacts to the score selector and to "ablate", and the page
shows no "Error displaying widget" and no traceback."""

from __future__ import annotations

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, browser_page, ensure_ipynb, open_and_run, page_problems, require_chromium, running_lab,
)

pytestmark = [pytest.mark.ui]


def test_attention_explorer_renders_and_reacts_in_jupyterlab():
    require_chromium()
    name = ensure_ipynb("01_attention_heads")
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, name, timeout_s=540)
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        assert page_problems(page) == []
        assert "all attention-head checks passed" in page.inner_text(".jp-NotebookPanel")
        page.screenshot(path=str(ARTIFACTS / "attention-explorer.png"), full_page=True)
        # the explorer: the only widget with an "ablate" button
        button = page.locator("button.jupyter-button", has_text="ablate").first
        explorer = page.locator(".widget-vbox", has=button).last
        kind = explorer.locator(".widget-dropdown select").first
        kind.select_option(label="previous_token")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
            ".some(t => t.textContent.startsWith('previous_token score per head'))", timeout=30_000)
        button.click()
        page.wait_for_function(
            "() => [...document.querySelectorAll('.widget-html-content')].some(t => t.textContent.includes('random heads'))",
            timeout=60_000)
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => t.textContent.startsWith('ablating L'))",
            timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "attention-explorer-after-ablate.png"), full_page=True)
        assert page_problems(page) == []
