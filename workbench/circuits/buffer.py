"""Activations from a named site, streamed through a shuffled, memory-bounded buffer.

``ActivationBuffer(subject, "resid_post.0", texts)`` runs the model over ``texts`` a few
prompts at a time (one nnsight trace per batch, stopped right after the site), keeps the
activations of real tokens (padding dropped, the first token too unless asked) in a
buffer of at most ``capacity`` rows (plus one forward's worth while refilling), and yields shuffled batches of ``batch_size`` rows.
When the buffer falls to half full it is refilled and reshuffled, so rows from many
prompts mix while memory stays bounded. The stream cycles over the texts forever (an
epoch reshuffles the prompt order) unless ``epochs`` is given.

``state_dict()`` / ``load_state_dict()`` capture the whole stream (buffer rows, prompt
cursor, random state), so a training run resumed from a checkpoint sees exactly the
batches it would have seen.
"""

from __future__ import annotations

import hashlib
import numbers
from typing import Iterator, Sequence

import torch

from workbench.errors import WorkbenchError
from workbench.layout import VECTOR_KINDS, check_vector_site, flat, site_width, unflat  # noqa: F401 (re-exported)
from workbench.memory import DEFAULT_BUDGET_BYTES, fmt_bytes

def check_texts(texts, empty: str = "no texts given; pass at least one text") -> list[str]:
    """``texts`` as a list of strings (one string is one text); anything else, an empty
    list (the error says ``empty``) or a non-string entry, is an error naming it."""
    if isinstance(texts, str):
        return [texts]
    if texts is None or isinstance(texts, (bytes, torch.Tensor)) or not hasattr(texts, "__iter__"):
        raise WorkbenchError(f"texts must be a list of strings (or one string), got {type(texts).__name__}")
    texts = list(texts)
    if not texts:
        raise WorkbenchError(empty)
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise WorkbenchError(f"texts[{i}] is a {type(t).__name__}, not a string")
    return texts


