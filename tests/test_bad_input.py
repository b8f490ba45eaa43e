"""The bad-input catalogue (`crossclass_nb.bad_inputs`, built on the page "What happens when"), one pytest case
each: every mistake gets an error of the package's own family (or, on the command line, one line on stderr and exit
code 2), and nothing on disk changes. Also two real `crossclass` processes, to see what a user's terminal shows.
The message texts are asserted once, where each error is raised (the chapters) or by the case's `words`."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from crossclass_nb.bad_inputs import CASES, check_case, problems
from crossclass_nb.core import CrossclassError


def test_catalogue_is_big_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 30 and sum(c.cli for c in CASES) >= 8
    assert all(c.cli or issubclass(c.error, CrossclassError) for c in CASES)


def test_the_catalogue_needs_no_test_tools():
    "The catalogue is part of the package: it imports without pytest, hypothesis or fastcore."
    code = "\n".join(["import sys", "for name in ('pytest', 'hypothesis', 'fastcore'): sys.modules[name] = None",
                      "import crossclass_nb.bad_inputs as b", "print(len(b.CASES))"])
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and int(r.stdout) == len(CASES), r.stderr[-2000:]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path):
    if case.skip and (reason := case.skip()): pytest.skip(reason)
    d = tmp_path / "sandbox"
    d.mkdir()
    res, changed = check_case(case, d)  # run with the sandbox as working directory: a stray relative write is seen
    assert not problems(case, res), f"{problems(case, res)}\nmessage: {res.message!r}\nerror: {res.error!r}"
    assert not changed, f"the disk changed: {changed}"


def _crossclass(*args, cwd):
    "Run the installed `crossclass` console script in a fresh process (as a user's terminal would)."
    exe = Path(sys.executable).with_name("crossclass")
    exe = str(exe) if exe.exists() else shutil.which("crossclass")
    assert exe, "the crossclass console script is not installed (pip install -e .)"
    env = {**os.environ, "CROSSCLASS_QUIET": "1"}
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_real_process_bad_preset(tmp_path, snapshot):
    before = snapshot(tmp_path)
    r = _crossclass("train", "--preset", "cifar11", "--out", tmp_path / "run", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossclass train: error:") and "Traceback" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before


def test_real_process_truncated_checkpoint(tmp_path, snapshot):
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    before = snapshot(tmp_path)
    r = _crossclass("eval", tmp_path / "last.pt", cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("crossclass eval: error:") and "Traceback" not in r.stderr, r.stderr
    assert snapshot(tmp_path) == before
