"""How many CPU threads torch uses: the CPU share this process actually gets.

torch sizes its thread pool from the cores it sees, not the share it gets. Under a CPU
quota (Binder, a container, a CI runner) or beside another busy process, that
oversubscribes the cores and a tutorial can crawl tens of times slower (a thread that
waits at a barrier for a descheduled sibling). So ``import workbench`` sets torch's
intra-op threads to :func:`available_cpus`: the CPUs this process may run on (its
affinity mask), capped by the cgroup CPU quota (``cpu.max`` in cgroup v2,
``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` in v1), less the other processes running
at that moment (``procs_running`` in ``/proc/stat``), and at least one.

Override it, in this order of precedence:

- ``WORKBENCH_THREADS=N`` in the environment (read at import);
- ``workbench.set_threads(N)`` at any time;
- ``WORKBENCH_THREADS=torch`` leaves torch's own default untouched.
"""

from __future__ import annotations

import math
import os

from workbench.errors import WorkbenchError

ENV = "WORKBENCH_THREADS"


def _cgroup_quota(root: str = "/sys/fs/cgroup") -> float | None:
    """CPUs allowed by the cgroup quota, or None when unlimited / unknown."""
    try:
        with open(os.path.join(root, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(root, "cpu", "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(root, "cpu", "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _others_running(stat: str = "/proc/stat") -> int:
    """Processes running now besides this one (0 when unknown)."""
    try:
        with open(stat) as f:
            for line in f:
                if line.startswith("procs_running"):
                    return max(0, int(line.split()[1]) - 1)
    except (OSError, ValueError, IndexError):
        pass
    return 0


def available_cpus(cgroup_root: str = "/sys/fs/cgroup", *, stat: str | None = "/proc/stat") -> int:
    """CPUs this process can use: its affinity mask, capped by the cgroup quota, less the
    processes running besides it (read from ``stat``; ``stat=None`` ignores them); >= 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        n = min(n, max(1, math.floor(quota)))
    if stat is not None:
        n -= _others_running(stat)
    return max(1, n)


def set_threads(n: int | None = None) -> int:
    """Set torch's intra-op thread count to ``n`` (default: :func:`available_cpus`);
    returns the count now in force."""
    import torch

    if n is None:
        n = available_cpus()
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise WorkbenchError(f"the thread count must be a positive integer, got {n!r}")
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n


def configure_from_env() -> int | None:
    """What ``import workbench`` does: ``WORKBENCH_THREADS`` if set, else the CPU share."""
    raw = os.environ.get(ENV, "").strip()
    if raw == "torch":
        return None
    if raw:
        try:
            n = int(raw)
        except ValueError:
            raise WorkbenchError(f"{ENV}={raw!r} is not a thread count; set a positive integer or 'torch'") from None
        return set_threads(n)
    return set_threads()


def reproducible(seed: int = 0, threads: int = 1) -> None:
    """Pin everything that can be pinned, for bit-identical reruns on this machine.

    Seeds Python's ``random``, NumPy's global generator and torch (CPU and every CUDA
    device), fixes torch's intra-op threads to ``threads`` and asks torch for
    deterministic kernels (warning, not failing, where an op has none).

    What this guarantees: the same call with the same seed gives the same numbers bit
    for bit on the same machine, torch build and thread count (every lens also takes its
    own ``seed`` and draws from a private generator, so the global seeds only matter for
    code outside the workbench). What it cannot: float sums are reduced in an order that
    depends on the thread count, so a training run at 1 thread and at 2 threads differs
    in the last bits after the first step and drifts apart (relative 1e-6 after a few
    steps); GPU kernels and another torch build may also round differently."""
    import random

    import numpy as np
    import torch

    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise WorkbenchError(f"seed must be a non-negative integer, got {seed!r}")
    set_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


__all__ = ["ENV", "available_cpus", "configure_from_env", "reproducible", "set_threads"]
