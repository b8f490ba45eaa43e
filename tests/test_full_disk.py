"""Full disk: a write that fails half-way (simulated: the bytes stop and OSError(ENOSPC) is raised, inside the real
`core.atomic_write`) leaves the previous file exactly as it was, no temporary file behind, an error that says what
happened, and a run that resumes to the same bits as one that never failed."""
import errno
import io
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from catalogue import TINY, copy_run, run_cli, snapshot, tiny_run  # noqa: F401 (tiny_run: a fixture)
from crossclass_nb import core
from crossclass_nb.checkpoint import load_checkpoint
from crossclass_nb.config import get_config
from crossclass_nb.core import CheckpointError, CrossclassError
from crossclass_nb.rundir import load_metrics
from crossclass_nb.training import train

CFG3 = dict(TINY, epochs=3)


@contextmanager
def disk_full_on(match, monkeypatch):
    "Make the first write of a file whose name satisfies `match` fail half-way with ENOSPC; yields the paths hit."
    real, hits = core.atomic_write, []

    def atomic_write(path, write):
        path = Path(path)
        if hits or not match(path): return real(path, write)
        hits.append(path)
        def half_then_full(f):
            buf = io.BytesIO(); write(buf); data = buf.getvalue()
            f.write(data[:len(data) // 2]); f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(path, half_then_full)

    users = [m for name, m in sys.modules.items()          # core, and every module that imported the function itself
             if name.startswith("crossclass_nb") and getattr(m, "atomic_write", None) is real]
    for m in users: monkeypatch.setattr(m, "atomic_write", atomic_write)
    yield hits
    for m in users: monkeypatch.setattr(m, "atomic_write", real)


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    "The 3-epoch run that never failed."
    return train(get_config("fmnist-tiny", **CFG3), tmp_path_factory.mktemp("straight") / "run", quiet=True)


def _same_end(a: Path, b: Path):
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] == 3
    assert all(torch.equal(ca["model"][k], cb["model"][k]) for k in ca["model"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]
    assert strip(load_metrics(a)) == strip(load_metrics(b))


TARGETS = {
    "last.pt": lambda p: p.name == "last.pt",
    "first-checkpoint-of-epoch-3": lambda p: p.suffix == ".pt",
    "metrics.jsonl": lambda p: p.name == "metrics.jsonl",
    "metrics.csv": lambda p: p.name == "metrics.csv",
    "cas-json": lambda p: p.parent.name == "cas",
    "config.json": lambda p: p.name == "config.json",
}


@pytest.mark.parametrize("target", TARGETS)
def test_full_disk_during_a_run(target, tmp_path, monkeypatch, straight, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")                      # 2 epochs done; the resume to 3 hits the full disk
    before = snapshot(run)
    with disk_full_on(TARGETS[target], monkeypatch) as hits, pytest.raises(Exception) as e:
        train(get_config("fmnist-tiny", **CFG3), run, resume=True, quiet=True)
    assert hits, "the simulated full disk was never reached"
    hit = hits[0]
    rel = str(hit.relative_to(run))
    after = snapshot(run)
    if rel in before: assert after[rel] == before[rel], f"{rel} changed although its write failed"
    assert not list(run.rglob(".*.tmp")), "a temporary file was left behind"
    for name in ("last.pt", "best.pt"): load_checkpoint(run / name)          # whole (old, or already the new one)
    msg = str(e.value)  # the wording is asserted where it is raised: the cause in chapter 00, the rest in 11
    if hit.suffix == ".pt":
        assert isinstance(e.value, CheckpointError), repr(e.value)
        assert hit.name in msg, msg                                              # the file that failed
    else:
        assert isinstance(e.value, (CrossclassError, OSError)) and e.value.__class__ is not RuntimeError, repr(e.value)
    assert load_checkpoint(run / "last.pt")["epoch"] in (2, 3)
    train(get_config("fmnist-tiny", **CFG3), run, resume=True, quiet=True)    # space freed: resume
    _same_end(straight, run)


def test_full_disk_on_the_command_line(tmp_path, monkeypatch, tiny_run):
    run = copy_run(tiny_run, tmp_path / "run")
    before = snapshot(run)
    with disk_full_on(lambda p: p.name == "last.pt", monkeypatch):
        res = run_cli(["train", "--resume", run, "--epochs", "3"])
    assert res.code == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert snapshot(run)["last.pt"] == before["last.pt"]


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    "The core helper alone: half the bytes, then ENOSPC (from torch.save itself, as a full disk would)."
    p = tmp_path / "last.pt"
    core.atomic_torch_save({"v": torch.arange(3)}, p)
    before = snapshot(tmp_path)
    real_save = torch.save
    def half_save(obj, f, *a, **k):
        buf = io.BytesIO(); real_save(obj, buf, *a, **k)
        f.write(buf.getvalue()[:100]); raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(OSError) as e: core.atomic_torch_save({"v": torch.arange(1000)}, p)
    monkeypatch.setattr(torch, "save", real_save)
    assert e.value.errno == errno.ENOSPC
    assert snapshot(tmp_path) == before
    assert torch.equal(core.safe_load(p)["v"], torch.arange(3))
