"""interp-workbench UI layer: figure builders (pure functions of results) and live widgets."""

from widgets.attention_view import AttentionView
from widgets.figures import pattern_heatmap, tokens_html
from widgets.task_vector_lab import TaskVectorLab, cosine_heatmap, ie_heatmap, merge_bars

__all__ = ["AttentionView", "TaskVectorLab", "cosine_heatmap", "ie_heatmap", "merge_bars", "pattern_heatmap",
           "tokens_html"]
