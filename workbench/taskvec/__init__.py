"""Task-vectors lens: where a task lives in the weights (fine-tuned minus base, merges,
interference) and in the activations (in-context task vectors, function vectors)."""

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
    "METHODS", "Checkpoint", "TaskVector", "TaskVectorDiagnostics", "block_of", "cosine_similarity", "diagnose",
    "load_state", "merge", "task_vector", "to_mergekit_yaml", "trim_topk",
]
