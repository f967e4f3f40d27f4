"""interp-workbench UI layer: figure builders (pure functions of results) and live widgets."""

from widgets.attention_explorer import AttentionExplorer
from widgets.attention_view import AttentionView
from widgets.circuit_explorer import (
    CircuitExplorer, FeatureDashboard, activation_histogram, circuit_figure, contexts_html, logit_effect_bars,
)
from widgets.conflict_monitor import ConflictMonitor
from widgets.figures import ablation_bars, pattern_heatmap, score_grid, tokens_html
from widgets.task_vector_lab import TaskVectorLab, cosine_heatmap, ie_heatmap, merge_bars

__all__ = [
    "AttentionExplorer", "AttentionView", "CircuitExplorer", "FeatureDashboard", "activation_histogram",
    "circuit_figure", "contexts_html", "logit_effect_bars", "ConflictMonitor", "TaskVectorLab", "ablation_bars", "cosine_heatmap",
    "ie_heatmap", "merge_bars", "pattern_heatmap", "score_grid", "tokens_html",
]
