"""MTL gradient-conflicts lens: per-task gradients on shared parameters, conflict
metrics overall and per block, the gradient-surgery aggregators, and a trainer whose
history is a Result."""

from workbench.mtl.aggregators import GradNorm, UncertaintyWeighting, aggregate, min_norm_weights
from workbench.mtl.gradients import (
    ConflictSummary,
    TaskGradients,
    conflict_summary,
    cosines_and_conflicts,
    representation_gradients,
    shared_parameters,
    task_gradients,
)
from workbench.mtl.trainer import (
    MultiTaskTrainer, TrainingHistory, TrainingStopped, lookahead_affinity, task_groups, transfer,
)

__all__ = [
    "ConflictSummary", "GradNorm", "MultiTaskTrainer", "TaskGradients", "TrainingHistory", "TrainingStopped",
    "UncertaintyWeighting", "aggregate", "conflict_summary", "cosines_and_conflicts", "lookahead_affinity",
    "min_norm_weights", "representation_gradients", "shared_parameters", "task_groups", "task_gradients", "transfer",
]