def check_int(value, name: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (not a bool), or an error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise WorkbenchError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def texts_fingerprint(texts: Sequence[str], site: str, skip_first: bool) -> torch.Tensor:
    """SHA-256 (32 uint8) of the texts, the site and ``skip_first``: what a saved stream
    state must match to resume."""
    h = hashlib.sha256(f"{site}\x00{int(skip_first)}\x00{len(texts)}".encode())
    for t in texts:
        h.update(b"\x00" + t.encode("utf-8", "surrogatepass"))
    return torch.frombuffer(bytearray(h.digest()), dtype=torch.uint8).clone()


def token_mask(batch, skip_first: bool) -> torch.Tensor:
    """Real-token mask [batch, pos], with position 0 dropped when ``skip_first``."""
    mask = batch.attention_mask.bool().clone()
    if skip_first:
        mask[:, 0] = False
    return mask


def collect(subject, site: str, texts: Sequence[str], *, batch_size: int = 32, skip_first: bool = True,
            max_rows: int | None = None, max_bytes: int = DEFAULT_BUDGET_BYTES) -> torch.Tensor:
    """All real-token activations at ``site`` over ``texts`` as one [rows, width] tensor
    (float32, CPU). Errors before running if it would exceed ``max_bytes``."""
    s = check_vector_site(subject, site)
    width = site_width(subject, s.name)
    texts = check_texts(texts, "no texts to collect activations from")
    batch_size = check_int(batch_size, "batch_size")
    if max_rows is not None:
        max_rows = check_int(max_rows, "max_rows", 0)
    max_bytes = check_int(max_bytes, "max_bytes")
    rows = []
    n = 0
    for start in range(0, len(texts), batch_size):
        batch = subject.tokenize(texts[start : start + batch_size])
        est = (n + int(batch.attention_mask.sum())) * width * 4
        if est > max_bytes:
            raise WorkbenchError(
                f"collecting {site} over {len(texts)} texts would take more than {fmt_bytes(max_bytes)}; "
                "use an ActivationBuffer to stream them, pass fewer texts, or raise max_bytes"
            )
        x = flat(subject.cache(batch, [s.name])[s.name], s)
        got = x[token_mask(batch, skip_first)].float().cpu()
        rows.append(got)
        n += len(got)
        if max_rows is not None and n >= max_rows:
            break
    out = torch.cat(rows) if rows else torch.empty(0, width)
    return out[:max_rows] if max_rows is not None else out


class ActivationBuffer:
    """Shuffled batches of token activations at one site, streamed from a model.

    Parameters: ``capacity`` rows kept at most (checked against ``max_bytes``),
    ``batch_size`` rows per yielded batch, ``prompt_batch_size`` prompts per forward,
    ``skip_first`` drops position 0 (BOS, whose norm dwarfs the rest), ``epochs`` stops
    after that many passes over the texts (default: cycle forever), ``seed`` fixes the
    shuffles.
    """

    def __init__(
        self,
        subject,
        site: str,
        texts: Sequence[str],
        *,
        batch_size: int = 256,
        capacity: int = 16384,
        prompt_batch_size: int = 32,
        skip_first: bool = True,
        epochs: int | None = None,
        seed: int = 0,
        max_bytes: int = DEFAULT_BUDGET_BYTES,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.subject = subject
        self.site = check_vector_site(subject, site).name
        self.width = site_width(subject, self.site)
        self.texts = check_texts(texts, "an ActivationBuffer needs at least one text")
        batch_size, capacity = check_int(batch_size, "batch_size"), check_int(capacity, "capacity")
        if capacity < 2 * batch_size:
            raise WorkbenchError(
                f"need batch_size >= 1 and capacity >= 2 * batch_size, got batch_size={batch_size}, capacity={capacity}"
            )
        prompt_batch_size = check_int(prompt_batch_size, "prompt_batch_size")
        if epochs is not None:
            epochs = check_int(epochs, "epochs")
        if not isinstance(skip_first, bool):
            raise WorkbenchError(f"skip_first must be True or False, got {skip_first!r}")
        seed, max_bytes = check_int(seed, "seed", 0), check_int(max_bytes, "max_bytes")
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise WorkbenchError(f"dtype must be a floating torch dtype (torch.float32, torch.bfloat16, ...), got {dtype!r}")
        need = capacity * self.width * torch.tensor([], dtype=dtype).element_size()
        if need > max_bytes:
            raise WorkbenchError(
                f"a buffer of {capacity} rows x {self.width} would take {fmt_bytes(need)} (budget {fmt_bytes(max_bytes)}); "
                "lower capacity or raise max_bytes"
            )
        self.batch_size = batch_size
        self.capacity = capacity
        self.prompt_batch_size = prompt_batch_size
        self.skip_first = skip_first
        self.epochs = epochs
        self.dtype = dtype
        self.gen = torch.Generator().manual_seed(seed)
        self.rows = torch.empty(0, self.width, dtype=dtype)
        self.order = torch.randperm(len(self.texts), generator=self.gen)
        self.cursor = 0
        self.epoch = 0
        self.tokens_seen = 0
        self.epoch_rows = 0  # rows the current pass over the texts gave so far
        self.fingerprint = texts_fingerprint(self.texts, self.site, skip_first)

    # ------------------------------------------------------------------ streaming

    def _next_texts(self) -> list[str] | None:
        if self.cursor >= len(self.texts):
            if self.epochs is not None and self.epoch >= self.epochs:
                return None  # used up already
            if self.epoch_rows == 0:
                raise WorkbenchError(
                    f"none of the {len(self.texts)} texts holds a token at {self.site}"
                    f"{' after position 0 (skip_first=True drops it)' if self.skip_first else ''}; "
                    "pass texts of at least two tokens"
                )
            self.epoch_rows = 0
            self.epoch += 1
            if self.epochs is not None and self.epoch >= self.epochs:
                return None
            self.order = torch.randperm(len(self.texts), generator=self.gen)
            self.cursor = 0
        idx = self.order[self.cursor : self.cursor + self.prompt_batch_size].tolist()
        self.cursor += len(idx)
        return [self.texts[i] for i in idx]

    def refill(self) -> None:
        """Run the model until the buffer is full (or the texts run out), then shuffle."""
        parts = [self.rows]
        n = len(self.rows)
        while n < self.capacity:
            texts = self._next_texts()
            if texts is None:
                break
            batch = self.subject.tokenize(texts)
            x = flat(self.subject.cache(batch, [self.site])[self.site], self.site)
            got = x[token_mask(batch, self.skip_first)].detach().to("cpu", self.dtype)
            parts.append(got)
            n += len(got)
            self.tokens_seen += len(got)
            self.epoch_rows += len(got)
        rows = torch.cat(parts)
        self.rows = rows[torch.randperm(len(rows), generator=self.gen)]

    def next_batch(self) -> torch.Tensor | None:
        """The next [batch_size, width] batch (None once finite epochs are used up)."""
        if len(self.rows) < self.capacity // 2 + self.batch_size:
            self.refill()
        if len(self.rows) < self.batch_size:
            if len(self.rows) == 0:
                return None
            out, self.rows = self.rows, self.rows[:0]
            return out
        out, self.rows = self.rows[: self.batch_size], self.rows[self.batch_size :]
        return out

    def __iter__(self) -> Iterator[torch.Tensor]:
        while True:
            b = self.next_batch()
            if b is None:
                return
            yield b

    def __next__(self) -> torch.Tensor:
        b = self.next_batch()
        if b is None:
            raise StopIteration
        return b

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {
            "rows": self.rows.clone(),
            "order": self.order.clone(),
            "counters": torch.tensor([self.cursor, self.epoch, self.tokens_seen, self.epoch_rows], dtype=torch.long),
            "rng": self.gen.get_state(),
            "fingerprint": self.fingerprint.clone(),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Resume the stream from :meth:`state_dict`; a state of another stream (other
        texts, site or ``skip_first``, another width) or a damaged one is refused and
        the buffer is left as it was."""
        if not isinstance(state, dict):
            state = {}
        missing = sorted({"rows", "order", "counters", "rng"} - set(state))
        if missing:
            raise WorkbenchError(f"the saved stream state lacks {missing}: it is not an ActivationBuffer's; "
                                 "resume with the same kind of data")
        rows, order, counters, rng = (state[k] for k in ("rows", "order", "counters", "rng"))
        if not all(isinstance(t, torch.Tensor) for t in (rows, order, counters, rng)):
            raise WorkbenchError("the saved stream state must hold tensors (rows, order, counters, rng)")
        if rows.ndim != 2 or rows.shape[1] != self.width:
            raise WorkbenchError(f"buffer state has rows {tuple(rows.shape)}; this buffer holds width {self.width}")
        if "fingerprint" in state and not torch.equal(state["fingerprint"].to(torch.uint8), self.fingerprint):
            raise WorkbenchError(f"the saved stream state is of other texts, another site or skip_first than this "
                                 f"buffer's ({len(self.texts)} texts at {self.site}); resume with the same ones")
        n = len(self.texts)
        if order.ndim != 1 or len(order) != n:
            raise WorkbenchError(f"the saved stream state is for {len(order) if order.ndim == 1 else '?'} texts; this "
                                 f"buffer has {n}: resume with the same texts")
        if order.dtype.is_floating_point or not torch.equal(order.sort().values, torch.arange(n)):
            raise WorkbenchError(f"the saved stream state's text order is not a permutation of the {n} texts; "
                                 "the state is damaged")
        if counters.ndim != 1 or len(counters) not in (3, 4):
            raise WorkbenchError(f"the saved stream state's counters have shape {tuple(counters.shape)}, expected (4,) "
                                 "(cursor, epoch, tokens seen, rows this epoch); the state is damaged")
        values = [int(v) for v in counters] + [1] * (4 - len(counters))
        if not 0 <= values[0] <= n or min(values[1:]) < 0:
            raise WorkbenchError(f"the saved stream state's counters {values[:len(counters)]} are out of range for "
                                 f"{n} texts; the state is damaged")
        if not bool(torch.isfinite(rows).all()):
            raise WorkbenchError("the saved stream state holds NaN or inf activation rows; the state is damaged")
        gen = torch.Generator()
        try:
            gen.set_state(rng.clone())
        except (RuntimeError, TypeError) as e:
            raise WorkbenchError(f"the saved stream state's random state is not a CPU generator's: {e}") from None
        self.rows = rows.to(self.dtype).clone()
        self.order = order.clone()
        self.cursor, self.epoch, self.tokens_seen, self.epoch_rows = values
        self.gen = gen

    def __repr__(self) -> str:
        return (f"ActivationBuffer({self.site!r}, width={self.width}, rows={len(self.rows)}/{self.capacity}, "
                f"texts={len(self.texts)}, epoch={self.epoch})")
