"""Write README.md from nbs/index.ipynb (nbdev_readme needs Quarto, which these machines cannot install).

The README is the landing page's prose: its markdown cells, in order. Code cells are left out, and so is every
markdown cell that holds `<!-- docs-only` (the parts about the picture, which only the docs site shows). Links to
notebooks point into `nbs/`. `python scripts/make_readme.py --check` only says whether README.md is current.
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
INDEX = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, then run the script. -->\n\n"
NOTEBOOK_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)\s]+\.ipynb)\)")


def readme_text(index: Path = INDEX) -> str:
    "The README that `index` gives."
    cells = json.loads(index.read_text(encoding="utf-8"))["cells"]
    parts = ["".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown"]
    parts = [p for p in parts if p and "<!-- docs-only" not in p]
    return HEADER + NOTEBOOK_LINK.sub(r"](nbs/\1)", "\n\n".join(parts)) + "\n"


def main():
    text = readme_text()
    if "--check" in sys.argv[1:]:
        current = README.exists() and README.read_text(encoding="utf-8") == text
        sys.exit(0 if current else "README.md is not what nbs/index.ipynb gives: run `python scripts/make_readme.py`")
    README.write_text(text, encoding="utf-8")
    print(f"wrote {README.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
