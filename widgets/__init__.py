"""interp-workbench UI layer: figure builders (pure functions of results) and live widgets."""

from widgets.attention_view import AttentionView
from widgets.figures import pattern_heatmap, tokens_html

__all__ = ["AttentionView", "pattern_heatmap", "tokens_html"]
