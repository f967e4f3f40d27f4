"""The MTL tutorial in a real JupyterLab, in headless Chromium, at both page widths: the
ConflictMonitor and the saved-run replay render with nothing clipped and no serialization
warning; after the notebook's run, choosing mgda under "next run" and pressing "start"
trains on with mgda (the status says so), "stop" ends it; the record slider looks back.
Screenshots: tests/ui/artifacts/conflict_monitor-<width>.png, conflict_replay-<width>.png."""

from __future__ import annotations

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, WIDTHS, browser_page, build_ipynb, open_and_run, overflow_problems, page_problems,
    require_chromium, running_lab, serialization_warnings,
)

pytestmark = [pytest.mark.ui]
NB = "04_mtl_gradient_conflicts"


def _status_matches(page, pattern: str, timeout_ms: int = 60_000) -> None:
    page.wait_for_function(
        "(p) => [...document.querySelectorAll('.widget-html-content')].some(t => new RegExp(p).test(t.textContent))",
        arg=pattern, timeout=timeout_ms)


def test_conflict_monitor_fits_and_its_controls_work_in_jupyterlab():
    require_chromium()
    name = build_ipynb(NB)
    with running_lab(ROOT / "notebooks") as (base, token), browser_page(max(WIDTHS)) as page:
        errors = []  # uncaught front-end errors ("[anywidget] Failed to initialize model": a figure left empty)
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_and_run(page, base, token, name, timeout_s=900)
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        assert page_problems(page) == []
        assert "all MTL checks passed" in page.inner_text(".jp-NotebookPanel")
        _status_matches(page, r"step 200/200 \(idle\)")
        monitor = page.locator(".jp-OutputArea-output", has=page.locator("button", has_text="start")).last
        replay = page.locator(".jp-OutputArea-output", has_text="saved run:").last
        assert monitor.locator(".js-plotly-plot").count() == 4  # cosines, affinity, panels, per-pair bars
        assert replay.locator(".js-plotly-plot").count() == 5  # ... and the three text runs overlaid
        for width in sorted(WIDTHS, reverse=True):
            page.set_viewport_size({"width": width, "height": 1000})
            page.wait_for_timeout(1500)  # plotly refits on the resize
            assert overflow_problems(page) == [], width
            page.set_viewport_size({"width": width, "height": 2600})  # tall: the whole widget in one shot
            page.wait_for_timeout(1000)
            monitor.scroll_into_view_if_needed()
            monitor.screenshot(path=str(ARTIFACTS / f"conflict_monitor-{width}.png"))
            replay.scroll_into_view_if_needed()
            replay.screenshot(path=str(ARTIFACTS / f"conflict_replay-{width}.png"))
            # the monitor trained before it was shown: its figures hold the run, not empty axes
            titles = monitor.locator(".js-plotly-plot .gtitle").all_text_contents()
            assert "gradient cosine (all blocks, step 190)" in titles and "lookahead affinity, step 190" in titles, (
                titles, errors)
            assert any(t.startswith("per-block cosine, step 190") for t in titles), titles
        page.set_viewport_size({"width": max(WIDTHS), "height": 1000})
        # the record slider looks back: Home shows the first record (step 0) in the matrices' titles
        handle = monitor.locator(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("Home")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].some(t => t.textContent.endsWith('step 0)'))",
            timeout=30_000)
        # "next run" is read: choose mgda, start; the finished run trains on with it
        monitor.locator(".widget-dropdown", has_text="next run").locator("select").select_option("mgda")
        monitor.locator("button", has_text="start").click()
        _status_matches(page, r"training on to step 400; mgda from step 200", 60_000)
        page.wait_for_timeout(1500)
        monitor.locator("button", has_text="stop").click()
        _status_matches(page, r"step \d+/400 \(idle\)", 120_000)
        assert page_problems(page) == []
        assert serialization_warnings(page) == []
        assert errors == []
        assert overflow_problems(page) == []
