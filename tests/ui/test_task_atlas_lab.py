"""The task-atlas notebook in a real JupyterLab, in headless Chromium, at 1440 and 1024 px:
the TaskAtlas renders with no widget error, traceback or serialization warning, nothing
overflows its output area at either width, the lens-measure selector redraws the scatter
and the pair selector the per-block view, and the notebook's own checks pass. Saves a
screenshot per width."""

from __future__ import annotations

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, WIDTHS, browser_page, build_ipynb, open_and_run, overflow_problems, page_problems,
    require_chromium, running_lab, serialization_warnings,
)

pytestmark = [pytest.mark.ui]
NB = "05_task_atlas"
TITLES = "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent)"


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    build_ipynb(NB)


def test_task_atlas_renders_fits_and_reacts_in_jupyterlab():
    assert sorted(WIDTHS) == [1024, 1440]
    with running_lab(ROOT / "notebooks") as (base, token), browser_page(1440) as page:
        errors = []  # uncaught front-end errors ("[anywidget] Failed to initialize model": a figure left empty)
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_and_run(page, base, token, f"{NB}.ipynb")
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        assert page_problems(page) == []
        assert "all atlas checks passed" in page.inner_text(".jp-NotebookPanel")
        for width in (1440, 1024):
            page.set_viewport_size({"width": width, "height": 1000})
            page.wait_for_timeout(1500)  # the lab relayouts; FitWidth refits the figures
            assert overflow_problems(page) == [], width
            page.set_viewport_size({"width": width, "height": 3200})  # tall: the whole widget in one shot
            page.wait_for_timeout(1000)
            view = page.locator(".wb-task-atlas").last
            view.scroll_into_view_if_needed()
            view.screenshot(path=str(ARTIFACTS / f"task_atlas-{width}.png"))
            page.set_viewport_size({"width": width, "height": 1000})
        # the agreement intervals are computed in a background thread: wait for them to be drawn
        page.wait_for_function(f"() => ({TITLES})().some(t => t.includes('bootstrap draws over pairs'))", timeout=60_000)
        # the atlas widget: the box holding the "lens measure" dropdown
        measure = page.locator(".widget-dropdown", has_text="lens measure").locator("select").last
        options = measure.locator("option").all_inner_texts()
        assert len(options) >= 5, options
        before = page.evaluate(TITLES)
        measure.select_option(index=len(options) - 1)
        page.wait_for_function(f"(before) => {{ const now = ({TITLES})(); return now.some(t => !before.includes(t)); }}",
                               arg=before, timeout=60_000)
        assert any(t.startswith("tag_affinity vs") for t in page.evaluate(TITLES))
        pair = page.locator(".widget-dropdown", has_text="pair").locator("select").last
        before = page.evaluate(TITLES)
        current = pair.evaluate("s => s.selectedIndex")
        pair.select_option(index=0 if current else 1)
        page.wait_for_function(f"(before) => {{ const now = ({TITLES})(); return now.some(t => !before.includes(t)); }}",
                               arg=before, timeout=60_000)
        assert any("through the depth" in t and t not in before for t in page.evaluate(TITLES))
        page.locator(".wb-task-atlas").last.screenshot(path=str(ARTIFACTS / "task_atlas-after-select.png"))
        assert page_problems(page) == []
        assert serialization_warnings(page) == []
        assert overflow_problems(page) == []
        assert errors == []
