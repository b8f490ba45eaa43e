"""Data integrity, end to end (tests/test_data.py checks the readers themselves): a dataset file corrupted on disk
stops `train`, a resume, `crossclass train` and `crossclass eval` with a clear error before anything is written;
no run ever trains on the damaged data. The most insidious damage is used: one flipped byte in the labels file, so
that the file still parses and every label is still a valid class."""
import gzip
from pathlib import Path

import pytest

from catalogue import TINY, run_cli, snapshot
from crossclass_nb.config import get_config
from crossclass_nb.core import DataError
from crossclass_nb.data import FASHION_MNIST_DEBIAN_DIR
from crossclass_nb.rundir import load_metrics
from crossclass_nb.training import train

FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
pytestmark = pytest.mark.skipif(not all((FASHION_MNIST_DEBIAN_DIR / f"{f}.gz").is_file() for f in FILES),
                                reason="needs Fashion-MNIST (apt-get install dataset-fashion-mnist)")


def data_copy(d: Path) -> Path:
    "A data directory: links to the real .gz files, and the training labels uncompressed (so a byte can be flipped)."
    d.mkdir(parents=True)
    for f in FILES:
        if f == "train-labels-idx1-ubyte": (d / f).write_bytes(gzip.decompress((FASHION_MNIST_DEBIAN_DIR / f"{f}.gz").read_bytes()))
        else: (d / f"{f}.gz").symlink_to(FASHION_MNIST_DEBIAN_DIR / f"{f}.gz")
    return d


def flip_a_label(d: Path, at: int = 30_000) -> Path:
    "Change one label into another valid class: the file still parses, only its checksum can tell."
    p = d / "train-labels-idx1-ubyte"
    b = bytearray(p.read_bytes())
    b[8 + at] = (b[8 + at] + 1) % 10
    p.write_bytes(bytes(b))
    return p


def _cfg(root: Path, **kw):
    return get_config("fmnist-tiny", **{**TINY, "data_root": str(root), **kw})


def _says_corrupted(msg: str, f: str = "train-labels-idx1-ubyte"):
    assert f in msg and "corrupted" in msg and ("replace" in msg or "download" in msg), msg


def test_a_good_copy_trains(tmp_path):
    "The control: the same directory, undamaged, trains (so the refusals below are about the damage)."
    run = train(_cfg(data_copy(tmp_path / "data"), epochs=1), tmp_path / "run", quiet=True)
    assert len(load_metrics(run)) == 1


def test_train_refuses_before_writing(tmp_path):
    data = data_copy(tmp_path / "data")
    flip_a_label(data)
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e: train(_cfg(data), tmp_path / "run", quiet=True)
    _says_corrupted(str(e.value))
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_resume_refuses_data_damaged_since(tmp_path):
    "A run trained on good data; the file is damaged afterwards; the resume refuses and leaves the run as it was."
    data = data_copy(tmp_path / "data")
    run = train(_cfg(data, epochs=1), tmp_path / "run", quiet=True)
    flip_a_label(data)
    before = snapshot(run)
    with pytest.raises(DataError) as e: train(_cfg(data), run, resume=True, quiet=True)
    _says_corrupted(str(e.value))
    assert snapshot(run) == before


def test_test_split_truncated(tmp_path):
    "Damage in the test split stops the run before its first epoch, too (all splits are read before writing)."
    data = data_copy(tmp_path / "data")
    (data / "t10k-images-idx3-ubyte.gz").unlink()
    raw = gzip.decompress((FASHION_MNIST_DEBIAN_DIR / "t10k-images-idx3-ubyte.gz").read_bytes())
    (data / "t10k-images-idx3-ubyte").write_bytes(raw[:-784 * 3])          # three images short
    before = snapshot(tmp_path)
    with pytest.raises(DataError): train(_cfg(data), tmp_path / "run", quiet=True)  # the message: chapter 01
    assert snapshot(tmp_path) == before


def _one_line(res):
    lines = res.stderr.strip().splitlines()
    assert res.code == 2 and len(lines) == 1 and "Traceback" not in res.stderr, (res.code, res.stderr)
    return lines[0]


def test_cli_train_and_eval_refuse(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    good = data_copy(tmp_path / "good")
    run = train(_cfg(good, epochs=1), tmp_path / "run", quiet=True)
    bad = data_copy(tmp_path / "bad")
    flip_a_label(bad)
    (bad / "t10k-labels-idx1-ubyte.gz").unlink()
    (bad / "t10k-labels-idx1-ubyte.gz").write_bytes((FASHION_MNIST_DEBIAN_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()[:-10])
    before = snapshot(tmp_path)
    line = _one_line(run_cli(["train", "--preset", "fmnist-tiny", "--data-root", bad, "--out", tmp_path / "new"]))
    _says_corrupted(line)
    line = _one_line(run_cli(["eval", run / "best.pt", "--data-root", bad, "--n", "20", "--autoattack", "none"]))
    assert "t10k-labels-idx1-ubyte.gz" in line, line              # which file (chapter 01 asserts the words)
    assert snapshot(tmp_path) == before
