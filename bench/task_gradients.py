"""Per-task gradients on MiniLM's shared encoder (batch 32 x 32): ``task_gradients``
against the sequential ``backward(retain_graph=True)`` loop that LibMTL uses (reading
``.grad`` after each task), for T = 2, 4, 8; and the cost of exact conflict monitoring
in the multi-task trainer at the default k = 10 against plain equal-weight training."""

from __future__ import annotations

import torch

from bench.harness import Table, timeit


def run() -> Table:
    import workbench
    from workbench.mtl import task_gradients
    from workbench.mtl.trainer import MultiTaskTrainer
    from workbench.mtl.workloads import MultiDigitsNet, batch_sampler, digit_losses, multidigits_tensors

    mini = workbench.load("minilm", device="cpu")
    model = mini.model
    words = "the keys near the cabinet are old and the dog by the doors was happy".split()
    prompts = [" ".join(words[i % 5 :] + words[: i % 5])[:200] for i in range(32)]
    batch = mini.tokenize(prompts)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    t = Table("Per-task gradients on MiniLM (22M shared parameters), one CPU thread", ["workbench", "LibMTL loop"], unit="s")

    def losses(T):
        h = model(**batch.kwargs()).last_hidden_state  # [b, p, d]
        chunks = h.chunk(T, dim=-1)
        return [c.pow(2).mean() for c in chunks]

    def ours(T):
        task_gradients(losses(T), params)

    def loop(T):
        ls = losses(T)
        rows = []
        for i, l in enumerate(ls):
            model.zero_grad(set_to_none=True)
            l.backward(retain_graph=i < T - 1)
            rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for _, p in params]))
        return torch.stack(rows)

    for T in (2, 4, 8):
        t.add(f"T={T}", timeit(lambda: ours(T), repeat=3, warmup=1, min_time=0.0),
              timeit(lambda: loop(T), repeat=3, warmup=1, min_time=0.0))

    data = multidigits_tensors("train", n=1000)

    def train(k):
        tr = MultiTaskTrainer(MultiDigitsNet(), digit_losses(), batch_sampler(data, 64), monitor_every=k)
        tr.fit(200, progress=False)

    t.add("MultiDigits 200 steps: monitor every 10 vs never", timeit(lambda: train(10), repeat=3, warmup=1, min_time=0.0),
          timeit(lambda: train(10_000), repeat=3, warmup=1, min_time=0.0))
    t.notes.append("ratio = workbench / anchor; for the last row, monitored / plain training (target <= 1.10x)")
    return t


RATIOS = [(0, 1, "ratio")]
