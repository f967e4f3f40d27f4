"""Conformance with SAELens 6: every SAE layout it writes loads here and computes what
SAELens computes, and what workbench writes in SAELens's format SAELens reads back.

SAEs are made by SAELens itself (seeded random weights): inference saves
(``save_model``, ``save_inference_model``) and the checkpoints its ``SAETrainer`` writes
while training offline on tiny random activations. Each is loaded with ``SAE.load`` and
compared on the same inputs with SAELens's own forward (feature activations, active
sets, decoding, reconstruction), with the largest absolute difference in every message.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from workbench import WorkbenchError
from workbench.circuits import SAE

sae_lens = pytest.importorskip("sae_lens")

from sae_lens import SAETrainer  # noqa: E402
from sae_lens.config import SAETrainerConfig  # noqa: E402
from sae_lens.saes import (  # noqa: E402
    BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig, GatedSAE, GatedSAEConfig, GatedTrainingSAE,
    GatedTrainingSAEConfig, JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig,
    StandardSAE, StandardSAEConfig, StandardTrainingSAE, StandardTrainingSAEConfig, TopKSAE, TopKSAEConfig,
    TopKTrainingSAE, TopKTrainingSAEConfig,
)
from sae_lens.saes.sae import SAE as LensSAE  # noqa: E402
from sae_lens.saes.sae import TrainingSAE as LensTrainingSAE  # noqa: E402

D_IN, D_SAE = 16, 48
TOL = 2e-5


def inputs(n=96, seed=7, d=D_IN):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * 2 + 0.5


def max_diff(a, b) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def assert_close(ours, theirs, what, tol=TOL):
    scale = 1 + float(theirs.double().abs().max())
    d = max_diff(ours, theirs)
    assert ours.shape == theirs.shape, f"{what}: shapes {tuple(ours.shape)} vs SAELens {tuple(theirs.shape)}"
    assert d <= tol * scale, f"{what}: max |workbench - SAELens| = {d:.3g} (allowed {tol * scale:.3g})"


@torch.no_grad()
def compare(ours: SAE, lens, x: torch.Tensor, what: str, *, lens_x=None, train_mode=False):
    """Feature activations, active sets, decode of the same features, reconstruction."""
    ours.train(train_mode)
    lens_x = x if lens_x is None else lens_x
    f_ours, f_lens = ours.encode(x), lens.encode(lens_x)
    f_lens = f_lens.to_dense() if f_lens.is_sparse else f_lens
    f_lens = f_lens.reshape(f_ours.shape)
    assert_close(f_ours, f_lens, f"{what}: feature activations")
    n_diff = int(((f_ours > 0) != (f_lens > 0)).sum())
    assert n_diff == 0, f"{what}: {n_diff} active-set differences (max |f diff| {max_diff(f_ours, f_lens):.3g})"
    assert int((f_ours > 0).sum()) > 0, f"{what}: no feature fires, the comparison would be empty"
    assert_close(ours.decode(f_lens), lens.decode(f_lens.reshape(lens.encode(lens_x).shape)).reshape(x.shape),
                 f"{what}: decode of SAELens's features")
    assert_close(ours(x), lens(lens_x).reshape(x.shape), f"{what}: reconstruction")
    ours.eval()


def randomize(sae, seed: int, *, thr: bool = True):
    """Random weights everywhere: decoder rows of uneven norms, nonzero biases, positive thresholds."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sae.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * 0.3)
        sae.W_dec.mul_(torch.rand(sae.W_dec.shape[0], 1, generator=g).to(sae.W_dec.dtype) * 2 + 0.2)
        sae.W_enc.mul_(3.0)
        if thr and hasattr(sae, "threshold"):
            sae.threshold.copy_(torch.rand(sae.threshold.shape, generator=g).to(sae.threshold.dtype) * 0.5)
        if hasattr(sae, "r_mag"):
            sae.r_mag.mul_(0.5)
    return sae


