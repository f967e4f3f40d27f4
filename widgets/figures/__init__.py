"""Figure builders: pure functions from results to plotly figures or HTML, one module per
lens (``attention``, ``taskvec``, ``circuits``, ``atlas``) and the token helpers (``tokens``).

They never touch a live model: everything drawn here can be drawn from a saved result in
a plain script. Token text is always HTML-escaped."""

from widgets.figures.atlas import (
    agreement_heatmap, atlas_blocks, atlas_matrices, atlas_scatter, grouping_html, pair_details_html,
)
from widgets.figures.attention import (
    ablation_bars, ablation_text, attention_tokens_html, attribution_html, heads_overview, masked_pattern, overview_head,
    overview_outline, pattern_heatmap, score_grid,
)
from widgets.figures.circuits import (
    activation_histogram, circuit_figure, circuit_layout, contexts_html, logit_effect_bars, metric_bars, metric_text,
)
from widgets.figures.taskvec import cosine_heatmap, ie_heatmap, merge_bars, sweep_figure
from widgets.figures.tokens import position_labels, tokens_html

__all__ = [
    "agreement_heatmap", "atlas_blocks", "atlas_matrices", "atlas_scatter", "grouping_html", "pair_details_html",
    "ablation_bars", "ablation_text", "activation_histogram", "attention_tokens_html", "attribution_html",
    "circuit_figure", "circuit_layout", "heads_overview", "masked_pattern", "overview_head", "overview_outline", "contexts_html", "cosine_heatmap", "ie_heatmap", "logit_effect_bars",
    "merge_bars", "metric_bars", "metric_text", "pattern_heatmap", "position_labels", "score_grid", "sweep_figure",
    "tokens_html",
]
