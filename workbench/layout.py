"""Layouts: uniform component names mapped onto each architecture's modules.

A *site* is a named activation, written ``kind.layer`` (``"z.3"``) or just ``kind`` for
the whole-model ones (``"embed"``, ``"logits"``). Shapes (b = batch, p = position,
d = d_model, h = heads, dh = d_head, v = vocabulary):

============== ================= =========================================================
kind           shape             what it is
============== ================= =========================================================
embed          [b, p, d]         token embedding output (before position embeddings)
resid_pre      [b, p, d]         residual stream entering layer L (the layer's input)
pattern        [b, h, q, k]      attention probabilities of layer L (eager attention)
z              [b, p, h, dh]     per-head attention output before the output projection
attn_out       [b, p, d]         attention sublayer output (after the output projection)
mlp_out        [b, p, d]         MLP sublayer output
resid_post     [b, p, d]         residual stream leaving layer L (the layer's output)
logits         [b, p, v]         unembedding output (models with an LM head)
============== ================= =========================================================

Within one layer the sites fire in the order of the table; a trace must read them in
that order (nnsight's forward-order rule), which ``Subject.cache`` does for you.
For post-LayerNorm encoders (BERT) ``attn_out`` / ``mlp_out`` are the dense outputs
before the residual add and LayerNorm, and ``resid_post`` is the normalised output.
For Gemma-2/3 they are the sublayer outputs before Gemma's post-sublayer norms.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from workbench.errors import WorkbenchError, one_of

SITE_KINDS: dict[str, str] = {
    "embed": "token embedding output [batch, pos, d_model]",
    "resid_pre": "residual stream entering a layer [batch, pos, d_model]",
    "pattern": "attention probabilities [batch, head, query, key]",
    "z": "per-head attention output before the output projection [batch, pos, head, d_head]",
    "attn_out": "attention sublayer output [batch, pos, d_model]",
    "mlp_out": "MLP sublayer output [batch, pos, d_model]",
    "resid_post": "residual stream leaving a layer [batch, pos, d_model]",
    "logits": "unembedding output [batch, pos, vocab]",
}
LAYER_KINDS = ("resid_pre", "pattern", "z", "attn_out", "mlp_out", "resid_post")
_STAGE = {k: i for i, k in enumerate(LAYER_KINDS)}


@dataclass(frozen=True)
class Site:
    """A parsed site name: ``kind`` and ``layer`` (None for embed / logits)."""

    kind: str
    layer: int | None = None

    @property
    def name(self) -> str:
        return self.kind if self.layer is None else f"{self.kind}.{self.layer}"

    def order(self) -> tuple[int, int]:
        """Forward-pass order of the site's hook: sort by this before reading in a trace."""
        if self.kind == "embed":
            return (-1, 0)
        if self.kind == "logits":
            return (1 << 30, 0)
        return (self.layer, _STAGE[self.kind])

    def __str__(self) -> str:
        return self.name


@dataclass(frozen=True)
class Family:
    """Module paths of one architecture family. Per-layer paths are relative to a layer."""

    name: str
    model_types: tuple[str, ...]
    layers: str  # ModuleList of blocks, relative to the base model
    attn: str  # module whose output is (attn_out, weights) or the attention core
    core: str  # module that calls the attention function (pattern hooks live here)
    o_proj: str  # output projection; its input is z
    attn_out: str  # module whose output (or output[0]) is attn_out
    mlp_out: str  # module whose output is mlp_out
    embed: str  # token embedding, relative to the base model
    final_norm: str | None  # relative to the base model
    unembed: str | None  # relative to the full model (LM head)
    causal: bool = True
    attn_out_is_tuple: bool = True


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family("gpt2", ("gpt2",), "h", "attn", "attn", "attn.c_proj", "attn", "mlp", "wte", "ln_f", "lm_head"),
        Family(
            "gpt_neox", ("gpt_neox",), "layers", "attention", "attention", "attention.dense", "attention", "mlp",
            "embed_in", "final_layer_norm", "embed_out|lm_head",
        ),
        Family(
            "llama", ("llama", "mistral", "qwen2", "qwen3", "olmo", "olmo2"), "layers", "self_attn", "self_attn",
            "self_attn.o_proj", "self_attn", "mlp", "embed_tokens", "norm", "lm_head",
        ),
        Family(
            "gemma2", ("gemma2", "gemma3_text", "gemma"), "layers", "self_attn", "self_attn", "self_attn.o_proj",
            "self_attn", "mlp", "embed_tokens", "norm", "lm_head",
        ),
        Family(
            "bert", ("bert",), "encoder.layer", "attention", "attention.self", "attention.output.dense",
            "attention.output.dense", "output.dense", "embeddings.word_embeddings", None, "cls",
            causal=False, attn_out_is_tuple=False,
        ),
    ]
}


