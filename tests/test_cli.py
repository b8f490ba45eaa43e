"""The `crossclass` command line: every subcommand works end to end, and --help everywhere. Bad input (one line on
stderr, exit code 2, nothing written) is the catalogue's (`tests/catalogue.py`, run by test_bad_input.py)."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torchvision

from crossclass_nb.attribution import cas, similarity_matrix
from crossclass_nb.cli import build_parser, main
from crossclass_nb.data import load_dataset, make_fake_cifar
from crossclass_nb.checkpoint import load_checkpoint
from crossclass_nb.rundir import load_metrics

CROSSCLASS = [sys.executable, "-c", "import sys; from crossclass_nb.cli import main; sys.exit(main())"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    "A finished 2-epoch tiny run (module-wide: the other tests read it)."
    d = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", "--preset", "fmnist-tiny", "--epochs", "2", "--out", str(d), "--quiet"]) == 0
    return d


def test_help_everywhere():
    p = subprocess.run(CROSSCLASS + ["--help"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "train" in p.stdout and "cas" in p.stdout
    for sub in ("demo", "train", "eval", "cas"):
        with pytest.raises(SystemExit) as e: build_parser().parse_args([sub, "--help"])
        assert e.value.code == 0


def test_demo(tmp_path, capsys):
    code, out, err = run(capsys, "demo", "--out", tmp_path / "demo")
    assert code == 0 and (tmp_path / "demo" / "examples.png").stat().st_size > 1000 and "60000" in out


def test_train_writes_a_run(trained):
    rows = load_metrics(trained)
    assert [r["epoch"] for r in rows] == [1, 2]
    for f in ("config.json", "metrics.csv", "last.pt", "best.pt", "cas/epoch_002.json", "figures/curves.png"):
        assert (trained / f).exists(), f


def test_train_refuses_existing_run_and_resumes(trained, tmp_path, capsys, snapshot):
    before = snapshot(trained)
    code, out, err = run(capsys, "train", "--preset", "fmnist-tiny", "--out", trained)
    assert code == 2 and err.count("\n") == 1
    assert snapshot(trained) == before                                   # nothing on disk changed
    # --resume in a copy (keep the module fixture at 2 epochs)
    import shutil
    copy = tmp_path / "copy"; shutil.copytree(trained, copy)
    code, out, err = run(capsys, "train", "--resume", copy, "--epochs", "3", "--quiet")
    assert code == 0 and "epochs: 3" in out and len(load_metrics(copy)) == 3
    code, out, err = run(capsys, "train", "--preset", "fmnist-tiny", "--epochs", "1", "--out", copy, "--overwrite", "--quiet",
                         "--set", "cas_every=0", "--set", "figures=false")
    assert code == 0 and len(load_metrics(copy)) == 1 and not (copy / "cas").exists() and not (copy / "epoch_002.pt").exists()


def test_train_config_file_and_overrides(tmp_path, capsys):
    (tmp_path / "c.json").write_text(json.dumps({"epochs": 1, "cas_every": 0, "figures": False}))
    code, out, err = run(capsys, "train", "--preset", "fmnist-tiny", "--config", tmp_path / "c.json", "--out", tmp_path / "r",
                         "--seed", "3", "--eps", "8/255", "--set", "label_smoothing=0.1", "--quiet")
    assert code == 0, err
    cfg = load_checkpoint(tmp_path / "r" / "last.pt")["config"]
    assert (cfg["epochs"], cfg["seed"], cfg["label_smoothing"], cfg["cas_every"]) == (1, 3, 0.1, 0)
    assert abs(cfg["eps"] - 8 / 255) < 1e-12


@pytest.mark.slow  # a subprocess or a whole run
def test_python_m_runs_the_cli():
    "`python -m crossclass_nb` and `python -m crossclass_nb.cli` are the `crossclass` program (what torchrun -m needs)."
    for module in ("crossclass_nb", "crossclass_nb.cli"):
        p = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
        assert p.returncode == 0 and "usage: crossclass" in p.stdout and "reproduce" in p.stdout, (module, p.stderr)
    p = subprocess.run([sys.executable, "-m", "crossclass_nb", "trian"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and p.stderr.count("\n") == 1


@pytest.mark.slow  # a subprocess or a whole run
def test_python_m_cli_really_trains(tmp_path):
    out = tmp_path / "runB"
    p = subprocess.run([sys.executable, "-m", "crossclass_nb.cli", "train", "--preset", "fmnist-tiny", "--out", str(out),
                        "--epochs", "1", "--quiet"], capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert p.returncode == 0, p.stderr
    assert f"run directory: {out}" in p.stdout
    assert [r["epoch"] for r in load_metrics(out)] == [1]
    for f in ("config.json", "last.pt", "best.pt"): assert (out / f).is_file(), f


@pytest.mark.slow  # a subprocess or a whole run
def test_train_says_where_it_trains(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "CROSSCLASS_QUIET"}
    p = subprocess.run([sys.executable, "-m", "crossclass_nb.cli", "train", "--preset", "fmnist-tiny", "--out",
                        str(tmp_path / "run"), "--epochs", "1", "--device", "cpu"], capture_output=True, text=True,
                       timeout=600, cwd=tmp_path, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("training on cpu, precision fp32, 1 process\n"), p.stdout[:500]


def test_eval_runs_autoattack_by_default_with_the_extra(trained, tmp_path, capsys):
    pytest.importorskip("torchattacks")
    code, out, err = run(capsys, "eval", trained, "--n", "50", "--out", tmp_path)
    assert code == 0 and err == "", err
    r = json.loads((tmp_path / "run_best.eval.json").read_text())
    assert r["autoattack"] == "cheap" and 0 <= r["autoattack_acc"] <= r["pgd_acc"] + 0.1


def test_eval_without_the_extra_runs_pgd_and_says_so(trained, tmp_path, capsys, monkeypatch, snapshot):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # as on an installation without [eval]
    code, out, err = run(capsys, "eval", trained, "--n", "50", "--out", tmp_path)
    assert code == 0 and err.count("\n") == 1, err                       # the notebook asserts what the line says
    r = json.loads((tmp_path / "run_best.eval.json").read_text())
    assert "autoattack_acc" not in r and 0 <= r["pgd_acc"] <= r["clean_acc"]
    before = snapshot(tmp_path)
    code, out, err = run(capsys, "eval", trained, "--n", "50", "--autoattack", "cheap", "--out", tmp_path)
    assert code == 2 and err.count("\n") == 1, err
    assert snapshot(tmp_path) == before


def test_eval(trained, tmp_path, capsys):
    code, out, err = run(capsys, "eval", trained / "best.pt", "--n", "50", "--autoattack", "cheap", "--out", tmp_path)
    assert code == 0, err
    r = json.loads((tmp_path / "run_best.eval.json").read_text())
    assert r["n"] == 50 and 0 <= r["autoattack_acc"] <= r["pgd_acc"] + 0.1 and r["pgd_acc"] <= r["clean_acc"]
    assert "PGD-3" in r["attack"]


def test_cas_two_checkpoints(trained, tmp_path, capsys):
    code, out, err = run(capsys, "cas", trained / "best.pt", trained / "last.pt", "--n", "50", "--out", tmp_path)
    assert code == 0, err
    for f in ("run_best.cas.json", "run_last.cas.json", "run_best.similarity.png", "run_best_minus_run_last.difference.png"):
        assert (tmp_path / f).stat().st_size > 0, f
    d = json.loads((tmp_path / "run_last.cas.json").read_text())
    assert len(d["C"]) == 10 and 0 <= d["cas"] <= 90 and d["epoch"] == 2
    code, out, err = run(capsys, "cas", trained, "--clean", "--n", "50", "--out", tmp_path / "clean")   # a run dir: best.pt
    assert code == 0, err
    clean = json.loads((tmp_path / "clean" / "run_best.cas.json").read_text())
    assert clean["settings"]["attack"] is None and clean["epoch"] == load_checkpoint(trained / "best.pt")["epoch"]


# ---- models that are not checkpoints of a run: --arch with --weights, --robustbench


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory):
    "A torchvision ResNet-18's state dict (W.pt) and a small test set in CIFAR-10's format."
    d = tmp_path_factory.mktemp("arch")
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), d / "W.pt")
    make_fake_cifar(d / "data", n_train=10, n_test=20)
    return d


def _hand_cas(weights, root):
    "CAS on clean test images, computed independently: g(x) from a forward hook on torchvision's own `fc`."
    model = torchvision.models.resnet18(num_classes=10)
    model.load_state_dict(torch.load(weights, weights_only=True))
    model.eval()
    ds, seen = load_dataset("cifar10", train=False, root=root), []
    model.fc.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    with torch.no_grad(): model(ds.x)
    A = torch.stack([(seen[0][ds.y == i] * model.fc.weight[i]).mean(0) for i in range(10)])
    return cas(similarity_matrix(A))


def test_cas_of_a_torchvision_model(resnet_weights, capsys):
    d = resnet_weights
    before = {p.name for p in d.iterdir()}
    code, out, err = run(capsys, "cas", "--arch", "torchvision:resnet18", "--weights", d / "W.pt", "--dataset", "cifar10",
                         "--data-root", d / "data", "--n", "0", "--clean", "--batch-size", "10")
    assert code == 0, err
    assert {p.name for p in d.iterdir()} - before == {"W.cas.json", "W.similarity.png"}
    rec = json.loads((d / "W.cas.json").read_text())
    assert rec["checkpoint"] == "torchvision:resnet18" and rec["epoch"] is None and rec["settings"]["num_examples"] == 20
    assert abs(rec["cas"] - float(_hand_cas(d / "W.pt", d / "data"))) < 1e-4
    code, out, err = run(capsys, "cas", "--arch", "torchvision:resnet18", "--weights", d / "W.pt", "--dataset", "cifar10",
                         "--data-root", d / "data", "--n", "0", "--steps", "2", "--out", d / "adv")
    assert code == 0, err
    adv = json.loads((d / "adv" / "W.cas.json").read_text())
    attack = adv["settings"]["attack"]
    assert (attack["name"], attack["steps"], attack["norm"]) == ("PGD", 2, "linf") and abs(attack["eps"] - 8 / 255) < 1e-9


def test_eval_of_a_torchvision_model(resnet_weights, tmp_path, capsys):
    d = resnet_weights
    code, out, err = run(capsys, "eval", "--arch", "torchvision:resnet18", "--weights", d / "W.pt", "--dataset", "cifar10",
                         "--data-root", d / "data", "--n", "0", "--steps", "2", "--autoattack", "none", "--out", tmp_path)
    assert code == 0, err
    r = json.loads((tmp_path / "W.eval.json").read_text())
    assert r["n"] == 20 and r["dataset"] == "cifar10" and 0 <= r["pgd_acc"] <= r["clean_acc"] <= 1
    assert "PGD-2 linf eps=0.03137" in r["attack"]  # the trainer's default evaluation radius, 8/255


def test_robustbench_arguments_reach_the_loader(resnet_weights, tmp_path, capsys, monkeypatch):
    "--robustbench NAME: the CLI asks `load_robustbench` for the model with its dataset, threat model and directory."
    import crossclass_nb.models as models
    calls = []
    def fake_loader(name, dataset="cifar10", threat_model="Linf", **kw):
        calls.append((name, dataset, threat_model, kw))
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    monkeypatch.setattr(models, "load_robustbench", fake_loader)
    code, out, err = run(capsys, "cas", "--robustbench", "Standard", "--data-root", resnet_weights / "data", "--n", "0",
                         "--norm", "l2", "--eps", "0.5", "--steps", "1", "--model-dir", tmp_path / "models",
                         "--out", tmp_path)
    assert code == 0, err
    assert calls == [("Standard", "cifar10", "L2", {"model_dir": str(tmp_path / "models")})]
    assert json.loads((tmp_path / "Standard.cas.json").read_text())["checkpoint"] == "Standard"


def test_cas_of_a_robustbench_model_offline(resnet_weights, tmp_path, capsys):
    "--robustbench NAME with a checkpoint placed in RobustBench's model-directory layout: nothing is downloaded."
    from crossclass_nb.core import MissingExtraError
    from crossclass_nb.models import _robustbench
    try: _, registry, enums = _robustbench()
    except MissingExtraError as e: pytest.skip(str(e))
    entry = registry[enums.BenchmarkDataset("cifar10")][enums.ThreatModel("Linf")]["Wong2020Fast"]
    torch.manual_seed(0)
    (tmp_path / "models" / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(entry["model"]().state_dict(), tmp_path / "models" / "cifar10" / "Linf" / "Wong2020Fast.pt")
    code, out, err = run(capsys, "cas", "--robustbench", "Wong2020Fast", "--model-dir", tmp_path / "models",
                         "--data-root", resnet_weights / "data", "--n", "0", "--steps", "1", "--out", tmp_path / "out")
    assert code == 0, err
    rec = json.loads((tmp_path / "out" / "Wong2020Fast.cas.json").read_text())
    assert rec["checkpoint"] == "Wong2020Fast" and rec["dataset"] == "cifar10" and len(rec["C"]) == 10
