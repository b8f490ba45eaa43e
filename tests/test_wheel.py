"""Installing from a wheel works as the README says: `pip install .` (not editable), then `crossclass reproduce --quick`
and `crossclass demo` from a directory outside the repository.

The wheel and its fresh environment are the session fixture `wheel` of conftest.py, and the `reproduce --quick` run is
the session fixture `quick_study` (run by that wheel's `crossclass`, outside the repository), so the suite builds one
wheel and trains the quick study once.
"""
import ast
import configparser
import importlib.metadata
import json
import re
import sys
import zipfile
from pathlib import Path

from conftest import ROOT, run, user_env


def test_wheel_holds_the_package_and_the_license(wheel):
    names = zipfile.ZipFile(wheel.wheel).namelist()
    assert "crossclass_nb/__main__.py" in names and "crossclass_nb/cli.py" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") or n.endswith(".dist-info/LICENSE") for n in names), names
    assert not any(n.startswith(("tests/", "nbs/", "results/", "tools/", "bench/")) for n in names)


def test_the_package_comes_from_the_fresh_environment(wheel, tmp_path):
    r = run([wheel.venv / "bin" / "python", "-c", "import crossclass_nb, torch; print(crossclass_nb.__file__)"], cwd=tmp_path)
    assert Path(r.stdout.strip()).is_relative_to(wheel.venv), r.stdout
    assert not Path(r.stdout.strip()).is_relative_to(ROOT / "crossclass_nb")
    r = run([wheel.venv / "bin" / "python", "-m", "crossclass_nb", "--help"], cwd=tmp_path)
    assert "reproduce" in r.stdout


def test_reproduce_quick_outside_the_repository(quick_study):
    assert quick_study.result.returncode == 0, quick_study.result.stderr[-3000:]
    assert not quick_study.cwd.resolve().is_relative_to(ROOT)
    assert (quick_study.out / "report.html").stat().st_size > 10_000, quick_study.result.stdout[-2000:]
    assert (quick_study.out / "claims.json").is_file()


def test_demo_outside_the_repository(wheel, tmp_path):
    r = run([wheel.venv / "bin" / "crossclass", "demo", "--out", "demo"], cwd=tmp_path, env=user_env(CROSSCLASS_QUIET="1"))
    assert "60000" in r.stdout and (tmp_path / "demo" / "examples.png").stat().st_size > 1000


def _top_level_imports(code: str) -> set[str]:
    "The top-level names a piece of Python imports absolutely (`torch` for `from torch.nn import functional`)."
    code = "\n".join(l for l in code.splitlines() if not l.lstrip().startswith(("%", "!")))  # magics and shell lines
    try: tree = ast.parse(code)
    except SyntaxError: return set()
    names = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import): names |= {a.name.split(".")[0] for a in n.names}
        elif isinstance(n, ast.ImportFrom) and n.level == 0 and n.module: names.add(n.module.split(".")[0])
    return names


def test_every_import_of_the_library_and_the_notebooks_is_declared():
    "Each third-party module that crossclass_nb/ or a notebook imports comes from a distribution settings.ini names."
    cfg = configparser.ConfigParser(delimiters=["="])
    cfg.read(ROOT / "settings.ini", encoding="utf-8")
    declared = {re.split(r"[<>=!~\[; ]", r)[0].lower().replace("_", "-")
                for k, v in cfg["DEFAULT"].items() if k == "requirements" or k.endswith("_requirements") for r in v.split()}
    imported = {}
    for f in sorted((ROOT / "crossclass_nb").glob("*.py")):
        for name in _top_level_imports(f.read_text(encoding="utf-8")): imported.setdefault(name, f.relative_to(ROOT))
    for nb in sorted((ROOT / "nbs").rglob("*.ipynb")):
        for c in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            if c["cell_type"] == "code":
                for name in _top_level_imports("".join(c["source"])): imported.setdefault(name, nb.relative_to(ROOT))
    dists = importlib.metadata.packages_distributions()
    third_party = {m: where for m, where in imported.items() if m not in sys.stdlib_module_names and m != "crossclass_nb"}
    missing = {m: str(where) for m, where in third_party.items()
               if not {d.lower().replace("_", "-") for d in dists.get(m, [m])} & declared}
    assert not missing, f"imported but not declared in settings.ini (module: first file): {missing}"
