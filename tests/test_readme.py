"""README.md: generated from nbs/index.ipynb (and current with it), its findings those of the stored study, exactly two
set-up commands (`make demo`, `make test`), and every command of its three quick-start recipes run as written, at the
smallest size each allows, on the CPU.

How a recipe is run at its smallest size: the commands are the README's own, run in order by bash (Python blocks by
Python) in a fresh directory whose $HOME holds a small dataset in CIFAR-10's format; only size flags are appended to
`crossclass train`, `cas` and `eval` (one epoch, 20 training images, one attack step, ...) and torchrun starts 2
processes instead of 4. `make docs` is the build the suite already made (the session fixture `docs_site`): the test
checks that `make docs` runs that same build, then serves the site with the README's own command, on a free port.
"""
import html
import importlib.util
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import torchvision

from crossclass_nb.data import make_fake_cifar
from crossclass_nb.rundir import load_metrics

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
spec = importlib.util.spec_from_file_location("make_readme", ROOT / "tools" / "make_readme.py")
make_readme = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_readme)

FENCE = re.compile(r"^```([^\n]*)\n(.*?)^```", re.M | re.S)
RECIPES = ("Read the book", "CAS of your own model", "The paper's recipe on a GPU")


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    "The text under `heading` (a line '## X' or '### X'), up to the next heading of the same or a higher level."
    level = heading.split()[0]
    m = re.search(rf"^{re.escape(heading)}\n(.*?)(?=^#{{1,{len(level)}}} |\Z)", text, re.M | re.S)
    assert m, f"README.md has no section {heading!r}"
    return m.group(1)


def blocks(text: str) -> list:
    "The fenced code blocks of `text` as (language, code)."
    return [(lang.strip(), code) for lang, code in FENCE.findall(text)]


def recipe(title: str) -> list:
    return blocks(section(section(readme(), "## Quick start"), f"### {title}"))


def index_study() -> Path:
    "The main study the index names (`STUDY = Path(\"../results/NAME\")`, relative to nbs/)."
    cells = json.loads(make_readme.INDEX.read_text(encoding="utf-8"))["cells"]
    return (make_readme.NBS / make_readme.study_of(cells)).resolve()


def plain(markdown: str) -> str:
    "Markdown as a reader sees it: links as their text, no emphasis or code marks, one space between words."
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", markdown)
    return " ".join(re.sub(r"[*`_]", "", text).split())


# ---------------------------------------------------------------------------------------- generated, current

