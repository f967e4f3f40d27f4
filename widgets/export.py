"""Share a widget's current view as one standalone HTML file that opens offline.

:func:`export_html` walks a widget's children as they are on screen: each plotly figure
becomes plotly's own HTML export (plotly.js inlined once, so the file needs no
network), token strips and HTML panes are copied inline, value controls become a line
"description: value" (so the file says what was selected), buttons and the export
controls themselves are left out. Boxes keep their order and wrap like the widget.
:func:`export_controls` is the "export" button every widget carries.
"""

from __future__ import annotations

import html
from pathlib import Path
import ipywidgets as W
import plotly.graph_objects as go
import plotly.io as pio

from widgets.common import json_safe

NO_EXPORT = "wb-noexport"  # a box with this class is left out of the export
CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 16px; color: #222; }
.wb-row { display: flex; flex-flow: row wrap; gap: 8px 16px; align-items: flex-start; }
.wb-row > .wb-item { flex: 1 1 440px; min-width: min(440px, 100%); }
.wb-control { font-size: 13px; color: #444; padding: 2px 6px; background: #f4f4f4; border-radius: 3px; }
.wb-tokens { white-space: normal; overflow-wrap: anywhere; }
"""


def _figure_html(fig, first: bool) -> str:
    figure = go.Figure(json_safe(go.Figure(fig).to_plotly_json()))
    figure.update_layout(autosize=True, width=None)
    return pio.to_html(figure, full_html=False, include_plotlyjs=True if first else False,
                       default_width="100%", config={"responsive": True, "displaylogo": False})


def _value_text(w) -> str | None:
    desc = getattr(w, "description", "") or ""
    if isinstance(w, (W.Button, W.FileUpload)) or isinstance(w, W.Text) and NO_EXPORT in w._dom_classes:
        return None
    if isinstance(w, (W.SelectMultiple, W.SelectionRangeSlider)):
        shown = ", ".join(str(x) for x in w.label) if isinstance(w.label, tuple) else str(w.label)
    elif hasattr(w, "options") and hasattr(w, "label"):  # dropdowns, toggles, selection sliders
        shown = str(w.label)
    elif hasattr(w, "value") and not isinstance(w, (W.HTML, W.HTMLMath, W.Label)):
        v = w.value
        shown = f"{v:.4g}" if isinstance(v, float) else str(v)
    else:
        return None
    return f'<span class="wb-control">{html.escape(desc)}{": " if desc else ""}{html.escape(shown)}</span>'


class _Writer:
    def __init__(self) -> None:
        self.first_figure = True

    def part(self, obj) -> str:
        if isinstance(obj, (go.Figure, go.FigureWidget)):
            out = _figure_html(obj, self.first_figure)
            self.first_figure = False
            return f'<div class="wb-figure">{out}</div>'
        if isinstance(obj, str):
            return obj
        if isinstance(obj, (list, tuple)):
            return "".join(self.part(x) for x in obj)
        if isinstance(obj, W.Widget):
            return self.widget(obj)
        raise TypeError(f"cannot export a {type(obj).__name__}: give widgets, plotly figures or HTML strings")

    def widget(self, w: W.Widget) -> str:
        classes = getattr(w, "_dom_classes", ())
        if NO_EXPORT in classes or (hasattr(w, "layout") and isinstance(w.layout, W.Layout)
                                    and w.layout.display == "none"):
            return ""
        if isinstance(w, go.FigureWidget):
            return self.part(w)
        if isinstance(w, W.Box):
            inner = [self.widget(c) for c in w.children]
            inner = [x for x in inner if x]
            if not inner:
                return ""
            if isinstance(w, W.VBox):
                return "<div>" + "".join(inner) + "</div>"
            return '<div class="wb-row">' + "".join(f'<div class="wb-item">{x}</div>' for x in inner) + "</div>"
        if isinstance(w, (W.HTML, W.HTMLMath)):
            return f"<div>{w.value}</div>" if w.value else ""
        if isinstance(w, W.Label):
            return f"<div>{html.escape(w.value)}</div>" if w.value else ""
        if isinstance(w, W.Output):
            chunks = []
            for out in w.outputs:
                data = out.get("data", {})
                if "text/html" in data:
                    chunks.append(data["text/html"])
                elif "text/plain" in data or "text" in out:
                    chunks.append(f"<pre>{html.escape(data.get('text/plain', out.get('text', '')))}</pre>")
            return "".join(chunks)
        value = getattr(w, "value", None)
        if isinstance(value, str) and "wb-tokens" in value:  # a TokenStrip and its kin
            return f"<div>{value}</div>"
        return _value_text(w) or ""


def export_html(widget_or_parts, path, *, title: str | None = None) -> Path:
    """Write ``widget_or_parts`` (a widget, a plotly figure, an HTML string, or a list of
    them) as it is now to one standalone HTML file at ``path`` (plotly.js inlined: it
    opens offline). Returns the path written."""
    path = Path(path)
    if path.suffix.lower() not in (".html", ".htm"):
        raise ValueError(f"export path {str(path)!r} must end in .html")
    body = _Writer().part(widget_or_parts)
    name = title or type(widget_or_parts).__name__
    doc = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(name)}</title>'
           f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
           f"<body><h3>{html.escape(name)}</h3>{body}</body></html>\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(doc, encoding="utf-8")
    return path


def export_controls(widget, filename: str) -> W.Box:
    """The "export" button of ``widget`` with the file name to write (editable) and a
    status line; clicking writes ``widget.export_html(name)`` and says where."""
    button = W.Button(description="export", icon="download",
                      tooltip="save this view as one standalone HTML file (opens offline)")
    name = W.Text(value=filename, description="to", layout=W.Layout(width="260px"))
    name.style.description_width = "initial"
    name.add_class(NO_EXPORT)
    status = W.HTML()

    def run(_b=None) -> None:
        status.value = "<i>writing...</i>"
        try:
            out = widget.export_html(name.value)
        except Exception as e:  # shown, not raised: the widget stays usable
            status.value = f'<span style="color:#b00">{html.escape(str(e))}</span>'
            return
        status.value = f"wrote {html.escape(str(out))} ({Path(out).stat().st_size // 1024} KB)"

    button.on_click(run)
    box = W.Box([button, name, status], layout=W.Layout(display="flex", flex_flow="row wrap", align_items="center"))
    box.add_class(NO_EXPORT)
    box.run = run
    return box

