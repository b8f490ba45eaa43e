"""The catalogue of mistakes (`tests/catalogue.py`), one pytest case each: every mistake gets an error of the
package's own family (on the command line: one line on stderr and exit code 2), and nothing on disk changes. Also a
few real `crossclass` processes, to see what a user's terminal shows. The message texts are asserted where each
error is raised (the notebooks); a case's `words` hold only what no notebook asserts."""
import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import crossclass_nb
from catalogue import CASES, Sandbox, check_case, problems, tiny_run  # noqa: F401 (tiny_run: a fixture)
from crossclass_nb.core import CrossclassError


def test_catalogue_is_big_and_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids)), "duplicate case ids"
    assert len(CASES) >= 30 and sum(c.cli for c in CASES) >= 8
    assert all(c.cli or issubclass(c.error, CrossclassError) for c in CASES)


def test_the_library_holds_no_test_tools():
    "Test machinery (mocks, atexit clean-ups, pytest) lives in tests/, never in the package."
    for path in Path(crossclass_nb.__file__).parent.glob("*.py"):
        tree = ast.parse(path.read_text())
        names = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not names & {"unittest", "unittest.mock", "atexit", "pytest"}, (path.name, names)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, monkeypatch, request):
    if case.skip and (reason := case.skip()): pytest.skip(reason)
    (tmp_path / "sandbox").mkdir()
    (tmp_path / "outside").mkdir()
    s = Sandbox(tmp_path / "sandbox", tmp_path / "outside", monkeypatch, lambda: request.getfixturevalue("tiny_run"))
    res, changed = check_case(case, s)  # run with the sandbox as working directory: a stray relative write is seen
    assert not problems(case, res), f"{problems(case, res)}\nmessage: {res.message!r}\nerror: {res.error!r}"
    assert not changed, f"the disk changed: {changed}"


def _crossclass(*args, cwd):
    "Run the installed `crossclass` console script in a fresh process (as a user's terminal would)."
    exe = Path(sys.executable).with_name("crossclass")
    exe = str(exe) if exe.exists() else shutil.which("crossclass")
    assert exe, "the crossclass console script is not installed (pip install -e .)"
    env = {**os.environ, "CROSSCLASS_QUIET": "1"}
    return subprocess.run([exe, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("argv", [
    ("train", "--preset", "cifar11", "--out", "{d}/run"),            # a package error
    ("train", "--epochs", "ten"),                                     # an argparse error
    ("eval", "{d}/x.pt"),                                             # a file that is not there
    ("eval", "{d}/last.pt"),                                          # a truncated checkpoint
], ids=["bad-preset", "argparse", "missing-checkpoint", "truncated-checkpoint"])
@pytest.mark.slow  # a subprocess or a whole run
def test_real_process(argv, tmp_path, snapshot):
    "The console script: one line `crossclass COMMAND: error: ...`, exit code 2, no traceback, nothing written."
    (tmp_path / "last.pt").write_bytes(b"PK\x03\x04 half a checkpoint")
    before = snapshot(tmp_path)
    r = _crossclass(*(a.replace("{d}", str(tmp_path)) for a in argv), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"crossclass {argv[0]}: error:"), r.stderr
    assert "Traceback" not in r.stderr
    assert snapshot(tmp_path) == before
