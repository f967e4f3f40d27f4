"""Feature circuits: TopK SAE training against SAELens, and attribution patching against
exact activation patching.

1. SAE training: the same activations (MiniLM's residual stream after layer 3, d=384, on
   task-suite sentences), the same initial weights, the same batch sequence, sizes and
   steps (4096 features, k=32, batch 4096, Adam at a constant lr; SAELens 6 trained from a
   plain iterator, ``SAETrainer(cfg, sae, data_provider=...)``). workbench decodes only
   the k active features per token (``embedding_bag``); SAELens runs a dense decoder
   (its sparse COO option, ``use_sparse_activations``, fails in the backward pass on the
   CPU with torch 2.13: ``aten::view`` has no SparseCPU kernel). Both reach the same
   fraction of variance unexplained on held-out rows (printed).
2. Node effects on tasklm's agreement task, 3 sites x 2048 TopK features + 3 error
   nodes: attribution patching (one forward and one backward) and integrated gradients
   (10 steps) against exact patching: the textbook loop (one patched forward per node,
   6147 of them) and workbench's batched exact (only features active on some token, many
   patched copies of the batch per forward), with the Spearman correlation of the effects
   of the 50 strongest nodes by exact patching.

SAELens is an anchor, installed by ``python3 dev.py bench`` (bench/requirements.txt),
never by the tests. ``BENCH_SAE_STEPS`` (default 150) sets the training steps.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from bench.harness import Table, timeit

D_SAE, K, BATCH = 4096, 32, 4096


def _activations():
    import workbench
    from workbench.circuits import collect
    from workbench.data import agreement_sentences, icl_prompts

    mini = workbench.load("minilm", device="cpu")
    texts = agreement_sentences(3000, seed=0, split="all")
    texts += list(icl_prompts("antonym", 4, 1500, seed=0)["prompt"])
    acts = collect(mini, "resid_post.3", texts, skip_first=True)
    g = torch.Generator().manual_seed(0)
    return acts[torch.randperm(len(acts), generator=g)].contiguous()


def _stream(acts: torch.Tensor, steps: int):
    """The same batch sequence for both trainers: batch i is rows [i*B, (i+1)*B) mod n."""
    n = len(acts)
    for i in range(steps):
        idx = (torch.arange(BATCH) + i * BATCH) % n
        yield acts[idx]


def _fvu(encode_decode, x: torch.Tensor) -> float:
    with torch.no_grad():
        err = (encode_decode(x) - x).double().pow(2).sum()
        return float(err / (x.double() - x.double().mean(0)).pow(2).sum())


def _train_ours(acts, held, init, steps):
    from workbench.circuits import SAE, train_sae

    sae = SAE(acts.shape[-1], D_SAE, kind="topk", k=K)
    sae.load_state_dict(init)
    train_sae(sae, _stream(acts, steps), steps=steps, batch_size=BATCH, lr=1e-3, dead_after=10**12, aux_coeff=0.0,
              max_grad_norm=1.0, progress=False)
    return _fvu(sae, held)


def _train_saelens(acts, held, init, steps, sparse: bool):
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    cfg = TopKTrainingSAEConfig(d_in=acts.shape[-1], d_sae=D_SAE, k=K, use_sparse_activations=sparse,
                                aux_loss_coefficient=0.0, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=True,
                                normalize_activations="none", dtype="float32", device="cpu")
    sae = TopKTrainingSAE(cfg)
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_enc", "b_dec"):
            getattr(sae, name).copy_(init[name])
    tcfg = SAETrainerConfig(total_training_samples=steps * BATCH, train_batch_size_samples=BATCH, lr=1e-3, lr_end=1e-3,
                            device="cpu", dead_feature_window=10**9, feature_sampling_window=10**9)
    import contextlib
    import io

    with contextlib.redirect_stderr(io.StringIO()):
        SAETrainer(tcfg, sae, data_provider=_stream(acts, steps)).fit()
    sae.eval()
    return _fvu(lambda x: sae.decode(sae.encode(x)), held)


def _sae_rows(t: Table) -> None:
    from workbench.circuits import SAE

    steps = int(os.environ.get("BENCH_SAE_STEPS", "150"))
    acts = _activations()
    held, acts = acts[:8192], acts[8192:]
    init = SAE(acts.shape[-1], D_SAE, kind="topk", k=K, seed=0).state_dict()
    fvu = {}

    def ours():
        fvu["workbench"] = _train_ours(acts, held, init, steps)

    def theirs(sparse):
        def run():
            fvu["SAELens sparse" if sparse else "SAELens"] = _train_saelens(acts, held, init, steps, sparse)
        return run

    t_ours = timeit(ours, repeat=1, warmup=0, min_time=0.0)  # each run is minutes long: one sample each
    t_dense = timeit(theirs(False), repeat=1, warmup=0, min_time=0.0)
    case = f"TopK SAE, {steps} steps of {BATCH} rows, d={acts.shape[-1]}, {D_SAE} features, k={K}"
    t.add(f"{case}: workbench vs SAELens", t_ours, t_dense)
    t.notes.append(f"SAE training on {len(acts)} MiniLM resid_post.3 rows; held-out FVU after training: "
                   + ", ".join(f"{k} {v:.4f}" for k, v in fvu.items())
                   + " (same init, batches and gradient clipping at norm 1; workbench keeps decoder rows at "
                   "unit norm, SAELens rescales activations by them)")


def _attribution_rows(t: Table) -> None:
    import workbench
    from workbench.circuits import SAE, collect, node_effects, train_sae
    from workbench.data import agreement_pairs, agreement_sentences
    from workbench.effects import pair_batches
    from workbench.metrics import logit_diff, mean_metric
    from workbench.stats import spearman

    lm = workbench.load("tasklm", device="cpu")
    texts = agreement_sentences(2000, seed=0, split="train")
    saes = {}
    for site in ("resid_post.0", "attn_out.1", "mlp_out.1"):
        acts = collect(lm, site, texts)
        sae = SAE(acts.shape[-1], 2048, kind="topk", k=16, site=site)
        train_sae(sae, acts, steps=300, batch_size=512, lr=2e-3, progress=False)
        saes[site] = sae
    pairs = agreement_pairs(32, seed=3, split="test", tokenizer=lm.tokenizer)
    good, bad = list(pairs["clean_answer_id"]), list(pairs["corrupted_answer_id"])

    def metric(logits, batch):
        return logit_diff(logits, batch, good, bad)

    clean, corr = list(pairs["clean"]), list(pairs["corrupted"])
    res = {}

    def run(method, **kw):
        def f():
            res[method] = node_effects(lm, saes, clean, corr, metric, method=method, **kw)
        return f

    def per_node_loop():
        # the textbook way: one patched forward per node, every feature and error node
        cb, xb = pair_batches(lm, clean, corr)
        with torch.no_grad():
            xc_all, xx_all = lm.cache(cb, list(saes)), lm.cache(xb, list(saes))
            for site, sae in saes.items():
                xc, xx = xc_all[site], xx_all[site]
                fc, fx = sae.encode(xc), sae.encode(xx)
                ec, ex = xc - sae.decode(fc), xx - sae.decode(fx)
                for j in range(sae.d_sae):
                    new = xc + (fx[..., j] - fc[..., j])[..., None] * sae.W_dec[j]
                    mean_metric(metric, lm.logits(cb, patch={site: new}), cb)
                mean_metric(metric, lm.logits(cb, patch={site: xc - ec + ex}), cb)

    t_loop = timeit(per_node_loop, repeat=1, warmup=0, min_time=0.0)
    t_exact = timeit(run("exact"), repeat=1, warmup=0, min_time=0.0)
    t_attrib = timeit(run("attribution"), repeat=5, warmup=1, min_time=0.0)
    t_ig = timeit(run("ig", ig_steps=10), repeat=3, warmup=1, min_time=0.0)
    e = res["exact"]["effect"]
    top = np.argsort(-np.abs(e))[:50]
    rho = {m: spearman(res[m]["effect"][top], e[top]) for m in ("attribution", "ig")}
    active = int(np.sum(np.abs(e) > 0))
    case = f"tasklm node effects, 3 sites x 2048 features, {len(clean)} pairs"
    t.add(f"{case}: attribution patching vs exact, one forward per node", t_attrib, t_loop)
    t.add(f"{case}: attribution patching vs workbench's batched exact", t_attrib, t_exact)
    t.add(f"{case}: integrated gradients (10 steps) vs batched exact", t_ig, t_exact)
    t.notes.append(f"node effects: exact patching ran {active} patched features (the others are inactive on every "
                   f"token, effect exactly 0); Spearman with exact on its top 50 nodes: attribution "
                   f"{rho['attribution']:.3f}, integrated gradients {rho['ig']:.3f}")


def run() -> Table:
    t = Table("Feature circuits: SAE training against SAELens; attribution against exact patching",
              ["workbench", "anchor"], unit="s")
    _sae_rows(t)
    _attribution_rows(t)
    t.notes.append("ratio = workbench / anchor (targets: SAE training <= 0.67x, i.e. >= 1.5x faster; "
                   "attribution <= 0.01x, i.e. >= 100x faster, Spearman >= 0.8)")
    return t


RATIOS = [(0, 1, "workbench/anchor")]
