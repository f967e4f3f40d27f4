"""Token attribution for one prediction: integrated gradients on the input embeddings
(captum's ``LayerIntegratedGradients`` on the embedding layer), to show next to the
attention view. The baseline replaces every token but the first by the pad token."""

from __future__ import annotations

import numpy as np
import torch

from workbench.errors import WorkbenchError
from workbench.results import Result, provenance, register
from workbench.tokens import token_strings


@register("token_attribution")
class TokenAttribution(Result):
    """Attribution per token of log p(target) at the last position; ``attrs`` holds the
    tokens, the target and captum's convergence delta."""


def token_attribution(subject, prompt: str, *, target: str | int | None = None, ig_steps: int = 50) -> TokenAttribution:
    """Integrated gradients of log p(``target``) at the prompt's last token with respect
    to each input token's embedding (summed over the embedding dimensions). ``target``
    defaults to the model's top prediction; ``ig_steps`` points on the path."""
    subject.require_local("token_attribution (captum integrated gradients through the local model)")
    from captum.attr import LayerIntegratedGradients

    if isinstance(ig_steps, bool) or not isinstance(ig_steps, int) or ig_steps < 1:
        raise WorkbenchError(f"ig_steps must be a positive integer (points on the integrated-gradients path), got {ig_steps!r}")
    if not subject.has_logits:
        raise WorkbenchError(f"{subject.name} has no language-model head to attribute a prediction of")
    batch = subject.tokenize([prompt])
    ids = batch.input_ids
    with torch.no_grad():
        logits = subject.model(**batch.kwargs()).logits[0, -1]
    if target is None:
        target_id = int(logits.argmax())
    elif isinstance(target, str):
        pieces = subject.tokenizer(target, add_special_tokens=False).input_ids
        if len(pieces) != 1:
            raise WorkbenchError(f"target {target!r} is {len(pieces)} tokens; give a single-token target or its id")
        target_id = pieces[0]
    else:
        target_id = int(target)
    pad = subject.tokenizer.pad_token_id if subject.tokenizer.pad_token_id is not None else 0
    baseline = torch.full_like(ids, pad)
    baseline[:, 0] = ids[:, 0]

    def forward(input_ids):
        out = subject.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits[:, -1]
        return out.float().log_softmax(-1)[:, target_id]

    lig = LayerIntegratedGradients(forward, subject.module("embed"))
    attr, delta = lig.attribute(ids, baselines=baseline, n_steps=ig_steps, return_convergence_delta=True)
    per_token = attr.float().sum(-1)[0].detach().cpu().numpy()  # summed in float32 at least
    with torch.no_grad():
        full, base = float(forward(ids)[0]), float(forward(baseline)[0])
    tokens = token_strings(subject.tokenizer, ids[0].tolist())
    params = {"prompt": prompt, "target_id": target_id, "ig_steps": ig_steps}
    return TokenAttribution(
        dims={"position": list(range(len(tokens)))},
        data={"attribution": (("position",), per_token)},
        attrs={**params, "tokens": tokens, "target": subject.tokenizer.decode([target_id]),
               "delta": float(delta.abs().max()), "logprob": full, "baseline_logprob": base},
        provenance=provenance(subject, params=params),
    )


def normalised(attribution: TokenAttribution) -> np.ndarray:
    """|attribution| scaled to [0, 1] for shading tokens."""
    a = np.abs(attribution["attribution"])
    return a / a.max() if a.max() > 0 else a
