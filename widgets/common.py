"""What every widget shares: in-place figure updates from pure builders, the token strip,
and controls that say why they are off.

Widgets draw by calling a builder of :mod:`widgets.figures` and copying the new
figure into their ``FigureWidget`` (:func:`update_in_place`), so what a widget shows is
always what the builder draws from the same results."""

from __future__ import annotations

import contextlib
import html
import math
from copy import deepcopy
from typing import Iterable

import anywidget
import ipywidgets as W
import numpy as np
import plotly.graph_objects as go
import traitlets

_SKIP = ("type", "uid")
TITLE_TOP = 64  # px above the plot area: the toolbar's row, then the title's row below it
TITLE_LINE_PX = 18  # one more line of a title (after a <br>)
MIN_CELL_PX = 440  # a figure narrower than this wraps below its neighbour


def json_safe(value):
    """``value`` with every NaN / inf replaced by None (plotly draws None as a gap), so no
    message to the front end carries an out-of-range float. Arrays come back as lists
    only when they held a non-finite value."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, np.floating):
        return float(value) if np.isfinite(value) else None
    if isinstance(value, np.ndarray):
        if value.dtype.kind in "fc":
            if value.dtype.kind == "c" or np.isfinite(value).all():
                return value
            return np.where(np.isfinite(value), value, None).tolist()
        if value.dtype == object:
            return [json_safe(v) for v in value.tolist()]
        return value
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(json_safe(v) for v in value)
    return value


def fit_layout(figure: go.Figure) -> go.Figure:
    """Size ``figure`` to its container and keep its title clear of the plotly toolbar:
    autosize with no fixed width, a top margin holding the toolbar's row with the
    title in a row below it (anchored to the plot's top edge), thin colorbars that
    push the margin instead of covering labels. Changes ``figure`` and returns it."""
    lay = figure.layout
    margin = lay.margin.to_plotly_json() if lay.margin else {}
    # plotly anchors a title by its first line: each further line (<br>) lifts it by one
    # line height so the last line ends above the plot, not over it; a builder may ask for
    # more room below its title (subplot titles) with a larger title pad
    text = lay.title.text or ""
    extra = TITLE_LINE_PX * text.count("<br>")
    pad_b = max(10 + extra, (lay.title.pad.b or 0) if lay.title.pad else 0)
    figure.update_layout(
        autosize=True, width=None,
        margin=dict(l=margin.get("l", 10), r=margin.get("r", 10), b=margin.get("b", 10),
                    t=max(TITLE_TOP + pad_b - 10, margin.get("t") or 0), pad=0),
        title=dict(x=0, xref="container", y=1, yref="paper", yanchor="bottom", pad=dict(b=pad_b, l=10), font_size=14),
    )
    for trace in figure.data:
        if "colorbar" in trace and trace.type in ("heatmap", "contour", "histogram2d"):
            trace.update(colorbar=dict(thickness=12, xpad=4, len=1, y=0.5, yanchor="middle"))
    return figure


class FullStateFigureWidget(go.FigureWidget):
    """A ``go.FigureWidget`` whose first message to the front end already holds its data
    and layout. (plotly opens the widget's channel before filling them in and sends
    them as later updates; a view that renders before those updates land draws empty
    axes, and plotly's view never redraws from them.)"""

    def __init__(self, *args, config: dict | None = None, **kwargs) -> None:
        self._hold_open = True
        self._drawn = False
        try:
            super().__init__(*args, **kwargs)
            if config:
                self._config = {**self._config, **config}
        finally:
            self._hold_open = False
        self.observe(self._on_drawn, names=["_js2py_layoutDelta", "_js2py_traceDeltas"])
        self.open()

    def _on_drawn(self, _change=None) -> None:
        self._drawn = True

    @property
    def drawn(self) -> bool:
        """Whether a view has drawn it (plotly's view reports its layout after its first draw)."""
        return self._drawn

    def open(self) -> None:
        if getattr(self, "_hold_open", False):
            return
        super().open()


def responsive_figure(figure: go.Figure) -> go.FigureWidget:
    """The ``FigureWidget`` every widget shows: ``figure`` with :func:`fit_layout` (width
    follows the container, title clear of the toolbar) and no NaN/inf in its data.
    Place it with :func:`wrap_box` (which also resizes it when its container does);
    update it with :func:`update_in_place`."""
    fig = fit_layout(go.Figure(figure))
    data = [json_safe({k: v for k, v in t.to_plotly_json().items() if k != "uid"}) for t in fig.data]
    # responsive: plotly refits the figure to its container on every window resize event
    return FullStateFigureWidget(data=data, layout=json_safe(fig.layout.to_plotly_json()),
                                 config={"responsive": True, "displaylogo": False})


class FitWidth(anywidget.AnyWidget):
    """An invisible helper inside every :func:`wrap_box`: it carries the wrapping CSS and,
    when the box's width changes (or the box first appears), asks plotly figures to
    re-fit (plotly's widget only refits on a window resize)."""

    _esm = """
    function render({ el }) {
      el.style.display = "none";
      let last = -1, queued = false;
      const fire = () => { queued = false; window.dispatchEvent(new Event("resize")); };
      const watch = () => {
        const box = el.parentElement;
        if (!box) { requestAnimationFrame(watch); return; }
        const ro = new ResizeObserver((entries) => {
          const w = Math.round(entries[0].contentRect.width);
          if (w === last || w === 0) return;
          last = w;
          if (!queued) { queued = true; requestAnimationFrame(fire); }
        });
        ro.observe(box);
      };
      requestAnimationFrame(watch);
    }
    export default { render };
    """
    _css = """
    .wb-wrap { display: flex; flex-flow: row wrap; align-items: flex-start; gap: 4px 12px; width: 100%;
               max-width: 100%; box-sizing: border-box; }
    .wb-cell { display: flex; flex-direction: column; min-width: 0; max-width: 100%; box-sizing: border-box; }
    .wb-cell > * { width: 100%; max-width: 100%; min-width: 0; box-sizing: border-box; }
    .wb-cell > .widget-hbox, .wb-wrap .widget-hbox { flex-wrap: wrap; }
    .wb-tokens { white-space: normal; overflow-wrap: anywhere; max-width: 100%; }
    """


def wrap_box(children: Iterable[W.Widget], *, min_width: int = MIN_CELL_PX, grow: Iterable[float] | None = None,
             **layout) -> W.Box:
    """Children side by side while they fit (each at least ``min_width`` px, or the whole
    width when narrower), wrapping below each other when they do not; every child
    takes a share of the row (``grow``: one weight per child, default 1). Figures
    (from :func:`responsive_figure`) resize with their cell. ``layout``: extra
    ``ipywidgets.Layout`` settings of the outer box."""
    children = list(children)
    weights = list(grow) if grow is not None else [1.0] * len(children)
    if len(weights) != len(children):
        raise ValueError(f"grow has {len(weights)} weights for {len(children)} children")
    cells = []
    for child, g in zip(children, weights):
        cell = W.Box([child], layout=W.Layout(flex=f"{g} 1 {min_width}px", min_width=f"min({min_width}px, 100%)"))
        cell.add_class("wb-cell")
        cells.append(cell)
    box = W.Box([*cells, FitWidth()], layout=W.Layout(width="100%", **layout))
    box.add_class("wb-wrap")
    return box


def controls_row(children: Iterable[W.Widget]) -> W.Box:
    """Controls in a row that wraps onto the next line when narrow (never clipped)."""
    box = W.Box(list(children), layout=W.Layout(display="flex", flex_flow="row wrap", width="100%",
                                                 align_items="center"))
    return box


def full_label(control: W.Widget, width: str = "initial") -> W.Widget:
    """Show ``control``'s whole description (no "country_c…"): description width
    ``initial``. Returns the control."""
    control.style.description_width = width
    return control


def update_in_place(widget: go.FigureWidget, figure: go.Figure) -> None:
    """Make ``widget`` show ``figure`` (same number of traces), in one batch: each trace's
    properties are replaced (those the new trace lacks are cleared); layout properties are
    merged, so the user's zoom survives; click handlers stay attached.

    plotly sends an update as a message that only views already on screen apply. While no
    view has drawn the figure (a widget that draws in its constructor, a cell that trains
    before showing its monitor), the change therefore goes out as one state message that
    also holds the whole figure (:func:`sync_state`): a view created later opens with it,
    and no update lands on a front-end model that is still starting (which breaks it:
    "[anywidget] Failed to initialize model", empty axes). Once a view is on screen
    (``drawn``, or the front end counts a view), updates go as plotly's own, small messages."""
    if len(widget.data) != len(figure.data):
        raise ValueError(f"the widget has {len(widget.data)} traces, the new figure {len(figure.data)}")
    figure = fit_layout(go.Figure(figure))
    on_screen = bool(getattr(widget, "_view_count", 0)) or getattr(widget, "drawn", False)
    with (contextlib.nullcontext() if on_screen else widget.hold_sync()):
        with widget.batch_update():
            for old, new in zip(widget.data, figure.data):
                props = {k: json_safe(v) for k, v in new.to_plotly_json().items() if k not in _SKIP}
                for k in old.to_plotly_json():
                    if k not in props and k not in _SKIP:
                        old[k] = None
                for k, v in props.items():
                    old[k] = v
            layout = {k: json_safe(v) for k, v in figure.layout.to_plotly_json().items() if k != "template"}
            widget.layout.update(layout)
        if not on_screen:
            sync_state(widget)


def sync_state(widget: go.FigureWidget) -> None:
    """Copy ``widget``'s current data and layout into the state a new front-end view is
    drawn from (what :func:`update_in_place` does while no view is on screen)."""
    widget._widget_data = json_safe(deepcopy(widget._data))
    widget._widget_layout = json_safe(deepcopy(widget._layout_obj._props))


def trace_data(figure) -> list[dict]:
    """The traces of a figure as plain dicts without their random ``uid`` (to compare two
    figures' data)."""
    return [{k: v for k, v in t.to_plotly_json().items() if k != "uid"} for t in figure.data]


def needs(button: W.Button, reason: str | None) -> None:
    """Disable ``button`` with ``reason`` as its tooltip (or enable it when None)."""
    button.disabled = reason is not None
    if reason is not None:
        button.tooltip = reason


def working(note: str) -> str:
    """The busy note every widget shows while an action runs: "working... (note)"."""
    return f"<i>working...</i> ({html.escape(note)})"


def run_busy(status: W.HTML, button: W.Button | None, note: str, fn):
    """Run ``fn()`` for a control: ``status`` says "working... (note)" and ``button`` is
    off while it runs; an error is shown in ``status`` (escaped) and raised to the caller.
    Returns what ``fn`` returns."""
    status.value = working(note)
    if button is not None:
        button.disabled = True
    try:
        return fn()
    except Exception as err:
        status.value = f'<span style="color:#b00">{html.escape(str(err))}</span>'
        raise
    finally:
        if button is not None:
            button.disabled = False


def reason_html(reason: str | None) -> str:
    return "" if reason is None else f'<span class="wb-offline" style="color:#777"><i>{html.escape(reason)}</i></span>'


class TokenStrip(anywidget.AnyWidget):
    """Tokens shaded by weights (``value``: HTML from :func:`widgets.figures.tokens_html`,
    token text escaped there); clicking a token sets ``selected`` to its position. A strip
    that carries an attention pattern (``data-pattern`` on ``.wb-tokens``, from
    :func:`widgets.figures.attention.attention_tokens_html`) also shades every token by the
    hovered token's attention (as bertviz / CircuitsVis do; keys it cannot see are grey),
    and shows the selected query's again when the pointer leaves."""

    _esm = """
    function render({ model, el }) {
      let rows = null, rowsFor = null;
      const draw = () => { el.innerHTML = model.get("value"); rows = null; rowsFor = null; };
      draw();
      model.on("change:value", draw);
      el.addEventListener("click", (event) => {
        const token = event.target.closest(".wb-token");
        if (!token || !el.contains(token)) return;
        model.set("selected", Number(token.dataset.pos));
        model.save_changes();
      });
      el.addEventListener("mouseover", (event) => {
        const token = event.target.closest(".wb-token");
        const strip = el.querySelector(".wb-tokens");
        if (!token || !strip || !el.contains(token)) return;
        if (rowsFor !== strip) {
          rowsFor = strip;
          try { rows = JSON.parse(strip.dataset.pattern || "null"); } catch (e) { rows = null; }
        }
        const q = Number(token.dataset.pos);
        if (!rows || !rows[q]) return;
        for (const t of el.querySelectorAll(".wb-token")) {
          const k = Number(t.dataset.pos), a = rows[q][k];
          t.style.background = (a === null || a === undefined) ? "#d9d9d9" : `rgba(31,119,180,${a})`;
          t.style.outline = k === q ? "2px dashed #d62728" : "";
          t.title = `${q} -> ${k}: ${a === null || a === undefined ? "masked" : a}`;
        }
        el.dataset.hover = String(q);
      });
      el.addEventListener("mouseleave", () => { if (el.dataset.hover !== undefined) { delete el.dataset.hover; draw(); } });
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
