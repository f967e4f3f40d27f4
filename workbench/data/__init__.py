"""The task suite shared by every lens: word-level tasks, agreement pairs, repeated
sequences and MultiDigits, as ``datasets.Dataset`` builders."""

from workbench.data.builders import (
    DEFAULT_FORMAT,
    PromptFormat,
    agreement_pairs,
    agreement_sentences,
    answer_token_ids,
    finetune_data,
    icl_prompts,
    multidigits,
    multitask_data,
    repeated_sequences,
    zero_shot_prompts,
)
from workbench.data.tasks import Task, agreement_nouns, get_task, task_names, vocabulary

__all__ = [
    "DEFAULT_FORMAT", "PromptFormat", "Task", "agreement_nouns", "agreement_pairs", "agreement_sentences",
    "answer_token_ids", "finetune_data", "get_task", "icl_prompts", "multidigits", "multitask_data",
    "repeated_sequences", "task_names", "vocabulary", "zero_shot_prompts",
]
