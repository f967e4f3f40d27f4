"""Task-vectors lens: where a task lives in the weights (fine-tuned minus base, merges,
interference) and in the activations (in-context task vectors, function vectors).

Weight space, by concept: :mod:`~workbench.taskvec.checkpoint` (reading checkpoints,
writing merged states), :mod:`~workbench.taskvec.vectors` (task vectors),
:mod:`~workbench.taskvec.merging` (the merge arithmetic and its driver),
:mod:`~workbench.taskvec.mergekit_export` (mergekit recipes),
:mod:`~workbench.taskvec.diagnostics` (interference), :mod:`~workbench.taskvec.finetune`
(fine-tuning, interactive merge evaluation, aTLAS)."""

from workbench.taskvec.activations import (
    FunctionVector,
    ICLTaskVectors,
    function_vector,
    fv_accuracy,
    fv_cosines,
    icl_task_vectors,
    indirect_effects,
    learn_head_weights,
)
from workbench.taskvec.checkpoint import Checkpoint, load_state, save_pretrained
from workbench.taskvec.diagnostics import TaskVectorDiagnostics, cosine_similarity, diagnose
from workbench.taskvec.finetune import MergeEvaluator, finetune, finetune_all, learn_coefficients, normalized_accuracy
from workbench.taskvec.mergekit_export import to_mergekit_yaml
from workbench.taskvec.merging import METHODS, merge, merge_delta, merge_tensor, trim_topk
from workbench.taskvec.vectors import TaskVector, task_vector

__all__ = [
    "FunctionVector", "ICLTaskVectors", "MergeEvaluator", "finetune", "finetune_all", "function_vector", "fv_accuracy",
    "fv_cosines", "icl_task_vectors", "indirect_effects", "learn_coefficients", "learn_head_weights",
    "normalized_accuracy",
    "METHODS", "Checkpoint", "TaskVector", "TaskVectorDiagnostics", "cosine_similarity", "diagnose",
    "load_state", "merge", "merge_delta", "merge_tensor", "save_pretrained", "task_vector", "to_mergekit_yaml",
    "trim_topk",
]
