"""Write README.md from nbs/index.ipynb. It writes nothing else.

The README is the index's markdown cells, in order. Code cells are left out, and so is every markdown cell that holds
`<!-- docs-only` (the parts about the toy picture, which only the docs site shows), except the two cells of "What the
package found", which the index computes when it renders and the README states as text:

- the cell `Markdown(findings_paragraph(STUDY))` becomes that paragraph (`crossclass_nb.report.findings_paragraph`,
  computed here exactly as the index computes it: from nbs/, for the study `STUDY` the index names), and the cell
  `Markdown(verdicts_table(STUDY))` the verdicts table (`crossclass_nb.report.verdicts_table`);
- the cell `Image(filename=STUDY / "story.png")` becomes a link to that figure, which `crossclass reproduce` wrote
  into the study's directory, with `crossclass_nb.report.story_caption` as its text.

Links to notebooks and images are relative to nbs/ in the index and point from the repository's top in the README.

    python tools/make_readme.py            # write README.md
    python tools/make_readme.py --check    # change nothing; exit 1 if README.md is not current
"""
import json
import os
import posixpath
import re
import sys
import textwrap
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NBS = ROOT / "nbs"
INDEX = NBS / "index.ipynb"
README = ROOT / "README.md"
HEADER = "<!-- Generated from nbs/index.ipynb by tools/make_readme.py: edit the notebook, then run the script. -->\n\n"
LOCAL_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)\s]+\.(?:ipynb|png|svg|html|md|json))\)")
STUDY_LINE = re.compile(r'^STUDY = Path\("([^"]+)"\)', re.M)  # the findings cell names its study: STUDY = Path("../results/x")
FINDINGS_CALL, TABLE_CALL = "Markdown(findings_paragraph(STUDY))", "Markdown(verdicts_table(STUDY))"
FIGURE_CALL = 'Image(filename=STUDY / "story.png")'


@contextmanager
def in_folder(path: Path):
    "Run the body with `path` as the working directory, as a notebook runs in its own folder."
    old = Path.cwd()
    os.chdir(path)
    try: yield
    finally: os.chdir(old)


def source(cell: dict) -> str:
    return "".join(cell["source"])


def study_of(cells: list) -> str:
    "The study the index's findings cell names (`../results/fmnist-main`), relative to nbs/."
    found = [m.group(1) for c in cells if c["cell_type"] == "code" for m in STUDY_LINE.finditer(source(c))]
    if len(found) != 1:
        sys.exit(f"nbs/index.ipynb must name its study once, in a line `STUDY = Path(\"../results/NAME\")`; found {found}")
    return found[0]


def findings(study: str) -> str:
    "The paragraph of \"What the package found\", as the index computes it (from nbs/), in lines of 118 characters."
    from crossclass_nb.report import findings_paragraph
    with in_folder(NBS): text = findings_paragraph(Path(study)).strip()
    return textwrap.fill(text, 118, break_long_words=False, break_on_hyphens=False)


def verdicts(study: str) -> str:
    "The verdicts table of \"What the package found\" (`crossclass_nb.report.verdicts_table`), as the index computes it."
    from crossclass_nb.report import verdicts_table
    with in_folder(NBS): return verdicts_table(Path(study))


def caption(study: str) -> str:
    "The caption of the study's key figure (`crossclass_nb.report.story_caption`)."
    from crossclass_nb.report import story_caption
    with in_folder(NBS): return story_caption(Path(study))


def figure(study: str) -> str:
    "The key figure of the study, as a markdown image relative to nbs/."
    return f"![{caption(study)}]({study}/story.png)"


def readme_parts(cells: list) -> list:
    "The README's blocks: the markdown cells but docs-only ones, and the findings cells as text."
    parts, study = [], None
    for c in cells:
        text = source(c).strip()
        if c["cell_type"] == "markdown":
            if text and "<!-- docs-only" not in text: parts.append(text)
        elif c["cell_type"] == "code" and any(call in text for call in (FINDINGS_CALL, TABLE_CALL, FIGURE_CALL)):
            study = study or study_of(cells)
            parts.append(findings(study) if FINDINGS_CALL in text else verdicts(study) if TABLE_CALL in text
                         else figure(study))
    return parts


def from_top(link: str) -> str:
    "A link relative to nbs/ as seen from the repository's top: `api/00_core.ipynb` -> `nbs/api/00_core.ipynb`."
    return posixpath.normpath(posixpath.join("nbs", link))


def readme_text(index: Path = INDEX) -> str:
    "The README that `index` gives."
    cells = json.loads(index.read_text(encoding="utf-8"))["cells"]
    text = "\n\n".join(readme_parts(cells))
    return HEADER + LOCAL_LINK.sub(lambda m: f"]({from_top(m.group(1))})", text) + "\n"


def main(argv: list) -> int:
    check = "--check" in argv
    text = readme_text()
    current = README.exists() and README.read_text(encoding="utf-8") == text
    if check:
        if not current: print("README.md is not current: run `python tools/make_readme.py` (or `make readme`)")
        return 0 if current else 1
    if not current: README.write_text(text, encoding="utf-8")
    print("README.md " + ("was current" if current else "written"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
