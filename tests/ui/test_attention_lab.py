"""The attention-heads tutorial in a real JupyterLab, in headless Chromium: at 1024 and
1440 px nothing of the AttentionExplorer sticks out of its output area and no message
fails to serialize; its controls change what they should (the score selector moves the
selection to the kind's top head, the query slider moves the outlined token, a click on a
thumbnail of the all-heads overview selects that head, "ablate" says working... then
names its metric and prompt, and its result leaves when the prompt changes). Saves a
screenshot per width."""

from __future__ import annotations

import pytest

from tests.ui.at_widths import assert_clean, check_widths, click_cell, press, titles, wait_title
from tests.ui.lab import ARTIFACTS, ROOT, browser_page, build_ipynb, open_and_run, require_chromium, running_lab

pytestmark = [pytest.mark.ui]
EX = ".wb-attention-explorer"


def test_attention_explorer_fits_and_reacts_in_jupyterlab():
    require_chromium()
    name = build_ipynb("01_attention_heads")
    with running_lab(ROOT / "notebooks") as (base, token), browser_page() as page:
        open_and_run(page, base, token, name, timeout_s=540)
        page.wait_for_selector(f"{EX} .js-plotly-plot", timeout=60_000)
        assert "all attention-head checks passed" in page.inner_text(".jp-NotebookPanel")
        assert_clean(page)
        assert check_widths(page, "attention-explorer", EX) == {1024: [], 1440: []}
        ex = page.locator(EX).first
        # the notebook set kind = "induction": the grid shows it, the box on its top head
        assert "induction score per head" in titles(page, EX)
        # the score selector: previous_token's grid, the selection moves with it
        ex.locator(".widget-dropdown select").first.select_option(label="previous_token")
        wait_title(page, EX, "t.startsWith('previous_token score per head')")
        # the query slider moves the outlined token
        tokens = ex.locator(".wb-tokens").first
        n = tokens.locator(".wb-token").count()
        press(page, EX, "query position", "ArrowLeft")
        page.wait_for_function(
            "([sel, q]) => !!document.querySelector(sel + ` .wb-tokens .wb-token[data-pos='${q}'][style*='outline']`)",
            arg=[EX, n - 2], timeout=30_000)
        # a click on an overview thumbnail selects that head (L0H1 on the first prompt)
        n0 = page.evaluate("(sel) => document.querySelector(sel + ' .wb-tokens').querySelectorAll('.wb-token').length",
                           EX)
        click_cell(page, EX, 3, 1 * (n0 + 1) + n0 // 2, n0 // 2)
        wait_title(page, EX, "t.startsWith('L0H1 attention')")
        # ablate: working..., then the effect on the named metric, on the selected prompt
        button = ex.locator("button.jupyter-button", has_text="ablate")
        assert "on prompt 0" in button.inner_text()
        button.click()
        page.wait_for_function(
            "(sel) => [...document.querySelectorAll(sel + ' .widget-html-content')].some(t =>"
            " t.textContent.includes('random heads') && t.textContent.includes('loss')"
            " && t.textContent.includes('prompt 0'))", arg=EX, timeout=120_000)
        wait_title(page, EX, "t.startsWith('ablating L0H1 on prompt 0: loss')")
        page.screenshot(path=str(ARTIFACTS / "attention-explorer-after-ablate.png"), full_page=True)
        # another prompt: the ablation of prompt 0 leaves the screen
        ex.locator(".widget-dropdown select").nth(1).select_option(index=1)
        wait_title(page, EX, "t.includes('press ablate')")
        page.wait_for_function(  # (a redraw under load can land a moment after the other title's)
            "(sel) => ![...document.querySelectorAll(sel + ' .js-plotly-plot .gtitle')]"
            ".some(t => t.textContent.startsWith('ablating'))", arg=EX, timeout=30_000)
        assert_clean(page)
