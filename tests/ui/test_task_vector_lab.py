"""The task-vectors notebook in a real JupyterLab, in headless Chromium: the TaskVectorLab
renders all four plots with data (no empty axes), with no widget error, traceback or
serialization warning; at 1024 and 1440 px nothing sticks out of its output area; a
coefficient slider re-merges the bars; the top-k slider and a head click change the
vector's heads and the line that names them. Saves a screenshot per width."""

from __future__ import annotations

import pytest

from tests.ui.at_widths import assert_clean, check_widths, click_cell, press
from tests.ui.lab import ARTIFACTS, ROOT, browser_page, build_ipynb, open_and_run, require_chromium, running_lab

pytestmark = [pytest.mark.ui]
NB = "02_task_vectors"
LAB = ".wb-task-vector-lab"
HEADS = (f"[...document.querySelectorAll('{LAB} .widget-html-content')]"
         ".find(e => e.textContent.includes('heads in vector')).textContent")


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    build_ipynb(NB)


def test_task_vector_lab_fits_and_reacts_in_jupyterlab():
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, f"{NB}.ipynb")
        page.wait_for_selector(f"{LAB} .js-plotly-plot", timeout=60_000)
        assert_clean(page)
        body = page.inner_text(".jp-NotebookPanel")
        assert "all task-vector checks passed" in body
        assert "Weight space" in body and "Activation space" in body
        # bars, cosine, IE heatmap, layer sweep: four plots, each drawn with data
        drawn = page.evaluate(f"() => [...document.querySelectorAll('{LAB} .js-plotly-plot')]"
                              ".map(gd => (gd.data || []).filter(t => (t.z || t.y || []).length > 0).length)")
        assert len(drawn) == 4 and all(k >= 1 for k in drawn), drawn
        assert check_widths(page, "task_vector_lab", LAB) == {1024: [], 1440: []}
        # a coefficient slider: "working..." then the bars re-merged (new accuracies, the time it took)
        before = page.evaluate(f"() => document.querySelector('{LAB} .js-plotly-plot').data[0].y.join()")
        press(page, LAB, "capitalize", "End")
        page.wait_for_function(
            "([sel, before]) => [...document.querySelectorAll(sel + ' .widget-html-content')].some("
            "e => e.textContent.includes('re-merged and scored in'))", arg=[LAB, before], timeout=90_000)
        after = page.evaluate(f"() => document.querySelector('{LAB} .js-plotly-plot').data[0].y.join()")
        readout = page.locator(f"{LAB} .widget-slider", has_text="capitalize").locator(".widget-readout").first
        assert readout.inner_text().strip() == "1.50"
        assert after != before or "merge: mean zero-shot accuracy" in page.evaluate(
            f"() => document.querySelector('{LAB} .js-plotly-plot .gtitle').textContent")
        # the top-k slider: one more head in the vector, the line says so
        k = int(page.evaluate(f"() => {HEADS}").split("(")[1].split(")")[0])
        press(page, LAB, "top k", "ArrowRight")
        page.wait_for_function(f"() => {HEADS}.includes('heads in vector ({k + 1})')", timeout=120_000)
        assert f"the top {k + 1} by indirect effect" in page.evaluate(f"() => {HEADS}")
        # a click on a head of the indirect-effect map toggles it; the slider follows the count
        text = page.evaluate(f"() => {HEADS}")
        click_cell(page, LAB, 2, 0, 0)
        page.wait_for_function(f"(t) => {HEADS} !== t", arg=text, timeout=120_000)
        now = page.evaluate(f"() => {HEADS}")
        count = int(now.split("(")[1].split(")")[0])
        assert count in (k, k + 2)
        slider = page.locator(f"{LAB} .widget-slider", has_text="top k").locator(".widget-readout").first
        assert slider.inner_text().strip() == str(count)
        page.screenshot(path=str(ARTIFACTS / "task_vector_lab-after-controls.png"), full_page=True)
        assert_clean(page)
