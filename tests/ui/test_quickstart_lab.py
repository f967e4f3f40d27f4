"""The quickstart in a real JupyterLab, in headless Chromium: it renders, reacts, and
shows no "Error displaying widget" and no traceback. Saves a screenshot."""

from __future__ import annotations

import pytest

from tests.ui.lab import ARTIFACTS, ROOT, browser_page, open_and_run, page_problems, require_chromium, running_lab

pytestmark = [pytest.mark.ui]


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    if not (ROOT / "notebooks" / "00_quickstart.ipynb").exists():
        import jupytext

        jupytext.write(jupytext.read(ROOT / "notebooks" / "00_quickstart.py"), ROOT / "notebooks" / "00_quickstart.ipynb")


def test_quickstart_renders_and_reacts_in_jupyterlab():
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, "00_quickstart.ipynb")
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        page.wait_for_selector(".widget-dropdown select", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "quickstart.png"), full_page=True)
        assert page_problems(page) == []
        body = page.inner_text(".jp-NotebookPanel")
        assert "all quickstart checks passed" in body
        # widget plots: one per AttentionView, plus the plain figure
        assert len(page.query_selector_all(".js-plotly-plot")) >= 3
        # tokens are shown as text, and token text never becomes markup
        assert page.query_selector_all(".wb-tokens .wb-token")
        # react: choose another head in the first view; its FigureWidget title follows
        view = page.query_selector_all(".widget-vbox")[0]
        selects = view.query_selector_all(".widget-dropdown select")
        layer_select, head_select = selects[1], selects[2]
        layer_select.select_option(label="0")
        head_select.select_option(label="1")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => t.textContent.startsWith('L0H1'))",
            timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "quickstart-after-click.png"), full_page=True)
        assert page_problems(page) == []
