"""README.md is generated from nbs/index.ipynb and gives exactly two set-up commands: `make demo` and `make test`."""
import importlib.util
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("make_readme", ROOT / "scripts" / "make_readme.py")
make_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_readme)

FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def test_readme_is_generated_from_index():
    assert (ROOT / "README.md").read_text(encoding="utf-8") == make_readme.readme_text(), \
        "README.md differs from what nbs/index.ipynb gives: run `python scripts/make_readme.py` and commit README.md"


def test_readme_has_exactly_the_two_commands():
    blocks = [b.strip() for b in FENCE.findall((ROOT / "README.md").read_text(encoding="utf-8"))]
    assert blocks == ["make demo", "make test"], f"README's fenced commands are {blocks}"
    targets = re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert {"demo", "test"} <= set(targets), f"the Makefile has no demo or test target: {targets}"


def test_generated_readme_follows_the_notebook(tmp_path):
    "The generator itself: markdown cells in order, docs-only cells and code cells left out, notebook links into nbs/."
    cell = lambda kind, src: {"cell_type": kind, "metadata": {}, "source": src, **({"outputs": [], "execution_count": None} if kind == "code" else {})}
    nb = {"cells": [cell("markdown", "# T\n> d"), cell("code", "print(1)"), cell("markdown", "<!-- docs-only -->\npicture"),
                    cell("markdown", "See [core](00_core.ipynb) and [site](https://x.org/a.ipynb).")],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "index.ipynb").write_text(json.dumps(nb))
    text = make_readme.readme_text(tmp_path / "index.ipynb")
    assert text == make_readme.HEADER + "# T\n> d\n\nSee [core](nbs/00_core.ipynb) and [site](https://x.org/a.ipynb).\n"
