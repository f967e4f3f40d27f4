"""Token strings as HTML and as plot labels. Token text is always HTML-escaped."""

from __future__ import annotations

import html
from typing import Sequence

import numpy as np


def position_labels(tokens: Sequence[str]) -> list[str]:
    """Unique, escaped axis labels ``"i: token"`` (plotly merges repeated category labels,
    so the position keeps repeats apart)."""
    return [f"{i}: {html.escape(t)}" for i, t in enumerate(tokens)]


def tokens_html(tokens: Sequence[str], weights: Sequence[float] | np.ndarray, *, focus: int | None = None,
                data: dict[str, str] | None = None) -> str:
    """Tokens as inline spans shaded by ``weights`` in [0, 1]. Token text is HTML-escaped;
    ``focus`` (a position) gets an outline, e.g. the query whose attention is shown;
    ``data``: extra ``data-*`` attributes of the strip (values escaped), for a front end
    that reads them (e.g. the whole pattern, for hover highlighting).

    Each token is an inline block (its own spaces kept), so a long prompt wraps onto
    further lines between tokens instead of running off the side of the output."""
    w = np.clip(np.asarray(weights, dtype=float), 0.0, 1.0)
    spans = []
    for i, (tok, a) in enumerate(zip(tokens, w)):
        border = "outline:2px solid #d62728;" if focus == i else ""
        spans.append(
            f'<span class="wb-token" data-pos="{i}" title="{i}: {a:.3f}" '
            f'style="display:inline-block;background:rgba(31,119,180,{a:.3f});{border}padding:1px 3px;margin:1px;'
            f'border-radius:3px;font-family:monospace;white-space:pre">{html.escape(tok)}</span>'
        )
    extra = "".join(f' data-{html.escape(k)}="{html.escape(v)}"' for k, v in (data or {}).items())
    return (f'<div class="wb-tokens"{extra} style="line-height:2;white-space:normal;overflow-wrap:anywhere;'
            'max-width:100%">' + "".join(spans) + "</div>")
