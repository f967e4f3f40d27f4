"""The quickstart in a real JupyterLab, in headless Chromium: it renders with no widget
error, traceback or serialization warning; at 1024 and 1440 px nothing sticks out of its
output area; choosing another head redraws the AttentionView. Saves a screenshot per
width."""

from __future__ import annotations

import pytest

from tests.ui.at_widths import assert_clean, check_widths, press, wait_title
from tests.ui.lab import (
    ARTIFACTS, ROOT, browser_page, build_ipynb, open_and_run, require_chromium, running_lab,
)

pytestmark = [pytest.mark.ui]
VIEW = ".wb-attention-view"


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    build_ipynb("00_quickstart")


def test_quickstart_fits_and_reacts_in_jupyterlab():
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, "00_quickstart.ipynb")
        page.wait_for_selector(f"{VIEW} .js-plotly-plot", timeout=60_000)
        assert_clean(page)
        assert "all quickstart checks passed" in page.inner_text(".jp-NotebookPanel")
        # widget plots: one per AttentionView, plus the plain figure
        assert len(page.query_selector_all(".js-plotly-plot")) >= 3
        # tokens are shown as text, and token text never becomes markup
        assert page.query_selector_all(".wb-tokens .wb-token")
        assert check_widths(page, "attention-view", VIEW) == {1024: [], 1440: []}
        # react: choose another head in the first view; its figure's title follows
        view = page.locator(VIEW).first
        selects = view.locator(".widget-dropdown select")
        selects.nth(1).select_option(label="0")
        selects.nth(2).select_option(label="1")
        wait_title(page, VIEW, "t.startsWith('L0H1')", timeout=30_000)
        # the query slider moves the outlined token
        n = view.locator(".wb-tokens .wb-token").count()
        press(page, VIEW, "query position", "Home")
        page.wait_for_function(
            "(sel) => !!document.querySelector(sel + ` .wb-tokens .wb-token[data-pos='0'][style*='outline']`)",
            arg=VIEW, timeout=30_000)
        assert n > 1
        page.screenshot(path=str(ARTIFACTS / "quickstart-after-click.png"), full_page=True)
        assert_clean(page)
