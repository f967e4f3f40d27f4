"""The feature-circuits notebook in a real JupyterLab, in headless Chromium, at both page
widths: the CircuitExplorer and its FeatureDashboard render with nothing clipped, no widget
error, traceback or serialization warning; the node-threshold slider prunes the graph in
place (End: one node) and grows it below the build threshold with the new nodes' edges
computed (Home); clicking a node's centre selects that node; the dashboard jumps to a
typed feature id. Screenshots: tests/ui/artifacts/circuit_explorer-<width>.png and
feature_dashboard-<width>.png."""

from __future__ import annotations

import re

import pytest

from tests.ui.lab import (
    ARTIFACTS, ROOT, WIDTHS, browser_page, build_ipynb, open_and_run, overflow_problems, page_problems,
    require_chromium, running_lab, serialization_warnings,
)

pytestmark = [pytest.mark.ui]
NB = "03_feature_circuits"
NODE_TRACE = 7


@pytest.fixture(scope="module", autouse=True)
def _needs_chromium():
    require_chromium()
    build_ipynb(NB)


def _circuit_title(page) -> str:
    return page.evaluate("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                         ".map(t => t.textContent).find(t => t.startsWith('circuit: ')) || ''")


def _edges(title: str) -> int:
    return int(re.search(r"(\d+) edges", title).group(1))


def test_circuit_explorer_fits_and_reacts_in_jupyterlab():
    with running_lab(ROOT / "notebooks") as (base, token), browser_page(max(WIDTHS)) as page:
        errors = []  # uncaught front-end errors ("[anywidget] Failed to initialize model": a figure left empty)
        page.on("pageerror", lambda e: errors.append(str(e)))
        open_and_run(page, base, token, f"{NB}.ipynb", timeout_s=900)
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                               ".some(t => t.textContent.startsWith('circuit: '))", timeout=60_000)
        assert page_problems(page) == []
        body = page.inner_text(".jp-NotebookPanel")
        assert "all feature-circuit checks passed" in body
        assert "quantile 3" in body and "top logits" in body  # the dashboard's contexts and logit lists
        explorer = page.locator(".wb-circuit-explorer").last
        dashboard = explorer.locator(".wb-feature-dashboard")
        for width in sorted(WIDTHS, reverse=True):
            page.set_viewport_size({"width": width, "height": 1000})
            page.wait_for_timeout(1500)
            assert overflow_problems(page) == [], width
            page.set_viewport_size({"width": width, "height": 3200})  # tall: the whole widget in one shot
            page.wait_for_timeout(1000)
            explorer.scroll_into_view_if_needed()
            explorer.screenshot(path=str(ARTIFACTS / f"circuit_explorer-{width}.png"))
            dashboard.screenshot(path=str(ARTIFACTS / f"feature_dashboard-{width}.png"))
            # the dashboard's figures hold their data (not empty axes)
            counts = dashboard.locator(".js-plotly-plot").evaluate_all(
                "(gs) => gs.map(g => g._fullData[0].x ? g._fullData[0].x.length : 0)")
            assert len(counts) == 2 and min(counts) > 0, counts
        page.set_viewport_size({"width": max(WIDTHS), "height": 1000})
        built = _circuit_title(page)
        # a click on a node's centre selects that node (the info line names it)
        plot = explorer.locator(".js-plotly-plot").first
        plot.scroll_into_view_if_needed()
        page.wait_for_timeout(1000)  # the notebook settles after the resizes
        # the centre of a node in the middle of the tallest column, from plotly's own axes (relative to the plot)
        where = plot.evaluate(
            """(gd) => { const t = gd._fullData[%d], L = gd._fullLayout;
                const k = Math.floor(t.x.length / 2);
                return {k, name: t.customdata[k][1],
                        x: L.xaxis._offset + L.xaxis.l2p(t.x[k]), y: L.yaxis._offset + L.yaxis.l2p(t.y[k])}; }"""
            % NODE_TRACE)
        name = where["name"]
        plot.hover(position={"x": where["x"] - 30, "y": where["y"]})
        plot.hover(position={"x": where["x"], "y": where["y"]})  # plotly clicks what it last hovered: hover first
        page.wait_for_timeout(500)
        hovered = plot.evaluate("(gd) => (gd._hoverdata || []).map(p => [p.curveNumber, p.pointNumber])")
        assert hovered == [[NODE_TRACE, where["k"]]], (hovered, where)  # the node under the pointer, not a neighbour
        plot.click(position={"x": where["x"], "y": where["y"]})
        try:
            page.wait_for_function(
                "(n) => [...document.querySelectorAll('.widget-html-content b')].some(b => b.textContent === n)",
                arg=name.replace("&amp;", "&"), timeout=30_000)
        except Exception as err:
            info = explorer.locator(".widget-html-content b").all_text_contents()[:3]
            hovered = plot.evaluate("(gd) => (gd._hoverdata || []).map(p => [p.curveNumber, p.pointNumber])")
            raise AssertionError(f"clicking {where} did not select {name}; shown: {info}; hovered {hovered}; "
                                 f"page errors: {errors}") from err
        # End on the node slider: only the strongest node; Home: below the build threshold, edges computed
        handle = explorer.locator(".widget-slider .ui-slider-handle, .widget-slider .noUi-handle").first
        handle.focus()
        page.keyboard.press("End")
        page.wait_for_function("() => [...document.querySelectorAll('.js-plotly-plot .gtitle')]"
                               ".some(t => t.textContent.startsWith('circuit: 1 nodes'))", timeout=30_000)
        handle.focus()
        page.keyboard.press("Home")
        page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')]"
                               ".some(t => t.textContent.includes('edges computed for the'))", timeout=180_000)
        page.wait_for_timeout(1000)
        assert _edges(_circuit_title(page)) > _edges(built), (built, _circuit_title(page))
        # the dashboard jumps to a typed feature id
        box_input = explorer.locator(".widget-inline-hbox", has_text="feature id").locator("input")
        box_input.fill("5")
        box_input.press("Enter")
        explorer.locator("button", has_text="show").click()
        page.wait_for_function("() => [...document.querySelectorAll('.widget-html-content')]"
                               ".some(t => /\\/5 shown/.test(t.textContent))", timeout=60_000)
        assert page_problems(page) == []
        assert serialization_warnings(page) == []
        assert errors == []
        assert overflow_problems(page) == []
