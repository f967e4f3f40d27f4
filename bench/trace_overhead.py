"""Subject trace overhead: ``subject.logits`` (an nnsight trace) against a plain HF
forward of the same model on the same batch, and ``subject.cache`` of every layer's
pattern against HF's own ``output_attentions=True``."""

from __future__ import annotations

import torch

from bench.harness import Table, timeit


def run() -> Table:
    import workbench
    from workbench.data import icl_prompts, repeated_sequences

    t = Table("Subject trace overhead vs a plain HF forward (one CPU thread)",
              ["workbench", "plain HF"])
    tasklm = workbench.load("tasklm", device="cpu")
    minilm = workbench.load("minilm", device="cpu")
    cases = [
        ("tasklm", tasklm, torch.tensor(repeated_sequences(tasklm.tokenizer, 64, 32, seed=0)["input_ids"])),
        ("minilm", minilm, minilm.tokenize(icl_prompts("antonym", 8, 32, seed=0)["prompt"])),
    ]
    for name, s, inputs in cases:
        batch = s.as_batch(inputs)
        shape = "x".join(map(str, batch.input_ids.shape))

        def plain(model=s.model, kw=batch.kwargs()):
            with torch.no_grad():
                return model(**kw)

        if s.has_logits:
            t.add(f"{name} {shape} logits", timeit(lambda: s.logits(batch)) * 1e3, timeit(plain) * 1e3)
        else:
            t.add(f"{name} {shape} last layer", timeit(lambda: s.cache(batch, [f"resid_post.{s.n_layers - 1}"])) * 1e3,
                  timeit(plain) * 1e3)
        sites = [f"pattern.{l}" for l in range(s.n_layers)]

        def plain_attn(model=s.model, kw=batch.kwargs()):
            with torch.no_grad():
                return model(**kw, output_attentions=True).attentions

        t.add(f"{name} {shape} all patterns", timeit(lambda: s.cache(batch, sites, stop=False)) * 1e3,
              timeit(plain_attn) * 1e3)
    t.notes.append("ratio = workbench / plain HF; 1.00x means no overhead")
    return t


RATIOS = [(0, 1, "overhead")]
