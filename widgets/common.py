"""What every widget shares: in-place figure updates from pure builders, the token strip,
and controls that say why they are off.

Widgets draw by calling a builder of :mod:`widgets.figures` and copying the new
figure into their ``FigureWidget`` (:func:`update_in_place`), so what a widget shows is
always what the builder draws from the same results."""

from __future__ import annotations

import html

import anywidget
import ipywidgets as W
import plotly.graph_objects as go
import traitlets

_SKIP = ("type", "uid")


def update_in_place(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Make ``widget`` show ``figure`` (same number of traces), in one batch: each trace's
    properties are replaced (those the new trace lacks are cleared); layout properties are
    merged, so the user's zoom survives; click handlers stay attached."""
    if len(widget.data) != len(figure.data):
        raise ValueError(f"the widget has {len(widget.data)} traces, the new figure {len(figure.data)}")
    with widget.batch_update():
        for old, new in zip(widget.data, figure.data):
            props = {k: v for k, v in new.to_plotly_json().items() if k not in _SKIP}
            for k in old.to_plotly_json():
                if k not in props and k not in _SKIP:
                    old[k] = None
            for k, v in props.items():
                old[k] = v
        layout = {k: v for k, v in figure.layout.to_plotly_json().items() if k != "template"}
        widget.layout.update(layout)


def trace_data(figure) -> list[dict]:
    """The traces of a figure as plain dicts without their random ``uid`` (to compare two
    figures' data)."""
    return [{k: v for k, v in t.to_plotly_json().items() if k != "uid"} for t in figure.data]


def needs(button: W.Button, reason: str | None) -> None:
    """Disable ``button`` with ``reason`` as its tooltip (or enable it when None)."""
    button.disabled = reason is not None
    if reason is not None:
        button.tooltip = reason


def reason_html(reason: str | None) -> str:
    return "" if reason is None else f'<span class="wb-offline" style="color:#777"><i>{html.escape(reason)}</i></span>'


class TokenStrip(anywidget.AnyWidget):
    """Tokens shaded by weights (``value``: HTML from :func:`widgets.figures.tokens_html`,
    token text escaped there); clicking a token sets ``selected`` to its position."""

    _esm = """
    function render({ model, el }) {
      const draw = () => { el.innerHTML = model.get("value"); };
      draw();
      model.on("change:value", draw);
      el.addEventListener("click", (event) => {
        const token = event.target.closest(".wb-token");
        if (!token || !el.contains(token)) return;
        model.set("selected", Number(token.dataset.pos));
        model.save_changes();
      });
    }
    export default { render };
    """
    _css = ".wb-token { cursor: pointer; }"
    value = traitlets.Unicode("").tag(sync=True)
    selected = traitlets.Int(-1).tag(sync=True)


def member(proposal, allowed, what: str):
    """A traitlets validator's check: the proposed value must be one of ``allowed``."""
    value = proposal["value"]
    if value not in allowed:
        raise traitlets.TraitError(f"{what} {value!r} is not shown here; choose one of {list(allowed)}")
    return value