def test_readme_is_generated_from_index():
    "`make_readme.py --check`: README.md is what nbs/index.ipynb and the stored study give."
    assert readme() == make_readme.readme_text(), \
        "README.md differs from what nbs/index.ipynb gives: run `python tools/make_readme.py` and commit README.md"
    r = subprocess.run([sys.executable, ROOT / "tools" / "make_readme.py", "--check"], capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr + r.stdout


def test_findings_come_from_the_stored_results():
    "The README states the paragraph the index computes, with the verdicts of claims.json, and links reproduce's figure."
    from crossclass_nb.report import findings_paragraph
    study = index_study()
    found = section(readme(), "## What the package found")
    with make_readme.in_folder(make_readme.NBS):
        paragraph = findings_paragraph(Path(os.path.relpath(study, make_readme.NBS))).strip()
    from_top = make_readme.LOCAL_LINK.sub(lambda m: f"]({make_readme.from_top(m.group(1))})", paragraph)  # as README links
    assert " ".join(from_top.split()) in " ".join(found.split())
    for c in json.loads((study / "claims.json").read_text()):   # the verdicts table: one row per claim, as shown
        (row,) = [line for line in found.splitlines() if line.startswith(("| claim ", "| check ")) and c["claim"] in line]
        assert f"| **{c['shown']}** | {c['verdict']} |" in row, row
    (image,) = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", found)
    assert (ROOT / image).resolve() == study / "story.png", image
    assert (study / "story.png").read_bytes().startswith(b"\x89PNG") and (study / "story.png").stat().st_size > 10_000


def test_findings_work_for_every_finished_study(tmp_path):
    """Every stored study of the claims that has a key run (hard-label AT at its main eps) gives a paragraph and has the
    figure reproduce drew; one without is refused, and so is a directory without claims."""
    from crossclass_nb.core import RunDirError
    from crossclass_nb.report import findings_paragraph
    studies = [d for d in sorted((ROOT / "results").iterdir()) if (d / "claims.json").is_file()]
    assert studies
    told = 0
    for d in studies:
        try: paragraph = findings_paragraph(d)
        except RunDirError:
            assert not (d / "story.png").exists(), d
            continue
        told += 1
        assert f"`results/{d.name}/`" in paragraph and (d / "story.png").stat().st_size > 10_000, d
    assert told, "no stored study gives the findings"
    with pytest.raises(RunDirError): findings_paragraph(tmp_path)


def test_generated_readme_follows_the_notebook(tmp_path, monkeypatch):
    "The generator itself: markdown cells in order, docs-only and code cells left out, the figure cell as a link, links from the top."
    def cell(kind, src):
        return {"cell_type": kind, "metadata": {}, "source": src,
                **({"outputs": [], "execution_count": None} if kind == "code" else {})}
    nb = {"cells": [cell("markdown", "# T\n> d"), cell("code", "print(1)"), cell("markdown", "<!-- docs-only -->\npicture"),
                    cell("markdown", "See [core](api/00_core.ipynb), [site](https://x.org/a.ipynb) and ![f](images/f.png)."),
                    cell("code", '#| echo: false\nSTUDY = Path("../results/s")\nImage(filename=STUDY / "story.png")')],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "index.ipynb").write_text(json.dumps(nb))
    monkeypatch.setattr(make_readme, "caption", lambda study: f"the key figure of {study}")
    text = make_readme.readme_text(tmp_path / "index.ipynb")
    assert text == make_readme.HEADER + ("# T\n> d\n\nSee [core](nbs/api/00_core.ipynb), [site](https://x.org/a.ipynb) and "
                                         "![f](nbs/images/f.png).\n\n![the key figure of ../results/s](results/s/story.png)\n")


# ------------------------------------------------------------------------------------------------ two commands

def test_readme_has_exactly_the_two_commands():
    "Setting up and running everything takes exactly two commands; the quick start comes after them."
    assert [code.strip() for _, code in blocks(section(readme(), "## Two commands"))] == ["make demo", "make test"]
    targets = re.findall(r"^(\w+):", (ROOT / "Makefile").read_text(encoding="utf-8"), re.M)
    assert {"demo", "test", "docs"} <= set(targets), f"the Makefile lacks demo, test or docs: {targets}"
    setup_words = section(readme(), "## Install") + section(readme(), "## Two commands")
    assert "make demo" in setup_words and "make test" in setup_words


def test_quick_start_has_the_three_recipes():
    quick = section(readme(), "## Quick start")
    assert [t for t in RECIPES if f"### {t}\n" in quick] == list(RECIPES)
    assert [lang for lang, _ in recipe("CAS of your own model")] == ["python", "sh"]
    assert "--data-root" in quick and "CROSSCLASS_DATA" in quick and "paper.ipynb" in quick


def test_license_and_citation():
    "LICENSE is the Apache-2.0 text settings.ini names; CITATION.cff cites the package and the paper it implements."
    import yaml
    assert "license = apache2" in (ROOT / "settings.ini").read_text()
    text = (ROOT / "LICENSE").read_text()
    assert text.strip().startswith("Apache License") and "Version 2.0, January 2004" in text and len(text) > 10_000
    cff = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    version = re.search(r"^version = (\S+)", (ROOT / "settings.ini").read_text(), re.M).group(1)
    assert cff["cff-version"] == "1.2.0" and cff["type"] == "software" and cff["version"] == version
    assert cff["license"] == "Apache-2.0"
    (paper,) = cff["references"]
    assert [a["family-names"] for a in paper["authors"]] == ["Wei", "Guo", "Wang"] and paper["year"] == 2025
    assert "2506.05032" in paper["identifiers"][0]["value"] and "ICML 2025" in paper["collection-title"]
    citing = section(readme(), "## Citing")
    assert "CITATION.cff" in citing and f"version = {{{version}}}" in citing and "eprint        = {2506.05032}" in citing


# ------------------------------------------------------------------------------------------- the recipes, run

def _env(tmp: Path, **extra) -> dict:
    "The environment of a user who activated the venv, in a fresh home directory."
    (tmp / "home").mkdir(exist_ok=True)
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp / "home"),
            "MPLBACKEND": "Agg", "CROSSCLASS_QUIET": "1", **extra}


def _run_shell(lines: list, cwd: Path, env: dict, timeout: int = 1800):
    "Run the commands one by one, as a terminal would (bash, stop at the first failure)."
    for line in lines:
        r = subprocess.run(["bash", "-ec", line], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        assert r.returncode == 0, f"$ {line}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"


def commands(code: str) -> list:
    return [line.strip() for line in code.strip().splitlines() if line.strip() and not line.startswith("#")]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, tries: int = 60) -> bytes:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=10) as r: return r.read()
        except OSError: time.sleep(0.5)
    raise AssertionError(f"nothing answered at {url}")


