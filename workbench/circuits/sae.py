"""Sparse autoencoders: ReLU + L1, TopK and BatchTopK, trained on streamed activations.

Conventions (those of SAELens, so its published dictionaries load as they are):
``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in] (each feature's
decoder direction is a row, kept at unit norm while training), ``b_dec`` [d_in],
optional ``threshold`` [d_sae] (JumpReLU; BatchTopK's inference threshold).

    f = act((x - b_dec) @ W_enc + b_enc)      # b_dec subtracted when apply_b_dec_to_input
    x_hat = f @ W_dec + b_dec

``act`` is ReLU (``kind="relu"``), keep the k largest per token then ReLU (``"topk"``),
keep the k * batch largest over the batch (``"batchtopk"``; a single learned threshold
at inference) or ``pre * (pre > threshold)`` (``"jumprelu"``, for loaded SAEs).

A TopK SAE decodes sparsely (only k rows of ``W_dec`` per token, through
``embedding_bag``), so its decoder costs k / d_sae of a dense one.

Saving writes a folder with ``cfg.json`` and ``sae.safetensors`` (no pickle);
:meth:`SAE.load` reads that and the SAELens layout (``cfg.json`` +
``sae_weights.safetensors``).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from workbench.errors import WorkbenchError, one_of
from workbench.results import Result, provenance, register

KINDS = ("relu", "topk", "batchtopk", "jumprelu")


class SAE(torch.nn.Module):
    """A sparse autoencoder over ``d_in``-wide vectors with ``d_sae`` features."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        kind: str = "topk",
        k: int | None = None,
        site: str | None = None,
        model: str | None = None,
        apply_b_dec_to_input: bool = True,
        skip_first: bool = True,
        seed: int = 0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise one_of("SAE kind", kind, KINDS)
        if d_in < 1 or d_sae < 1:
            raise WorkbenchError(f"need d_in >= 1 and d_sae >= 1, got d_in={d_in}, d_sae={d_sae}")
        if kind in ("topk", "batchtopk"):
            if k is None or not 1 <= k <= d_sae:
                raise WorkbenchError(f"a {kind} SAE needs 1 <= k <= d_sae ({d_sae}), got k={k}")
        self.d_in, self.d_sae, self.kind, self.k = d_in, d_sae, kind, k
        self.site, self.model_name = site, model
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.skip_first = skip_first
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.to(dtype))
        self.W_enc = torch.nn.Parameter(w.T.clone().to(dtype))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, dtype=dtype))
        thr = torch.zeros(d_sae if kind == "jumprelu" else 1, dtype=dtype)
        self.register_buffer("threshold", thr)

    # ------------------------------------------------------------------ config

    def config(self) -> dict[str, Any]:
        return {
            "d_in": self.d_in, "d_sae": self.d_sae, "kind": self.kind, "k": self.k, "site": self.site,
            "model": self.model_name, "apply_b_dec_to_input": self.apply_b_dec_to_input,
            "skip_first": self.skip_first, "dtype": str(self.W_dec.dtype).replace("torch.", ""),
        }

    def __repr__(self) -> str:
        k = f", k={self.k}" if self.k else ""
        return f"SAE({self.kind}, d_in={self.d_in}, d_sae={self.d_sae}{k}, site={self.site!r})"

    def check_input(self, x: torch.Tensor, what: str = "input") -> None:
        if x.shape[-1] != self.d_in:
            where = f" (trained on {self.site})" if self.site else ""
            raise WorkbenchError(
                f"SAE width mismatch: this SAE{where} takes vectors of width d_in={self.d_in}, but the {what} has "
                f"width {x.shape[-1]} (shape {tuple(x.shape)}); use an SAE trained on a site of this model"
            )

    def check_subject(self, subject, site: str) -> None:
        """Raise unless this SAE fits ``site`` of ``subject`` (width and d_model)."""
        from workbench.circuits.buffer import site_width

        width = site_width(subject, site)
        if width != self.d_in:
            raise WorkbenchError(
                f"SAE width mismatch: site {site!r} of {subject.name} has width {width} (d_model={subject.d_model}), "
                f"but this SAE takes d_in={self.d_in}{f' (trained on {self.site})' if self.site else ''}"
            )

    # ------------------------------------------------------------------ forward

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae]."""
        self.check_input(x)
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK only: (values, indices) [..., k] of the active features."""
        if self.kind != "topk":
            raise WorkbenchError(f"encode_sparse is for topk SAEs; this one is {self.kind}")
        vals, idx = self.pre(x).topk(self.k, dim=-1)
        return F.relu(vals), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae]."""
        pre = self.pre(x)
        if self.kind == "relu":
            return F.relu(pre)
        if self.kind == "topk":
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        if self.kind == "jumprelu":
            return pre * (pre > self.threshold)
        # batchtopk
        if self.training:
            flat = F.relu(pre.reshape(-1, self.d_sae))
            n = min(flat.numel(), self.k * flat.shape[0])
            vals, idx = flat.flatten().topk(n)
            out = torch.zeros_like(flat).flatten().scatter(0, idx, vals).reshape(pre.shape)
            return out
        return F.relu(pre) * (pre > self.threshold)

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        """[..., d_sae] -> [..., d_in]."""
        if f.shape[-1] != self.d_sae:
            raise WorkbenchError(f"decode takes [..., d_sae={self.d_sae}] features, got shape {tuple(f.shape)}")
        return f @ self.W_dec + self.b_dec

    def decode_sparse(self, vals: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sum of ``vals`` times the decoder rows ``idx`` ([n, k] each) plus b_dec: [n, d_in]."""
        return F.embedding_bag(idx, self.W_dec, per_sample_weights=vals, mode="sum") + self.b_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction x_hat, same shape as ``x``."""
        if self.kind == "topk":
            shape = x.shape
            vals, idx = self.encode_sparse(x.reshape(-1, shape[-1]))
            return self.decode_sparse(vals, idx).reshape(shape)
        return self.decode(self.encode(x))

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Scale each decoder row to unit norm (and the encoder to match, so outputs are kept)."""
        norms = self.W_dec.norm(dim=1).clamp(min=1e-12)
        self.W_dec.div_(norms[:, None])
        self.W_enc.mul_(norms[None, :])
        self.b_enc.mul_(norms)
        if self.kind == "jumprelu":
            self.threshold.mul_(norms)

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike) -> str:
        """Write ``path/cfg.json`` and ``path/sae.safetensors`` (a temp folder renamed into place)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, tmp / "sae.safetensors")
            (tmp / "cfg.json").write_text(json.dumps({"format": "workbench-sae", **self.config()}, indent=1))
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "SAE":
        """Load a folder written by :meth:`save`, or a SAELens folder (``cfg.json`` +
        ``sae_weights.safetensors`` with W_enc, b_enc, W_dec, b_dec and optionally threshold)."""
        from safetensors.torch import load_file

        path = Path(path)
        cfg_path = path / "cfg.json"
        if not cfg_path.exists():
            raise WorkbenchError(f"no SAE at {str(path)!r}: expected a folder with cfg.json and sae.safetensors "
                                 "(workbench) or sae_weights.safetensors (SAELens)")
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("format") == "workbench-sae":
            sae = cls(cfg["d_in"], cfg["d_sae"], kind=cfg["kind"], k=cfg["k"], site=cfg["site"], model=cfg["model"],
                      apply_b_dec_to_input=cfg["apply_b_dec_to_input"], skip_first=cfg["skip_first"],
                      dtype=getattr(torch, cfg.get("dtype", "float32")))
            sae.load_state_dict(load_file(path / "sae.safetensors"))
            return sae.to(device).eval()
        return _from_saelens(cls, path, cfg, device)


_TL_HOOKS = {
    "hook_resid_pre": "resid_pre", "hook_resid_post": "resid_post", "hook_attn_out": "attn_out",
    "hook_mlp_out": "mlp_out", "attn.hook_z": "z", "hook_resid_mid": None,
}


def site_from_hook(hook: str | None) -> str | None:
    """TransformerLens hook name -> workbench site (``blocks.8.hook_resid_pre`` -> ``resid_pre.8``)."""
    if not hook:
        return None
    if hook == "hook_embed":
        return "embed"
    m = re.fullmatch(r"blocks\.(\d+)\.(.+)", hook)
    if m and _TL_HOOKS.get(m.group(2)):
        return f"{_TL_HOOKS[m.group(2)]}.{m.group(1)}"
    return None


def _from_saelens(cls, path: Path, cfg: dict, device) -> SAE:
    from safetensors.torch import load_file

    wpath = path / "sae_weights.safetensors"
    if not wpath.exists():
        raise WorkbenchError(f"{str(path)!r} has a cfg.json but no sae_weights.safetensors (SAELens) or sae.safetensors")
    w = load_file(wpath)
    missing = [k for k in ("W_enc", "b_enc", "W_dec", "b_dec") if k not in w]
    if missing:
        raise WorkbenchError(f"{wpath} lacks {missing}; a SAELens SAE holds W_enc, b_enc, W_dec, b_dec (and threshold)")
    meta = cfg.get("metadata") or {}
    d_in, d_sae = w["W_enc"].shape
    if w["W_dec"].shape != (d_sae, d_in):
        raise WorkbenchError(f"W_dec has shape {tuple(w['W_dec'].shape)}; with W_enc {tuple(w['W_enc'].shape)} it must be {(d_sae, d_in)}")
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and int(cfg[key]) != want:
            raise WorkbenchError(f"cfg.json says {key}={cfg[key]} but the weights give {want}")
    arch = str(cfg.get("architecture") or "standard").lower()
    act = str(cfg.get("activation_fn_str") or cfg.get("activation_fn") or "relu").lower()
    k = cfg.get("k") or (cfg.get("activation_fn_kwargs") or {}).get("k")
    if arch == "jumprelu" or "threshold" in w:
        kind = "jumprelu"
    elif arch in ("topk", "batchtopk") or act == "topk":
        kind = "topk"
    elif arch == "standard" and act == "relu":
        kind = "relu"
    else:
        raise WorkbenchError(f"SAELens architecture {arch!r} with activation {act!r} is not supported; "
                             "supported: standard (relu), topk, batchtopk, jumprelu")
    norm = cfg.get("normalize_activations") or "none"
    if norm not in ("none", None):
        raise WorkbenchError(f"SAELens normalize_activations={norm!r} is not supported (only 'none')")
    hook = cfg.get("hook_name") or meta.get("hook_name")
    model = cfg.get("model_name") or meta.get("model_name")
    prepend_bos = cfg.get("prepend_bos", meta.get("prepend_bos", True))
    sae = cls(d_in, d_sae, kind=kind, k=int(k) if kind == "topk" else None, site=site_from_hook(hook), model=model,
              apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)), skip_first=bool(prepend_bos),
              dtype=w["W_enc"].dtype)
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name])
        if kind == "jumprelu":
            sae.threshold.copy_(w["threshold"] if "threshold" in w else torch.zeros(d_sae))
    sae.hook_name = hook
    return sae.to(device).eval()


# ---------------------------------------------------------------------- data streams


class TensorStream:
    """Shuffled batches from an in-memory [rows, d] tensor, forever; resumable."""

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int = 0) -> None:
        if data.ndim != 2 or len(data) < 1:
            raise WorkbenchError(f"training data must be [rows, d], got shape {tuple(data.shape)}")
        self.data, self.batch_size = data, min(batch_size, len(data))
        self.gen = torch.Generator().manual_seed(seed)
        self.perm = torch.randperm(len(data), generator=self.gen)
        self.pos = 0

    def __iter__(self) -> Iterator[torch.Tensor]:
        return self

    def __next__(self) -> torch.Tensor:
        if self.pos + self.batch_size > len(self.data):
            self.perm = torch.randperm(len(self.data), generator=self.gen)
            self.pos = 0
        idx = self.perm[self.pos : self.pos + self.batch_size]
        self.pos += self.batch_size
        return self.data[idx]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"perm": self.perm.clone(), "pos": torch.tensor([self.pos]), "rng": self.gen.get_state()}

    def load_state_dict(self, s: dict[str, torch.Tensor]) -> None:
        self.perm, self.pos = s["perm"].clone(), int(s["pos"][0])
        self.gen.set_state(s["rng"].clone())


class _SkipStream:
    """Any iterable of batches; resumable by replaying (skipping) the consumed batches."""

    def __init__(self, data: Iterable[torch.Tensor]) -> None:
        self.src, self.it, self.n = data, iter(data), 0

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        self.n += 1
        return next(self.it)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"consumed": torch.tensor([self.n])}

    def load_state_dict(self, s) -> None:
        self.it, self.n = iter(self.src), 0
        for _ in range(int(s["consumed"][0])):
            next(self)


def as_stream(data, batch_size: int, seed: int):
    if isinstance(data, torch.Tensor):
        return TensorStream(data, batch_size, seed=seed)
    if hasattr(data, "state_dict") and hasattr(data, "load_state_dict") and hasattr(data, "__next__"):
        return data
    return _SkipStream(data)


# ---------------------------------------------------------------------- training


@register("sae_training")
class TrainingLog(Result):
    """Per-step loss, MSE, L0 and dead fraction of an SAE training run."""


def _aux_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, k_aux: int):
    """TopK auxiliary loss (Gao et al.): the dead features' top k_aux pre-activations
    reconstruct the residual error, normalised by its variance."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    err = (x - x_hat).detach()
    masked = torch.where(dead, pre, torch.full_like(pre, -torch.inf))
    vals, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    err_hat = F.embedding_bag(idx, sae.W_dec, per_sample_weights=F.relu(vals), mode="sum")
    denom = (err - err.mean(0)).pow(2).sum(-1).mean().clamp(min=1e-8)
    return (err_hat - err).pow(2).sum(-1).mean() / denom