INFERENCE = {
    "standard": lambda **kw: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)),
    "standard-no-b_dec-in": lambda **kw: StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                                                      apply_b_dec_to_input=False, **kw)),
    "topk": lambda **kw: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, **kw)),
    "topk-rescaled": lambda **kw: TopKSAE(TopKSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5,
                                                        rescale_acts_by_decoder_norm=True, **kw)),
    "jumprelu": lambda **kw: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)),
    "jumprelu-no-b_dec-in": lambda **kw: JumpReLUSAE(JumpReLUSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                                                      apply_b_dec_to_input=False, **kw)),
    "gated": lambda **kw: GatedSAE(GatedSAEConfig(d_in=D_IN, d_sae=D_SAE, **kw)),
}
KIND_OF = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu", "gated": "gated"}


@pytest.mark.parametrize("name", list(INFERENCE))
def test_inference_saves_load_and_match(tmp_path, name):
    lens = randomize(INFERENCE[name](), seed=len(name))
    lens.cfg.metadata.hook_name = "blocks.1.hook_resid_post"
    lens.cfg.metadata.model_name = "tiny"
    lens.save_model(tmp_path / "s")
    ours = SAE.load(tmp_path / "s")
    assert ours.kind == KIND_OF[name.split("-")[0]] and ours.site == "resid_post.1" and ours.model_name == "tiny"
    assert ours.apply_b_dec_to_input == lens.cfg.apply_b_dec_to_input
    back = LensSAE.load_from_disk(tmp_path / "s")  # SAELens's own reading of its folder
    compare(ours, back, inputs(), name)
    if name == "topk-rescaled":  # ignoring the flag would select other features (the reported bug)
        assert not torch.allclose(lens.W_dec.norm(dim=-1), torch.ones(D_SAE))
        assert torch.allclose(ours.W_dec.norm(dim=-1), torch.ones(D_SAE), atol=1e-5)


def test_hook_z_reshaping(tmp_path):
    """A z SAE: SAELens takes [..., heads, d_head], workbench's z site the heads concatenated."""
    lens = randomize(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, reshape_activations="hook_z")), seed=3)
    lens.cfg.metadata.hook_name = "blocks.0.attn.hook_z"
    lens.save_model(tmp_path / "z")
    ours = SAE.load(tmp_path / "z")
    assert ours.site == "z.0"
    x = inputs()
    back = LensSAE.load_from_disk(tmp_path / "z")
    compare(ours, back, x, "hook_z", lens_x=x.reshape(len(x), 4, D_IN // 4))


def test_jumprelu_log_threshold(tmp_path):
    """Older JumpReLU checkpoints store log_threshold; SAELens exponentiates it on loading."""
    lens = randomize(JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE)), seed=4)
    lens.save_model(tmp_path / "j")
    w = load_file(tmp_path / "j" / "sae_weights.safetensors")
    w["log_threshold"] = w.pop("threshold").log()
    save_file(w, tmp_path / "j" / "sae_weights.safetensors")
    ours = SAE.load(tmp_path / "j")
    back = LensTrainingSAE.load_from_disk(tmp_path / "j")
    assert float(back.threshold.detach().min()) > 0
    assert torch.allclose(ours.threshold, back.threshold, rtol=1e-6), max_diff(ours.threshold, back.threshold)
    compare(ours, back, inputs(), "jumprelu log_threshold")
    with torch.no_grad():  # threshold 0 (the reported bug) fires other features
        f = ours.encode(inputs())
        ours.threshold.zero_()
        assert int(((ours.encode(inputs()) > 0) != (f > 0)).sum()) > 0


@pytest.mark.parametrize("norm", ["layer_norm", "constant_norm_rescale"])
def test_run_time_normalisation_is_refused(tmp_path, norm):
    lens = randomize(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE, normalize_activations=norm)), seed=5)
    lens.save_model(tmp_path / "n")
    with pytest.raises(WorkbenchError, match=f"normalize_activations='{norm}'"):
        SAE.load(tmp_path / "n")


