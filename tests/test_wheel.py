"""Installing from a wheel works as the README says: `pip install .` (not editable), then `crossclass reproduce --quick`
and `crossclass demo` from a directory outside the repository.

The wheel is built from a copy of the repository (the files a clone has, plus new ones not yet committed), and
installed with `--no-deps` into a fresh virtual environment. The dependencies (torch, ...) are not downloaded again:
a `.pth` line adds the development venv's site-packages after the fresh one. Python does not process `.pth` files
inside a directory added that way, so the development venv's editable install stays inactive, and the test checks
that `crossclass_nb` is imported from the fresh environment.
"""
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(args, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, **{"timeout": 1200, **kw})
    assert r.returncode == 0, f"$ {' '.join(map(str, args))}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def _copy_of_the_repository(dst: Path) -> Path:
    "The repository's files as a clone has them, plus files not yet committed (what `git ls-files` lists)."
    listed = _run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT).stdout
    for name in filter(None, listed.split("\0")):
        src = ROOT / name
        if src.is_file():
            (dst / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / name)
    return dst


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    "A fresh venv with the wheel installed (not editable); returns (venv, wheel)."
    if shutil.which("git") is None or not (ROOT / ".git").exists(): pytest.skip("needs the git repository")
    tmp = tmp_path_factory.mktemp("wheel")
    src = _copy_of_the_repository(tmp / "src")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp / "dist", src])
    (wheel,) = (tmp / "dist").glob("crossclass_nb-*.whl")
    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv])
    fresh = Path(_run([venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
                 .stdout.strip())
    (fresh / "dev_dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "--no-deps", "--no-index", "-q",
          wheel])
    return venv, wheel


def test_wheel_holds_the_package_and_the_license(installed):
    _, wheel = installed
    names = zipfile.ZipFile(wheel).namelist()
    assert "crossclass_nb/__main__.py" in names and "crossclass_nb/cli.py" in names
    assert "crossclass_nb/bad_inputs.py" in names  # the catalogue of the page "What happens when" ships too
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "nbs/", "results/")) for n in names)


def test_the_package_comes_from_the_fresh_environment(installed, tmp_path):
    venv, _ = installed
    r = _run([venv / "bin" / "python", "-c", "import crossclass_nb, torch; print(crossclass_nb.__file__)"], cwd=tmp_path)
    assert Path(r.stdout.strip()).is_relative_to(venv), r.stdout
    assert not Path(r.stdout.strip()).is_relative_to(ROOT / "crossclass_nb")
    r = _run([venv / "bin" / "python", "-m", "crossclass_nb", "--help"], cwd=tmp_path)
    assert "reproduce" in r.stdout


def test_reproduce_quick_and_demo_outside_the_repository(installed, tmp_path):
    venv, _ = installed
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    assert not outside.resolve().is_relative_to(ROOT)
    env = {**os.environ, "MPLBACKEND": "Agg", "CROSSCLASS_QUIET": "1", "PYTHONPATH": ""}
    r = _run([venv / "bin" / "crossclass", "reproduce", "--quick", "--out", "quick"], cwd=outside, env=env, timeout=3000)
    assert (outside / "quick" / "report.html").stat().st_size > 10_000, r.stdout[-2000:]
    assert (outside / "quick" / "claims.json").is_file()
    r = _run([venv / "bin" / "crossclass", "demo", "--out", "demo"], cwd=outside, env=env)
    assert "60000" in r.stdout and (outside / "demo" / "examples.png").stat().st_size > 1000
