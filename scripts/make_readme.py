"""Write README.md from nbs/index.ipynb, and the index's "What the package found" from the stored results.

`python scripts/make_readme.py` does three things, in this order:

1. draws the key figure of the main study, `STUDY` (CAS and test robust accuracy over training of its hard-label
   PGD-AT run at the main eps, first seed, with the early, best and last checkpoints and the lr decays marked), into
   nbs/images/story.png;
2. writes the "What the package found" cell of nbs/index.ipynb (the one holding `FINDINGS_MARK`): one paragraph with
   the study's verdicts (its claims.json) and the numbers of that run (its run directory), then the figure;
3. writes README.md: the index's markdown cells, in order. Code cells are left out, and so is every markdown cell
   that holds `<!-- docs-only` (the parts about the toy picture, which only the docs site shows). Links to notebooks
   and images point into `nbs/`.

`python scripts/make_readme.py --check` changes nothing and says whether all three are current. nbdev_readme
would need Quarto, which these machines cannot install.
"""
import json
import math
import os
import re
import shutil
import sys
import tempfile
import textwrap
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUDY = ROOT / "results" / "fmnist-noise"  # the main study: a directory written by `crossclass reproduce`
INDEX = ROOT / "nbs" / "index.ipynb"
README = ROOT / "README.md"
FIGURE = ROOT / "nbs" / "images" / "story.png"
HEADER = "<!-- Generated from nbs/index.ipynb by scripts/make_readme.py: edit the notebook, then run the script. -->\n\n"
FINDINGS_MARK = "<!-- findings: written by scripts/make_readme.py"
LOCAL_LINK = re.compile(r"\]\((?![a-z]+:|/|#)([^)\s]+\.(?:ipynb|png|svg))\)")


# ------------------------------------------------------------------------------------------- the main study

def _shown(path: Path) -> str:
    "A path as the reader should see it: relative to the repository when it is inside it."
    path = Path(path).resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def eps_text(eps: float, unit: float) -> str:
    "A radius in the study's own unit: 8/255 for a study counted in 1/255, 0.1 otherwise."
    return f"{eps / unit:.4g}/255" if math.isclose(unit, 1 / 255) else f"{eps:.4g}"


def main_run(study_dir: Path):
    "The RunSpec of the key figure: hard-label AT at the study's main eps, the first seed whose run finished."
    from crossclass_nb.core import RunDirError
    from crossclass_nb.experiments import load_study, run_finished
    study = load_study(study_dir)
    runs = sorted((s for s in study.runs if s.method == "at" and math.isclose(s.eps, study.main_eps)), key=lambda s: s.seed)
    finished = [s for s in runs if run_finished(study_dir / "runs" / s.name, s.config.epochs)]
    if not finished:
        raise RunDirError(f"{study_dir} has no finished hard-label AT run at eps {study.main_eps}: "
                          "point STUDY in scripts/make_readme.py at a study directory written by `crossclass reproduce`")
    return study, finished[0]


def _claims(study_dir: Path) -> list:
    "The study's judged claims (claims.json), or an error that says what the directory is missing."
    from crossclass_nb.core import RunDirError
    path = study_dir / "claims.json"
    if not path.is_file():
        raise RunDirError(f"{study_dir} has no claims.json (a search study has none, and an unfinished study not yet): "
                          "point STUDY in scripts/make_readme.py at a finished study of the paper's claims")
    return json.loads(path.read_text(encoding="utf-8"))


def _verdicts(claims: list) -> str:
    "Each claim with its verdict, then how many of each verdict."
    label = lambda c: f"claim {c['id']}" if str(c["id"]).isdigit() else f"check {c['id']}"
    each = "; ".join(f"{label(c)}, *{c['claim'].rstrip('.')}*: **{c['verdict']}**" for c in claims)
    counts = Counter(c["verdict"] for c in claims)
    return f"{each} ({', '.join(f'{n} {v}' for v, n in counts.most_common())})"


def _noise_sentence(rate: float) -> str:
    "What the label noise of the main study is for, when it has any."
    if not rate: return ""
    return (f"{100 * rate:.0f} % of each seed's training labels are replaced by another class (validation and test "
            "labels are clean): an amplifier of memorisation, not the paper's setting. With clean labels hard-label AT "
            "overfits at this scale only when a wide model trained for 200 epochs fits its training set almost "
            "completely, which is too slow for every method here; there, with hard-label AT alone, claims 1 and 3 are "
            "reproduced too (the robust overfitting chapter shows the search and the clean-label studies). ")


