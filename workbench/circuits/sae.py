"""Sparse autoencoders: ReLU + L1, TopK and BatchTopK, trained on streamed activations;
JumpReLU and gated SAEs loaded from SAELens.

Conventions (those of SAELens, so its dictionaries load as they are):
``W_enc`` [d_in, d_sae], ``b_enc`` [d_sae], ``W_dec`` [d_sae, d_in] (each feature's
decoder direction is a row, kept at unit norm while training), ``b_dec`` [d_in],
``threshold`` ([d_sae] for JumpReLU; one number, BatchTopK's inference threshold).

    pre = (x - b_dec) @ W_enc + b_enc         # b_dec subtracted when apply_b_dec_to_input
    f = act(pre)
    x_hat = f @ W_dec + b_dec

``act`` is ReLU (``kind="relu"``), keep the k largest per token then ReLU (``"topk"``),
keep the k * batch largest over the batch while training and ``relu(pre) * (pre >
threshold)`` at inference (``"batchtopk"``), ``relu(pre) * (pre > threshold)`` per
feature (``"jumprelu"``), or ``(pre > 0) * relu((x - b_dec) @ (W_enc * exp(r_mag)) +
b_mag)`` (``"gated"``: ``b_enc`` is the gate's bias, SAELens's ``b_gate``).

A TopK SAE decodes sparsely (only k rows of ``W_dec`` per token, through
``embedding_bag``), so its decoder costs k / d_sae of a dense one.

Persistence (safetensors and JSON only, no pickle): :meth:`SAE.save` writes a folder
whose ``cfg.json`` is written last and names the weights file by its SHA-256 (see
:mod:`workbench.storage`), so an interrupted save leaves the old SAE or the new
one, never a mix; ``save(path, format="saelens")`` writes SAELens's inference layout
(``cfg.json`` + ``sae_weights.safetensors``) that ``sae_lens.SAE.load_from_disk``
reads. :meth:`SAE.load` reads both, and every folder SAELens 6 writes: inference saves
and training checkpoints of standard, TopK, BatchTopK, JumpReLU and gated SAEs, with
``rescale_acts_by_decoder_norm``, ``log_threshold``, ``apply_b_dec_to_input`` and the
normalisations that fold into the weights honoured (an unsupported setting is a
WorkbenchError naming its key).
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from workbench import storage
from workbench.errors import WorkbenchError, one_of
from workbench.memory import check_budget
from workbench.results import Result, provenance, register

KINDS = ("relu", "topk", "batchtopk", "jumprelu", "gated")
TRAINABLE_KINDS = ("relu", "topk", "batchtopk")
FORMAT = "workbench-sae"
FORMAT_VERSION = 2
SAE_MANIFEST, SAE_PREFIX = "cfg.json", "sae"
# the SAELens on-disk format written (``metadata.sae_lens_version``; below 6 SAELens reads a config as pre-6)
SAELENS_FORMAT_VERSION = "6.0.0"


class SAE(torch.nn.Module):
    """A sparse autoencoder over ``d_in``-wide vectors with ``d_sae`` features."""

    def __init__(
        self,
        d_in: int,
        d_sae: int,
        *,
        kind: str = "topk",
        k: int | float | None = None,
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
        if not (is_integer(d_in) and is_integer(d_sae)) or d_in < 1 or d_sae < 1:
            raise WorkbenchError(f"need integers d_in >= 1 and d_sae >= 1, got d_in={d_in!r}, d_sae={d_sae!r}")
        d_in, d_sae = int(d_in), int(d_sae)
        if kind == "topk":
            if not (is_integer(k) and 1 <= k <= d_sae):
                raise WorkbenchError(f"a topk SAE needs an integer 1 <= k <= d_sae ({d_sae}), got k={k!r}")
            k = int(k)
        elif kind == "batchtopk":
            if not (isinstance(k, numbers.Real) and not isinstance(k, bool) and 0 < k <= d_sae):
                raise WorkbenchError(f"a batchtopk SAE needs 0 < k <= d_sae ({d_sae}) (k may be fractional: "
                                     f"int(k x rows) features are kept per batch), got k={k!r}")
            k = int(k) if float(k).is_integer() else float(k)
        else:
            k = None
        self.d_in, self.d_sae, self.kind, self.k = d_in, d_sae, kind, k
        self.site, self.model_name = site, model
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.skip_first = bool(skip_first)
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(d_sae, d_in, generator=g, dtype=torch.float32)
        w = w / w.norm(dim=1, keepdim=True)
        self.W_dec = torch.nn.Parameter(w.to(dtype))
        self.W_enc = torch.nn.Parameter(w.T.clone().to(dtype))
        self.b_enc = torch.nn.Parameter(torch.zeros(d_sae, dtype=dtype))
        self.b_dec = torch.nn.Parameter(torch.zeros(d_in, dtype=dtype))
        if kind == "gated":
            self.r_mag = torch.nn.Parameter(torch.zeros(d_sae, dtype=dtype))
            self.b_mag = torch.nn.Parameter(torch.zeros(d_sae, dtype=dtype))
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

    def sae_in(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's input: ``x`` (cast), minus ``b_dec`` when apply_b_dec_to_input."""
        self.check_input(x)
        x = x.to(self.W_enc.dtype)
        return x - self.b_dec if self.apply_b_dec_to_input else x

    def pre(self, x: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [..., d_sae] (for a gated SAE, the gate's)."""
        return self.sae_in(x) @ self.W_enc + self.b_enc

    def encode_sparse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """TopK only: (values, indices) [..., k] of the active features."""
        if self.kind != "topk":
            raise WorkbenchError(f"encode_sparse is for topk SAEs; this one is {self.kind}")
        vals, idx = self.pre(x).topk(self.k, dim=-1)
        return F.relu(vals), idx

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations [..., d_sae]."""
        if self.kind == "gated":
            s = self.sae_in(x)
            gate = (s @ self.W_enc + self.b_enc) > 0
            return gate * F.relu(s @ (self.W_enc * self.r_mag.exp()) + self.b_mag)
        pre = self.pre(x)
        if self.kind == "relu":
            return F.relu(pre)
        if self.kind == "topk":
            vals, idx = pre.topk(self.k, dim=-1)
            return torch.zeros_like(pre).scatter(-1, idx, F.relu(vals))
        if self.kind == "batchtopk" and self.training:
            return batch_topk(pre, self.k)
        return F.relu(pre) * (pre > self.threshold)  # jumprelu; batchtopk at inference

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
        self.fold_decoder_norms(self.W_dec.norm(dim=1).clamp(min=1e-12))

    @torch.no_grad()
    def fold_decoder_norms(self, norms: torch.Tensor) -> None:
        """Divide decoder row i by ``norms[i]`` and multiply feature i's encoder column and
        bias(es) by it: reconstructions are unchanged, activations scale by ``norms``."""
        self.W_dec.div_(norms[:, None].to(self.W_dec.dtype))
        self.W_enc.mul_(norms[None, :].to(self.W_enc.dtype))
        self.b_enc.mul_(norms.to(self.b_enc.dtype))
        if self.kind == "gated":
            self.b_mag.mul_(norms.to(self.b_mag.dtype))
        if self.kind == "jumprelu":
            self.threshold.mul_(norms.to(self.threshold.dtype))

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | os.PathLike, *, format: str = "workbench") -> str:
        """Write this SAE to the folder ``path``.

        ``format="workbench"``: ``cfg.json`` + ``sae-<hash>.safetensors``; ``cfg.json``,
        written last, is the commit point, so an interrupted save leaves the previous SAE
        intact. An existing folder is accepted only if it is empty or holds an SAE
        written here; files in it that this method did not write are never touched.

        ``format="saelens"``: SAELens 6's inference layout (``cfg.json`` +
        ``sae_weights.safetensors``; standard, topk, jumprelu or gated; a BatchTopK SAE
        is written as JumpReLU with its threshold, as SAELens does). Written into a
        temporary folder that is renamed into place; ``path`` must not exist or be empty.
        """
        if format == "saelens":
            return self._save_saelens(Path(path))
        if format != "workbench":
            raise one_of("SAE save format", format, ("workbench", "saelens"))
        path = Path(path)
        check_sae_folder_writable(path)
        legacy = path / "sae.safetensors"  # the weights of a version-1 folder (before content names)
        legacy_ours = legacy.exists() and storage.read_json(path / SAE_MANIFEST).get("version", 1) == 1
        storage.commit(path, SAE_MANIFEST, {"format": FORMAT, "version": FORMAT_VERSION, **self.config()},
                       self.state_dict(), prefix=SAE_PREFIX)
        if legacy_ours:
            storage.remove(legacy)
        return str(path)

    @classmethod
    def load(cls, path: str | os.PathLike, *, device: str | torch.device = "cpu") -> "SAE":
        """Load a folder written by :meth:`save` or by SAELens (see the module docstring)."""
        path = Path(path)
        cfg_path = path / "cfg.json"
        if not path.is_dir() or not cfg_path.is_file():
            raise WorkbenchError(f"no SAE at {str(path)!r}: expected a folder with cfg.json and the weights "
                                 "(sae-<hash>.safetensors from workbench, sae_weights.safetensors from SAELens)")
        cfg = storage.read_json(cfg_path, "SAE config")
        if cfg.get("format") == FORMAT:
            return _from_workbench(cls, path, cfg).to(device).eval()
        return _from_saelens(cls, path, cfg).to(device).eval()

    def _save_saelens(self, path: Path) -> str:
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise WorkbenchError(f"{str(path)!r} exists and is not an empty folder; SAELens-format saves never "
                                 "overwrite: pick a new folder")
        cfg, tensors = saelens_layout(self)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}{storage.TMP_MARK}{uuid.uuid4().hex[:12]}"
        tmp.mkdir()
        try:
            storage.write_tensors(tmp / "sae_weights.safetensors", tensors)
            storage.write_text(tmp / "cfg.json", json.dumps(cfg, indent=1, allow_nan=False))
            if path.exists():
                path.rmdir()  # empty (checked above)
            storage.replace(tmp, path)  # the commit point
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)
        return str(path)


def is_integer(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def batch_topk(pre: torch.Tensor, k: float) -> torch.Tensor:
    """BatchTopK: of relu(pre) over the whole batch keep the int(k x rows) largest."""
    flat = F.relu(pre.reshape(-1, pre.shape[-1]))
    n = min(flat.numel(), int(k * flat.shape[0]))
    vals, idx = flat.flatten().topk(n)
    return torch.zeros_like(flat).flatten().scatter(0, idx, vals).reshape(pre.shape)


# ---------------------------------------------------------------------- workbench folders


def check_sae_folder_writable(path: Path) -> None:
    """Refuse to save into anything but a new or empty folder or one holding an SAE saved here."""
    if path.exists() and not path.is_dir():
        raise WorkbenchError(f"cannot save an SAE to {str(path)!r}: it is a file, not a folder")
    if not path.exists():
        return
    names = [p.name for p in path.iterdir()]
    if not names:
        return
    cfg_path = path / SAE_MANIFEST
    if cfg_path.exists():
        try:
            ours = storage.read_json(cfg_path).get("format") == FORMAT
        except WorkbenchError:
            ours = False
    else:  # only the leftovers of an interrupted first save?
        ours = all(storage.is_own_file(n, SAE_MANIFEST, SAE_PREFIX) for n in names)
    if not ours:
        raise WorkbenchError(f"cannot save an SAE to {str(path)!r}: the folder holds files that SAE.save did not "
                             f"write ({', '.join(sorted(names)[:5])}{', ...' if len(names) > 5 else ''}); "
                             "pick a new or empty folder")


def _from_workbench(cls, path: Path, cfg: dict) -> SAE:
    cfg_path = path / SAE_MANIFEST
    keys = ("d_in", "d_sae", "kind", "k", "site", "model", "apply_b_dec_to_input", "skip_first")
    storage.require_keys(cfg, keys, cfg_path)
    dtype = cfg.get("dtype", "float32")
    if not isinstance(getattr(torch, str(dtype), None), torch.dtype):
        raise WorkbenchError(f"{str(cfg_path)!r}: unknown dtype {dtype!r}")
    try:
        sae = cls(cfg["d_in"], cfg["d_sae"], kind=cfg["kind"], k=cfg["k"], site=cfg["site"], model=cfg["model"],
                  apply_b_dec_to_input=cfg["apply_b_dec_to_input"], skip_first=cfg["skip_first"],
                  dtype=getattr(torch, dtype))
    except WorkbenchError as e:
        raise WorkbenchError(f"{str(cfg_path)!r}: {e}") from None
    if cfg.get("version", 1) >= 2:
        tensors = storage.read_committed(path, SAE_MANIFEST, "SAE config", manifest=cfg)
        wpath = path / cfg["tensors"]["file"]
    else:  # written before content-named weights
        wpath = path / "sae.safetensors"
        tensors = storage.load_tensors(wpath)
    storage.check_tensors(tensors, {k: tuple(v.shape) for k, v in sae.state_dict().items()}, wpath)
    sae.load_state_dict(tensors)
    return sae


# ---------------------------------------------------------------------- SAELens folders

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


def hook_from_site(site: str | None) -> str | None:
    """workbench site -> TransformerLens hook name (``resid_pre.8`` -> ``blocks.8.hook_resid_pre``)."""
    if not site:
        return None
    if site == "embed":
        return "hook_embed"
    m = re.fullmatch(r"([a-z_]+)\.(\d+)", site)
    hooks = {v: k for k, v in _TL_HOOKS.items() if v}
    if m and m.group(1) in hooks:
        return f"blocks.{m.group(2)}.{hooks[m.group(1)]}"
    return None


SAELENS_ARCHITECTURES = ("standard", "topk", "batchtopk", "matryoshka_batchtopk", "jumprelu", "gated")
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _saelens_cfg(cfg: dict, cfg_path: Path) -> dict:
    """A flat view of a SAELens cfg.json (6.x, or older: renamed keys, metadata at top level)."""
    meta = cfg.get("metadata") or {}
    if not isinstance(meta, dict):
        raise WorkbenchError(f"{str(cfg_path)!r}: 'metadata' must be a JSON object, got {type(meta).__name__}")
    version = str(cfg.get("sae_lens_version") or meta.get("sae_lens_version") or "0")
    m = re.match(r"(\d+)", version)
    out = dict(cfg)
    if not m or int(m.group(1)) < 6:  # SAELens < 6 wrote other names
        for old, new in (("hook_point", "hook_name"), ("hook_point_head_index", "hook_head_index"),
                         ("activation_fn_str", "activation_fn")):
            if old in out and new not in out:
                out[new] = out[old]
        act = str(out.get("activation_fn") or "relu")
        kwargs = out.get("activation_fn_kwargs") or {}
        if act == "topk" and kwargs.get("k") is not None:
            out["architecture"], out["k"] = "topk", kwargs["k"]
        elif act != "relu" and out.get("architecture", "standard") == "standard":
            raise WorkbenchError(f"{str(cfg_path)!r}: activation_fn={act!r} is not supported for a standard SAE "
                                 "(supported: relu, topk with activation_fn_kwargs.k)")
        if isinstance(out.get("normalize_activations"), bool):
            out["normalize_activations"] = "expected_average_only_in" if out["normalize_activations"] else "none"
    for key in ("hook_name", "model_name", "prepend_bos", "hook_head_index"):
        if key not in out and key in meta:
            out[key] = meta[key]
    out["metadata"] = meta
    return out


def _fold_whitening(sae: SAE, mean: torch.Tensor, M: torch.Tensor, M_inv: torch.Tensor) -> None:
    """Absorb z = (x - mean) @ M (and x = z @ M_inv + mean) into the weights, so the SAE
    takes raw activations (SAELens's ``fold_activation_whitening``)."""
    dt = torch.promote_types(sae.W_enc.dtype, M.dtype)
    mean, M, M_inv = mean.to(dt), M.to(dt), M_inv.to(dt)
    with torch.no_grad():
        W_enc = M @ sae.W_enc.to(dt)
        sae.W_enc.copy_(W_enc)
        if not sae.apply_b_dec_to_input:
            shift = mean @ W_enc
            sae.b_enc.sub_(shift.to(sae.b_enc.dtype))
            if sae.kind == "gated":
                sae.b_mag.sub_((shift * sae.r_mag.to(dt).exp()).to(sae.b_mag.dtype))
        sae.W_dec.copy_(sae.W_dec.to(dt) @ M_inv)
        sae.b_dec.copy_(sae.b_dec.to(dt) @ M_inv + mean)


def _from_saelens(cls, path: Path, raw_cfg: dict) -> SAE:
    """An SAE from a folder SAELens 6 (or older) wrote: an inference save or a training checkpoint."""
    cfg_path = path / "cfg.json"
    cfg = _saelens_cfg(raw_cfg, cfg_path)
    meta = cfg["metadata"]
    arch = str(cfg.get("architecture") or "standard")
    if arch not in SAELENS_ARCHITECTURES:
        raise WorkbenchError(f"{str(cfg_path)!r}: SAELens architecture={arch!r} is not supported; "
                             f"supported: {', '.join(SAELENS_ARCHITECTURES)}")
    wpath = path / "sae_weights.safetensors"
    if not wpath.is_file():
        raise WorkbenchError(f"{str(path)!r} has a cfg.json but no sae_weights.safetensors (SAELens) and its "
                             f"cfg.json is not a workbench one (no \"format\": {FORMAT!r})")
    w = storage.load_tensors(wpath)
    # weights SAELens once stored that are plain numbers of the config
    if "scaling_factor" in w:  # SAELens < 6 "finetuning scaling factor": decode(f * s)
        s = w.pop("scaling_factor")
        if not torch.allclose(s, torch.ones_like(s)):
            if "W_dec" in w and s.shape == (w["W_dec"].shape[0],):
                w["W_dec"] = w["W_dec"] * s[:, None].to(w["W_dec"].dtype)  # folded: same reconstructions
            else:
                raise WorkbenchError(f"{str(wpath)!r}: scaling_factor has shape {tuple(s.shape)}; expected [d_sae]")
    if "log_threshold" in w:
        if "threshold" in w:
            raise WorkbenchError(f"{str(wpath)!r} holds both threshold and log_threshold; expected one")
        w["threshold"] = w.pop("log_threshold").exp()
    if "W_enc" not in w or w["W_enc"].ndim != 2:
        raise WorkbenchError(f"{str(wpath)!r}: no 2-d W_enc [d_in, d_sae] (tensors: {sorted(w)})")
    d_in, d_sae = (int(n) for n in w["W_enc"].shape)
    for key, want in (("d_in", d_in), ("d_sae", d_sae)):
        if key in cfg and cfg[key] != want:
            raise WorkbenchError(f"{str(cfg_path)!r} says {key}={cfg[key]} but W_enc in {wpath.name} "
                                 f"({d_in} x {d_sae}) gives {want}")
    gate_bias = "b_gate" if arch == "gated" else "b_enc"
    want = {"W_enc": (d_in, d_sae), gate_bias: (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    if arch == "jumprelu":
        want["threshold"] = (d_sae,)
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        want["topk_threshold"] = ()
    elif arch == "gated":
        want.update(r_mag=(d_sae,), b_mag=(d_sae,))
    storage.check_tensors(w, want, wpath)

    # the settings that change what the SAE computes
    norm = cfg.get("normalize_activations") or "none"
    scale, whitening = None, None
    if norm == "expected_average_only_in":
        scaler = path / "activation_scaler.json"
        factor = storage.read_json(scaler, "SAELens activation scaler").get("scaling_factor") \
            if scaler.exists() else None
        if not isinstance(factor, (int, float)) or not math.isfinite(factor) or factor <= 0:
            raise WorkbenchError(f"{str(cfg_path)!r}: normalize_activations='expected_average_only_in' needs the "
                                 "activation scaling factor, and the folder has no activation_scaler.json holding one; "
                                 "fold it into the weights first (SAELens: sae.fold_activation_norm_scaling_factor)")
        scale = float(factor)
    elif norm == "covariance_whitening":
        wfile = path / "activation_whitening.safetensors"
        if not wfile.exists():
            raise WorkbenchError(f"{str(cfg_path)!r}: normalize_activations='covariance_whitening' needs "
                                 "activation_whitening.safetensors (mean, matrix, inverse_matrix) beside it; "
                                 "fold it into the weights first (SAELens: sae.fold_activation_whitening)")
        whitening = storage.load_tensors(wfile)
        storage.check_tensors(whitening, {"mean": (d_in,), "matrix": (d_in, d_in), "inverse_matrix": (d_in, d_in)},
                              wfile)
    elif norm != "none":
        raise WorkbenchError(f"{str(cfg_path)!r}: normalize_activations={norm!r} is not supported (it normalises each "
                             "input at run time, which cannot be folded into the weights); supported: 'none', "
                             "'expected_average_only_in' and 'covariance_whitening' (folded into the weights)")
    reshape = cfg.get("reshape_activations") or "none"
    if reshape not in ("none", "hook_z"):  # hook_z: heads concatenated, as workbench's z sites are
        raise WorkbenchError(f"{str(cfg_path)!r}: reshape_activations={reshape!r} is not supported; "
                             "supported: 'none', 'hook_z'")
    dtype = cfg.get("dtype")
    if dtype is None:
        dt = w["W_enc"].dtype
    elif str(dtype).replace("torch.", "") in _DTYPES:
        dt = _DTYPES[str(dtype).replace("torch.", "")]
    else:
        raise WorkbenchError(f"{str(cfg_path)!r}: dtype={dtype!r} is not supported; supported: {list(_DTYPES)}")

    wb = meta.get("workbench") if isinstance(meta.get("workbench"), dict) else {}
    if arch == "standard":
        kind, k = "relu", None
    elif arch == "topk":
        kind, k = "topk", cfg.get("k")
    elif arch in ("batchtopk", "matryoshka_batchtopk"):
        kind, k = "batchtopk", cfg.get("k")
    elif arch == "jumprelu":
        kind, k = "jumprelu", None
        thr = w["threshold"]
        if wb.get("kind") == "batchtopk" and bool((thr == thr[0]).all()):  # a BatchTopK SAE saved here
            kind, k = "batchtopk", wb.get("k")
            w["threshold"] = thr[:1]
    else:
        kind, k = "gated", None
    if kind in ("topk", "batchtopk") and k is None:
        raise WorkbenchError(f"{str(cfg_path)!r}: a {arch} SAE needs its k (key 'k')")
    if kind == "topk" and isinstance(k, float) and k.is_integer():
        k = int(k)
    rescale = bool(cfg.get("rescale_acts_by_decoder_norm", False)) and arch in (
        "topk", "batchtopk", "matryoshka_batchtopk")
    hook = cfg.get("hook_name")
    site = wb["site"] if "site" in wb else site_from_hook(hook)
    if cfg.get("hook_head_index") is not None:
        site = None  # one head's slice of z: no workbench site holds it
    try:
        sae = cls(d_in, d_sae, kind=kind, k=k, site=site, model=wb.get("model", cfg.get("model_name")),
                  apply_b_dec_to_input=bool(cfg.get("apply_b_dec_to_input", True)),
                  skip_first=bool(wb.get("skip_first", cfg.get("prepend_bos", True))), dtype=dt)
    except WorkbenchError as e:
        raise WorkbenchError(f"{str(cfg_path)!r}: {e}") from None
    with torch.no_grad():
        for name in ("W_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(w[name])
        sae.b_enc.copy_(w[gate_bias])
        if kind == "gated":
            sae.r_mag.copy_(w["r_mag"])
            sae.b_mag.copy_(w["b_mag"])
        if "threshold" in w:
            sae.threshold.copy_(w["threshold"])
        if "topk_threshold" in w:
            sae.threshold.fill_(float(w["topk_threshold"]))
        # in SAELens's order: the activation scale, the decoder norms, the whitening
        if scale is not None:
            sae.W_enc.mul_(scale)
            sae.W_dec.div_(scale)
            sae.b_dec.div_(scale)
            if rescale and kind == "batchtopk":  # its threshold is in units of pre x |W_dec row|
                sae.threshold.div_(scale)
        if rescale:  # pre x |W_dec row| selects, f / |W_dec row| decodes: fold the norms in
            norms = sae.W_dec.norm(dim=-1).clamp(min=1e-8)
            sae.W_dec.div_(norms[:, None])
            sae.W_enc.mul_(norms[None, :])
            sae.b_enc.mul_(norms)
        if whitening is not None:
            _fold_whitening(sae, whitening["mean"], whitening["matrix"], whitening["inverse_matrix"])
    sae.hook_name = hook
    return sae


def saelens_layout(sae: SAE) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The cfg.json and weights of SAELens 6's inference format for ``sae``."""
    arch = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu",
            "gated": "gated"}[sae.kind]
    sd = {k: v.detach().clone() for k, v in sae.state_dict().items()}
    tensors = {"W_enc": sd["W_enc"], "W_dec": sd["W_dec"], "b_dec": sd["b_dec"]}
    tensors["b_gate" if sae.kind == "gated" else "b_enc"] = sd["b_enc"]
    if sae.kind == "gated":
        tensors.update(r_mag=sd["r_mag"], b_mag=sd["b_mag"])
    if sae.kind == "jumprelu":
        tensors["threshold"] = sd["threshold"]
    if sae.kind == "batchtopk":
        tensors["threshold"] = sd["threshold"].expand(sae.d_sae).clone()
    hook = hook_from_site(sae.site)
    cfg = {
        "architecture": arch, "d_in": sae.d_in, "d_sae": sae.d_sae,
        "dtype": str(sae.W_dec.dtype).replace("torch.", ""), "device": "cpu",
        "apply_b_dec_to_input": sae.apply_b_dec_to_input, "normalize_activations": "none",
        "reshape_activations": "hook_z" if hook and hook.endswith("hook_z") else "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION, "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "model_name": sae.model_name, "hook_name": hook, "prepend_bos": sae.skip_first,
            "workbench": {"kind": sae.kind, "k": sae.k, "site": sae.site, "model": sae.model_name,
                          "skip_first": sae.skip_first},
        },
    }
    if arch == "topk":
        cfg.update(k=sae.k, rescale_acts_by_decoder_norm=False)
    return cfg, tensors


# ---------------------------------------------------------------------- data streams


class TensorStream:
    """Shuffled batches from an in-memory [rows, d] tensor, forever; resumable."""

    def __init__(self, data: torch.Tensor, batch_size: int, *, seed: int = 0) -> None:
        if not isinstance(data, torch.Tensor) or data.ndim != 2 or len(data) < 1:
            raise WorkbenchError(f"training data must be a [rows, d] tensor with rows >= 1, got "
                                 f"{tuple(data.shape) if isinstance(data, torch.Tensor) else type(data).__name__}")
        check_batch_size(batch_size)
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
        if set(s) != {"perm", "pos", "rng"} or s["perm"].shape != (len(self.data),):
            raise WorkbenchError(f"the saved stream state is for {tuple(s['perm'].shape)[0] if 'perm' in s else '?'} "
                                 f"rows of data; this data has {len(self.data)} rows: resume with the same data")
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
        if "consumed" not in s:
            raise WorkbenchError(f"the saved stream state ({sorted(s)}) is not that of a plain iterator of batches: "
                                 "resume with the same kind of data")
        self.it, self.n = iter(self.src), 0
        for _ in range(int(s["consumed"][0])):
            next(self)


def check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise WorkbenchError(f"batch_size must be an integer >= 1, got {batch_size!r}")


def as_stream(data, batch_size: int, seed: int):
    if isinstance(data, torch.Tensor):
        return TensorStream(data, batch_size, seed=seed)
    if hasattr(data, "state_dict") and hasattr(data, "load_state_dict") and hasattr(data, "__next__"):
        return data
    return _SkipStream(data)


def check_finite(x: torch.Tensor, what: str) -> None:
    """Raise a WorkbenchError naming ``what`` and the first bad row if ``x`` [rows, d] holds NaN or inf."""
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        rows = bad.reshape(len(x), -1).any(-1).nonzero()[:, 0]
        raise WorkbenchError(f"{what} holds NaN or inf in {len(rows)} of its {len(x)} rows "
                             f"(first: row {int(rows[0])}); remove or fix those rows before training")


# ---------------------------------------------------------------------- training


@register("sae_training")
class TrainingLog(Result):
    """Per-step loss, MSE, L0 and dead fraction of an SAE training run."""


class SparsePre(torch.autograd.Function):
    """``pre.gather(-1, idx)`` for the encoder pre-activations ``pre = xc @ W_enc + b_enc``
    (computed beforehand without a graph), differentiable in ``xc``, ``W_enc`` and
    ``b_enc``. Its backward touches only the gathered entries: [rows, k] gradients give
    ``W_enc``'s gradient by index_add (rows x k x d_in work) and ``xc``'s through
    ``embedding_bag``, where autograd through the dense ``pre`` would run two dense
    [rows, d_in] x [d_in, d_sae] products on a gradient that is zero outside the k
    entries. Gradients accumulate in float32 at least."""

    ROWS = 256  # rows per index_add chunk (bounds the [rows, k, d_in] temporary)

    @staticmethod
    def forward(ctx, xc, W_enc, b_enc, pre, idx):  # noqa: D102
        ctx.save_for_backward(xc, W_enc, idx)
        return pre.gather(-1, idx)

    @staticmethod
    def backward(ctx, g):  # noqa: D102
        xc, W_enc, idx = ctx.saved_tensors
        d, n = W_enc.shape
        acc = torch.promote_types(g.dtype, torch.float32)
        g = g.to(acc)
        gx = gW = gb = None
        if ctx.needs_input_grad[2]:
            gb = torch.zeros(n, dtype=acc, device=g.device).index_add_(0, idx.reshape(-1), g.reshape(-1))
            gb = gb.to(W_enc.dtype)
        if ctx.needs_input_grad[1]:
            gWT = torch.zeros(n, d, dtype=acc, device=g.device)
            x = xc.to(acc)
            for a in range(0, len(x), SparsePre.ROWS):
                b = a + SparsePre.ROWS
                gWT.index_add_(0, idx[a:b].reshape(-1), (g[a:b, :, None] * x[a:b, None, :]).reshape(-1, d))
            gW = gWT.t().to(W_enc.dtype).contiguous()
        if ctx.needs_input_grad[0]:
            gx = F.embedding_bag(idx, W_enc.t().to(acc).contiguous(), per_sample_weights=g, mode="sum")
            gx = gx.to(xc.dtype)
        return gx, gW, gb, None, None


def _aux_loss(sae: SAE, x: torch.Tensor, x_hat: torch.Tensor, pre: torch.Tensor, dead: torch.Tensor, k_aux: int,
              pre_at=None):
    """TopK auxiliary loss (Gao et al.): the dead features' top k_aux pre-activations
    reconstruct the residual error, normalised by its variance. ``pre_at(idx)`` gives the
    differentiable pre-activations at ``idx`` (default: gathered from ``pre``)."""
    n_dead = int(dead.sum())
    if n_dead == 0:
        return x.new_zeros(())
    err = (x - x_hat).detach()
    masked = torch.where(dead, pre.detach(), torch.full_like(pre, -torch.inf, requires_grad=False))
    _, idx = masked.topk(min(k_aux, n_dead), dim=-1)
    vals = pre_at(idx) if pre_at is not None else pre.gather(-1, idx)
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


def training_bytes(sae: SAE, batch_size: int) -> int:
    """Bytes one step of :func:`train_sae` holds: the parameters, their gradients and two
    Adam moments, and per batch row the dense pre-activations, features and gradient of
    each ([batch_size, d_sae], float32 at least) and a few [batch_size, d_in] tensors
    (input, reconstruction, error, gradient)."""
    params = sum(p.numel() * p.element_size() for p in sae.parameters())
    width = max(4, sae.W_dec.element_size())
    return 4 * params + batch_size * width * (4 * sae.d_sae + 4 * sae.d_in)


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
    max_bytes: int | None = None,
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

    A batch holding NaN or inf, or a loss that is not finite, stops training with a
    WorkbenchError naming the step, before the weights are touched.

    ``checkpoint`` names a folder: every ``checkpoint_every`` steps (and at the end) the
    SAE, the optimiser, the dead-feature counters, the random state and the data
    stream's position are written there (``train_state.json``, written last, names the
    tensors file by hash: an interrupted write leaves the previous checkpoint whole).
    Calling again with the same folder resumes where it stopped, and the result is
    bit-identical to an uninterrupted run; the call's hyperparameters must match the
    checkpoint's (a WorkbenchError lists those that differ).
    A tqdm bar shows loss, L0 and the dead fraction.

    ``max_bytes``: the memory budget of training (the SAE, its gradients and Adam's two
    moments, and one batch's dense [batch_size, d_sae] pre-activations, features and
    their gradients, :func:`training_bytes`); a run over it is refused before the first
    step, with the estimate. None: no limit.
    """
    from tqdm.auto import tqdm

    if max_grad_norm is not None and not max_grad_norm > 0:
        raise WorkbenchError(f"max_grad_norm must be a positive number or None, got {max_grad_norm}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise WorkbenchError(f"steps must be an integer >= 0, got {steps!r}")
    check_batch_size(batch_size)
    if not (isinstance(checkpoint_every, int) and checkpoint_every >= 1):
        raise WorkbenchError(f"checkpoint_every must be an integer >= 1, got {checkpoint_every!r}")
    if sae.kind not in TRAINABLE_KINDS:
        raise WorkbenchError(f"training {sae.kind} SAEs is not supported; train {', '.join(TRAINABLE_KINDS)}")
    check_budget(training_bytes(sae, batch_size), max_bytes,
                 f"training this SAE ({sae.d_in} x {sae.d_sae}) on batches of {batch_size}",
                 "lower batch_size or d_sae, or raise max_bytes")
    if isinstance(data, torch.Tensor):
        sae.check_input(data, "training data")
        check_finite(data, "the training data")
    hyper = {"batch_size": batch_size, "lr": lr, "l1_coeff": l1_coeff, "lr_warmup_steps": lr_warmup_steps,
             "lr_decay_steps": lr_decay_steps, "dead_after": dead_after, "aux_k": aux_k, "aux_coeff": aux_coeff,
             "resample_every": resample_every, "max_grad_norm": max_grad_norm, "seed": seed}
    if lr_decay_steps:  # the decay schedule is counted back from the last step
        hyper["steps"] = steps
    torch.manual_seed(seed)
    stream = as_stream(data, batch_size, seed)
    dev = sae.W_dec.device
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
    since_fired = torch.zeros(sae.d_sae, dtype=torch.long, device=dev)
    gen = torch.Generator().manual_seed(seed + 1)
    log: dict[str, list[float]] = {"loss": [], "mse": [], "l0": [], "dead_fraction": [], "aux": []}
    start = 0
    ck = Path(checkpoint) if checkpoint is not None else None
    if ck is not None:
        if ck.exists() and not ck.is_dir():
            raise WorkbenchError(f"checkpoint {str(ck)!r} is a file; pass a folder")
        if (ck / CHECKPOINT_MANIFEST).exists():
            start, log = _load_checkpoint(ck, sae, opt, since_fired, gen, stream, hyper)
            if start > steps:
                raise WorkbenchError(f"checkpoint {str(ck)!r} is at step {start}, past steps={steps}; "
                                     f"pass steps >= {start} or use another folder")
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
            if x.ndim != 2 or len(x) == 0:
                raise WorkbenchError(f"the training batch of step {step} has shape {tuple(x.shape)}; "
                                     "batches must be [rows >= 1, d_in]")
            x_finite = torch.isfinite(x).all()  # read with the step's numbers below, not on its own
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            aux = x.new_zeros(())
            pre_at = None
            if sae.kind == "topk":  # dense pre without a graph; the gradient flows through k entries per row
                xc = sae.sae_in(x)
                with torch.no_grad():
                    pre = torch.addmm(sae.b_enc, xc, sae.W_enc)

                def pre_at(ix, xc=xc, pre=pre):
                    return SparsePre.apply(xc, sae.W_enc, sae.b_enc, pre, ix)

                idx = pre.topk(sae.k, dim=-1).indices
                vals = F.relu(pre_at(idx))
                x_hat = sae.decode_sparse(vals, idx)
                # features with a positive value in some row (a scatter: no data-dependent shape)
                fired = torch.zeros(sae.d_sae, dtype=torch.long, device=dev).scatter_add_(
                    0, idx.reshape(-1), (vals > 0).reshape(-1).long()) > 0
                l0 = (vals > 0).sum(-1).float().mean()
                sparsity = x.new_zeros(())
            else:
                pre = sae.pre(x)
                if sae.kind == "relu":
                    f = F.relu(pre)
                else:
                    f = batch_topk(pre, sae.k)
                    with torch.no_grad():  # the smallest positive value, if any (kept on the device)
                        on = f > 0
                        t = torch.where(on, f, torch.full_like(f, torch.inf)).min()
                        new = t if step == 0 else 0.99 * sae.threshold + 0.01 * t
                        sae.threshold.copy_(torch.where(on.any(), new, sae.threshold))
                x_hat = sae.decode(f)
                fired = (f > 0).any(0)
                l0 = (f > 0).sum(-1).float().mean()
                sparsity = f.sum(-1).mean() if sae.kind == "relu" else x.new_zeros(())
            mse = (x_hat - x).pow(2).sum(-1).mean()
            since_fired += len(x)
            since_fired.masked_fill_(fired, 0)
            dead = since_fired >= dead_after
            if sae.kind in ("topk", "batchtopk") and aux_coeff > 0:
                aux = _aux_loss(sae, x, x_hat, pre, dead, k_aux, pre_at)
            loss = mse + l1_coeff * sparsity + aux_coeff * aux
            # the step's numbers in one read from the device (one wait per step, not one per number)
            finite_x, loss_v, mse_v, l0_v, dead_frac, aux_v = torch.stack(
                [t.detach().double() for t in (x_finite, loss, mse, l0, dead.float().mean(), aux)]).tolist()
            if not finite_x:
                check_finite(x, f"the training batch of step {step}")
            if not math.isfinite(loss_v):
                raise WorkbenchError(f"the loss of step {step} is {loss_v} (MSE {mse_v}) "
                                     "on a finite batch: training diverged; lower lr or set max_grad_norm. The SAE "
                                     f"holds the weights after step {step - 1}")
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
            log["loss"].append(loss_v)
            log["mse"].append(mse_v)
            log["l0"].append(l0_v)
            log["dead_fraction"].append(dead_frac)
            log["aux"].append(aux_v)
            bar.update(1)
            if step % 10 == 0 or step == steps - 1:
                bar.set_postfix(loss=f"{loss_v:.4g}", L0=f"{l0_v:.1f}", dead=f"{dead_frac:.1%}")
            if ck is not None and ((step + 1) % checkpoint_every == 0 or step == steps - 1):
                save_checkpoint(ck, step + 1, sae, opt, since_fired, gen, stream, log, hyper)
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


# ---------------------------------------------------------------------- checkpoints

CHECKPOINT_MANIFEST, CHECKPOINT_PREFIX = "train_state.json", "train_state"
CHECKPOINT_FORMAT = "workbench-sae-checkpoint"
# the SAE settings a checkpoint must share with the SAE it resumes
RESUME_KEYS = ("d_in", "d_sae", "kind", "k", "apply_b_dec_to_input", "site", "dtype")


def _optimizer_tensors(opt, sae: SAE) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in sae.named_parameters():
        st = opt.state.get(p, {})
        for key, v in st.items():
            out[f"opt.{name}.{key}"] = (v if torch.is_tensor(v) else torch.tensor(v)).detach().cpu().contiguous()
    return out


def save_checkpoint(ck: Path, step: int, sae: SAE, opt, since_fired, gen, stream, log, hyper: dict) -> None:
    """Write a resumable training state into the folder ``ck`` (one commit point: the manifest)."""
    tensors = {f"sae.{k}": v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    tensors.update(_optimizer_tensors(opt, sae))
    tensors["since_fired"] = since_fired.cpu()
    tensors["rng.resample"] = gen.get_state()
    tensors["rng.torch"] = torch.get_rng_state()
    tensors.update({f"data.{k}": v.detach().cpu().contiguous() for k, v in stream.state_dict().items()})
    meta = {"format": CHECKPOINT_FORMAT, "version": 2, "step": step, "config": sae.config(),
            "hyperparameters": hyper, "log": log}
    storage.commit(ck, CHECKPOINT_MANIFEST, meta, tensors, prefix=CHECKPOINT_PREFIX)


def _load_checkpoint(ck: Path, sae: SAE, opt, since_fired, gen, stream, hyper: dict):
    mpath = ck / CHECKPOINT_MANIFEST
    meta = storage.read_json(mpath, "training checkpoint")
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise WorkbenchError(f"{str(mpath)!r} is not a workbench SAE training checkpoint (written by an older "
                             "version, or by something else); use another folder")
    storage.require_keys(meta, ("step", "config", "hyperparameters", "log", "tensors"), mpath)
    cfg, saved = sae.config(), meta["config"]
    diff = [f"{k}: checkpoint {saved.get(k)!r}, this SAE {cfg[k]!r}" for k in RESUME_KEYS if saved.get(k) != cfg[k]]
    if diff:
        raise WorkbenchError(f"checkpoint {str(ck)!r} is for another SAE ({'; '.join(diff)}); use another folder")
    old = meta["hyperparameters"]
    diff = [f"{k}: checkpoint {old.get(k)!r}, this call {hyper.get(k)!r}" for k in sorted(set(old) | set(hyper))
            if old.get(k) != hyper.get(k)]
    if diff:
        raise WorkbenchError(f"checkpoint {str(ck)!r} was written with other hyperparameters ({'; '.join(diff)}); "
                             "resume with the same ones, or train into another folder")
    t = storage.read_committed(ck, CHECKPOINT_MANIFEST, "training checkpoint", manifest=meta)
    wpath = ck / meta["tensors"]["file"]
    sd = {k[4:]: v for k, v in t.items() if k.startswith("sae.")}
    storage.check_tensors(sd, {k: tuple(v.shape) for k, v in sae.state_dict().items()}, wpath)
    if "since_fired" not in t or "rng.resample" not in t or "rng.torch" not in t:
        raise WorkbenchError(f"{str(wpath)!r} lacks the training state (since_fired, rng.resample, rng.torch)")
    sae.load_state_dict(sd)
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
