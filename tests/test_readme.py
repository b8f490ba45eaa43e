"""README.md: generated from nbs/index.ipynb, its findings and figure current with the stored study, exactly two
set-up commands (`make demo`, `make test`), and every command of its three quick-start recipes run as written, at the
smallest size each allows, on the CPU.

How a recipe is run at its smallest size: the commands are the README's own, run in order by bash (Python blocks by
Python) in a fresh directory whose $HOME holds a small dataset in CIFAR-10's format; only size flags are appended to
`crossclass train`, `cas` and `eval` (one epoch, 20 training images, one attack step, ...), torchrun starts 2
processes instead of 4, and the docs server gets a free port instead of 8000.
"""
import importlib.util
import json
import math
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
from crossclass_nb.training import load_metrics

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
spec = importlib.util.spec_from_file_location("make_readme", ROOT / "scripts" / "make_readme.py")
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


# ---------------------------------------------------------------------------------------- generated, current

def test_readme_is_generated_from_index():
    assert readme() == make_readme.readme_text(), \
        "README.md differs from what nbs/index.ipynb gives: run `python scripts/make_readme.py` and commit README.md"


def test_findings_and_figure_are_current_with_the_main_study():
    "`make_readme.py --check`: the index's findings cell, its figure and README.md are what the stored study gives."
    r = subprocess.run([sys.executable, ROOT / "scripts" / "make_readme.py", "--check"], capture_output=True, text=True,
                       timeout=600, env={**os.environ, "MPLBACKEND": "Agg"})
    assert r.returncode == 0, r.stderr + r.stdout
    cell = make_readme.findings_cell()
    assert cell in readme().replace("](nbs/", "](") and "![" in cell and make_readme.FIGURE.stat().st_size > 10_000


def test_findings_come_from_the_stored_results():
    "The verdicts and the key run's numbers in the paragraph are those of claims.json and the run's metrics."
    claims = json.loads((make_readme.STUDY / "claims.json").read_text())
    cell = " ".join(make_readme.findings_cell().split())
    for c in claims: assert f"**{c['verdict']}**" in cell and " ".join(c["claim"].rstrip(".").split()) in cell
    study, run = make_readme.main_run(make_readme.STUDY)
    assert run.method == "at" and math.isclose(run.eps, study.main_eps)
    rows = {r["epoch"]: r for r in load_metrics(make_readme.STUDY / "runs" / run.name)}
    best = rows[max(rows)]["best_epoch"]
    assert f"test robust accuracy {100 * rows[best]['test_robust_acc']:.1f} % and CAS {rows[best]['cas']:.1f}" in cell


def test_findings_work_for_every_finished_study(tmp_path):
    "Any study of the claims written by `crossclass reproduce` gives a paragraph and a figure; other dirs a clear error."
    from crossclass_nb.core import RunDirError
    studies = [d for d in sorted((ROOT / "results").iterdir()) if (d / "claims.json").is_file()]
    assert studies
    for d in studies:
        assert f"`results/{d.name}/`" in make_readme.findings_cell(d)
        assert make_readme.draw_story(d, tmp_path / f"{d.name}.png").stat().st_size > 10_000
    with pytest.raises(RunDirError, match="no claims.json"): make_readme.findings_cell(tmp_path)


def test_generated_readme_follows_the_notebook(tmp_path):
    "The generator itself: markdown cells in order, docs-only and code cells left out, local links into nbs/."
    def cell(kind, src):
        return {"cell_type": kind, "metadata": {}, "source": src,
                **({"outputs": [], "execution_count": None} if kind == "code" else {})}
    nb = {"cells": [cell("markdown", "# T\n> d"), cell("code", "print(1)"), cell("markdown", "<!-- docs-only -->\npicture"),
                    cell("markdown", "See [core](00_core.ipynb), [site](https://x.org/a.ipynb) and ![f](images/f.png).")],
          "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    (tmp_path / "index.ipynb").write_text(json.dumps(nb))
    text = make_readme.readme_text(tmp_path / "index.ipynb")
    assert text == make_readme.HEADER + \
        "# T\n> d\n\nSee [core](nbs/00_core.ipynb), [site](https://x.org/a.ipynb) and ![f](nbs/images/f.png).\n"


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


def test_recipe_read_the_book():
    "`make docs`, then the site served from _docs: its index page is this README's page, figure included."
    ((lang, code),) = recipe("Read the book")
    build, serve = commands(code)
    assert (lang, build, serve) == ("sh", "make docs", "python -m http.server -d _docs 8000")
    _run_shell([build], ROOT, {**os.environ, "MPLBACKEND": "Agg"}, timeout=3600)
    port = _free_port()
    server = subprocess.Popen([sys.executable, *shlex.split(serve)[1:-1], str(port)], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        page = _get(f"http://127.0.0.1:{port}/index.html").decode()
        assert "Quick start" in page and "What the package found" in page and "story.png" in page
        image = re.search(r"""src=["']([^"']*story\.png)""", page).group(1)
        assert _get(f"http://127.0.0.1:{port}/{image}").startswith(b"\x89PNG")
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.fixture
def fake_cifar_home(tmp_path):
    "A fresh home directory with a small CIFAR-10 in ~/data (torchvision's format), and a directory to work in."
    make_fake_cifar(tmp_path / "home" / "data", n_train=50, n_test=10)  # one test image per class
    (tmp_path / "work").mkdir()
    return tmp_path


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
