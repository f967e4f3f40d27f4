"""Task-vectors lens: where a task lives in the weights (fine-tuned minus base, merges,
interference) and in the activations (in-context task vectors, function vectors)."""

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
from workbench.taskvec.finetune import MergeEvaluator, finetune, finetune_all, learn_coefficients, normalized_accuracy
from workbench.taskvec.weights import (
    METHODS,
    Checkpoint,
    TaskVector,
    TaskVectorDiagnostics,
    block_of,
    cosine_similarity,
    diagnose,
    load_state,
    merge,
    task_vector,
    to_mergekit_yaml,
    trim_topk,
)

__all__ = [
    "FunctionVector", "ICLTaskVectors", "MergeEvaluator", "finetune", "finetune_all", "function_vector", "fv_accuracy",
    "fv_cosines", "icl_task_vectors", "indirect_effects", "learn_coefficients", "learn_head_weights",
    "normalized_accuracy",
    "METHODS", "Checkpoint", "TaskVector", "TaskVectorDiagnostics", "block_of", "cosine_similarity", "diagnose",
    "load_state", "merge", "task_vector", "to_mergekit_yaml", "trim_topk",
]
