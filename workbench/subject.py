"""Subject: one way into any model.

``load(name_or_path)`` returns a :class:`Subject` holding the Hugging Face model, its
tokenizer, an nnsight wrapper and a layout (see :mod:`workbench.layout`). Every read
and write of an activation goes through an nnsight trace, so the same analysis code
runs locally, across GPUs (``device_map``) or on NDIF (``remote=True``).

Inside your own trace::

    with subject.trace(batch) as tracer:
        z = subject.read("z.1").save()            # [batch, pos, head, d_head]
        subject.write("z.1", z * mask)            # replace it downstream
        logits = subject.read("logits").save()

or, for the common cases, ``subject.cache(prompts, ["pattern.0", "resid_post.1"])``,
``subject.logits(prompts, patch={"z.1": fn})`` and ``subject.gradients(...)``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.layout import FAMILIES, SITE_KINDS as SITE_SHAPES, Family, Site, all_sites, family_for, parse_site

Inputs = Any  # list[str] | str | dict with input_ids | LongTensor [batch, pos]
Patch = Mapping[str, "torch.Tensor | Callable[[torch.Tensor], torch.Tensor]"]


@dataclass
class Batch:
    """Token ids and mask of a padded batch (right padding), on the model's device."""

    input_ids: torch.Tensor  # [batch, pos]
    attention_mask: torch.Tensor  # [batch, pos]
    extra: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. token_type_ids
    # set by Subject.as_batch once the ids and mask are checked: the largest token id. Rows
    # and repeats of a checked batch are checked too, so running them again reads nothing
    # back from the device (the check's reads would wait for it once per forward pass).
    _max_id: int | None = field(default=None, compare=False, repr=False)

    def kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask, **self.extra}

    @property
    def last(self) -> torch.Tensor:
        """Index of each row's last real token [batch]."""
        return self.attention_mask.sum(-1) - 1

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, rows: slice | int | torch.Tensor) -> "Batch":
        """The rows ``rows`` (a slice, an index, or an index / boolean tensor over the
        batch) as a Batch, extra inputs included."""
        if isinstance(rows, int):
            rows = slice(rows, rows + 1 if rows != -1 else None)
        elif isinstance(rows, torch.Tensor):
            rows = rows.to(self.input_ids.device)
        return Batch(self.input_ids[rows], self.attention_mask[rows], {k: v[rows] for k, v in self.extra.items()},
                     self._max_id)

    def repeat(self, n: int) -> "Batch":
        """``n`` copies of the batch stacked along the batch dimension (copy i holds rows
        ``i * len(self)`` to ``(i + 1) * len(self) - 1``)."""
        if n < 1:
            raise WorkbenchError(f"a batch repeats a positive number of times, got {n}")

        def rep(v: torch.Tensor) -> torch.Tensor:
            return v.repeat(n, *[1] * (v.ndim - 1))

        return Batch(rep(self.input_ids), rep(self.attention_mask), {k: rep(v) for k, v in self.extra.items()},
                     self._max_id)


