"""CASTracker: CAS records of a plain PyTorch loop, in the layout that the experiment figures read."""
import json

import matplotlib
matplotlib.use("Agg")
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crossclass_nb.attacks import PGD
from crossclass_nb.attribution import AttributionResult, CASTracker, attribution_report
from crossclass_nb.core import InputError, RunDirError
from crossclass_nb.analysis import cas_record, checkpoint_epochs
from crossclass_nb.figures import plot_per_class, plot_run_matrices
from crossclass_nb.rundir import load_metrics

CLASSES = ["a", "b", "c", "d"]


def data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    x = (0.15 * torch.rand(n, 1, 6, 6, generator=g) + 0.2 * y[:, None, None, None] / 3).clamp(0, 1)
    return x, y


def train(out_dir, epochs=5, every=2, tracked=True):
    "A plain loop: an nn.Sequential CNN-free MLP, PGD-1 training, the tracker called once per epoch."
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(36, 16), nn.ReLU(), nn.Linear(16, 4))
    x, y = data()
    opt = torch.optim.SGD(net.parameters(), lr=0.5)
    tracker = CASTracker(net, (x, y), PGD(0.05, steps=3), out_dir, every=every, epochs=epochs, classes=CLASSES) if tracked else None
    for epoch in range(1, epochs + 1):
        net.train()
        loss = F.cross_entropy(net(PGD(0.05, steps=1)(net, x, y)), y)      # random start: uses the global generator
        opt.zero_grad(); loss.backward(); opt.step()
        if tracked: tracker(epoch, train_loss=loss.item())
    return net, x, y


def test_tracker_files_are_read_by_the_figures(tmp_path):
    run = tmp_path / "run"
    net, x, y = train(run)
    assert sorted(p.name for p in (run / "cas").iterdir()) == ["epoch_002.json", "epoch_004.json", "epoch_005.json"]
    rows = load_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    ck = checkpoint_epochs(rows, 5)
    assert ck["last"] == 5 and ck["best"] in (2, 4, 5)
    rec = cas_record(run, 4)
    assert list(rec)[:3] == ["epoch", "split", "attack"] and rec["epoch"] == 4 and rec["settings"]["classes"] == CLASSES
    assert AttributionResult.from_dict(rec).C.shape == (4, 4)
    fig = plot_run_matrices(run)
    assert len(fig.axes) >= 4 and f"CAS {cas_record(run, ck['last'])['cas']:.1f}" in fig.axes[2].get_title()
    fig = plot_per_class(run)
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == CLASSES


def test_record_is_the_measurement(tmp_path):
    net, x, y = train(tmp_path / "run", epochs=2, every=1)
    torch.manual_seed(0)                                                  # the tracker's default seed
    expected = attribution_report(net, (x, y), PGD(0.05, steps=3), classes=CLASSES)
    rec = cas_record(tmp_path / "run", 2)
    assert rec["cas"] == pytest.approx(expected.cas, abs=1e-6)
    assert rec["per_class_acc"] == pytest.approx(expected.per_class_acc.tolist(), abs=1e-6)
    assert rec["split"] == "test" and "PGD" in rec["attack"]
    assert rec["A"] is None


def test_tracker_leaves_the_loop_unchanged(tmp_path):
    tracked, _, _ = train(tmp_path / "a", epochs=3, every=1)
    plain, _, _ = train(tmp_path / "b", epochs=3, tracked=False)
    for p, q in zip(tracked.parameters(), plain.parameters()): assert torch.equal(p, q)


def test_rerun_replaces_later_epochs(tmp_path):
    run = tmp_path / "run"
    train(run, epochs=4, every=1)
    train(run, epochs=2, every=1)
    assert [r["epoch"] for r in load_metrics(run)] == [1, 2]
    assert json.loads((run / "config.json").read_text()) == {"name": "cas_tracker", "epochs": 2}


def test_bad_input(tmp_path):
    net = nn.Sequential(nn.Linear(36, 4))
    x, y = data()
    with pytest.raises(InputError, match="every"): CASTracker(net, (x, y), None, tmp_path, every=0)
    (tmp_path / "trained").mkdir()
    (tmp_path / "trained" / "config.json").write_text(json.dumps({"name": "fmnist-tiny", "epochs": 3, "loss": "pgd"}))
    with pytest.raises(RunDirError, match="its own directory"): CASTracker(net, (x, y), None, tmp_path / "trained")
    tracker = CASTracker(net, (x.flatten(1), y), None, tmp_path / "t")
    with pytest.raises(InputError): tracker(0)  # the messages are checked in chapter 05
    with pytest.raises(InputError): tracker(1, loss=torch.tensor(1.0))
    assert not (tmp_path / "t").exists()                                  # nothing written by refused calls