def test_recipe_read_the_book(docs_site):
    """`make docs` is the build the suite made (`docs_site`); the site served with the README's command: its index
    page is this README's page, with the findings paragraph and the figure computed when it rendered."""
    ((lang, code),) = recipe("Read the book")
    build, serve = commands(code)
    assert (lang, build, serve) == ("sh", "make docs", "python -m http.server -d _docs 8000")
    dry = subprocess.run(["make", "-n", "docs"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    assert "python tools/build_docs.py" in dry and "python tools/build_docs.py" in (ROOT / "tools/run_tests.sh").read_text()
    port = _free_port()
    server = subprocess.Popen([sys.executable, *shlex.split(serve)[1:-1], str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = _get(f"http://127.0.0.1:{port}/index.html").decode()
    finally:
        server.terminate()
        server.wait(timeout=30)
    start, end = '<section id="what-the-package-found"', '<section id="quick-start"'
    assert start in page and end in page, "the page has no section 'What the package found' before 'Quick start'"
    found = page[page.index(start):page.index(end)]  # the sections themselves, not the table of contents
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", found)).replace("\u2019", "'").split())
    (paragraph,) = [p for p in section(readme(), "## What the package found").split("\n\n") if p.startswith("The study stored")]
    paragraph = plain(paragraph)
    assert " ".join(paragraph.split()[:12]) in text, "the page's findings are not the README's"
    assert "data:image/png;base64," in found, "the page shows no figure under its findings"


@pytest.fixture
def fake_cifar_home(tmp_path):
    "A fresh home directory with a small CIFAR-10 in ~/data (torchvision's format), and a directory to work in."
    make_fake_cifar(tmp_path / "home" / "data", n_train=50, n_test=10)  # one test image per class
    (tmp_path / "work").mkdir()
    return tmp_path


@pytest.mark.slow
def test_recipe_cas_of_your_own_model(fake_cifar_home):
    "The five lines of Python, then the two commands, on a ResNet-18 state dict W.pt and a small CIFAR-10."
    tmp, work = fake_cifar_home, fake_cifar_home / "work"
    env = _env(tmp, CROSSCLASS_DATA=str(tmp / "home" / "data"))
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), work / "W.pt")
    (_, python), (_, shell) = recipe("CAS of your own model")
    r = subprocess.run([sys.executable, "-c", python], cwd=work, env=env, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, r.stderr[-3000:]
    cas, acc = map(float, re.fullmatch(r"CAS (\S+), robust accuracy (\S+)\n", r.stdout).groups())
    assert 0 <= cas <= 90 and 0 <= acc <= 1
    _run_shell(commands(shell), work, env)
    record = json.loads((work / "W.cas.json").read_text())
    assert record["settings"]["num_examples"] == 10 and 0 <= record["cas"] <= 90 and record["checkpoint"] == "torchvision:resnet18"
    assert (work / "W.similarity.png").stat().st_size > 1000
    assert json.loads((work / "W.eval.json").read_text())["n"] == 10


SMALL_TRAIN = " --epochs 1 --batch-size 10 --set train_size=20 --set val_size=10 --set steps=1 --set eval_steps=1 --quiet"


def _small(line: str) -> str:
    "A command of the GPU recipe at its smallest size on the CPU."
    if line.startswith("torchrun"): return line.replace("--nproc_per_node=4", "--nproc_per_node=2") + SMALL_TRAIN
    if line.startswith("crossclass train --resume"): return line + " --epochs 2 --quiet"
    if line.startswith("crossclass train"): return line + SMALL_TRAIN
    if line.startswith(("crossclass cas", "crossclass eval")): return line + " --n 10 --steps 1"
    return line


@pytest.mark.slow
def test_recipe_the_papers_recipe_on_a_gpu(fake_cifar_home):
    "CIFAR-10 from ~/data through CROSSCLASS_DATA, train, resume, cas of best vs last, eval, and torchrun (2 CPUs)."
    tmp, work = fake_cifar_home, fake_cifar_home / "work"
    (_, single), (_, several) = recipe("The paper's recipe on a GPU")
    lines = commands(single)
    assert lines[0] == "export CROSSCLASS_DATA=~/data"
    setup, rest = lines[0], [_small(line) for line in lines[1:]]
    _run_shell([" && ".join([setup, line]) for line in rest], work, _env(tmp))
    run = work / "runs" / "c10"
    assert [r["epoch"] for r in load_metrics(run)] == [1, 2], "trained one epoch, then resumed for a second"
    assert json.loads((run / "config.json").read_text())["model"] == "preact_resnet18"
    for f in ("best.cas.json", "last.cas.json", "best_minus_last.difference.png", "best.eval.json"):
        assert (run / f).stat().st_size > 0, f
    (line,) = commands(several)
    assert line.startswith("torchrun --nproc_per_node=4 -m crossclass_nb train --preset cifar10-paper")
    _run_shell([f"{setup} && {_small(line)}"], work, _env(tmp))
    assert [r["epoch"] for r in load_metrics(work / "runs" / "c10-4gpu")] == [1]
