"""MTL gradient-conflicts lens: per-task gradients on shared parameters, conflict
metrics overall and per block, and the gradient-surgery aggregators."""

from workbench.mtl.aggregators import GradNorm, UncertaintyWeighting, aggregate, min_norm_weights
from workbench.mtl.trainer import MultiTaskTrainer, TrainingStopped, lookahead_affinity, task_groups, transfer
from workbench.mtl.gradients import (
    TaskGradients,
    conflict_summary,
    cosine_from_gramian,
    representation_gradients,
    shared_parameters,
    task_gradients,
)

__all__ = [
    "GradNorm", "TaskGradients", "UncertaintyWeighting", "aggregate", "conflict_summary", "cosine_from_gramian",
    "MultiTaskTrainer", "TrainingStopped", "lookahead_affinity", "task_groups", "transfer", "min_norm_weights", "representation_gradients", "shared_parameters", "task_gradients",
]
