"""Feature-circuits lens: sparse autoencoders over any site, their evaluation, and
attribution over SAE features with error nodes (Marks et al., "Sparse Feature Circuits")."""

from workbench.circuits.buffer import ActivationBuffer, collect, site_width
from workbench.circuits.evaluation import SAEEvaluation, evaluate_sae
from workbench.circuits.sae import SAE, TensorStream, TrainingLog, site_from_hook, train_sae

__all__ = [
    "ActivationBuffer", "SAE", "SAEEvaluation", "TensorStream", "TrainingLog", "collect", "evaluate_sae",
    "site_from_hook", "site_width", "train_sae",
]

from workbench.circuits.attribution import (  # noqa: E402
    CircuitGraph, Faithfulness, NodeEffects, ablated_metric, faithfulness, feature_means, find_circuit, node_effects,
    spliced_run,
)

__all__ += [
    "CircuitGraph", "Faithfulness", "NodeEffects", "ablated_metric", "faithfulness", "feature_means", "find_circuit",
    "node_effects", "spliced_run",
]

from workbench.circuits.features import (  # noqa: E402
    FeatureFlow, FeatureSummary, Intervention, ablate_features, feature_flow, feature_summary, output_direction, steer,
)

__all__ += [
    "FeatureFlow", "FeatureSummary", "Intervention", "ablate_features", "feature_flow", "feature_summary",
    "output_direction", "steer",
]
