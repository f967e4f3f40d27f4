"""The thread count follows the CPU share: affinity capped by the cgroup quota, overridable."""

import os

import pytest
import torch

from workbench import threads
from workbench.errors import WorkbenchError


def _cgroup(tmp_path, v2=None, v1=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2)
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(str(v1[0]))
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(str(v1[1]))
    return str(tmp_path)


def test_quota_caps_affinity(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert threads.available_cpus(_cgroup(tmp_path / "a", v2="150000 100000"), stat=None) == 1
    assert threads.available_cpus(_cgroup(tmp_path / "b", v2="400000 100000"), stat=None) == 4
    assert threads.available_cpus(_cgroup(tmp_path / "c", v2="max 100000"), stat=None) == 16
    assert threads.available_cpus(_cgroup(tmp_path / "d", v1=(200000, 100000)), stat=None) == 2
    assert threads.available_cpus(_cgroup(tmp_path / "e", v1=(-1, 100000)), stat=None) == 16
    assert threads.available_cpus(str(tmp_path / "missing"), stat=None) == 16


def test_affinity_below_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3})
    assert threads.available_cpus(_cgroup(tmp_path, v2="800000 100000"), stat=None) == 2


def test_env_override_and_set_threads(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv(threads.ENV, "3")
        assert threads.configure_from_env() == 3 and torch.get_num_threads() == 3
        monkeypatch.setenv(threads.ENV, "torch")
        assert threads.configure_from_env() is None and torch.get_num_threads() == 3
        monkeypatch.setenv(threads.ENV, "many")
        with pytest.raises(WorkbenchError, match="WORKBENCH_THREADS='many'"):
            threads.configure_from_env()
        for bad in (0, -2, 1.5, True):
            with pytest.raises(WorkbenchError, match="positive integer"):
                threads.set_threads(bad)
        assert threads.set_threads(2) == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_busy_processes_are_left_their_cores(tmp_path, monkeypatch):
    """Beside one busy process on two cores, one thread (two would wait on each other)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    stat = tmp_path / "stat"
    root = str(tmp_path / "nocgroup")
    for running, want in ((1, 2), (2, 1), (9, 1)):
        stat.write_text(f"cpu  1 2 3\nprocs_running {running}\nprocs_blocked 0\n")
        assert threads.available_cpus(root, stat=str(stat)) == want
    stat.write_text("garbage")
    assert threads.available_cpus(root, stat=str(stat)) == 2


def test_reproducible_pins_seed_and_threads_and_reruns_bit_identically():
    import random

    import numpy as np

    import workbench
    from workbench.taskvec import finetune

    before = torch.get_num_threads()
    try:
        workbench.reproducible(7, threads=1)
        assert torch.get_num_threads() == 1 and torch.are_deterministic_algorithms_enabled()
        draws = (random.random(), float(np.random.rand()), float(torch.rand(())))
        workbench.reproducible(7, threads=1)
        assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == draws
        lm = workbench.load("tasklm")
        a = finetune(lm, "antonym", steps=3, batch_size=8, seed=3)
        b = finetune(lm, "antonym", steps=3, batch_size=8, seed=3)
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert any(not torch.equal(a[k], lm.model.state_dict()[k]) for k in a)  # it trained
    finally:
        torch.use_deterministic_algorithms(False)
        torch.set_num_threads(before)


@pytest.mark.parametrize("seed", [-1, 1.5, "0", True])
def test_reproducible_refuses_a_bad_seed(seed):
    import workbench

    with pytest.raises(WorkbenchError, match="seed"):
        workbench.reproducible(seed)
