"""`crossclass reproduce --quick` end to end: it trains the tiny study in a subprocess, prints its output directory,
writes the report, the CSV/JSON behind it and the story figure, and the report renders in Chromium (the `serve` and `chromium` fixtures
of conftest.py) with every image loaded and no request leaving the machine."""
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from crossclass_nb.claims import CLAIMS, VERDICTS
from crossclass_nb.studies import get_study
from conftest import user_env

# the package's own command line, for the second invocations (the first is the wheel's, in `quick_study`)
CROSSCLASS = [sys.executable, "-c", "import sys; from crossclass_nb.cli import main; sys.exit(main())"]


@pytest.fixture
def quick(quick_study):
    "The suite's one `crossclass reproduce --quick` (conftest.py): (output directory, completed process, wall seconds)."
    return quick_study.out, quick_study.result, quick_study.seconds


@pytest.fixture
def quick_copy(quick_study, tmp_path):
    "A copy of that study, for a test that writes into it."
    assert quick_study.result.returncode == 0, quick_study.result.stderr[-3000:]
    shutil.copytree(quick_study.out, tmp_path / "quick")
    return tmp_path / "quick"


def test_quick_run_writes_everything(quick):
    out, r, seconds = quick
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"output directory {out}" in r.stdout.splitlines()[0]       # printed before any training
    assert f"report: {out / 'report.html'}" in r.stdout
    assert "100.00% [" in r.stdout and "finished at_eps0.1_s0" in r.stdout          # the progress bar and a line per run
    study = get_study("fmnist-quick")
    for s in study.runs:
        for f in ("config.json", "metrics.csv", "metrics.jsonl", "best.pt", "last.pt"): assert (out / "runs" / s.name / f).is_file()
        assert len(list((out / "runs" / s.name / "cas").glob("epoch_*.json"))) == s.config.epochs
    assert (out / "story.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(out / "summary.csv") as f: assert len(list(csv.DictReader(f))) == len(study.runs)
    claims = json.loads((out / "claims.json").read_text())
    assert [c["id"] for c in claims] == [c["id"] for c in CLAIMS] and all(c["verdict"] in VERDICTS for c in claims)
    for c in claims: assert f"  {c['id']}: {c['shown']}" in r.stdout
    t = json.loads((out / "timings.json").read_text())
    assert t["runs trained now"] == len(study.runs) and t["total seconds (this invocation)"] <= seconds
    print(f"crossclass reproduce --quick: {seconds:.0f} s wall ({t['training seconds (this invocation)']:.0f} s training)")


def test_a_second_run_refuses_and_resume_trains_nothing(quick_copy):
    out = quick_copy
    again = subprocess.run([*CROSSCLASS, "reproduce", "--quick", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    resumed = subprocess.run([*CROSSCLASS, "reproduce", "--quick", "--out", str(out), "--resume"], capture_output=True,
                             text=True, timeout=600, env=user_env())
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert json.loads((out / "timings.json").read_text())["runs trained now"] == 0
    assert "0 to train" in resumed.stdout


def test_report_renders_offline_in_chromium(quick, serve, chromium):
    out, r, _ = quick
    assert r.returncode == 0
    base = serve(out)
    page = chromium.new_page()
    requests, errors = [], []
    page.on("request", lambda req: requests.append(req.url))
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    resp = page.goto(base + "report.html", wait_until="load")
    assert resp is not None and resp.status == 200
    images = page.evaluate("""() => Array.from(document.images).map(i => ({
        ok: i.complete && i.naturalWidth > 0 && i.naturalHeight > 0, src: i.src.slice(0, 22), w: i.naturalWidth}))""")
    verdicts = page.locator("table.claims tbody tr td:nth-child(3) b").all_inner_texts()   # the verdict shown, in bold
    title = page.locator("h1").inner_text()
    page.close()
    assert len(images) == 5 and all(i["ok"] and i["src"] == "data:image/png;base64," and i["w"] > 300 for i in images), images
    assert [v.strip() for v in verdicts] == [c["shown"] for c in json.loads((out / "claims.json").read_text())]
    assert "fmnist-quick" in title
    outside = [u for u in requests if not (u.startswith(base) or u.startswith("data:"))]
    assert not outside, outside
    assert not errors, errors


def test_local_launcher_gives_the_numbers_of_the_default_path(quick, tmp_path):
    "`--launcher local` (submitit's local executor, one process per run) trains the same runs to the same numbers."
    pytest.importorskip("submitit", reason='the local launcher needs the optional extra: pip install -e ".[cluster]"')
    out, r, _ = quick
    assert r.returncode == 0
    local = tmp_path / "local"  # hard-label AT of seed 0 only: its runs are also in the quick study
    done = subprocess.run([*CROSSCLASS, "reproduce", "--quick", "--methods", "at", "--seeds", "1", "--launcher", "local",
                           "--out", str(local)], capture_output=True, text=True, timeout=900, env=user_env())
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads((local / "timings.json").read_text())["launcher"] == "local"
    names = [s.name for s in get_study("fmnist-quick", seeds=(0,), methods=("at",)).runs]
    assert len(names) == 3 and all((local / "logs" / n).is_dir() for n in names)   # one submitit job per run
    own = ("seconds", "dcas_control", "dcas_excess")   # timing, and the control that the subset does not train
    numbers = lambda d: json.dumps([{k: v for k, v in row.items() if k not in own}   # as text: NaN equals NaN
                                    for row in json.loads((d / "summary.json").read_text()) if row["name"] in names])
    assert numbers(local) == numbers(out)
