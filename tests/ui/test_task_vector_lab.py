"""The task-vectors notebook in a real JupyterLab, in headless Chromium: the TaskVectorLab
renders with no widget error or traceback, a coefficient slider re-merges the bars, and
the notebook's own checks pass. Saves screenshots."""

from __future__ import annotations

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, browser_page, build_ipynb, open_and_run, page_problems, require_chromium, running_lab,
)

pytestmark = [pytest.mark.ui]
NB = "02_task_vectors"


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    build_ipynb(NB)


def test_task_vector_lab_renders_and_reacts_in_jupyterlab():
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, f"{NB}.ipynb")
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        page.wait_for_selector(".widget-slider", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "task_vector_lab.png"), full_page=True)
        assert page_problems(page) == []
        body = page.inner_text(".jp-NotebookPanel")
        assert "all task-vector checks passed" in body
        assert "Weight space" in body and "Activation space" in body
        # bars, cosine, IE heatmap, layer sweep: four widget plots (plus the notebook's heatmap)
        assert len(page.query_selector_all(".js-plotly-plot")) >= 5
        # react: press End on the first coefficient slider; the bar title follows the re-merge
        before = page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent)")
        handle = page.query_selector_all(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle")[0]
        handle.focus()
        page.keyboard.press("End")
        page.wait_for_function(
            "(before) => { const now = [...document.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent);"
            " return now.some(t => t.includes('merge: mean zero-shot accuracy') && !before.includes(t)); }",
            arg=before, timeout=30_000,
        )
        page.screenshot(path=str(ARTIFACTS / "task_vector_lab-after-slider.png"), full_page=True)
        assert page_problems(page) == []
