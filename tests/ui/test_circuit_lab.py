"""The feature-circuits notebook in a real JupyterLab, in headless Chromium: the
CircuitExplorer and its FeatureDashboard render with no widget error or traceback, the
node-threshold slider prunes the graph in place, and the notebook's own checks pass.
Saves screenshots."""

from __future__ import annotations

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, browser_page, build_ipynb, open_and_run, page_problems, require_chromium, running_lab,
)

pytestmark = [pytest.mark.ui]
NB = "03_feature_circuits"


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    build_ipynb(NB)


def _titles(page):
    return page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')].map(t => t.textContent)")


def test_circuit_explorer_renders_and_reacts_in_jupyterlab():
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, f"{NB}.ipynb")
        page.wait_for_selector(".js-plotly-plot", timeout=60_000)
        page.wait_for_selector(".widget-slider", timeout=60_000)
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                               ".some(t => t.textContent.startsWith('circuit: '))", timeout=60_000)
        page.screenshot(path=str(ARTIFACTS / "circuit_explorer.png"), full_page=True)
        assert page_problems(page) == []
        body = page.inner_text(".jp-NotebookPanel")
        assert "all feature-circuit checks passed" in body
        assert "quantile 3" in body  # the dashboard's top contexts
        # graph, metric bars, histogram, logit effects
        assert len(page.query_selector_all(".js-plotly-plot")) >= 4
        before = [t for t in _titles(page) if t.startswith("circuit: ")][0]
        assert not before.startswith("circuit: 1 nodes")
        # react: press End on the node-threshold slider: only the strongest node stays
        handle = page.query_selector_all(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle")[0]
        handle.focus()
        page.keyboard.press("End")
        page.wait_for_function(
            "() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
            ".some(t => t.textContent.startsWith('circuit: 1 nodes'))", timeout=30_000)
        page.screenshot(path=str(ARTIFACTS / "circuit_explorer-after-slider.png"), full_page=True)
        assert page_problems(page) == []
