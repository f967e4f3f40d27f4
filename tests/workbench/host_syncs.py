"""Count host round-trips (device -> host reads) during a call, on any device.

On a GPU a host round-trip stalls the Python thread until the device catches up: a
``.item()`` per head or per feature in a hot loop serialises the whole analysis. On the
CPU nothing stalls, but the same calls still happen, so they can be counted here and a
test can assert that their number does not grow with the number of nodes.

Counted, per call site (the innermost frame inside ``workbench/``):

- ``aten._local_scalar_dense``: ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)``,
  ``if t:``, formatting a 0-dim tensor;
- ``aten.nonzero`` / ``aten.masked_select`` and indexing (read or write) with a boolean
  tensor: the output size depends on the data, so the host waits for it;
- ``Tensor.tolist``, ``Tensor.numpy``, ``np.asarray(t)`` (``__array__``), ``Tensor.cpu``:
  a copy to the host (these do not reach the dispatcher, so a function mode sees them);
- ``upload``: ``torch.tensor`` / ``torch.as_tensor`` of host data (lists, numbers,
  arrays). A blocking host-to-device copy also waits for the device, so building an
  index tensor from a Python list per node costs what a read does.

Not counted: reads inside ``torch.optim`` (Adam's step counters are host tensors on
every device unless ``capturable``/``fused``, so reading them never waits for a GPU).
"""

from __future__ import annotations

import collections
import contextlib
import os
import sys

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

_WORKBENCH = os.sep + "workbench" + os.sep
_TESTS = os.sep + "tests" + os.sep
_HOST_METHODS = {"tolist", "numpy", "__array__", "cpu"}
_DATA_DEPENDENT = {"nonzero", "masked_select", "masked_scatter"}


_OPTIM = os.sep + os.path.join("torch", "optim") + os.sep


def _where() -> str | None:
    """file:line of the innermost workbench frame (else the innermost test frame); None
    inside ``torch.optim``."""
    f = sys._getframe(2)
    fallback = None
    while f is not None:
        fn = f.f_code.co_filename
        if _OPTIM in fn:
            return None
        if fn == __file__:
            pass
        elif _WORKBENCH in fn and _TESTS not in fn:
            return f"{fn.rsplit(_WORKBENCH, 1)[1]}:{f.f_lineno}"
        elif fallback is None and _TESTS in fn:
            fallback = f"tests/{fn.rsplit(_TESTS, 1)[1]}:{f.f_lineno}"
        f = f.f_back
    return fallback or "?"


def _has_data(x) -> bool:
    """Host data with at least one number (an empty list moves nothing)."""
    if isinstance(x, torch.Tensor):
        return False
    try:
        return len(x) > 0
    except TypeError:
        return True  # a number


def _has_bool_index(indices) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


class _Dispatch(TorchDispatchMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name == "_local_scalar_dense":
            self.counter.add("item")
        elif name in _DATA_DEPENDENT:
            self.counter.add(name)
        elif name in ("index", "index_put", "index_put_", "_index_put_impl_") and _has_bool_index(args[1]):
            self.counter.add("bool index")
        return func(*args, **(kwargs or {}))


class _Function(TorchFunctionMode):
    def __init__(self, counter: "SyncCounter") -> None:
        super().__init__()
        self.counter = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in _HOST_METHODS:
            self.counter.add(name)
        elif func in (torch.tensor, torch.as_tensor) and args and _has_data(args[0]):
            self.counter.add("upload")
        return func(*args, **(kwargs or {}))


class SyncCounter:
    """``with SyncCounter() as c: ...`` then ``c.total``, ``c.by_site`` ({file:line: n})
    and ``c.by_kind``."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def add(self, kind: str) -> None:
        where = _where()
        if where is not None:
            self.events.append((kind, where))

    @property
    def total(self) -> int:
        return len(self.events)

    @property
    def by_site(self) -> dict[str, int]:
        return dict(collections.Counter(w for _, w in self.events).most_common())

    @property
    def by_kind(self) -> dict[str, int]:
        return dict(collections.Counter(k for k, _ in self.events).most_common())

    def __enter__(self) -> "SyncCounter":
        self._stack = contextlib.ExitStack()
        self._stack.enter_context(_Function(self))
        self._stack.enter_context(_Dispatch(self))
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()


def count_syncs(fn, *args, **kwargs) -> tuple[SyncCounter, object]:
    """Run ``fn(*args, **kwargs)`` counting host round-trips: (counter, result)."""
    with SyncCounter() as c:
        out = fn(*args, **kwargs)
    return c, out
