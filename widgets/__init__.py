"""interp-workbench UI layer: figure builders (pure functions of results) and live widgets."""

from widgets.attention_explorer import AttentionExplorer
from widgets.attention_view import AttentionView
from widgets.conflict_monitor import ConflictMonitor
from widgets.figures import ablation_bars, pattern_heatmap, score_grid, tokens_html

__all__ = ["AttentionExplorer", "AttentionView", "ConflictMonitor", "ablation_bars", "pattern_heatmap", "score_grid", "tokens_html"]
