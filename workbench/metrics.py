"""Metrics on a model's logits at each prompt's last real token.

All take ``logits`` [batch, pos, vocab] and the :class:`~workbench.subject.Batch` they
came from (right-padded, so the last real token differs per row), and return one value
per prompt [batch] unless they say otherwise. They are differentiable where it makes
sense, so they serve as the metric of attribution patching too.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import torch

from workbench.errors import WorkbenchError

Metric = Callable[[torch.Tensor, object], torch.Tensor]
"""``metric(logits, batch) -> Tensor[batch]``: one value per prompt."""


def upcast(x: torch.Tensor) -> torch.Tensor:
    """At least float32 (half precision upcast; float64 kept)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def last_logits(logits: torch.Tensor, batch) -> torch.Tensor:
    """Logits at each prompt's last real token [batch, vocab]."""
    return logits[torch.arange(logits.shape[0], device=logits.device), batch.last.to(logits.device)]


def _ids(ids: Sequence[int] | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    if isinstance(ids, torch.Tensor):
        return ids.to(device=like.device, dtype=torch.long)
    return _ids_on(tuple(int(i) for i in ids), like.device)


@functools.lru_cache(maxsize=64)
def _ids_on(ids: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # the same answer ids are sent to the device once, not at every call (a metric runs once
    # per batch copy: per node of an exact patching run, and a blocking upload waits for the device)
    with torch.inference_mode(False):  # a normal tensor even if first made under inference_mode
        return torch.tensor(ids, dtype=torch.long, device=device)


def logit_diff(logits: torch.Tensor, batch, good: Sequence[int], bad: Sequence[int]) -> torch.Tensor:
    """logit[good] - logit[bad] at the last token, per prompt."""
    last = last_logits(logits, batch)
    rows = torch.arange(last.shape[0], device=last.device)
    return last[rows, _ids(good, last)] - last[rows, _ids(bad, last)]


def answer_logprob(logits: torch.Tensor, batch, answers: Sequence[int]) -> torch.Tensor:
    """log p(answer) at the last token, per prompt."""
    last = upcast(last_logits(logits, batch)).log_softmax(-1)
    return last[torch.arange(last.shape[0], device=last.device), _ids(answers, last)]


def correct(logits: torch.Tensor, batch, answers: Sequence[int]) -> torch.Tensor:
    """Whether the top-1 prediction at the last token is the answer, per prompt (bool)."""
    return last_logits(logits, batch).argmax(-1) == _ids(answers, logits)


def next_token_loss(logits: torch.Tensor, batch) -> torch.Tensor:
    """Mean next-token cross-entropy over real tokens, per prompt."""
    logp = upcast(logits[:, :-1]).log_softmax(-1)
    target = batch.input_ids[:, 1:].to(logits.device)
    nll = -logp.gather(-1, target[..., None])[..., 0]
    mask = (batch.attention_mask[:, 1:] * batch.attention_mask[:, :-1]).to(nll.dtype).to(logits.device)
    return (nll * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def resolve_metric(metric: str | Metric) -> Metric:
    """The one metric protocol: a function ``(logits, batch) -> [batch]`` is returned as
    is; ``"loss"`` is :func:`next_token_loss`."""
    if callable(metric):
        return metric
    if metric == "loss":
        return next_token_loss
    raise WorkbenchError(f"unknown metric {metric!r}; pass 'loss' or a function (logits, batch) -> [batch] "
                         "such as functools.partial(workbench.metrics.logit_diff, good=..., bad=...)")


def mean_metric(metric: Metric, logits: torch.Tensor, batch) -> torch.Tensor:
    """The metric's mean over the batch (a 0-dim tensor, differentiable; a metric that
    already returns a scalar is taken as that mean)."""
    v = metric(logits, batch)
    if v.dtype == torch.bool:
        v = v.float()
    return v.mean() if v.ndim else v