def test_expected_average_without_factor_is_refused(tmp_path):
    lens = randomize(StandardSAE(StandardSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                                   normalize_activations="expected_average_only_in")), seed=5)
    lens.save_model(tmp_path / "n")
    with pytest.raises(WorkbenchError, match="normalize_activations='expected_average_only_in'.*scaling factor"):
        SAE.load(tmp_path / "n")


# ---------------------------------------------------------------------- SAELens's trainer


def provider(seed=0, batch=64):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(D_IN, D_IN, generator=g) / 2 + torch.eye(D_IN)
    while True:
        yield (torch.randn(batch, D_IN, generator=g) @ mix) * 3 + 1.0


TRAINING = {
    "standard": lambda **kw: StandardTrainingSAE(StandardTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                                                          l1_coefficient=1e-3, **kw)),
    "topk": lambda **kw: TopKTrainingSAE(TopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, **kw)),
    "batchtopk": lambda **kw: BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, k=5, **kw)),
    "jumprelu": lambda **kw: JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE,
                                                                          l0_coefficient=1e-3, **kw)),
    "gated": lambda **kw: GatedTrainingSAE(GatedTrainingSAEConfig(d_in=D_IN, d_sae=D_SAE, l1_coefficient=1e-3, **kw)),
}


def train_with_saelens(arch, folder: Path, *, norm="none", steps=24):
    torch.manual_seed(11)
    lens = TRAINING[arch](normalize_activations=norm)
    tcfg = SAETrainerConfig(total_training_samples=64 * steps, train_batch_size_samples=64, lr=3e-3, lr_end=3e-3,
                            n_checkpoints=1, checkpoint_path=str(folder), save_final_checkpoint=True,
                            dead_feature_window=5, feature_sampling_window=1000, n_batches_for_norm_estimate=4)
    with contextlib.redirect_stderr(io.StringIO()):
        SAETrainer(tcfg, lens, data_provider=provider()).fit()
    lens.save_inference_model(folder / "inference")
    mid = [p for p in folder.iterdir() if p.name.isdigit()]
    assert len(mid) == 1
    return lens, mid[0], folder / f"final_{64 * steps}", folder / "inference"


def lens_reference(folder: Path):
    """SAELens's own SAE for a checkpoint folder, with the normalisation its trainer would fold at the end."""
    cfg = json.loads((folder / "cfg.json").read_text())
    lens = LensTrainingSAE.load_from_disk(folder)
    scaler = folder / "activation_scaler.json"
    if cfg["normalize_activations"] == "expected_average_only_in":
        lens.fold_activation_norm_scaling_factor(json.loads(scaler.read_text())["scaling_factor"])
    elif cfg["normalize_activations"] == "covariance_whitening":
        w = load_file(folder / "activation_whitening.safetensors")
        lens.fold_activation_whitening(w["mean"], w["matrix"], w["inverse_matrix"])
    return lens


@pytest.mark.parametrize("arch,norm", [("standard", "none"), ("topk", "none"), ("batchtopk", "none"),
                                       ("jumprelu", "none"), ("gated", "none"),
                                       ("topk", "expected_average_only_in"),
                                       ("batchtopk", "expected_average_only_in"),
                                       ("topk", "covariance_whitening"), ("batchtopk", "covariance_whitening"),
                                       ("standard", "covariance_whitening")])
def test_trainer_checkpoints_load_and_match(tmp_path, arch, norm):
    lens, mid, final, inference = train_with_saelens(arch, tmp_path / "run", norm=norm)
    x = next(provider(seed=5, batch=128))
    for folder in (mid, final):
        cfg = json.loads((folder / "cfg.json").read_text())
        assert cfg["architecture"] == arch
        if arch in ("topk", "batchtopk") and folder is mid:  # (folding a whitening at the end turns it off)
            assert cfg["rescale_acts_by_decoder_norm"] is True  # SAELens's default for its TopK training
        ours = SAE.load(folder)
        ref = lens_reference(folder)
        what = f"{arch}/{norm} checkpoint {folder.name}"
        # BatchTopK: SAELens's training SAE always selects over the batch, as ours does while training
        compare(ours, ref, x, what, train_mode=arch == "batchtopk")
    # the inference save (BatchTopK becomes JumpReLU with the learned threshold)
    ours = SAE.load(inference)
    ref = LensSAE.load_from_disk(inference)
    compare(ours, ref, x, f"{arch}/{norm} inference save")
    if arch == "batchtopk":
        from_ck = SAE.load(final)
        assert from_ck.kind == "batchtopk" and ours.kind == "jumprelu"
        compare(from_ck, ref, x, "batchtopk checkpoint at inference vs SAELens's JumpReLU save")


