"""interp-workbench UI layer: figure builders (pure functions of results, in
:mod:`widgets.figures`) and widgets that are views over results, live when given a model."""

from widgets.attention_explorer import AttentionExplorer
from widgets.attention_view import AttentionView
from widgets.circuit_explorer import CircuitExplorer, FeatureDashboard
from widgets.common import TokenStrip
from widgets.conflict_monitor import ConflictMonitor
from widgets.figures import (
    ablation_bars, activation_histogram, circuit_figure, contexts_html, cosine_heatmap, heads_overview, ie_heatmap,
    logit_effect_bars, merge_bars, metric_bars, pattern_heatmap, score_grid, sweep_figure, tokens_html,
)
from widgets.figures.atlas import (
    agreement_heatmap, atlas_blocks, atlas_matrices, atlas_scatter, grouping_html, pair_details_html,
)
from widgets.task_atlas import TaskAtlas
from widgets.task_vector_lab import TaskVectorLab

__all__ = [
    "TaskAtlas", "agreement_heatmap", "atlas_blocks", "atlas_matrices", "atlas_scatter", "grouping_html",
    "pair_details_html",
    "AttentionExplorer", "AttentionView", "CircuitExplorer", "ConflictMonitor", "FeatureDashboard", "TaskVectorLab",
    "TokenStrip", "ablation_bars", "activation_histogram", "circuit_figure", "contexts_html", "cosine_heatmap",
    "heads_overview", "ie_heatmap", "logit_effect_bars", "merge_bars", "metric_bars", "pattern_heatmap", "score_grid",
    "sweep_figure", "tokens_html",
]
