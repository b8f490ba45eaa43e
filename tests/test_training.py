"""Trainer safety: atomic checkpoint writes, weights_only loading (payloads never run), the run-directory lock
(a live holder refuses, a killed one is taken over), refusals that leave the disk unchanged, config round trips."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from crossclass_nb.core import CheckpointError, CrossclassError, InputError, RunDirError
from crossclass_nb.config import PRESETS, TrainConfig, get_config, parse_setting
from crossclass_nb.rundir import RunLock, load_metrics
from crossclass_nb.checkpoint import CheckpointCB, load_checkpoint, load_model
from crossclass_nb.training import train

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

TINY = dict(epochs=1, figures=False, cas_every=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tr") / "run"
    train(get_config("fmnist-tiny", **TINY), d)
    return d


def test_presets_round_trip_and_validate():
    for name, cfg in PRESETS.items():
        assert TrainConfig.from_json(cfg.to_json()) == cfg
        assert get_config(name) == cfg
    assert get_config("cifar10-paper").select_on == "val" and get_config("cifar10-paper", select_on="test").select_on == "test"
    assert parse_setting("milestones", "[100, 150]") == [100, 150]
    with pytest.raises(InputError): parse_setting("epoch", "3")     # message: asserted in 08
    for bad in ({"eps": float("nan")}, {"kd_start": 5, "kd_end": 2}, {"batch_size": 0}, {"model": "vgg"}):
        with pytest.raises(InputError): get_config("fmnist-tiny", **bad)


def test_checkpoint_is_plain_and_validated(run_dir, tmp_path):
    ck = torch.load(run_dir / "last.pt", weights_only=True)          # plain data only
    assert ck["format_version"] == 1 and ck["epoch"] == 1 and len(ck["rng"]) == 1 and ck["history"][0]["epoch"] == 1
    for k in ("model", "optimizer", "scheduler", "scaler", "best_score", "best_epoch", "config"): assert k in ck
    torch.save({**ck, "format_version": 2}, tmp_path / "newer.pt")
    with pytest.raises(CheckpointError): load_checkpoint(tmp_path / "newer.pt")     # message: asserted in 11
    (tmp_path / "cut.pt").write_bytes((run_dir / "last.pt").read_bytes()[:3000])
    with pytest.raises(CheckpointError): load_checkpoint(tmp_path / "cut.pt")     # message: the catalogue
    extra = dict(ck["model"]); extra["head.extra"] = torch.zeros(1)
    torch.save({**ck, "model": extra}, tmp_path / "extra.pt")
    with pytest.raises(CheckpointError): load_model(tmp_path / "extra.pt")     # message: the catalogue


def test_failed_checkpoint_write_keeps_previous(run_dir, tmp_path, monkeypatch):
    import shutil
    d = tmp_path / "run"; shutil.copytree(run_dir, d)
    before = {f: (d / f).read_bytes() for f in ("last.pt", "best.pt")}
    real_save = torch.save
    def full_disk(obj, f, *a, **k):
        real_save(obj, f, *a, **k); raise OSError(28, "No space left on device")
    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(CheckpointError):     # "the previous last.pt is intact": asserted in 11
        train(get_config("fmnist-tiny", **{**TINY, "epochs": 2}), d, resume=True)
    monkeypatch.undo()
    assert all((d / f).read_bytes() == b for f, b in before.items()) and not list(d.glob(".*.tmp"))
    assert load_checkpoint(d / "last.pt")["epoch"] == 1
    train(get_config("fmnist-tiny", **{**TINY, "epochs": 2}), d, resume=True)     # and the run goes on
    assert len(load_metrics(d)) == 2


class Payload:
    def __init__(self, marker): self.marker = marker
    def __reduce__(self): return (Path.write_text, (Path(self.marker), "payload ran"))


def test_malicious_checkpoints_never_run(run_dir, tmp_path):
    marker = tmp_path / "PWNED"
    evil = {"format_version": 1, "epoch": 1, "model": Payload(marker), "config": {}, "model_info": {}}
    torch.save(evil, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError): load_model(tmp_path / "evil.pt")     # "refused unloaded": asserted in 11
    with pytest.raises(CheckpointError): load_checkpoint(tmp_path / "evil.pt")
    with pytest.raises(CheckpointError):                                  # as a KD teacher
        train(get_config("fmnist-tiny", kd="teacher", kd_teacher=str(tmp_path / "evil.pt"), **TINY), tmp_path / "kd")
    assert not (tmp_path / "kd").exists()
    import shutil
    d = tmp_path / "resume"; shutil.copytree(run_dir, d); torch.save(evil, d / "last.pt")
    with pytest.raises(CheckpointError): train(None, d, resume=True)   # on resume
    assert not marker.exists()


def test_refusals_leave_disk_unchanged(run_dir, tmp_path, snapshot):
    before = snapshot(run_dir)
    with pytest.raises(RunDirError): train(get_config("fmnist-tiny", **TINY), run_dir)     # messages: asserted in 10
    with pytest.raises(RunDirError): train(get_config("fmnist-tiny", **{**TINY, "lr": 0.5}), run_dir, resume=True)
    with pytest.raises(InputError): train(None, run_dir, resume=True, overwrite=True)   # message: the catalogue
    assert snapshot(run_dir) == before
    other = tmp_path / "other"; other.mkdir(); (other / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError): train(get_config("fmnist-tiny", **TINY), other, overwrite=True)
    assert snapshot(other) == {"notes.txt": snapshot(other)["notes.txt"]}
    with pytest.raises(InputError): train(TrainConfig(dataset="mnist2", **TINY), tmp_path / "x")   # message: asserted in 08
    assert not (tmp_path / "x").exists()


LOCKER = """
import sys, time
from crossclass_nb.rundir import RunLock
RunLock(sys.argv[1]).acquire(); print("locked", flush=True); time.sleep(600)
"""


def test_lock_refuses_live_holder_and_survives_its_death(run_dir, tmp_path):
    import shutil
    d = tmp_path / "run"; shutil.copytree(run_dir, d)
    p = subprocess.Popen([sys.executable, "-c", LOCKER, str(d)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "locked"
        assert RunLock(d).owner() == p.pid
        with pytest.raises(RunDirError, match=f"pid {p.pid}"): train(None, d, resume=True)
    finally:
        os.kill(p.pid, signal.SIGKILL); p.wait()
    assert RunLock(d).owner() is None                                 # the stale lock file is free again
    train(get_config("fmnist-tiny", **{**TINY, "epochs": 2}), d, resume=True)
    assert len(load_metrics(d)) == 2


def test_divergence_is_caught(tmp_path):
    with pytest.raises(CrossclassError):     # "training diverged": asserted in 07
        train(get_config("fmnist-tiny", loss="standard", lr=1e12, momentum=0.0, **TINY), tmp_path / "nan")
    assert not (tmp_path / "nan" / "last.pt").exists()


def test_resume_is_exact_for_distillation_and_trades(tmp_path):
    "The EMA teacher, TRADES and label smoothing all survive a restart bit for bit (in-process: stop after 2 of 3 epochs)."
    cfg = get_config("fmnist-tiny", loss="trades", kd="ema", kd_decay=0.9, label_smoothing=0.1, steps=2, figures=False,
                     train_size=100, cas_every=2)
    train(cfg, tmp_path / "straight")
    train(get_config("fmnist-tiny", **{**cfg.to_dict(), "epochs": 2}), tmp_path / "cut")
    train(cfg, tmp_path / "cut", resume=True)
    a, b = load_checkpoint(tmp_path / "straight" / "last.pt"), load_checkpoint(tmp_path / "cut" / "last.pt")
    for k in a["model"]: assert torch.equal(a["model"][k], b["model"][k]), k
    ta, tb = a["callbacks"]["DistillCB"]["teacher"], b["callbacks"]["DistillCB"]["teacher"]
    for k in ta: assert torch.equal(ta[k], tb[k]), k
    ma, mb = load_metrics(tmp_path / "straight"), load_metrics(tmp_path / "cut")
    assert [r["cas"] for r in ma][1:] == [r["cas"] for r in mb][1:] and ma[-1]["kd_weight"] == 0.8
    assert ma[0]["cas"] != ma[0]["cas"] and set(ma[0]) == set(ma[1])     # not measured at epoch 1: NaN, same columns


def test_label_noise_flips_exactly_the_fraction_of_training_labels_only():
    from crossclass_nb.training import flip_labels, load_splits
    clean = load_splits(get_config("fmnist-tiny"))
    noisy = load_splits(get_config("fmnist-tiny", label_noise=0.3, data_seed=5))
    clean5 = load_splits(get_config("fmnist-tiny", data_seed=5))
    flipped = noisy["train"].y != clean5["train"].y
    assert flipped.sum().item() == round(0.3 * len(clean5["train"]))        # exact fraction, never to the same class
    assert torch.equal(noisy["train"].x, clean5["train"].x)
    for split in ("val", "test"):                                            # evaluation labels stay clean
        assert torch.equal(noisy[split].y, clean5[split].y)
    again = load_splits(get_config("fmnist-tiny", label_noise=0.3, data_seed=5))
    assert torch.equal(again["train"].y, noisy["train"].y)                   # same seed, same flips
    other = flip_labels(clean5["train"], 0.3, seed=6)
    assert not torch.equal(other.y, noisy["train"].y)
    assert torch.equal(flip_labels(clean["train"], 0.0).y, clean["train"].y)  # 0.0 changes nothing
    big = flip_labels(clean["train"], 0.99, seed=1)
    assert (big.y != clean["train"].y).sum().item() == round(0.99 * 300)
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(InputError):     # message: asserted in 08
            get_config("fmnist-tiny", label_noise=bad)


def test_run_files_get_the_users_permissions(tmp_path):
    "Results and checkpoints are written through a private temporary file, then given the mode any new file gets."
    (tmp_path / "plain").write_text("x")
    expected = (tmp_path / "plain").stat().st_mode & 0o777
    run = train(get_config("fmnist-tiny", epochs=1, cas_every=1, final_eval=True), tmp_path / "run")
    files = ["config.json", "metrics.csv", "metrics.jsonl", "last.pt", "best.pt", "final_eval.json",
             "cas/epoch_001.json", "figures/curves.png"]
    assert {f: (run / f).stat().st_mode & 0o777 for f in files} == {f: expected for f in files}
    old = os.umask(0o077)
    try: train(get_config("fmnist-tiny", epochs=1, cas_every=0, figures=False), tmp_path / "private")
    finally: os.umask(old)
    assert (tmp_path / "private" / "last.pt").stat().st_mode & 0o777 == 0o600


def test_torchvision_model_trains_with_the_datasets_classes(tmp_path):
    "model='torchvision:resnet18': num_classes from the dataset, normalisation inside, model_kwargs passed on."
    cfg = get_config("fmnist-tiny", model="torchvision:resnet18", model_kwargs={"zero_init_residual": True},
                     train_size=40, val_size=20, test_size=20, epochs=1, batch_size=20, steps=1, eval_steps=1,
                     figures=False, milestones=[1])
    run = train(cfg, tmp_path / "run")
    model, saved = load_model(run)
    assert saved.model == "torchvision:resnet18" and model.head.out_features == 10
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)
    assert 0 <= load_metrics(run)[-1]["test_robust_acc"] <= 1
    with pytest.raises(InputError):    # the message of check_model_name: asserted in 03
        get_config("fmnist-tiny", model="torchvision:resnet1800")
