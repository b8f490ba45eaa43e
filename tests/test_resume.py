"""Exact resume after SIGKILL: a real training process is killed at random moments (between epochs, mid-epoch,
mid-checkpoint-write) and resumed each time; the finished run must be bit-identical to an uninterrupted one."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossclass_nb.config import get_config
from crossclass_nb.rundir import load_metrics
from crossclass_nb.checkpoint import load_checkpoint
from crossclass_nb.training import train

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

# tiny and quick, but long enough (several epochs, a checkpoint per epoch) for kills to land in different places
CFG = get_config("fmnist-tiny", epochs=8, save_every=2, figures=False, train_size=400, test_size=100, val_size=100)

SCRIPT = """
import sys
from crossclass_nb.config import TrainConfig
from crossclass_nb.training import train

train(TrainConfig.from_json(sys.argv[1]), sys.argv[2], resume=True, quiet=True)
"""


def _start(cfg_path, run_dir):
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", SCRIPT, str(cfg_path), str(run_dir)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _epochs_done(run_dir):
    try: return sum(1 for l in (run_dir / "metrics.jsonl").read_text().splitlines() if l.strip())
    except OSError: return 0


def _same_run(a: Path, b: Path):
    ca, cb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    assert ca["epoch"] == cb["epoch"] == CFG.epochs
    for k in ca["model"]: assert torch.equal(ca["model"][k], cb["model"][k]), f"weights differ in {k}"
    for k, st in ca["optimizer"]["state"].items():
        for n, v in st.items(): assert torch.equal(v, cb["optimizer"]["state"][k][n]), f"optimizer state differs ({k}, {n})"
    assert torch.equal(ca["rng"][0]["torch"], cb["rng"][0]["torch"])
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]
    ma, mb = strip(load_metrics(a)), strip(load_metrics(b))
    assert len(ma) == len(mb) == CFG.epochs
    for ra, rb in zip(ma, mb):
        for k in ra: assert ra[k] == rb[k] or (ra[k] != ra[k] and rb[k] != rb[k]), (k, ra[k], rb[k])
    best_a, best_b = load_checkpoint(a / "best.pt"), load_checkpoint(b / "best.pt")
    assert best_a["epoch"] == best_b["epoch"]
    for k in best_a["model"]: assert torch.equal(best_a["model"][k], best_b["model"][k])


def test_sigkill_and_resume_is_bit_identical(tmp_path):
    ref = train(CFG, tmp_path / "ref", quiet=True)          # the uninterrupted run, in this process
    # kill delays scale with this machine's speed: about one epoch (training, evaluation, checkpoint writes)
    per_epoch = 1.5 * sum(r["time_train"] + r["time_eval"] for r in load_metrics(ref)) / CFG.epochs
    cfg_path = tmp_path / "cfg.json"; CFG.to_json(cfg_path)
    run = tmp_path / "killed"
    rng = random.Random(1234)
    kills = 0
    # the first kill lands early (before or during the first epochs); later ones at random points of the run
    for trial in range(4):
        p = _start(cfg_path, run)
        deadline = time.time() + 120
        start_epochs = _epochs_done(run)
        while _epochs_done(run) <= start_epochs and p.poll() is None and time.time() < deadline: time.sleep(0.002)
        time.sleep(rng.uniform(0, 0.8 * per_epoch))
        if p.poll() is None:
            os.kill(p.pid, signal.SIGKILL); kills += 1
        p.wait(timeout=60)
        if _epochs_done(run) >= CFG.epochs and p.returncode == 0: break
    assert kills >= 2, "the process finished before it could be killed often enough: make the run longer"
    p = _start(cfg_path, run)                                  # resume to the end
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err.decode()[-2000:]
    _same_run(ref, run)
    assert not list(run.glob(".*.tmp")), "leftover temporary files"


def test_kill_before_first_checkpoint_restarts_cleanly(tmp_path):
    "A run killed before its first checkpoint (only config.json written) restarts from scratch on resume."
    cfg = get_config("fmnist-tiny", epochs=2, figures=False, cas_every=0)
    ref = train(cfg, tmp_path / "ref", quiet=True)
    run = tmp_path / "run"; run.mkdir()
    cfg.to_json(run / "config.json")                            # what a process killed during epoch 1 leaves
    train(None, run, resume=True, quiet=True)
    a, b = load_checkpoint(ref / "last.pt"), load_checkpoint(run / "last.pt")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
