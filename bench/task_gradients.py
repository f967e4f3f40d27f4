"""Per-task gradients on MiniLM's shared encoder (batch 32 x 32): ``task_gradients``
against two anchors on the same model and batch, for T = 2, 4, 8:

- the sequential ``backward(retain_graph=True)`` loop that LibMTL uses (reading ``.grad``
  after each task and stacking the rows into the T x P matrix);
- TorchJD's ``torchjd.autojac.jac(losses, params)`` (its default: all T rows in one
  vectorised pass), its per-parameter Jacobians concatenated into the T x P matrix.

Time (median of 3 after a warm-up) and peak memory. Peak memory is measured for each
method and T in a fresh subprocess: the model and batch are loaded, the kernel's
peak-RSS mark is reset (``/proc/self/clear_refs``), the method runs once, and the
peak above the resident size before it is reported.

The last two rows are the cost of exact conflict monitoring in the multi-task trainer at
the default k = 20 (T - 1) against plain equal-weight training, on MultiDigits and on the
text tasks (runs interleaved so that a busy machine slows both alike).
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.harness import Table, timeit

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("workbench", "loop", "torchjd")


def minilm_setup():
    """MiniLM's encoder, a batch of 32 prompts of up to 32 tokens, and its trainable
    parameters: the workload the MTL benches share."""
    import workbench

    mini = workbench.load("minilm", device="cpu")
    model = mini.model
    words = "the keys near the cabinet are old and the dog by the doors was happy".split()
    prompts = [" ".join(words[i % 5 :] + words[: i % 5])[:200] for i in range(32)]
    batch = mini.tokenize(prompts)
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return model, batch, params


def _methods(model, batch, params):
    from workbench.mtl import task_gradients

    tensors = [p for _, p in params]

    def losses(T):
        h = model(**batch.kwargs()).last_hidden_state  # [b, p, d]
        return [c.pow(2).mean() for c in h.chunk(T, dim=-1)]

    def ours(T):
        return task_gradients(losses(T), params)

    def loop(T):
        ls = losses(T)
        rows = []
        for i, l in enumerate(ls):
            model.zero_grad(set_to_none=True)
            l.backward(retain_graph=i < T - 1)
            rows.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in tensors]))
        model.zero_grad(set_to_none=True)
        return torch.stack(rows)

    def torchjd(T):
        from torchjd.autojac import jac

        jacs = jac(losses(T), tensors)
        return torch.cat([j.flatten(1) for j in jacs], 1)

    return {"workbench": ours, "loop": loop, "torchjd": torchjd}


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


def _peak_child(method: str, T: int) -> None:
    torch.set_num_threads(1)
    fn = _methods(*minilm_setup())[method]
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS mark
    base = _status("VmRSS")
    out = fn(T)
    peak = _status("VmHWM")
    del out
    print("PEAK", peak - base)


def _peak(method: str, T: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        env.setdefault(k, "1")
    res = subprocess.run([sys.executable, __file__, "--peak", method, str(T)], env=env, capture_output=True, text=True,
                         timeout=900)
    lines = [l for l in res.stdout.splitlines() if l.startswith("PEAK ")]
    if res.returncode or not lines:
        raise RuntimeError(f"peak-memory run {method} T={T} failed:\n{res.stderr[-2000:]}")
    return int(lines[-1].split()[1]) / 2**20


def _monitoring() -> list[tuple[str, float, float]]:
    """Monitored (at the default k) against never-monitored training, on MultiDigits (T=2,
    an MLP whose 0.6 ms steps are dominated by per-operation overhead) and on the text
    tasks (T=4, the tasklm decoder as the shared trunk)."""
    import statistics

    from workbench.mtl.trainer import MultiTaskTrainer, default_monitor_every
    from workbench.mtl.workloads import MultiDigitsNet, TextTasks, batch_sampler, digit_losses, multidigits_tensors

    data = multidigits_tensors("train", n=1000)
    text = TextTasks()
    cases = {
        "MultiDigits (T=2), 400 steps": (lambda k: MultiTaskTrainer(
            MultiDigitsNet(), digit_losses(), batch_sampler(data, 64), monitor_every=k), 2, 400, 9),
        "text tasks on tasklm (T=4), 240 steps": (lambda k: MultiTaskTrainer(
            text.model(), text.losses(), text.sampler(8), monitor_every=k), 4, 240, 5),
    }
    rows = []
    for case, (make, n_tasks, steps, reps) in cases.items():
        def train(k):
            tr = make(k)
            start = time.perf_counter()
            tr.fit(steps, progress=False)
            return time.perf_counter() - start

        k = default_monitor_every(n_tasks)
        train(k), train(10**9)
        mon, plain = [], []
        for _ in range(reps):  # interleaved, so that load from other processes hits both alike
            mon.append(train(None))
            plain.append(train(10**9))
        rows.append((f"{case}: monitored every {k} (the default) vs never (s)", statistics.median(mon),
                     statistics.median(plain)))
    return rows


def run() -> Table:
    fns = _methods(*minilm_setup())
    t = Table("Per-task gradients on MiniLM (22M shared parameters, batch 32 x 32), one CPU thread",
              ["workbench", "LibMTL loop", "TorchJD jac"], unit="s or MB")
    for T in (2, 4, 8):
        t.add(f"time T={T} (s)", *[timeit(lambda m=m: fns[m](T), repeat=3, warmup=1, min_time=0.0) for m in METHODS])
    del fns
    gc.collect()
    for T in (2, 4, 8):
        t.add(f"peak memory T={T} (MB above the loaded model)", *[_peak(m, T) for m in METHODS])
    for case, mon, plain in _monitoring():
        t.add(case, mon, plain, float("nan"))
    t.notes.append("ratios = workbench / anchor (targets: <= 1.00x the loop in time and memory); for the last two rows, "
                   "monitored / plain training (target <= 1.10x; no TorchJD column)")
    t.notes.append("workbench also returns float64 Gramians overall and per block (a TaskGradients result); the anchors "
                   "return the T x P matrix only")
    return t


RATIOS = [(0, 1, "vs loop"), (0, 2, "vs TorchJD")]

if __name__ == "__main__" and sys.argv[1:2] == ["--peak"]:
    _peak_child(sys.argv[2], int(sys.argv[3]))
