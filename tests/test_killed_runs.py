"""Killed runs: training processes are SIGKILLed at seeded random moments, including in the middle of writing a
checkpoint; after every kill the run directory resumes, and every finished run is bit-identical to an uninterrupted
one. A second process on a run directory in use is refused; the lock of a killed process does not stick.

To afford many trials, the training processes are forked from a small server that has already imported torch and
read the dataset (fork is safe there: it has done no parallel work). Each child is a real process: it takes the run
lock, writes real files, and dies by SIGKILL. In "slow-write" children every file write goes through the real
`core.atomic_write`, its bytes fed in a few chunks with a pause between them, which opens a window to kill inside.
"""
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossclass_nb.core import CheckpointError, RunDirError
from crossclass_nb.config import get_config
from crossclass_nb.rundir import RunLock, load_metrics
from crossclass_nb.checkpoint import load_checkpoint
from crossclass_nb.training import train

from catalogue import copy_run, tiny_run  # noqa: F401 (tiny_run: a fixture)

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

# small but complete: EMA distillation, label smoothing, augmentation, CAS every epoch, epoch checkpoints
CFG = get_config("fmnist-tiny", train_size=100, val_size=50, test_size=50, batch_size=25, epochs=4, eval_steps=2,
                 save_every=2, figures=False, augment=True, label_smoothing=0.1, kd="ema", kd_decay=0.9,
                 kd_start=1, kd_end=3, milestones=[3])

SERVER = r"""
import io, json, os, sys, time, traceback
from pathlib import Path
import torch
torch.set_num_threads(1)
from crossclass_nb import core, learner
from crossclass_nb.config import TrainConfig
from crossclass_nb.training import make_trainer, train
make_trainer(TrainConfig.from_json(sys.argv[1]), None)   # warm the data cache and every lazy import before forking
REAL = core.atomic_write

def child(cmd):
    log = open(cmd["status"], "a", buffering=1)
    def event(s): log.write(f"{time.monotonic():.4f} {os.getpid()} {s}\n")
    if cmd["slow"]:
        def slow_write(path, write):
            def chunked(f):
                buf = io.BytesIO(); write(buf); data = buf.getvalue()
                event(f"save {Path(path).name}")
                step = max(1, -(-len(data) // cmd["chunks"]))
                for i in range(0, len(data), step):
                    f.write(data[i:i + step]); f.flush(); time.sleep(cmd["slow"])
            out = REAL(path, chunked); event(f"saved {Path(path).name}"); return out
        core.atomic_write = learner.atomic_write = slow_write      # learner: the figures' own import of it
    event("start")
    train(TrainConfig.from_dict(cmd["config"]), cmd["run"], resume=True, quiet=True)
    event("done")

print("ready", flush=True)
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "start":
        pid = os.fork()
        if pid == 0:
            os.dup2(2, 1)                      # the protocol owns stdout; the child's prints go to stderr
            code = 0
            try: child(cmd)
            except BaseException: traceback.print_exc(); code = 1
            sys.stderr.flush(); os._exit(code)
        print(pid, flush=True)
    elif cmd["op"] == "wait":
        _, st = os.waitpid(cmd["pid"], 0)
        print(st, flush=True)
"""


class Server:
    "Forks training processes on demand (see the module docstring)."
    def __init__(self, log: Path):
        self.err = open(log, "w")
        self.p = subprocess.Popen([sys.executable, "-c", SERVER, CFG.to_json()], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, bufsize=1, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert self.p.stdout.readline().strip() == "ready", Path(log).read_text()

    def ask(self, **cmd) -> int:
        self.p.stdin.write(json.dumps(cmd) + "\n"); self.p.stdin.flush()
        line = self.p.stdout.readline()
        assert line, "the fork server died: " + Path(self.err.name).read_text()[-3000:]
        return int(line)

    def start(self, run: Path, status: Path, slow: float = 0.0, chunks: int = 6) -> int:
        return self.ask(op="start", run=str(run), status=str(status), config=CFG.to_dict(), slow=slow, chunks=chunks)

    def wait(self, pid: int) -> int: return self.ask(op="wait", pid=pid)

    def close(self):
        self.p.stdin.close(); self.p.wait(timeout=30); self.err.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("server") / "server.log")
    yield s
    s.close()