def supported_model_types() -> list[str]:
    return sorted(t for f in FAMILIES.values() for t in f.model_types)


def family_for(model_type: str) -> Family:
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    raise WorkbenchError(
        f"no layout for model type {model_type!r}; supported model types: {', '.join(supported_model_types())}. "
        "Add a Family to workbench.layout.FAMILIES to support another architecture."
    )


_SITE_RE = re.compile(r"^([a-z_]+)(?:\.(-?\d+))?$")


def parse_site(site: str | Site, n_layers: int, has_logits: bool = True) -> Site:
    """Parse ``"z.3"`` / ``"embed"`` into a ``Site``; negative layers count from the end.

    Unknown kinds and out-of-range layers get an error listing what is valid.
    """
    if isinstance(site, Site):
        kind, layer = site.kind, site.layer
    else:
        m = _SITE_RE.match(str(site))
        if not m:
            raise WorkbenchError(f"cannot parse site {site!r}; write kind.layer such as 'z.0' or 'resid_post.1', or 'embed' / 'logits'")
        kind, layer = m.group(1), (int(m.group(2)) if m.group(2) is not None else None)
    if kind not in SITE_KINDS:
        raise one_of("site kind", kind, [f"{k} ({v})" for k, v in SITE_KINDS.items()])
    if kind in LAYER_KINDS:
        if layer is None:
            raise WorkbenchError(f"site kind {kind!r} needs a layer: '{kind}.0' ... '{kind}.{n_layers - 1}'")
        if not -n_layers <= layer < n_layers:
            raise WorkbenchError(f"layer {layer} out of range for site {kind!r}: this model has layers 0..{n_layers - 1}")
        layer %= n_layers
    elif layer is not None:
        raise WorkbenchError(f"site {kind!r} has no layer; write it as {kind!r}")
    if kind == "logits" and not has_logits:
        raise WorkbenchError("this model has no LM head, so no 'logits' site; load a *ForCausalLM / *ForMaskedLM model")
    return Site(kind, layer)


def all_sites(n_layers: int, has_logits: bool = True) -> list[str]:
    out = ["embed"]
    for layer in range(n_layers):
        out += [f"{k}.{layer}" for k in LAYER_KINDS]
    if has_logits:
        out.append("logits")
    return out


# ---------------------------------------------------------------------- vector sites

# site kinds that hold one vector per token: where SAE features and neurons are defined
VECTOR_KINDS = ("embed", "resid_pre", "z", "attn_out", "mlp_out", "resid_post")


def site_width(subject, site: str) -> int:
    """Width of the per-token vector at ``site`` (d_model, or heads * d_head for ``z``)."""
    s = check_vector_site(subject, site)
    return subject.n_heads * subject.d_head if s.kind == "z" else subject.d_model


def check_vector_site(subject, site: str):
    """Parse ``site`` (unknown names list the valid ones) and require one vector per token."""
    s = subject.site(site)
    if s.kind not in VECTOR_KINDS:
        valid = ["embed"] + [f"{k}.0..{subject.n_layers - 1}" for k in VECTOR_KINDS[1:]]
        raise WorkbenchError(
            f"site {s.name!r} does not hold one vector per token, so no SAE feature or neuron is defined on it; "
            f"valid sites: {', '.join(valid)}"
        )
    return s


def _kind(site) -> str:
    return site.kind if hasattr(site, "kind") else str(site).split(".")[0]


def flat(x: torch.Tensor, site) -> torch.Tensor:
    """[batch, pos, ...] -> [batch, pos, width] (``z`` heads concatenated)."""
    return x.reshape(*x.shape[:2], -1) if _kind(site) == "z" else x


def unflat(x: torch.Tensor, site, subject) -> torch.Tensor:
    """Inverse of :func:`flat`."""
    if _kind(site) == "z":
        return x.reshape(*x.shape[:2], subject.n_heads, subject.d_head)
    return x