def findings_cell(study_dir: Path = STUDY) -> str:
    "The markdown of the index's \"What the package found\": the verdicts, the key run's numbers, the figure."
    from crossclass_nb.experiments import run_summary
    study_dir = Path(study_dir)
    claims = _claims(study_dir)
    study, spec = main_run(study_dir)
    s = run_summary(study_dir / "runs" / spec.name)
    where, eps = _shown(study_dir), eps_text(spec.eps, study.eps_unit)
    paragraph = (
        f"The study stored in `{where}/` trained {len(study.runs)} runs: {study.description.split('. ')[0]}. "
        f"{_noise_sentence(spec.config.label_noise)}"
        f"It tests the claims of the paper ([the paper page](paper.ipynb) states them), and code judges each from the "
        f"runs by a criterion fixed in advance: {_verdicts(claims)}. The figure follows the hard-label PGD-AT run at "
        f"eps {eps}, seed {spec.seed}: test robust accuracy {s['rob_best']:.1f} % and CAS {s['cas_best']:.1f} at the "
        f"best checkpoint (epoch {s['best_epoch']}, chosen on validation), {s['rob_last']:.1f} % and CAS "
        f"{s['cas_last']:.1f} at the last (epoch {s['last_epoch']}). The chapters [robust overfitting]"
        f"(07_robust_overfitting.ipynb) and [soft labels](08_soft_labels.ipynb) show every figure and table, and "
        f"`{where}/report.html` holds them all in one file.")
    caption = (f"{study.name}, hard-label PGD-AT at eps {eps}, seed {spec.seed}: accuracies (left) and CAS (right) "
               "per epoch; early, best and last checkpoints and the learning-rate decays marked")
    wrap = lambda text: textwrap.fill(text, 118, break_long_words=False, break_on_hyphens=False)
    return "\n\n".join([
        "## What the package found",
        f"{FINDINGS_MARK} from the stored study {where}; edit the script, not this cell -->\n{wrap(paragraph)}",
        f"![{caption}](images/{FIGURE.name})"])


def draw_story(study_dir: Path = STUDY, path: Path = FIGURE) -> Path:
    "Draw the key figure of the study into `path` (PNG)."
    os.environ.setdefault("MPLBACKEND", "Agg")
    from crossclass_nb.experiments import plot_run_curves
    study, spec = main_run(Path(study_dir))
    title = f"{study.name}: hard-label PGD-AT, eps {eps_text(spec.eps, study.eps_unit)}, seed {spec.seed}"
    fig = plot_run_curves(Path(study_dir) / "runs" / spec.name, title=title)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, metadata={"Software": None})
    return path


def same_figure(a: Path, b: Path) -> bool:
    "Whether two PNGs show the same picture (matplotlib's own image comparison, small tolerance)."
    from matplotlib.testing.compare import compare_images
    if not (a.is_file() and b.is_file()): return False
    with tempfile.TemporaryDirectory() as tmp:  # compare_images writes a *-failed-diff.png beside its input
        copy = Path(tmp) / a.name
        shutil.copyfile(a, copy)
        return compare_images(str(b), str(copy), tol=2) is None


# ------------------------------------------------------------------------------------ the index and the README

def with_findings(nb: dict, text: str) -> dict:
    "The notebook `nb` with its findings cell (the markdown cell holding FINDINGS_MARK) replaced by `text`."
    cells = [c for c in nb["cells"] if c["cell_type"] == "markdown" and FINDINGS_MARK in "".join(c["source"])]
    if len(cells) != 1: sys.exit(f"nbs/index.ipynb must have exactly one markdown cell holding {FINDINGS_MARK!r}")
    cells[0]["source"] = text.splitlines(keepends=True)
    return nb


def readme_text(index: Path = INDEX) -> str:
    "The README that `index` gives."
    cells = json.loads(index.read_text(encoding="utf-8"))["cells"]
    parts = ["".join(c["source"]).strip() for c in cells if c["cell_type"] == "markdown"]
    parts = [p for p in parts if p and "<!-- docs-only" not in p]
    return HEADER + LOCAL_LINK.sub(r"](nbs/\1)", "\n\n".join(parts)) + "\n"


def _notebook_text(nb: dict) -> str:
    "The notebook as nbdev_clean writes it."
    return json.dumps(nb, sort_keys=True, indent=1, ensure_ascii=False) + "\n"


def main():
    check = "--check" in sys.argv[1:]
    nb = with_findings(json.loads(INDEX.read_text(encoding="utf-8")), findings_cell())
    with tempfile.TemporaryDirectory() as tmp:
        figure = draw_story(STUDY, Path(tmp) / FIGURE.name)
        stale = [] if same_figure(figure, FIGURE) else [FIGURE]
        if not check and stale:
            FIGURE.parent.mkdir(parents=True, exist_ok=True)
            FIGURE.write_bytes(figure.read_bytes())
    if _notebook_text(nb) != INDEX.read_text(encoding="utf-8"):
        stale.append(INDEX)
        if not check: INDEX.write_text(_notebook_text(nb), encoding="utf-8")
    if not README.exists() or README.read_text(encoding="utf-8") != readme_text():
        stale.append(README)
        if not check: README.write_text(readme_text(), encoding="utf-8")
    names = ", ".join(_shown(p) for p in stale)
    if check: sys.exit(f"not current: {names}: run `python scripts/make_readme.py`" if stale else 0)
    print(f"wrote {names}" if stale else "README.md, nbs/index.ipynb and the figure were current")


if __name__ == "__main__":
    main()
