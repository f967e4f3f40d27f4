"""Blocks: one naming of a model's parts, shared by every lens.

A *block* is a coarse part of a model that weights, gradients and activations all belong
to. The lenses report per-block numbers (task-vector interference, gradient conflict,
where a task's heads or features sit) under the same names, so their results join on
``(task, block)`` with a plain ``pandas.merge``:

=============== ==============================================================
block           what belongs to it
=============== ==============================================================
``embed``       token (and position) embeddings
``layer.L``     transformer layer L: its attention, MLP and norms; every site
                ``kind.L`` (``z.L``, ``resid_post.L``...) and every head (L, h)
``final_norm``  the norm after the last layer
``unembed``     the LM head (when its weights are not tied to ``embed``)
``other``       anything else (a task head, a pooler); models outside the layout
                use their own module path instead, see :func:`block_of`
=============== ==============================================================

Parameter names are resolved through the Subject's layout (``Family``), so
``gpt_neox.layers.3.mlp.dense_h_to_4h.weight`` and ``model.layers.3.mlp.up_proj.weight``
both belong to ``layer.3``. For a model with no layout (a plain ``nn.Module``), a name
is cut after its first numeric part (``trunk.blocks.2.fc.weight`` -> ``trunk.blocks.2``)
or after its first ``depth`` parts.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Iterable

from workbench.errors import WorkbenchError
from workbench.layout import FAMILIES, Family

EMBED, FINAL_NORM, UNEMBED, OTHER = "embed", "final_norm", "unembed", "other"
_LAYER = re.compile(r"^layer\.(\d+)$")


def layer_block(layer: int) -> str:
    """The block name of transformer layer ``layer``: ``"layer.3"``."""
    return f"layer.{int(layer)}"


def layer_of(block: str) -> int | None:
    """The layer index of a ``layer.L`` block, else None."""
    m = _LAYER.match(block)
    return int(m.group(1)) if m else None


def site_block(site) -> str:
    """The block an activation site belongs to (``z.3`` -> ``layer.3``)."""
    from workbench.layout import Site

    s = site if isinstance(site, Site) else _parse_loose(str(site))
    if s.layer is not None:
        return layer_block(s.layer)
    return EMBED if s.kind == "embed" else UNEMBED


def _parse_loose(site: str):
    from workbench.layout import Site

    kind, _, layer = site.partition(".")
    return Site(kind, int(layer) if layer else None)


def _family(family: Family | str | None) -> Family | None:
    if family is None or isinstance(family, Family):
        return family
    if family not in FAMILIES:
        raise WorkbenchError(f"unknown layout family {family!r}; known: {', '.join(FAMILIES)}")
    return FAMILIES[family]


def _strip(name: str, prefix: str) -> str | None:
    """``name`` after the dotted module path ``prefix`` (anywhere in it), else None."""
    pat = r"(?:^|\.)" + re.escape(prefix) + r"(?:\.|$)"
    m = re.search(pat, name)
    return name[m.end():] if m else None


@lru_cache(maxsize=65536)
def _block_of(name: str, family: Family | None, depth: int) -> str:
    if family is not None:
        rest = _strip(name, family.layers)
        if rest is not None:
            head = rest.split(".", 1)[0]
            if head.isdigit():
                return layer_block(int(head))
        embeds = [family.embed, "wpe", "embed_positions", "position_embeddings", "token_type_embeddings"]
        if any(_strip(name, e) is not None for e in embeds) or _strip(name, "embeddings") is not None:
            return EMBED
        if family.final_norm and _strip(name, family.final_norm) is not None:
            return FINAL_NORM
        if family.unembed and any(name.startswith(u + ".") or name == u for u in family.unembed.split("|")):
            return UNEMBED
        return OTHER
    parts = [p for p in name.split(".") if p not in ("weight", "bias")]
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: i + 1])
    return ".".join(parts[:depth]) or name


def block_of(name: str, family: Family | str | None = None, *, depth: int = 2) -> str:
    """The block a parameter (or state-dict key) belongs to.

    With ``family`` (a :class:`~workbench.layout.Family`, its name, or ``subject.family``),
    the answer is one of ``embed``, ``layer.L``, ``final_norm``, ``unembed``, ``other``.
    Without one it falls back to the module path (see the module docstring)."""
    return _block_of(name, _family(family), depth)


def family_of_keys(keys: Iterable[str]) -> Family | None:
    """The layout family that names the most of the state-dict ``keys`` (layers, embeddings,
    final norm, LM head), if any: for task vectors and checkpoints read without a Subject.
    Families that name the keys equally well give the same blocks."""
    keys = list(keys)
    best, hits = None, 0
    for fam in FAMILIES.values():
        n = sum(_block_of(k, fam, 2) != OTHER for k in keys)
        if n > hits:
            best, hits = fam, n
    return best


def block_order(blocks: Iterable[str]) -> list[str]:
    """Distinct blocks in depth order: embed, layer.0, layer.1, ..., final_norm, unembed,
    then any others by name."""

    def rank(b: str):
        if b == EMBED:
            return (0, 0, "")
        layer = layer_of(b)
        if layer is not None:
            return (1, layer, "")
        if b == FINAL_NORM:
            return (2, 0, "")
        if b == UNEMBED:
            return (3, 0, "")
        return (4, 0, b)

    return sorted(set(blocks), key=rank)


__all__ = ["EMBED", "FINAL_NORM", "OTHER", "UNEMBED", "block_of", "block_order", "family_of_keys", "layer_block",
           "layer_of", "site_block"]
