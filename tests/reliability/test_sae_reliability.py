"""SAE artifacts survive interruptions: an exception or Ctrl-C at any single I/O step of a
save or a checkpoint leaves the old artifact or the new one (never a mix, never a loss of
files the save did not write), and a training run resumed from what is left is
bit-identical to one that was never interrupted."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import WorkbenchError
from tests.reliability.interrupts import STEPS, DiskFull, instrument  # noqa: F401
from workbench import storage
from workbench.circuits import SAE, train_sae



def same_weights(a: SAE, b: SAE) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def two_saes():
    old = SAE(12, 40, kind="topk", k=3, site="resid_post.0", seed=0)
    new = SAE(12, 40, kind="topk", k=3, site="resid_post.0", seed=1)
    with torch.no_grad():
        new.b_enc.fill_(0.5)
    return old, new


@pytest.mark.parametrize("exc", [DiskFull("no space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_sae_save_interrupted_at_every_step(tmp_path, monkeypatch, exc):
    old, new = two_saes()
    probe = tmp_path / "probe"
    old.save(probe)
    with monkeypatch.context() as m:
        calls = instrument(m)
        new.save(probe)
    assert calls == ["write_tensors", "replace", "write_text", "replace", "remove"], calls
    seen = []
    for i in range(len(calls)):
        folder = tmp_path / f"s{i}"
        old.save(folder)
        (folder / "mine.txt").write_text("the user's notes")
        with monkeypatch.context() as m:
            instrument(m, fail_at=i, exc=exc)
            with pytest.raises(type(exc)):
                new.save(folder)
        back = SAE.load(folder)
        assert same_weights(back, old) or same_weights(back, new), f"step {i} ({calls[i]}): a mix of old and new"
        seen.append("new" if same_weights(back, new) else "old")
        assert (folder / "mine.txt").read_text() == "the user's notes"
        new.save(folder)  # the next save succeeds and clears what the interrupted one left
        assert same_weights(SAE.load(folder), new)
        assert sorted(p.name for p in folder.iterdir() if not p.name.startswith("sae-")) == ["cfg.json", "mine.txt"]
        assert len(list(folder.glob("sae-*.safetensors"))) == 1
    assert seen == ["old"] * 4 + ["new"]  # only the clean-up comes after the commit point


@pytest.mark.parametrize("exc", [DiskFull("no space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_first_save_interrupted_leaves_nothing_to_load(tmp_path, monkeypatch, exc):
    _, new = two_saes()
    for i in range(4):
        folder = tmp_path / f"s{i}"
        with monkeypatch.context() as m:
            instrument(m, fail_at=i, exc=exc)
            with pytest.raises(type(exc)):
                new.save(folder)
        with pytest.raises(WorkbenchError, match="no SAE at"):
            SAE.load(folder)
        new.save(folder)  # leftovers of our own interrupted save are not "someone else's files"
        assert same_weights(SAE.load(folder), new)


@pytest.mark.parametrize("exc", [DiskFull("no space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_saelens_export_interrupted_at_every_step(tmp_path, monkeypatch, exc):
    _, new = two_saes()
    with monkeypatch.context() as m:
        calls = instrument(m)
        new.save(tmp_path / "probe" / "lens", format="saelens")
    assert calls == ["write_tensors", "write_text", "replace"], calls
    for i in range(len(calls)):
        parent = tmp_path / f"p{i}"
        with monkeypatch.context() as m:
            instrument(m, fail_at=i, exc=exc)
            with pytest.raises(type(exc)):
                new.save(parent / "lens", format="saelens")
        assert list(parent.iterdir()) == []  # no half-written folder, no temporary left behind
        new.save(parent / "lens", format="saelens")
        assert same_weights(SAE.load(parent / "lens"), new)


def data(n=2000, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) * torch.rand(d, generator=g)


KW = dict(steps=30, batch_size=64, lr=3e-3, l1_coeff=0.05, dead_after=200, seed=3, progress=False,
          checkpoint_every=10)


@pytest.mark.parametrize("kind", ["topk", "relu"])
@pytest.mark.parametrize("exc", [DiskFull("no space left on device"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_checkpoint_interrupted_at_every_step_resumes_exactly(tmp_path, monkeypatch, kind, exc):
    X = data()
    k = 3 if kind == "topk" else None
    kw = {**KW, "resample_every": 7 if kind == "relu" else None}
    ref = SAE(12, 40, kind=kind, k=k, seed=0)
    ref_log = train_sae(ref, X, **kw)
    # an uninterrupted run with checkpoints: the I/O steps of each, and the states at steps 10 and 20
    states = {}
    real_commit = storage.commit

    def recording_commit(folder, name, manifest, tensors, **kw2):
        states[manifest["step"]] = {k2: v.clone() for k2, v in tensors.items() if k2.startswith("sae.")}
        return real_commit(folder, name, manifest, tensors, **kw2)

    with monkeypatch.context() as m:
        m.setattr(storage, "commit", recording_commit)
        calls = instrument(m)
        train_sae(SAE(12, 40, kind=kind, k=k, seed=0), X, checkpoint=tmp_path / "probe", **kw)
    assert sorted(states) == [10, 20, 30]
    first = ["write_tensors", "replace", "write_text", "replace"]
    assert calls == first + (first + ["remove"]) * 2, calls
    for i in range(5):  # each I/O step of the checkpoint at step 20
        folder = tmp_path / f"ck{i}"
        with monkeypatch.context() as m:
            instrument(m, fail_at=len(first) + i, exc=exc)
            with pytest.raises(type(exc)):
                train_sae(SAE(12, 40, kind=kind, k=k, seed=0), X, checkpoint=folder, **kw)
        meta = storage.read_json(folder / "train_state.json")
        t = storage.read_committed(folder, "train_state.json", "checkpoint", manifest=meta)
        assert meta["step"] == (20 if i == 4 else 10), (i, meta["step"])
        for name, v in states[meta["step"]].items():  # the tensors are those of the step the manifest names
            assert torch.equal(t[name], v), (i, name)
        again = SAE(12, 40, kind=kind, k=k, seed=0)
        log = train_sae(again, X, checkpoint=folder, **kw)
        assert same_weights(again, ref), f"resumed after an interruption at I/O step {i} differs"
        assert np.array_equal(log["loss"], ref_log["loss"])


def test_damaged_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    X = data(500)
    train_sae(SAE(12, 40, kind="topk", k=3), X, steps=4, checkpoint=tmp_path / "ck", progress=False)
    meta = json.loads((tmp_path / "ck" / "train_state.json").read_text())
    (tmp_path / "ck" / meta["tensors"]["file"]).write_bytes(b"\0" * 64)
    with pytest.raises(WorkbenchError, match="SHA-256"):
        train_sae(SAE(12, 40, kind="topk", k=3), X, steps=8, checkpoint=tmp_path / "ck", progress=False)
    (tmp_path / "ck" / meta["tensors"]["file"]).unlink()
    with pytest.raises(WorkbenchError, match="does not exist"):
        train_sae(SAE(12, 40, kind="topk", k=3), X, steps=8, checkpoint=tmp_path / "ck", progress=False)
    old = tmp_path / "old"  # the layout of earlier versions (two files renamed one after the other)
    old.mkdir()
    (old / "train_state.json").write_text(json.dumps({"step": 10, "config": {}, "log": {}}))
    with pytest.raises(WorkbenchError, match="not a workbench SAE training checkpoint"):
        train_sae(SAE(12, 40, kind="topk", k=3), X, steps=8, checkpoint=old, progress=False)


def test_no_pickle_anywhere(tmp_path):
    """SAE folders and checkpoints are JSON and safetensors only."""
    X = data(300)
    sae = SAE(12, 40, kind="batchtopk", k=3)
    train_sae(sae, X, steps=3, checkpoint=tmp_path / "ck", progress=False)
    sae.save(tmp_path / "s")
    sae.save(tmp_path / "l", format="saelens")
    for p in tmp_path.rglob("*"):
        if p.is_file():
            assert p.suffix in (".json", ".safetensors"), p
            head = p.read_bytes()[:2]
            assert head != b"\x80\x04" and head[:1] != b"PK", f"{p} looks like a pickle / torch.save file"
