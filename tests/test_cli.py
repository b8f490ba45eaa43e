"""The `crossclass` command line: every subcommand works end to end, --help everywhere, and bad input gives one
line on stderr and exit code 2 without touching the disk."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from crossclass_nb.cli import build_parser, main
from crossclass_nb.training import load_checkpoint, load_metrics

CROSSCLASS = [sys.executable, "-c", "import sys; from crossclass_nb.cli import main; sys.exit(main())"]


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def snapshot(d: Path):
    return {str(p.relative_to(d)): (p.stat().st_size, p.stat().st_mtime_ns) for p in d.rglob("*")} if d.exists() else None


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


def test_train_refuses_existing_run_and_resumes(trained, tmp_path, capsys):
    before = snapshot(trained)
    code, out, err = run(capsys, "train", "--preset", "fmnist-tiny", "--out", trained)
    assert code == 2 and "already holds a run" in err and err.count("\n") == 1
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


BAD = [
    (["train", "--preset", "cifar11"], "unknown preset"),
    (["train"], "say what to train"),
    (["train", "--preset", "fmnist-tiny", "--set", "lr_rate=1"], "did you mean 'lr'"),
    (["train", "--preset", "fmnist-tiny", "--set", "lr"], "KEY=VALUE"),
    (["train", "--preset", "fmnist-tiny", "--eps", "-1"], "eps"),
    (["train", "--preset", "fmnist-tiny", "--loss", "madry"], "not one of"),
    (["train", "--preset", "fmnist-tiny", "--set", "epochs=0"], "at least 1"),
    (["train", "--resume", "{tmp}/nothing"], "no run to resume"),
    (["train", "--resume", "{tmp}/a", "--overwrite"], "exclude each other"),
    (["train", "--resume", "{tmp}/a", "--out", "{tmp}/b"], "different directories"),
    (["train", "--config", "{tmp}/missing.json"], "no config file"),
    (["eval", "{tmp}/missing.pt"], "no checkpoint"),
    (["eval", "{tmp}/garbage.pt"], "not a torch checkpoint"),
    (["cas", "{tmp}/garbage.pt"], "not a torch checkpoint"),
]


@pytest.mark.parametrize("argv,msg", BAD)
def test_bad_input_one_line_exit_2(argv, msg, tmp_path, capsys):
    (tmp_path / "garbage.pt").write_text("not a checkpoint")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    before = snapshot(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2 and msg in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert snapshot(tmp_path) == before


def test_bad_input_in_a_real_process(tmp_path):
    "The console entry point: argparse errors and package errors exit 2 with no traceback."
    for argv in (["train", "--epochs", "ten"], ["eval", str(tmp_path / "x.pt")]):
        p = subprocess.run(CROSSCLASS + argv, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and "Traceback" not in p.stderr and p.stderr.count("\n") == 1, p.stderr
