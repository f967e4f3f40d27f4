"""Interrupts at every I/O step of :mod:`workbench.storage`, shared by the reliability tests."""

from __future__ import annotations

from pathlib import Path

from workbench import storage

STEPS = ("write_tensors", "write_text", "replace", "remove")


class DiskFull(OSError):
    pass


def instrument(monkeypatch, fail_at: int | None = None, exc: BaseException | None = None) -> list[str]:
    """Wrap each I/O step of ``storage``; the ``fail_at``-th call (from 0) raises ``exc``
    (a write first leaves half its bytes behind, as a crash mid-write would)."""
    calls: list[str] = []
    for name in STEPS:
        real = getattr(storage, name)

        def step(*args, _real=real, _name=name, **kw):
            calls.append(_name)
            if fail_at is not None and len(calls) - 1 == fail_at:
                if _name in ("write_tensors", "write_text"):
                    _real(*args, **kw)
                    path = Path(args[0])
                    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
                raise exc
            return _real(*args, **kw)

        monkeypatch.setattr(storage, name, step)
    return calls
