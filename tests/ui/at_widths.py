"""Look at a rendered notebook at every width of ``WIDTHS``: nothing may stick out of its
output area, no message may fail to serialize; a screenshot per widget per width."""

from __future__ import annotations

from tests.ui.lab import ARTIFACTS, WIDTHS, overflow_problems, page_problems, serialization_warnings


def settle(page, ms: int = 1500) -> None:
    """Let the widgets' resize observers refit every figure after a width change."""
    page.wait_for_timeout(ms)


def check_widths(page, widget: str, selector: str) -> dict[int, list[str]]:
    """At each page width: the page's overflow problems (want: none) and screenshots of the
    widget (``selector``) from its top (``<widget>-<width>.png``) and its end
    (``<widget>-<width>-end.png``). Returns {width: problems}."""
    found = {}
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 1000})
        settle(page)
        found[width] = overflow_problems(page)
        el = page.locator(selector).first
        el.evaluate("e => e.scrollIntoView({block: 'start'})")
        settle(page, 500)
        page.screenshot(path=str(ARTIFACTS / f"{widget}-{width}.png"))
        el.evaluate("e => e.scrollIntoView({block: 'end'})")
        settle(page, 500)
        page.screenshot(path=str(ARTIFACTS / f"{widget}-{width}-end.png"))
    return found


def assert_clean(page) -> None:
    assert page_problems(page) == []
    assert serialization_warnings(page) == []


def titles(page, selector: str) -> list[str]:
    return page.evaluate("(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot .gtitle')]"
                         ".map(t => t.textContent)", selector)


def wait_title(page, selector: str, js_test: str, timeout: int = 60_000) -> None:
    """Wait until a plot title of ``selector`` passes ``js_test`` (a JS expression of ``t``)."""
    page.wait_for_function(
        f"(sel) => [...document.querySelectorAll(sel + ' .js-plotly-plot .gtitle')].some(t => {{"
        f" t = t.textContent; return {js_test}; }})", arg=selector, timeout=timeout)


def click_cell(page, selector: str, index: int, x: float, y: float) -> None:
    """A real mouse click on data point (x, y) of the ``index``-th plot of ``selector``."""
    px, py = page.evaluate(
        """([sel, index, x, y]) => {
            const gd = document.querySelectorAll(sel + ' .js-plotly-plot')[index];
            gd.scrollIntoView({ block: 'center' });
            const xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis, r = gd.getBoundingClientRect();
            return [r.left + xa._offset + xa.l2p(x), r.top + ya._offset + ya.l2p(y)];
        }""", [selector, index, x, y])
    # as a hand does: onto the cell, a pause, then the click. (plotly finds the point under the
    # pointer at most every 50 ms: a click right after a move can land on the point of a moment before)
    page.mouse.move(px - 4, py - 4)
    page.mouse.move(px, py, steps=2)
    page.wait_for_timeout(120)
    page.mouse.click(px, py)


def press(page, selector: str, label: str, key: str) -> None:
    """Press ``key`` on the handle of the slider of ``selector`` labelled ``label``."""
    handle = page.locator(f"{selector} .widget-slider", has_text=label).locator(".noUi-handle").first
    handle.scroll_into_view_if_needed()
    handle.focus()
    page.keyboard.press(key)