class Subject:
    """A model under study: HF model + tokenizer + nnsight wrapper + layout."""

    def __init__(
        self,
        model: torch.nn.Module,
        tokenizer,
        *,
        name: str,
        nn=None,
        remote: bool = False,
        revision: str | None = None,
        weights_sha256: str | None = None,
    ) -> None:
        from nnsight import NNsight

        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.remote = remote
        if nn is None:
            with warnings.catch_warnings():  # BERT's submodules named "output" are renamed by nnsight
                warnings.filterwarnings("ignore", message=".*nnsight already serves on every module.*")
                nn = NNsight(model)
        self.nn = nn
        cfg = model.config
        self.config = cfg
        self.family: Family = family_for(cfg.model_type)
        self.revision = revision or getattr(cfg, "_commit_hash", None)
        self.weights_sha256 = weights_sha256
        self.n_layers: int = cfg.num_hidden_layers
        self.n_heads: int = cfg.num_attention_heads
        self.n_kv_heads: int = getattr(cfg, "num_key_value_heads", None) or self.n_heads
        self.d_model: int = cfg.hidden_size
        self.d_head: int = getattr(cfg, "head_dim", None) or self.d_model // self.n_heads
        self.d_vocab: int = cfg.vocab_size
        self.max_positions: int | None = (
            getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        )
        self.causal: bool = self.family.causal
        self._base = self._base_prefix()
        self._unembed = self._resolve_unembed()
        self._pattern_ops: dict[int, tuple[str, str]] = {}

    # ------------------------------------------------------------------ structure

    def _base_prefix(self) -> str:
        prefix = getattr(self.model, "base_model_prefix", "")
        if prefix and isinstance(getattr(self.model, prefix, None), torch.nn.Module):
            return prefix + "."
        return ""

    def _resolve_unembed(self) -> str | None:
        if not self.family.unembed:
            return None
        for cand in self.family.unembed.split("|"):
            if self._has_module(cand):
                return cand
        return None

    def _has_module(self, path: str) -> bool:
        try:
            self.model.get_submodule(path)
            return True
        except AttributeError:
            return False

    @property
    def has_logits(self) -> bool:
        return self._unembed is not None

    @property
    def sites(self) -> list[str]:
        """Every site name this subject accepts."""
        return all_sites(self.n_layers, self.has_logits)

    def site(self, site: str | Site) -> Site:
        """Parse and check a site name (unknown kinds and layers get a clear error)."""
        return parse_site(site, self.n_layers, self.has_logits)

    def module_path(self, site: str | Site) -> str:
        """Dotted path of the module whose hook carries ``site``."""
        s = self.site(site)
        f, b = self.family, self._base
        layer = f"{b}{f.layers}.{s.layer}" if s.layer is not None else None
        return {
            "embed": f"{b}{f.embed}",
            "resid_pre": layer,
            "resid_post": layer,
            "pattern": f"{layer}.{f.core}",
            "z": f"{layer}.{f.o_proj}",
            "attn_out": f"{layer}.{f.attn_out}",
            "mlp_out": f"{layer}.{f.mlp_out}",
            "logits": self._unembed,
        }[s.kind]

    def module(self, site: str | Site) -> torch.nn.Module:
        """The torch module behind a site (for weights: ``subject.module('z.0')`` is o_proj)."""
        return self.model.get_submodule(self.module_path(site))

    @property
    def layers(self) -> torch.nn.ModuleList:
        return self.model.get_submodule(f"{self._base}{self.family.layers}")

    def W_O(self, layer: int) -> torch.Tensor:
        """Per-head output projection of a layer, [head, d_head, d_model]."""
        self.require_local("W_O (a weight matrix)")
        mod = self.module(f"z.{layer}")
        w = mod.weight
        # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
        w_in_out = w if type(mod).__name__ == "Conv1D" else w.T
        return w_in_out.reshape(self.n_heads, self.d_head, -1)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding matrix [d_model, vocab] (the LM head's final linear map)."""
        if not self.has_logits:
            raise WorkbenchError("this model has no LM head, so no unembedding")
        self.require_local("W_U (a weight matrix)")
        head = self.model.get_submodule(self._unembed)
        lin = head if isinstance(head, torch.nn.Linear) else [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
        return lin.weight.T

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the first parameter, or for a model dispatched by
        accelerate (``device_map``) the device its token embedding runs on; weights
        offloaded to the CPU or disk (``"cpu"``, ``"disk"``, the ``meta`` device) run on
        the CPU unless another device holds the embedding."""
        dmap = getattr(self.model, "hf_device_map", None)
        if dmap:
            placed = [d for d in dmap.values() if d not in ("disk", "meta")]
            first = placed[0] if placed else "cpu"
            return torch.device(f"cuda:{first}" if isinstance(first, int) else first)
        try:
            dev = next(self.model.parameters()).device
        except StopIteration:
            return torch.device("cpu")
        return torch.device("cpu") if dev.type == "meta" else dev

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def require_local(self, what: str) -> None:
        """Refuse ``what`` on a remote subject: its weights stay on the NDIF server (the
        local copy is an empty skeleton on the ``meta`` device), and a trace sends back
        saved values without their autograd graph. Activations, patched logits and
        :meth:`gradients` do work remotely; ``what`` names what does not."""
        if self.remote:
            raise WorkbenchError(
                f"{what} needs the model's weights (or an autograd graph) on this machine, but {self.name!r} was "
                "loaded with remote=True, so its weights stay on the NDIF server. Remotely, use what runs through "
                "traces (subject.cache / logits / gradients and the lenses built on them, see docs/remote.md), or "
                f"load the model locally (workbench.load({self.name!r}))")

    # ------------------------------------------------------------------ inputs

    def tokenize(self, prompts: str | Sequence[str], *, max_length: int | None = None) -> Batch:
        """Tokenize prompts into a right-padded :class:`Batch` on the model's device.

        Empty input and prompts longer than the model's context get a clear error.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        if not prompts:
            raise WorkbenchError("empty prompt list; pass at least one prompt")
        if not all(isinstance(p, str) for p in prompts):
            bad = next(type(p).__name__ for p in prompts if not isinstance(p, str))
            raise WorkbenchError(f"prompts must be strings, got a {bad}; pass token ids as a tensor or dict instead")
        tok = self.tokenizer
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token or tok.unk_token
        old_side = tok.padding_side
        tok.padding_side = "right"
        try:
            enc = tok(prompts, return_tensors="pt", padding=True)
        finally:
            tok.padding_side = old_side
        return self.as_batch(dict(enc), max_length=max_length)

    def as_batch(self, inputs: Inputs, *, max_length: int | None = None) -> Batch:
        """Coerce prompts, a tensor of ids, a dict / BatchEncoding or a Batch into a Batch."""
        if isinstance(inputs, Batch):
            batch = inputs
        elif isinstance(inputs, (str, list, tuple)) and (isinstance(inputs, str) or not inputs or isinstance(inputs[0], str)):
            return self.tokenize(inputs, max_length=max_length)
        elif isinstance(inputs, torch.Tensor):
            ids = inputs if inputs.ndim == 2 else inputs[None]
            batch = Batch(ids, torch.ones_like(ids))
        elif isinstance(inputs, Mapping) and "input_ids" in inputs:
            ids = torch.as_tensor(inputs["input_ids"])
            ids = ids if ids.ndim == 2 else ids[None]
            mask = torch.as_tensor(inputs["attention_mask"]) if "attention_mask" in inputs else torch.ones_like(ids)
            mask = mask if mask.ndim == 2 else mask[None]
            extra = {k: torch.as_tensor(v) for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
            batch = Batch(ids, mask, extra)
        else:
            raise WorkbenchError(
                f"cannot use {type(inputs).__name__} as model input; pass a list of prompt strings, a LongTensor of "
                "token ids [batch, pos], or a dict with input_ids (and attention_mask)"
            )
        if batch.input_ids.numel() == 0:
            raise WorkbenchError("empty input: no tokens to run")
        max_id = batch._max_id
        if max_id is None or max_id >= self.d_vocab:
            max_id = self._check_batch(batch)
        limit = max_length or self.max_positions
        if limit is not None and batch.input_ids.shape[1] > limit:
            lengths = batch.attention_mask.sum(-1)
            worst = int(lengths.argmax())
            raise WorkbenchError(
                f"prompt {worst} is {int(lengths[worst])} tokens long; this model's context holds {limit} positions"
            )
        dev = self.device
        return Batch(
            batch.input_ids.to(dev).long(),
            batch.attention_mask.to(dev).long(),
            {k: v.to(dev) for k, v in batch.extra.items()},
            max_id,
        )

    def _check_batch(self, batch: Batch) -> int:
        """Token ids in range and integer, a right-padded 0/1 mask of the same shape, and at
        least one real token per row (a wrong mask would silently misplace every row's last
        token). Returns the largest token id."""
        ids, mask = batch.input_ids, batch.attention_mask
        if ids.ndim != 2:
            raise WorkbenchError(f"token ids must be [batch, pos] (or [pos] for one prompt), got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise WorkbenchError(f"token ids must be integers, got dtype {ids.dtype}")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.d_vocab:
            bad = lo if lo < 0 else hi
            raise WorkbenchError(f"token id {bad} is outside this model's vocabulary (ids 0..{self.d_vocab - 1})")
        if tuple(mask.shape) != tuple(ids.shape):
            raise WorkbenchError(
                f"attention_mask has shape {tuple(mask.shape)} but input_ids has {tuple(ids.shape)}; they must match")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise WorkbenchError("attention_mask must hold only 0 and 1")
        empty = (mask.sum(-1) == 0).nonzero()
        if len(empty):
            raise WorkbenchError(f"prompt {int(empty[0, 0])} has no real tokens (its attention_mask is all zeros)")
        if mask.shape[1] > 1 and bool((mask[:, 1:] > mask[:, :-1]).any()):
            row = int((mask[:, 1:] > mask[:, :-1]).any(-1).nonzero()[0, 0])
            raise WorkbenchError(
                f"prompt {row} is not right-padded (its attention_mask has a 0 before a 1); the workbench reads each "
                "prompt's last real token at sum(mask) - 1, so pad on the right (pass the prompts as strings, or "
                "tokenize with padding_side='right')")
        return hi

    def batches(self, inputs: Sequence[str], batch_size: int) -> Iterator[Batch]:
        """Split prompts into padded batches of ``batch_size``."""
        if batch_size < 1:
            raise WorkbenchError(f"batch_size must be >= 1, got {batch_size}")
        for i in range(0, len(inputs), batch_size):
            yield self.tokenize(list(inputs[i : i + batch_size]))

    # ------------------------------------------------------------------ tracing

    def trace(self, inputs: Inputs, **kwargs):
        """An nnsight trace over ``inputs`` (remote when the subject is remote). A model
        that would fill a key/value cache for generation runs without one (``use_cache=False``
        unless given): one forward never reads it back, and it holds every layer's keys and
        values of the whole batch in device memory."""
        batch = self.as_batch(inputs)
        if self.remote:
            kwargs.setdefault("remote", True)
        if self._takes_use_cache():
            kwargs.setdefault("use_cache", False)
        return self.nn.trace(**batch.kwargs(), **kwargs)

    def _takes_use_cache(self) -> bool:
        if not hasattr(self, "_use_cache_arg"):
            import inspect

            try:
                params = inspect.signature(self.model.forward).parameters
            except (TypeError, ValueError):
                params = {}
            self._use_cache_arg = "use_cache" in params
        return self._use_cache_arg

    def _envoy(self, path: str):
        """The nnsight envoy of a module path (walks real child names, so a submodule
        that nnsight renames, such as BERT's ``output``, still resolves)."""
        env = self.nn
        for part in path.split("."):
            children = getattr(env, "_child_map", {})
            env = children[part] if part in children else getattr(env, part)
        return env

    def _pattern_op(self, layer: int):
        """The softmax inside layer ``layer``'s attention function (a source op)."""
        if self.config._attn_implementation != "eager":
            raise WorkbenchError(
                f"the 'pattern' site needs eager attention, but this model uses {self.config._attn_implementation!r}; "
                "load it with attn_implementation='eager' (the default of workbench.load)"
            )
        core = self._envoy(self.module_path(f"pattern.{layer}")).source
        if layer not in self._pattern_ops:
            calls = [n for n in core.names if re.fullmatch(r"attention_interface_\d+", n)]
            if not calls:
                raise WorkbenchError(
                    f"cannot find the attention function call in {type(self.module(f'pattern.{layer}')).__name__}.forward"
                )
            self._pattern_ops[layer] = (calls[-1], "")
        call, soft = self._pattern_ops[layer]
        inner = getattr(core, call).source
        if not soft:
            softs = [n for n in inner.names if "softmax" in n]
            if not softs:
                raise WorkbenchError("cannot find the softmax inside this model's eager attention function")
            soft = softs[0]
            self._pattern_ops[layer] = (call, soft)
        return getattr(inner, soft)

    def read(self, site: str | Site) -> torch.Tensor:
        """Inside a trace: the activation at ``site`` in the layout's uniform shape."""
        s = self.site(site)
        env = None if s.kind in ("pattern", "logits") else self._envoy(self.module_path(s))
        if s.kind == "pattern":
            return self._pattern_op(s.layer).output
        if s.kind == "logits":  # the model's final logits (after e.g. Gemma's soft-capping)
            return self.nn.output.logits
        if s.kind == "resid_pre":
            return env.input
        if s.kind == "z":
            x = env.input
            return x.view(*x.shape[:-1], self.n_heads, self.d_head)
        out = env.output
        return out[0] if isinstance(out, tuple) else out

    def write(self, site: str | Site, value: torch.Tensor) -> None:
        """Inside a trace: replace the activation at ``site`` for everything downstream."""
        s = self.site(site)
        if s.kind == "pattern":
            self._pattern_op(s.layer).output = value
            return
        if s.kind == "logits":
            self.nn.output.logits = value
            return
        env = self._envoy(self.module_path(s))
        if s.kind == "resid_pre":
            env.input = value
        elif s.kind == "z":
            env.input = value.reshape(*value.shape[:-2], self.n_heads * self.d_head)
        else:
            out = env.output
            env.output = (value, *out[1:]) if isinstance(out, tuple) else value

    def patch(self, site: str | Site, fn) -> None:
        """Inside a trace: replace ``site`` by ``fn(current)`` (or by the tensor ``fn``).

        The new value must have the site's shape, or broadcast to it (a mean vector
        [d_model] over every position, say); anything else is refused with both shapes."""
        s = self.site(site)
        cur = self.read(s)
        new = fn(cur) if callable(fn) else fn
        if not isinstance(new, torch.Tensor):
            raise WorkbenchError(f"the patch for site {s.name!r} gave a {type(new).__name__}, not a tensor")
        want = tuple(cur.shape)
        if tuple(new.shape) != want:
            try:
                ok = tuple(torch.broadcast_shapes(tuple(new.shape), want)) == want
            except RuntimeError:
                ok = False
            if not ok:
                raise WorkbenchError(
                    f"the patch for site {s.name!r} has shape {tuple(new.shape)}, but the activation there is {want} "
                    f"({SITE_SHAPES.get(s.kind, '')}); pass a tensor of that shape or one that broadcasts to it")
            new = new.expand(want)
        self.write(s, new.to(cur.dtype) if new.dtype != cur.dtype else new)

    # ------------------------------------------------------------------ conveniences

    def _plan(self, reads: Iterable[str], patch: Patch | None) -> list[tuple[Site, str, Any]]:
        steps: dict[tuple, tuple[Site, str, Any]] = {}
        for name, fn in (patch or {}).items():
            s = self.site(name)
            steps[(s.order(), 0, s.name)] = (s, "patch", fn)
        for name in reads:
            s = self.site(name)
            steps[(s.order(), 1, s.name)] = (s, "read", None)
        return [steps[k] for k in sorted(steps)]

    def cache(
        self,
        inputs: Inputs,
        sites: Iterable[str],
        *,
        patch: Patch | None = None,
        grad: bool = False,
        stop: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Run once and return the activations at ``sites`` (after any ``patch``).

        ``patch`` maps sites to a replacement tensor or a function of the current one.
        The forward stops after the last site needed unless ``stop=False``.
        """
        if grad:
            self.require_local("cache(..., grad=True) (activations that carry their autograd graph back)")
        sites = list(sites)
        plan = self._plan(sites, patch)
        need_logits = any(s.kind == "logits" for s, _, _ in plan)
        ctx = contextlib.nullcontext() if grad else torch.no_grad()
        with ctx, self.trace(inputs) as tracer:
            out = {}
            for s, op, fn in plan:
                if op == "patch":
                    self.patch(s, fn)
                else:
                    out[s.name] = self.read(s)
            out = save(out)
            if stop and not need_logits:
                tracer.stop()
        return {self.site(k).name: out[self.site(k).name] for k in sites}

    def logits(self, inputs: Inputs, *, patch: Patch | None = None, grad: bool = False) -> torch.Tensor:
        """Logits [batch, pos, vocab], optionally with patched activations."""
        return self.cache(inputs, ["logits"], patch=patch, grad=grad)["logits"]

    def gradients(
        self,
        inputs: Inputs,
        sites: Iterable[str],
        metric: Callable[[torch.Tensor, Batch], torch.Tensor],
        *,
        patch: Patch | None = None,
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
        """Activations at ``sites``, the gradient of ``metric(logits, batch)`` with respect
        to each, and the metric value: one forward and one backward pass.

        A zero leaf is added at each site (``x + delta``), so each gradient is the total
        derivative d metric / d activation, through every later site too (a detached copy
        in place of the activation would cut the paths through later sites). Parameter
        gradients are not computed.

        On a remote subject the metric and the backward pass run inside the trace, on
        the server (the saved values come back without their graph), and only the
        activations, the gradients and the metric value travel back.
        """
        if self.remote:
            return self._remote_gradients(inputs, sites, metric, patch)
        batch = self.as_batch(inputs)
        sites = [self.site(s).name for s in sites]
        plan = self._plan(sites + ["logits"], patch)
        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            p.requires_grad_(False)
        try:
            with torch.enable_grad(), self.trace(batch):
                saved, deltas, logits = self._with_leaves(plan)
                saved, deltas = save(saved), save(deltas)
                logits = save(logits)
            value = metric(logits, batch)
            value.sum().backward() if value.ndim else value.backward()
        finally:
            for p in params:
                p.requires_grad_(True)
        acts = dict(saved)
        grads = {k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in deltas.items()}
        return acts, grads, value.detach()

    def _with_leaves(self, plan):
        """Inside a trace, walk ``plan``: apply its patches, and at each site read the
        activation and write back ``x + delta`` with a zero leaf ``delta``. Returns
        ({site: x detached}, {site: delta}, logits)."""
        saved, deltas, logits = {}, {}, None
        for s, op, fn in plan:
            if op == "patch":
                self.patch(s, fn)
            elif s.kind == "logits":
                logits = self.read(s)
            else:
                x = self.read(s)
                delta = torch.zeros_like(x, requires_grad=True)
                self.write(s, x + delta)
                saved[s.name], deltas[s.name] = x.detach(), delta
        return saved, deltas, logits

    def _remote_gradients(self, inputs, sites, metric, patch):
        """:meth:`gradients` with the metric and ``torch.autograd.grad`` inside the trace
        (the same leaves, the same sums), for a subject whose trace runs on NDIF."""
        batch = self.as_batch(inputs)
        sites = [self.site(s).name for s in sites]
        plan = self._plan(sites + ["logits"], patch)
        with torch.enable_grad(), self.trace(batch):
            saved, deltas, logits = self._with_leaves(plan)
            value = metric(logits, batch)
            names = list(deltas)
            got = torch.autograd.grad(value.sum() if value.ndim else value, [deltas[k] for k in names],
                                      allow_unused=True)
            grads = {k: torch.zeros_like(deltas[k]) if g is None else g for k, g in zip(names, got)}
            saved, grads, value = save(saved), save(grads), save(value.detach())
        return dict(saved), dict(grads), value

    # ------------------------------------------------------------------ provenance

    def config_hash(self) -> str:
        cfg = self.config.to_dict()
        for k in ("_commit_hash", "_name_or_path", "transformers_version", "torch_dtype", "dtype"):
            cfg.pop(k, None)
        return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def provenance(self) -> dict[str, Any]:
        """Model name, revision, config hash and weights hash (when known)."""
        return {
            "model": self.name,
            "revision": self.revision,
            "config_hash": self.config_hash(),
            "weights_sha256": self.weights_sha256,
            "family": self.family.name,
        }

    def __repr__(self) -> str:
        return (
            f"Subject({self.name!r}, family={self.family.name}, layers={self.n_layers}, heads={self.n_heads}"
            f"{'' if self.n_kv_heads == self.n_heads else f' (kv {self.n_kv_heads})'}, d_model={self.d_model}, "
            f"device={self.device}, dtype={self.dtype}{', remote' if self.remote else ''})"
        )


def save(obj):
    """Inside a trace: keep ``obj`` (a tensor, or a dict / tuple of them) after the trace
    ends (nnsight's ``save``)."""
    import nnsight

    return nnsight.save(obj)


# ---------------------------------------------------------------------- loading


def _pick_device(device: str | torch.device) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise WorkbenchError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise WorkbenchError(f"device {device!r} asked for, but torch sees no CUDA GPU here; use device='cpu' or 'auto'")
    return dev


MODEL_DTYPES = ("float32", "bfloat16", "float16", "float64")


def _pick_dtype(dtype, device: torch.device):
    """``"auto"``, a floating torch dtype or its name (``"bfloat16"``); anything else is refused."""
    if isinstance(dtype, str) and dtype == "auto":
        return torch.float32 if device.type == "cpu" else "auto"
    name = dtype.replace("torch.", "") if isinstance(dtype, str) else None
    if name is not None and name in MODEL_DTYPES:
        return getattr(torch, name)
    if isinstance(dtype, torch.dtype) and str(dtype).replace("torch.", "") in MODEL_DTYPES:
        return dtype
    raise WorkbenchError(f"unknown dtype {dtype!r}; use 'auto' or one of {', '.join(MODEL_DTYPES)} "
                         "(as a name or a torch dtype, e.g. torch.bfloat16)")


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "tokenizer.model",
                    "spiece.model")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _model_class(config):
    import transformers

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    fam = family_for(config.model_type)
    return transformers.AutoModelForCausalLM if fam.causal else transformers.AutoModelForMaskedLM


def load(
    name_or_path: str,
    device: str | torch.device = "auto",
    dtype: str | torch.dtype = "auto",
    remote: bool = False,
    **hf_kwargs: Any,
) -> Subject:
    """Load a model as a :class:`Subject`.

    ``name_or_path`` is a zoo name (``workbench.zoo.names()``, offline), a local
    directory, or a Hugging Face hub id. ``device="auto"`` picks CUDA when present;
    ``dtype="auto"`` is float32 on the CPU and the checkpoint's dtype on a GPU. Extra
    keyword arguments go to ``from_pretrained`` (``device_map="auto"`` spreads a large
    model over several GPUs; ``revision=...``; ``trust_remote_code`` stays off unless
    you pass it; ``max_memory={"cpu": "2GB"}`` with ``offload_folder=...`` caps what is
    held in memory and offloads the remaining layers to disk through accelerate, for
    a model larger than the memory given to it). Attention defaults to ``attn_implementation="eager"`` so attention
    patterns can be read. ``remote=True`` runs every trace on NDIF through nnsight: it takes a
    hub id that NDIF hosts, keeps only an empty skeleton here, and refuses ``device``,
    ``dtype`` and the placement keywords (``device_map``, ``max_memory``, ...), which have
    no meaning there; see docs/remote.md for what works remotely.
    """
    from transformers import AutoConfig, AutoTokenizer

    from workbench import zoo

    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path).strip():
        raise WorkbenchError(f"load() needs a zoo name, a local path or a hub id, got {name_or_path!r}")
    name = str(name_or_path)
    entry = zoo.get(name)
    hf_kwargs.setdefault("attn_implementation", "eager")
    hf_kwargs.setdefault("trust_remote_code", False)
    if remote is not False:
        return _load_remote(name, entry is not None, remote, device, dtype, hf_kwargs)
    weights_sha = None
    if entry is not None:
        path = entry.path()
        weights_sha = entry.weights_sha256()
    elif os.path.isdir(name):
        path = name
    elif _HUB_ID.match(name) and not os.path.exists(name):
        path = name
    else:
        raise WorkbenchError(
            f"unknown model {name!r}: not a zoo name and not an existing directory. Zoo names (offline): "
            f"{', '.join(zoo.names())}. For a Hugging Face model pass its hub id (e.g. 'gpt2', "
            "'EleutherAI/pythia-70m'); for a local model pass the directory holding config.json."
        )

    dev = _pick_device(device)
    _check_dispatch(hf_kwargs)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=hf_kwargs["trust_remote_code"],
                                            revision=hf_kwargs.get("revision"))
    except OSError as err:
        raise WorkbenchError(
            f"could not load {name!r}: {err}. Offline, use a zoo name ({', '.join(zoo.names())}) or a local path."
        ) from err
    except ValueError as err:  # a folder whose config.json is missing or has no model_type
        raise WorkbenchError(f"{name!r} holds no usable Hugging Face config.json ({err})") from err
    family_for(config.model_type)  # unsupported architectures fail before any weights load
    if os.path.isdir(path) and not any(os.path.exists(os.path.join(path, f)) for f in _TOKENIZER_FILES):
        raise WorkbenchError(
            f"the model folder {path!r} has no tokenizer files (any of {', '.join(_TOKENIZER_FILES)}); save the "
            "tokenizer beside the model (tokenizer.save_pretrained(folder)) or wrap the model with "
            "workbench.from_model(model, tokenizer)")
    cls = _model_class(config)
    kwargs = dict(hf_kwargs)
    kwargs.setdefault("dtype", _pick_dtype(dtype, dev))
    model = cls.from_pretrained(path, use_safetensors=True, **kwargs)
    if "device_map" not in hf_kwargs:
        model.to(dev)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(path, revision=hf_kwargs.get("revision"))
    return Subject(model, tokenizer, name=name, weights_sha256=weights_sha)


REMOTE_REFUSED = ("device_map", "max_memory", "offload_folder", "offload_state_dict", "quantization_config")


def _load_remote(name: str, in_zoo: bool, remote, device, dtype, hf_kwargs: dict) -> Subject:
    """``load(..., remote=True)``: nnsight's ``TransformersModel`` for the hub id of a causal
    language model (its config and tokenizer, and an empty skeleton on the ``meta``
    device, no weights), every trace sent to NDIF. The workbench package is registered
    with nnsight to travel by value, since the server does not have it installed."""
    if not isinstance(remote, bool):
        raise WorkbenchError(f"remote must be True (every trace runs on NDIF) or False (runs here), got {remote!r}")
    if in_zoo or os.path.exists(name) or not _HUB_ID.match(name):
        what = ("a zoo model" if in_zoo else "a local path" if os.path.exists(name) else "not a hub id")
        raise WorkbenchError(
            f"remote=True needs the Hugging Face hub id of a model the NDIF server hosts (e.g. "
            f"'meta-llama/Llama-3.1-8B'; nnsight.ndif.status() lists them), but {name!r} is {what}: its weights "
            "exist only on this machine. Load it without remote=True.")
    if not (isinstance(device, str) and device == "auto"):
        raise WorkbenchError(f"device={device!r} does not apply with remote=True: the NDIF server places the "
                             "model; leave device='auto'")
    if not (isinstance(dtype, str) and dtype == "auto"):
        raise WorkbenchError(f"dtype={dtype!r} does not apply with remote=True: the NDIF server runs the model in "
                             "the dtype it was deployed in; leave dtype='auto'")
    given = [k for k in REMOTE_REFUSED if hf_kwargs.get(k) is not None]
    if given:
        raise WorkbenchError(f"{', '.join(given)} {'does' if len(given) == 1 else 'do'} not apply with remote=True: "
                             "they place or quantize weights on this machine, and a remote model's weights stay "
                             "on the NDIF server. Remote, pass only revision= or trust_remote_code=; for a model "
                             "larger than this machine without NDIF, use device_map='auto' instead of remote=True")
    import nnsight

    import workbench

    nnsight.register(workbench)  # the server has no workbench: the code in the traces travels by value
    try:
        nn = nnsight.TransformersModel(name, task="text-generation", **hf_kwargs)
    except OSError as err:  # no such repo, a gated one, or no connection to the hub
        raise WorkbenchError(f"could not read {name!r} from the Hugging Face hub ({err}); remote=True reads the "
                             "config and tokenizer from the hub, then runs every trace on NDIF") from err
    return Subject(nn._module, nn.tokenizer, name=name, nn=nn, remote=True)


def _check_dispatch(hf_kwargs: Mapping[str, Any]) -> None:
    """``device_map`` / ``max_memory`` / ``offload_folder``: accelerate's dispatch, checked
    before any weights load."""
    if hf_kwargs.get("device_map") is None:
        given = [k for k in ("max_memory", "offload_folder", "offload_state_dict") if hf_kwargs.get(k) is not None]
        if given:
            raise WorkbenchError(f"{', '.join(given)} only apply with device_map (e.g. device_map='auto', which "
                                 "places the layers under max_memory and offloads the rest to the CPU or to "
                                 "offload_folder on disk)")
        return
    try:
        import accelerate  # noqa: F401
    except ImportError as err:
        raise WorkbenchError("device_map needs the accelerate package (pip install accelerate)") from err
    dm = hf_kwargs["device_map"]
    if not isinstance(dm, (str, Mapping, torch.device, int)):
        raise WorkbenchError(f"device_map must be 'auto', 'balanced', 'sequential', a device, or a dict "
                             f"module name -> device ('cpu', 'disk', 0, 'cuda:0'), got {type(dm).__name__}")
    mm = hf_kwargs.get("max_memory")
    if mm is not None and (not isinstance(mm, Mapping) or not mm):
        raise WorkbenchError(f"max_memory must be a dict device -> size such as {{'cpu': '2GB'}} or {{0: '10GiB', "
                             f"'cpu': '30GiB'}}, got {mm!r}")
    folder = hf_kwargs.get("offload_folder")
    if folder is not None and not isinstance(folder, (str, os.PathLike)):
        raise WorkbenchError(f"offload_folder must be a directory path, got {type(folder).__name__}")


def from_model(model: torch.nn.Module, tokenizer, *, name: str = "custom", eager: bool = True) -> Subject:
    """Wrap an already-built HF model (e.g. a tiny one made from a config) as a Subject.

    ``eager=True`` switches the model to eager attention (needed to read ``pattern``)."""
    if eager and getattr(model.config, "_attn_implementation", "eager") != "eager":
        model.set_attn_implementation("eager")
    model.eval()
    return Subject(model, tokenizer, name=name)


__all__ = ["Batch", "Subject", "load", "from_model", "save", "FAMILIES"]
