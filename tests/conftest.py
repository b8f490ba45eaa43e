"""Fixtures shared by the test files, and the settings of the whole suite.

- The suite is quiet by the package's own setting: `CROSSCLASS_QUIET=1` (a test that wants the output a user sees
  removes it from the environment of its subprocess, as `quick_study` does).
- `snapshot`: the disk snapshot that proves a refused call wrote nothing.
- `serve` and `chromium`: a real browser (Debian's Chromium, driven by Playwright) and a local HTTP server.
- Built once per run and shared: `docs_site` (the `_docs/` site that `tools/build_docs.py` built, which is also the
  run of every notebook), `wheel` (one wheel, installed into a fresh virtual environment) and `quick_study` (one
  `crossclass reproduce --quick`, by the installed wheel, outside the repository). Once also when pytest-xdist runs
  the suite in several processes (`make test` uses two): the first to ask builds, under a file lock (`built_once`).
- A test that uses one of these three is marked `slow`, as are the tests marked by hand: `pytest -m "not slow"` leaves
  them out.
"""
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

os.environ["CROSSCLASS_QUIET"] = "1"
os.environ.setdefault("MPLBACKEND", "Agg")

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "_docs"
SLOW_FIXTURES = {"docs_site", "wheel", "quick_study"}


def pytest_collection_modifyitems(config, items):
    "Every test that needs a heavy session fixture is slow."
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())): item.add_marker(pytest.mark.slow)


def run(args, **kw) -> subprocess.CompletedProcess:
    "Run a command; fail the test with the command and the end of its output if it exits non-zero."
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **{"timeout": 1200, **kw})
    assert r.returncode == 0, f"$ {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture
def snapshot():
    "`snapshot(d)`: every entry under `d`; equal before and after a refused call means nothing was written."
    from catalogue import snapshot
    return snapshot


# ------------------------------------------------------------------------------ a real browser on a local server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    "Serves files without a log line per request."
    def log_message(self, *args): pass


@pytest.fixture(scope="module")
def serve():
    "`serve(folder)` -> base URL: the folder served over HTTP on a free port of 127.0.0.1 until the module ends."
    servers = []

    def start(folder) -> str:
        handler = functools.partial(_QuietHandler, directory=str(folder))
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}/"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def chromium():
    "Debian's Chromium, headless and driven by Playwright; skipped where it is missing (an error on CI, which has it)."
    if not Path(CHROMIUM).exists():
        why = f"{CHROMIUM} is missing: install it with `apt-get install -y chromium` (make test does)"
        if os.environ.get("CI"): raise RuntimeError(why)
        pytest.skip(why)
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


# ------------------------------------------------------------------------- built once per session, then shared

def shared_dir(tmp_path_factory) -> Path:
    "A folder all the processes of one pytest run share: the base temp, or its parent under pytest-xdist's workers."
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


def built_once(tmp_path_factory, name: str, build) -> dict:
    """`build(folder)` run once per pytest run, also when pytest-xdist splits the run over several processes: the
    first process to ask builds into `shared/name` under a file lock and stores what `build` returns (a JSON dict);
    the others wait for it and read it back."""
    from filelock import FileLock
    folder, shared = shared_dir(tmp_path_factory) / name, shared_dir(tmp_path_factory)
    done = shared / f"{name}.json"
    with FileLock(str(shared / f"{name}.lock")):
        if not done.exists():
            folder.mkdir(exist_ok=True)
            done.write_text(json.dumps(build(folder)))
    return json.loads(done.read_text())


@pytest.fixture(scope="session")
def docs_site(tmp_path_factory) -> Path:
    """The docs site `_docs/` as `make docs` (tools/build_docs.py) builds it. `make test` builds it just before pytest,
    and that build is the run of every notebook; here it is built only when it is missing (`make docs` refreshes it)."""
    def build(_):
        if not (DOCS / "index.html").exists():
            run([sys.executable, ROOT / "tools" / "build_docs.py"], cwd=ROOT, timeout=3600)
        return {}
    built_once(tmp_path_factory, "docs", build)
    return DOCS


class Wheel(NamedTuple):
    venv: Path  # a fresh virtual environment with the wheel installed (not editable)
    wheel: Path  # the wheel file


def _copy_of_the_repository(dst: Path) -> Path:
    "The repository's files as a clone has them, plus files not yet committed (what `git ls-files` lists)."
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Wheel:
    """One wheel of the package, built from a copy of the repository (the files a clone has, plus new ones not yet
    committed) and installed with `--no-deps` into a fresh virtual environment. The dependencies (torch, ...) are not
    downloaded again: a `.pth` line adds the development venv's site-packages after the fresh one. Python does not
    process `.pth` files inside a directory added that way, so the development venv's editable install stays inactive."""
    if shutil.which("git") is None or not (ROOT / ".git").exists(): pytest.skip("needs the git repository")
    def build(tmp: Path) -> dict:
        src = _copy_of_the_repository(tmp / "src")
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src])
        (built,) = (tmp / "dist").glob("crossclass_nb-*.whl")
        venv = tmp / "venv"
        run([sys.executable, "-m", "venv", "--without-pip", venv])
        fresh = Path(run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                     .stdout.strip())
        (fresh / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", "-q",
             built])
        return {"venv": str(venv), "wheel": str(built)}
    made = built_once(tmp_path_factory, "wheel", build)
    return Wheel(Path(made["venv"]), Path(made["wheel"]))


class QuickStudy(NamedTuple):
    out: Path  # the study directory it wrote
    result: subprocess.CompletedProcess  # its exit status, stdout and stderr
    seconds: float  # its wall time
    cwd: Path  # the directory it ran in, outside the repository


def user_env(**extra) -> dict:
    "The environment of a user who runs the command: not quiet, no PYTHONPATH, pictures drawn off-screen."
    env = {k: v for k, v in os.environ.items() if k != "CROSSCLASS_QUIET"}
    return {**env, "MPLBACKEND": "Agg", "PYTHONPATH": "", **extra}


@pytest.fixture(scope="session")
def quick_study(wheel, tmp_path_factory) -> QuickStudy:
    """The one `crossclass reproduce --quick` of the suite, as a user runs it after `pip install .`: the wheel's
    `crossclass`, in a directory outside the repository, not quiet. Tests that need a finished study share it; a test
    that changes it works on a copy (`shutil.copytree(quick_study.out, ...)`)."""
    def build(cwd: Path) -> dict:
        assert not cwd.resolve().is_relative_to(ROOT)
        t0 = time.perf_counter()
        r = subprocess.run([wheel.venv / "bin" / "crossclass", "reproduce", "--quick", "--out", cwd / "quick"], cwd=cwd,
                           env=user_env(), capture_output=True, text=True, timeout=1800)
        return {"cwd": str(cwd), "returncode": r.returncode, "stdout": r.stdout, "stderr": r.stderr,
                "seconds": time.perf_counter() - t0, "args": [str(a) for a in r.args]}
    made = built_once(tmp_path_factory, "elsewhere", build)
    result = subprocess.CompletedProcess(made["args"], made["returncode"], made["stdout"], made["stderr"])
    return QuickStudy(Path(made["cwd"]) / "quick", result, made["seconds"], Path(made["cwd"]))
