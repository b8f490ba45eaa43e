"""DistributedDataParallel on the CPU: torchrun with 2 processes and the gloo backend, as on a multi-GPU machine.
Checks that the data are sharded, metrics reduced over both processes, weights stay in sync, only rank 0 writes, and
that `train` leaves no process group behind: it creates the group and destroys it after a barrier, and no gloo thread
survives (one running into interpreter shutdown can abort the process)."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from crossclass_nb.config import get_config
from crossclass_nb.rundir import load_metrics
from crossclass_nb.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

SCRIPT = r"""
import json, os, sys, torch, torch.distributed as dist
from crossclass_nb.learner import Callback
from crossclass_nb.config import TrainConfig
from crossclass_nb.training import train

def thread_names():
    "Names of this process's threads (Linux)."
    return [open(f"/proc/self/task/{tid}/comm").read().strip() for tid in os.listdir("/proc/self/task")]

class SyncCheck(Callback):
    "After training, every rank reports a checksum of its weights; rank 0 writes them all."
    order = 100
    def __init__(self, path): self.path = path
    def after_fit(self, t):
        s = torch.stack([p.detach().double().sum() for p in t.raw.parameters()]).tolist()
        sums = [None] * dist.get_world_size(); dist.all_gather_object(sums, s)
        self.report = {"world_size": t.world_size, "sums": sums}

for cfg_path, out, check in zip(sys.argv[1::3], sys.argv[2::3], sys.argv[3::3]):
    cb = SyncCheck(check)
    train(TrainConfig.from_json(cfg_path), out, quiet=True, cbs=[cb])
    cb.report["destroyed"] = not dist.is_initialized()
    cb.report["gloo_threads"] = [name for name in thread_names() if "gloo" in name]
    if int(os.environ["RANK"]) == 0: open(check, "w").write(json.dumps(cb.report))
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    runs = {"pgd": get_config("fmnist-tiny", epochs=2, figures=False, final_eval=True),
            "trades_kd": get_config("fmnist-tiny", epochs=2, loss="trades", kd="ema", kd_decay=0.9, figures=False, cas_every=0)}
    args = []
    for name, cfg in runs.items():
        cfg.to_json(tmp_path / f"{name}.json")
        args += [str(tmp_path / f"{name}.json"), str(tmp_path / name), str(tmp_path / f"{name}_sums.json")]
    script = tmp_path / "ddp_train.py"; script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for i in range(0, len(args), 3):     # one run per torchrun: train() creates the process group and destroys it
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={_free_port()}", str(script), *args[i:i + 3]]
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
        assert p.returncode == 0, p.stderr[-3000:]
    for name, cfg in runs.items():
        run = tmp_path / name
        rows = load_metrics(run)
        assert [r["epoch"] for r in rows] == [1, 2]                      # written once, by rank 0 only
        assert all(r["train_n"] == cfg.train_size for r in rows)           # both shards counted
        assert all(0 <= r["test_robust_acc"] <= r["test_clean_acc"] <= 1 for r in rows)
        ck = load_checkpoint(run / "last.pt")
        assert len(ck["rng"]) == 2 and not torch.equal(ck["rng"][0]["torch"], ck["rng"][1]["torch"])
        sums = json.loads((tmp_path / f"{name}_sums.json").read_text())
        assert sums["world_size"] == 2 and sums["sums"][0] == sums["sums"][1], "weights out of sync across ranks"
        assert sums["destroyed"], "train() left its process group behind"
        assert sums["gloo_threads"] == [], f"gloo threads outlived destroy_process_group: {sums['gloo_threads']}"
        assert rows[-1]["train_loss"] < rows[0]["train_loss"] or rows[-1]["train_clean_acc"] > 0.3
    assert "cas" in load_metrics(tmp_path / "pgd")[-1] and (tmp_path / "pgd" / "cas" / "epoch_002.json").exists()
    record = json.loads((tmp_path / "pgd" / "cas" / "epoch_002.json").read_text())     # the CAS pass is shared:
    assert record["settings"]["num_examples"] == runs["pgd"].test_size                 # both halves were summed
    assert record["cas"] == load_metrics(tmp_path / "pgd")[-1]["cas"]
    final = json.loads((tmp_path / "pgd" / "final_eval.json").read_text())
    assert final["best"]["cas"] > 0 and 0 <= final["last"]["test_robust_acc"] <= final["last"]["test_clean_acc"] <= 1
    assert not (tmp_path / "trades_kd" / "cas").exists()