@torch.no_grad()
def _resample(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, dead: torch.Tensor, opt, gen) -> int:
    """Re-initialise dead features towards inputs the SAE reconstructs badly (Anthropic's
    resampling): sample inputs with probability ~ squared loss, point the dead decoder rows
    at them, set the encoder to 0.2 x the mean alive encoder norm, zero their Adam state."""
    idx = dead.nonzero()[:, 0]
    if len(idx) == 0:
        return 0
    loss = (x - x_hat).pow(2).sum(-1)
    probs = loss / loss.sum() if float(loss.sum()) > 0 else torch.full_like(loss, 1 / len(loss))
    pick = torch.multinomial(probs.cpu(), len(idx), replacement=True, generator=gen).to(x.device)
    v = x[pick] - sae.b_dec
    v = v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8)
    alive = ~dead
    enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if bool(alive.any()) else torch.tensor(1.0)
    sae.W_dec[idx] = v
    sae.W_enc[:, idx] = v.T * enc_norm * 0.2
    sae.b_enc[idx] = 0
    for p, rows in ((sae.W_dec, (idx, slice(None))), (sae.W_enc, (slice(None), idx)), (sae.b_enc, (idx,))):
        st = opt.state.get(p, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][rows] = 0
    return len(idx)


def train_sae(
    sae: SAE,
    data,
    *,
    steps: int,
    batch_size: int = 256,
    lr: float = 1e-3,
    l1_coeff: float = 1e-3,
    lr_warmup_steps: int = 0,
    lr_decay_steps: int = 0,
    dead_after: int = 10_000,
    aux_k: int | None = None,
    aux_coeff: float = 1 / 32,
    resample_every: int | None = None,
    max_grad_norm: float | None = None,
    checkpoint: str | os.PathLike | None = None,
    checkpoint_every: int = 500,
    seed: int = 0,
    progress: bool = True,
) -> TrainingLog:
    """Train ``sae`` in place for ``steps`` steps of Adam; returns the per-step log.

    ``data`` is a [rows, d] tensor (shuffled batches of ``batch_size``), an
    :class:`~workbench.circuits.buffer.ActivationBuffer`, or any iterator of [batch, d]
    tensors. Loss: summed-squared reconstruction error per token (mean over the batch),
    plus ``l1_coeff`` x the L1 norm of the features (ReLU SAEs; decoder rows have unit
    norm) or ``aux_coeff`` x the TopK auxiliary loss over dead features (TopK /
    BatchTopK, ``aux_k`` of them, default d_in // 2). A feature is dead when it has not
    fired for ``dead_after`` tokens. ReLU SAEs can instead resample dead features every
    ``resample_every`` steps. Decoder rows are kept at unit norm (the gradient along
    each row is removed before the step, the row renormalised after). ``max_grad_norm``
    clips the gradients' total norm before each step (SAELens clips at 1.0; with the same
    clip, initial weights and batches, both reach the same reconstruction error).

    ``checkpoint`` names a folder: every ``checkpoint_every`` steps (and at the end) the
    SAE, the optimiser, the dead-feature counters, the random state and the data
    stream's position are written there; calling again with the same folder resumes
    where it stopped, and the result is bit-identical to an uninterrupted run.
    A tqdm bar shows loss, L0 and the dead fraction.
    """
    from tqdm.auto import tqdm

    if max_grad_norm is not None and not max_grad_norm > 0:
        raise WorkbenchError(f"max_grad_norm must be a positive number or None, got {max_grad_norm}")
    if steps < 0:
        raise WorkbenchError(f"steps must be >= 0, got {steps}")
    if sae.kind == "jumprelu":
        raise WorkbenchError("training JumpReLU SAEs is not supported; train relu, topk or batchtopk")
    torch.manual_seed(seed)
    stream = as_stream(data, batch_size, seed)
    dev = sae.W_dec.device
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=dev)
    gen = torch.Generator().manual_seed(seed + 1)
    log: dict[str, list[float]] = {"loss": [], "mse": [], "l0": [], "dead_fraction": [], "aux": []}
    start = 0
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None and (ck / "train_state.json").exists():
        start, log = _load_checkpoint(ck, sae, opt, since_fired, gen, stream)
    k_aux = aux_k or max(1, sae.d_in // 2)
    sae.train()

    def lr_at(step: int) -> float:
        f = 1.0
        if lr_warmup_steps and step < lr_warmup_steps:
            f = (step + 1) / lr_warmup_steps
        if lr_decay_steps and step >= steps - lr_decay_steps:
            f *= max(0.0, (steps - step) / lr_decay_steps)
        return lr * f

    bar = tqdm(total=steps, initial=start, desc=f"SAE {sae.kind} {sae.site or ''}".strip(), disable=not progress)
    try:
        for step in range(start, steps):
            x = next(stream).to(dev, sae.W_dec.dtype)
            sae.check_input(x, "training batch")
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            pre = sae.pre(x)
            aux = x.new_zeros(())
            if sae.kind == "topk":
                vals, idx = pre.topk(sae.k, dim=-1)
                vals = F.relu(vals)
                x_hat = sae.decode_sparse(vals, idx)
                fired = torch.zeros(sae.d_sae, dtype=torch.bool, device=dev)
                fired[idx[vals > 0]] = True
                l0 = (vals > 0).sum(-1).float().mean()
                sparsity = x.new_zeros(())
            else:
                if sae.kind == "relu":
                    f = F.relu(pre)
                else:
                    flat = F.relu(pre)
                    n = min(flat.numel(), sae.k * flat.shape[0])
                    v, i = flat.flatten().topk(n)
                    f = torch.zeros_like(flat).flatten().scatter(0, i, v).reshape(flat.shape)
                    with torch.no_grad():
                        pos = v[v > 0]
                        if len(pos):
                            t = pos.min()
                            sae.threshold.copy_(t if step == 0 else 0.99 * sae.threshold + 0.01 * t)
                x_hat = sae.decode(f)
                fired = (f > 0).any(0)
                l0 = (f > 0).sum(-1).float().mean()
                sparsity = f.sum(-1).mean() if sae.kind == "relu" else x.new_zeros(())
            mse = (x_hat - x).pow(2).sum(-1).mean()
            since_fired += len(x)
            since_fired[fired] = 0
            dead = since_fired >= dead_after
            if sae.kind in ("topk", "batchtopk") and aux_coeff > 0:
                aux = _aux_loss(sae, x, x_hat, pre, dead, k_aux)
            loss = mse + l1_coeff * sparsity + aux_coeff * aux
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():  # no gradient along each decoder row (its norm is fixed)
                g, w = sae.W_dec.grad, sae.W_dec
                g.sub_((g * w).sum(1, keepdim=True) * w)
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(sae.parameters(), max_grad_norm)
            opt.step()
            sae.normalize_decoder()
            if sae.kind == "relu" and resample_every and (step + 1) % resample_every == 0:
                if _resample(sae, x, x_hat.detach(), dead, opt, gen):
                    since_fired[dead] = 0
            dead_frac = float(dead.float().mean())
            log["loss"].append(float(loss.detach()))
            log["mse"].append(float(mse.detach()))
            log["l0"].append(float(l0))
            log["dead_fraction"].append(dead_frac)
            log["aux"].append(float(aux.detach()))
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{float(loss.detach()):.4g}", L0=f"{float(l0):.1f}", dead=f"{dead_frac:.1%}")
            if ck is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
                _save_checkpoint(ck, step + 1, sae, opt, since_fired, gen, stream, log)
    finally:
        bar.close()
        sae.eval()
    n = len(log["loss"])
    params = {"kind": sae.kind, "d_in": sae.d_in, "d_sae": sae.d_sae, "k": sae.k, "lr": lr, "l1_coeff": l1_coeff,
              "steps": steps, "batch_size": batch_size, "dead_after": dead_after, "aux_coeff": aux_coeff,
              "resample_every": resample_every, "max_grad_norm": max_grad_norm, "site": sae.site}
    return TrainingLog(dims={"step": list(range(n))},
                       data={k: (("step",), np.asarray(v, dtype=np.float64)) for k, v in log.items()},
                       attrs=params, provenance=provenance(seed=seed, params=params))


def _optimizer_tensors(opt, sae: SAE) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in sae.named_parameters():
        st = opt.state.get(p, {})
        for key, v in st.items():
            out[f"opt.{name}.{key}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def _save_checkpoint(ck: Path, step: int, sae: SAE, opt, since_fired, gen, stream, log) -> None:
    from safetensors.torch import save_file

    ck.mkdir(parents=True, exist_ok=True)
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    tensors.update(_optimizer_tensors(opt, sae))
    tensors["since_fired"] = since_fired.cpu()
    tensors["rng.resample"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update({f"data.{k}": v.detach().cpu().contiguous() for k, v in stream.state_dict().items()})
    tmp = ck / "train_state.safetensors.tmp"
    save_file(tensors, tmp)
    meta = {"step": step, "config": sae.config(), "log": log}
    jtmp = ck / "train_state.json.tmp"
    jtmp.write_text(json.dumps(meta))
    os.replace(tmp, ck / "train_state.safetensors")
    os.replace(jtmp, ck / "train_state.json")


def _load_checkpoint(ck: Path, sae: SAE, opt, since_fired, gen, stream):
    from safetensors.torch import load_file

    meta = json.loads((ck / "train_state.json").read_text())
    cfg = sae.config()
    saved = meta["config"]
    if {k: saved.get(k) for k in ("d_in", "d_sae", "kind", "k")} != {k: cfg[k] for k in ("d_in", "d_sae", "kind", "k")}:
        raise WorkbenchError(f"checkpoint {str(ck)!r} is for {saved}, not this SAE ({cfg}); use another folder")
    t = load_file(ck / "train_state.safetensors")
    sae.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("sae.")})
    dev = sae.W_dec.device
    for name, p in sae.named_parameters():
        keys = [k for k in t if k.startswith(f"opt.{name}.")]
        if keys:
            st = {}
            for k in keys:
                key = k[len(f"opt.{name}."):]
                st[key] = t[k] if key == "step" else t[k].to(dev)
            opt.state[p] = st
    since_fired.copy_(t["since_fired"])
    gen.set_state(t["rng.resample"])
    torch.set_rng_state(t["rng.torch"])
    stream.load_state_dict({k[5:]: v for k, v in t.items() if k.startswith("data.")})
    return int(meta["step"]), meta["log"]