def test_rescaled_topk_differs_when_the_flag_is_ignored(tmp_path):
    """The size of the bug fixed: reading a rescaled TopK checkpoint as a plain one."""
    _, _, final, _ = train_with_saelens("topk", tmp_path / "run")
    ours = SAE.load(final)
    cfg = json.loads((final / "cfg.json").read_text())
    cfg["rescale_acts_by_decoder_norm"] = False
    plain_dir = tmp_path / "plain"
    plain_dir.mkdir()
    (plain_dir / "cfg.json").write_text(json.dumps(cfg))
    (plain_dir / "sae_weights.safetensors").write_bytes((final / "sae_weights.safetensors").read_bytes())
    plain = SAE.load(plain_dir)
    x = next(provider(seed=5, batch=128))
    with torch.no_grad():
        assert max_diff(ours.encode(x), plain.encode(x)) > 1e-2
        assert int(((ours.encode(x) > 0) != (plain.encode(x) > 0)).sum()) > 0


# ---------------------------------------------------------------------- round trips


def ours_random(kind: str, seed: int) -> SAE:
    k = {"topk": 5, "batchtopk": 5}.get(kind)
    sae = SAE(D_IN, D_SAE, kind=kind, k=k, site="mlp_out.2", model="tiny", seed=seed)
    randomize(sae, seed, thr=kind == "jumprelu")
    if kind == "batchtopk":
        with torch.no_grad():
            sae.threshold.fill_(0.4)
    return sae.eval()


@pytest.mark.parametrize("kind", ["relu", "topk", "batchtopk", "jumprelu", "gated"])
def test_workbench_to_saelens_and_back(tmp_path, kind):
    ours = ours_random(kind, seed=21)
    ours.save(tmp_path / "lens", format="saelens")
    assert sorted(p.name for p in (tmp_path / "lens").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    lens = LensSAE.load_from_disk(tmp_path / "lens")
    assert lens.cfg.metadata.hook_name == "blocks.2.hook_mlp_out" and lens.cfg.metadata.model_name == "tiny"
    compare(ours, lens, inputs(), f"workbench {kind} -> SAELens")
    back = SAE.load(tmp_path / "lens")
    assert back.config() == ours.config()
    for name, p in ours.state_dict().items():
        assert torch.equal(p, back.state_dict()[name]), f"{kind}: {name} changed in the round trip"
    with pytest.raises(WorkbenchError, match="never overwrite"):
        ours.save(tmp_path / "lens", format="saelens")


@pytest.mark.parametrize("name", ["standard", "topk-rescaled", "jumprelu", "gated"])
def test_saelens_to_workbench_to_saelens(tmp_path, name):
    lens = randomize(INFERENCE[name](), seed=31)
    lens.save_model(tmp_path / "a")
    ours = SAE.load(tmp_path / "a")
    ours.save(tmp_path / "b", format="saelens")
    first, second = LensSAE.load_from_disk(tmp_path / "a"), LensSAE.load_from_disk(tmp_path / "b")
    x = inputs()
    with torch.no_grad():
        assert_close(second.encode(x), first.encode(x), f"{name}: SAELens -> workbench -> SAELens features")
        assert_close(second(x), first(x), f"{name}: SAELens -> workbench -> SAELens reconstruction")
    assert torch.equal(ours.W_enc, SAE.load(tmp_path / "b").W_enc)  # workbench -> SAELens -> workbench is exact
