"""Merging eight task vectors: workbench's tensor-by-tensor TIES (linear-time trim by
``torch.kthvalue``) against mergekit on the same safetensors checkpoints, time and peak
memory, each in its own process; and the indirect effect of every head in one batched
forward against the sequential per-head loop.

``BENCH_MERGE_SIZE=58m`` (default) builds a 58M-parameter Llama (the size the issue
measured); ``tiny`` a 2-layer one for a quick correctness run. mergekit is an anchor:
installed by ``python3 dev.py bench`` (bench/requirements.txt), never by the tests.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from bench.harness import Table, timeit

ROOT = Path(__file__).resolve().parents[1]
SIZES = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
    "58m": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=8, num_attention_heads=8,
                num_key_value_heads=8, vocab_size=32000),
}
N_MODELS = 8
DENSITY = 0.2

_MEASURE = r"""
import json, resource, subprocess, sys, time
t = time.perf_counter()
r = subprocess.run(sys.argv[1:], capture_output=True, text=True)
dt = time.perf_counter() - t
print(json.dumps({"rc": r.returncode, "seconds": dt, "peak_bytes": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
                  "stderr": r.stderr[-2000:]}))
"""

_WORKBENCH = r"""
import sys, torch
torch.set_num_threads(1)
from workbench.taskvec import TaskVector, merge
base, out, density, *fts = sys.argv[1:]
merge(base, [TaskVector(base, f) for f in fts], "ties", density=float(density), out=out)
"""


def _measure(cmd: list[str]) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", _MEASURE, *cmd], capture_output=True, text=True, env=env, check=True)
    info = json.loads(res.stdout.strip().splitlines()[-1])
    if info["rc"] != 0:
        raise RuntimeError(f"{cmd[:3]} failed:\n{info['stderr']}")
    return info


def make_checkpoints(root: Path, size: str) -> tuple[str, list[str]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(max_position_embeddings=256, tie_word_embeddings=False, **SIZES[size])
    torch.manual_seed(0)
    base = LlamaForCausalLM(cfg)
    base.save_pretrained(root / "base")
    fts = []
    for i in range(N_MODELS):
        g = torch.Generator().manual_seed(100 + i)
        state = {k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in base.state_dict().items()}
        ft = LlamaForCausalLM(cfg)
        ft.load_state_dict(state)
        ft.save_pretrained(root / f"ft{i}")
        fts.append(str(root / f"ft{i}"))
        del ft, state
    return str(root / "base"), fts


def _compare(ours: str, theirs_dir: str) -> tuple[int, int, float]:
    from workbench.safetensors_io import SafetensorsFile

    files = sorted(Path(theirs_dir).glob("*.safetensors"))
    differ = total = 0
    worst = 0.0
    with SafetensorsFile(ours) as a:
        for f in files:
            with SafetensorsFile(f) as b:
                for k in b.keys():
                    x, y = a.read(k).float(), b.read(k).float()
                    d = (x - y).abs()
                    differ += int((d > 1e-6).sum())
                    total += d.numel()
                    worst = max(worst, float(d.max()))
    return differ, total, worst


def run() -> Table:
    import workbench
    from workbench.data import icl_prompts
    from workbench.taskvec import TaskVector, to_mergekit_yaml
    from workbench.taskvec.activations import indirect_effects, mean_head_outputs

    size = os.environ.get("BENCH_MERGE_SIZE", "58m")
    t = Table(f"TIES merge of {N_MODELS} task vectors (density {DENSITY}) and batched indirect effects",
              ["workbench", "anchor"], unit="s")
    tmp = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        base, fts = make_checkpoints(tmp, size)
        ours = _measure([sys.executable, "-c", _WORKBENCH, base, str(tmp / "ours.safetensors"), str(DENSITY), *fts])
        recipe = tmp / "recipe.yml"
        recipe.write_text(to_mergekit_yaml(base, [TaskVector(base, f) for f in fts], "ties", density=DENSITY))
        mergekit = shutil.which("mergekit-yaml") or str(Path(sys.executable).parent / "mergekit-yaml")
        if not Path(mergekit).exists():
            raise RuntimeError("mergekit is not installed; run `python3 dev.py bench merge`, which installs the anchors")
        theirs = _measure([mergekit, str(recipe), str(tmp / "mergekit_out"), "--lazy-unpickle"])
        n_params = sum(int(torch.tensor(s).prod()) for s in _shapes(base))
        t.add(f"{size} Llama ({n_params / 1e6:.0f}M) time", ours["seconds"], theirs["seconds"])
        t.add(f"{size} Llama peak memory (GB)", ours["peak_bytes"] / 2**30, theirs["peak_bytes"] / 2**30)
        differ, total, worst = _compare(str(tmp / "ours.safetensors"), str(tmp / "mergekit_out"))
        t.notes.append(f"outputs: {differ} of {total} entries differ by > 1e-6 (max |diff| {worst:.3g}); "
                       "differences can only come from magnitudes tied exactly at the trim threshold "
                       "(workbench keeps every tied entry, mergekit an argsort-order subset)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    tasklm = workbench.load("tasklm", device="cpu")
    clean = tasklm.tokenize(icl_prompts("capitalize", 5, 32, tokenizer=tasklm.tokenizer)["prompt"])
    ds = icl_prompts("capitalize", 5, 32, seed=1, shuffle_labels=True, tokenizer=tasklm.tokenizer)
    xb = tasklm.tokenize(ds["prompt"])
    answers = torch.tensor(ds["answer_id"])
    mz = mean_head_outputs(tasklm, clean)
    batched = timeit(lambda: indirect_effects(tasklm, xb, answers, mz), repeat=3, warmup=1)
    loop = timeit(lambda: indirect_effects(tasklm, xb, answers, mz, batched=False), repeat=3, warmup=1)
    t.add(f"tasklm indirect effect, {tasklm.n_layers * tasklm.n_heads} heads x 32 prompts", batched, loop)
    t.notes.append("anchor: mergekit-yaml (rows 1-2); the sequential per-head loop (row 3). ratio = workbench / anchor")
    return t


def _shapes(path: str):
    from workbench.taskvec import Checkpoint

    ck = Checkpoint(path)
    return [ck.shape(k) for k in ck.keys()]


RATIOS = [(0, 1, "workbench/anchor")]
