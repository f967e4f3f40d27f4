"""The widget layer is views: no science (no torch, no private core helpers), builders are
pure and public, and the token strip reports clicks through a trait."""

from __future__ import annotations

import ast
from pathlib import Path

import ipywidgets as W

from widgets import TokenStrip, tokens_html

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            for a in node.names:
                yield node.module, a.name


def test_widgets_import_no_private_names_and_no_torch():
    for path in sorted((ROOT / "widgets").rglob("*.py")):
        for module, name in _imports(path):
            where = f"{path.relative_to(ROOT)} imports {module}.{name}"
            assert module.split(".")[0] != "torch", where  # computing belongs to workbench
            assert not (name or "").startswith("_"), where


def test_token_strip_clicks_set_a_trait_and_text_is_escaped():
    strip = TokenStrip(value=tokens_html(["a", "<b>"], [0.1, 0.9]))
    assert "&lt;b&gt;" in strip.value and "<b>" not in strip.value
    assert "model.set(\"selected\"" in strip._esm and "data-pos" in strip.value
    query = W.IntSlider(max=1)
    link = W.link((strip, "selected"), (query, "value"))
    strip.selected = 1  # what a click on the second token does in the browser
    assert query.value == 1
    link.unlink()
