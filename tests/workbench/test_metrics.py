"""Last-token metrics on right-padded batches."""

import torch

from workbench import metrics
from workbench.subject import Batch


def _batch():
    ids = torch.tensor([[2, 5, 6, 0], [2, 7, 8, 9]])
    return Batch(ids, (ids != 0).long())


def test_metrics_read_each_prompts_last_real_token():
    b = _batch()
    logits = torch.zeros(2, 4, 10)
    logits[0, 2, 3] = 5.0  # prompt 0 ends at position 2
    logits[1, 3, 4] = 2.0
    logits[0, 3, 9] = 100.0  # padding must be ignored
    assert torch.equal(metrics.last_logits(logits, b)[0], logits[0, 2])
    assert metrics.logit_diff(logits, b, [3, 4], [1, 1]).tolist() == [5.0, 2.0]
    assert metrics.correct(logits, b, [3, 4]).tolist() == [True, True]
    lp = metrics.answer_logprob(logits, b, [3, 4])
    assert torch.allclose(lp, torch.stack([logits[0, 2].log_softmax(-1)[3], logits[1, 3].log_softmax(-1)[4]]))


def test_next_token_loss_skips_padding():
    b = _batch()
    logits = torch.zeros(2, 4, 10)
    loss = metrics.next_token_loss(logits, b)
    assert torch.allclose(loss, torch.full((2,), float(torch.log(torch.tensor(10.0)))))


def test_one_metric_protocol():
    import pytest

    from workbench.errors import WorkbenchError

    b = _batch()
    logits = torch.zeros(2, 4, 10)
    logits[0, 2, 3] = 5.0
    assert metrics.resolve_metric("loss") is metrics.next_token_loss
    fn = lambda lg, bb: metrics.logit_diff(lg, bb, [3, 4], [1, 1])  # noqa: E731
    assert metrics.resolve_metric(fn) is fn
    assert float(metrics.mean_metric(fn, logits, b)) == 2.5  # (5 + 0) / 2
    assert float(metrics.mean_metric(lambda lg, bb: metrics.correct(lg, bb, [3, 0]), logits, b)) == 1.0  # bools count
    with pytest.raises(WorkbenchError, match="unknown metric 'accuracy'"):
        metrics.resolve_metric("accuracy")