@pytest.fixture(scope="module")
def reference(server, tmp_path_factory):
    "One uninterrupted run (in a forked child like the others), and how long it took."
    d = tmp_path_factory.mktemp("ref")
    t0 = time.monotonic()
    pid = server.start(d / "run", d / "status")
    st = server.wait(pid)
    assert os.WIFEXITED(st) and os.WEXITSTATUS(st) == 0, (d / "status").read_text()
    return d / "run", time.monotonic() - t0


def _events(status: Path) -> list[str]:
    try: return [l.split(" ", 2)[2] for l in status.read_text().splitlines()]
    except FileNotFoundError: return []


def _killed(st: int) -> bool: return os.WIFSIGNALED(st) and os.WTERMSIG(st) == signal.SIGKILL


def _files(run: Path) -> set:
    return {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file() and p.name != ".lock"}


def assert_same_run(ref: Path, run: Path):
    "Bit-identical ends: weights, optimizer, EMA teacher, random states, metrics, best.pt, CAS files, file list."
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    assert a["epoch"] == b["epoch"] == CFG.epochs
    for k in a["model"]: assert torch.equal(a["model"][k], b["model"][k]), f"weights differ: {k}"
    for i, s in a["optimizer"]["state"].items():
        for n, v in s.items(): assert torch.equal(v, b["optimizer"]["state"][i][n]), f"optimizer differs: {i} {n}"
    ta, tb = a["callbacks"]["DistillCB"]["teacher"], b["callbacks"]["DistillCB"]["teacher"]
    for k in ta: assert torch.equal(ta[k], tb[k]), f"EMA teacher differs: {k}"
    for ra, rb in zip(a["rng"], b["rng"]):
        assert torch.equal(ra["torch"], rb["torch"]) and ra["python"] == rb["python"], "random states differ"
    assert (a["best_epoch"], a["best_score"]) == (b["best_epoch"], b["best_score"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time")} for r in rows]
    assert strip(load_metrics(ref)) == strip(load_metrics(run))
    ba, bb = load_checkpoint(ref / "best.pt"), load_checkpoint(run / "best.pt")
    assert ba["epoch"] == bb["epoch"] and all(torch.equal(ba["model"][k], bb["model"][k]) for k in ba["model"])
    for f in sorted((ref / "cas").glob("*.json")):
        assert json.loads(f.read_text()) == json.loads((run / "cas" / f.name).read_text()), f"cas/{f.name} differs"
    assert _files(ref) == _files(run), _files(ref) ^ _files(run)


def _check_after_kill(run: Path):
    "What a kill may leave: the lock is free, and every checkpoint present is whole (or the run resumes past it)."
    assert RunLock(run).owner() is None, "the lock of a killed process is still held"
    for p in run.glob("*.pt") if run.exists() else []:
        load_checkpoint(p)        # raises if a kill left a torn file under a real name


def test_sigkill_at_random_moments_then_resume(server, reference, tmp_path):
    ref, t_full = reference
    rng = random.Random(20261125)
    stats = {"kills": 0, "mid_write": 0, "trials": 0, "not_resumable": 0}
    for trial in range(12):
        run, status = tmp_path / f"t{trial}" / "run", tmp_path / f"t{trial}" / "status"
        status.parent.mkdir()
        mid_write = trial % 3 == 2                       # every third trial aims inside a file write
        for attempt in range(rng.randint(1, 2)):
            if mid_write:
                pid = server.start(run, status, slow=0.02, chunks=4)
                saves_before = sum(e.startswith("save ") for e in _events(status))
                target = saves_before + rng.randint(1, 8)       # the k-th write of this process, then inside it
                deadline = time.monotonic() + 120
                while sum(e.startswith("save ") for e in _events(status)) < target and time.monotonic() < deadline:
                    if "done" in _events(status)[-1:]: break
                    time.sleep(0.005)
                time.sleep(rng.uniform(0.0, 0.07))              # the write takes 4 chunks x 20 ms
            else:
                pid = server.start(run, status)
                time.sleep(rng.uniform(0.0, 1.0) * t_full)
            os.kill(pid, signal.SIGKILL)
            st = server.wait(pid)
            if _killed(st):
                stats["kills"] += 1
                ev = _events(status)
                last_save = max((i for i, e in enumerate(ev) if e.startswith("save ")), default=None)
                if last_save is not None and not any(e.startswith("saved ") for e in ev[last_save:]):
                    stats["mid_write"] += 1
                    name = ev[last_save].split(" ", 1)[1]
                    assert list(run.rglob(f".{name}.*.tmp")), f"killed while writing {name} but no partial file seen"
            _check_after_kill(run)
        try: train(CFG, run, resume=True, quiet=True)         # this process: a different one from the killed ones
        except (RunDirError, CheckpointError) as e:
            stats["not_resumable"] += 1
            raise AssertionError(f"trial {trial}: the run directory does not resume: {e}") from None
        assert_same_run(ref, run)
        assert not list(run.rglob(".*.tmp")), "temporary files left after the resume"
        stats["trials"] += 1
    print(f"\nkilled runs: {stats}")
    assert stats["kills"] >= 10 and stats["mid_write"] >= 3, stats


def test_kill_during_the_first_config_write(server, reference, tmp_path):
    "The very first write of a run (config.json, into a fresh directory) is the narrowest window; aim at it."
    ref, _ = reference
    run, status = tmp_path / "run", tmp_path / "status"
    pid = server.start(run, status, slow=0.2, chunks=4)
    deadline = time.monotonic() + 120
    while "save config.json" not in _events(status) and time.monotonic() < deadline: time.sleep(0.005)
    time.sleep(0.3)
    os.kill(pid, signal.SIGKILL)
    assert _killed(server.wait(pid)) and list(run.glob(".config.json.*.tmp")), _events(status)
    _check_after_kill(run)
    train(CFG, run, resume=True, quiet=True)
    assert_same_run(ref, run)


def test_second_process_refused_and_dead_lock_does_not_stick(server, reference, tmp_path):
    ref, _ = reference
    run, status = tmp_path / "run", tmp_path / "status"
    pid = server.start(run, status, slow=0.05)
    deadline = time.monotonic() + 120
    while "saved config.json" not in _events(status) and time.monotonic() < deadline: time.sleep(0.01)
    assert RunLock(run).owner() == pid
    with pytest.raises(RunDirError) as e: train(CFG, run, resume=True, quiet=True)       # a second process
    assert f"pid {pid}" in str(e.value) and "in use" in str(e.value)
    from catalogue import run_cli
    res = run_cli(["train", "--resume", str(run)])
    assert res.code == 2 and len(res.stderr.strip().splitlines()) == 1 and f"pid {pid}" in res.stderr, res.stderr
    os.kill(pid, signal.SIGKILL)
    assert _killed(server.wait(pid))
    assert (run / ".lock").exists() and RunLock(run).owner() is None     # the file stays, the lock does not
    train(CFG, run, resume=True, quiet=True)
    assert_same_run(ref, run)


def test_stale_lock_file_of_a_dead_pid(tmp_path, tiny_run):
    "A lock file naming a process that no longer exists (e.g. copied from another machine) does not block."
    run = copy_run(tiny_run, tmp_path / "run")
    p = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run / ".lock").write_text(p.stdout)                  # a pid that has just died
    assert RunLock(run).owner() is None
    lock = RunLock(run).acquire()
    assert RunLock(run).owner() == os.getpid()
    lock.release()
