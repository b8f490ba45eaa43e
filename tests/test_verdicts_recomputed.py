"""The stored verdicts' numbers, recomputed without the package: plain json, numpy and scipy on each run's
`config.json` and `metrics.jsonl`. For every stored claims study: the best epoch (highest validation accuracy of the
run's selection metric), the gap and ΔCAS of hard-label AT at the main eps, their paired Student-t intervals, and the
matched control's excess ΔCAS, compared with what `claims.json` holds."""
import json
import math
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

RESULTS = Path(__file__).resolve().parent.parent / "results"
CLAIMS_STUDIES = sorted(p.parent.name for p in RESULTS.glob("*/claims.json"))


def read_run(run_dir: Path) -> dict:
    "The numbers the claims use, from the run's files alone."
    config = json.loads((run_dir / "config.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    evaluated = [r for r in rows if isinstance(r.get("cas"), (int, float)) and math.isfinite(r["cas"])]
    key = f"val_{config['select_metric']}_acc"
    best = evaluated[int(np.argmax([r[key] for r in evaluated]))]   # the first epoch with the highest value
    last = evaluated[-1]
    cas = {r["epoch"]: r["cas"] for r in evaluated}
    return {"best": best["epoch"], "last": last["epoch"], "cas": cas, "recorded_best": rows[-1]["best_epoch"],
            "gap": 100 * (best["test_robust_acc"] - last["test_robust_acc"]), "dcas": best["cas"] - last["cas"]}


def paired_interval(values) -> tuple[float, float]:
    v = np.asarray(values, float)
    half = stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v))
    return v.mean() - half, v.mean() + half


@pytest.fixture(params=CLAIMS_STUDIES)
def study(request):
    out = RESULTS / request.param
    spec = json.loads((out / "study.json").read_text())
    claims = {c["id"]: c for c in json.loads((out / "claims.json").read_text())}
    return out, spec, claims


def test_every_claims_study_is_found():
    assert {"fmnist-main", "fmnist-noise", "fmnist-clean"} <= set(CLAIMS_STUDIES), CLAIMS_STUDIES


def test_gap_dcas_and_intervals_recomputed(study):
    out, spec, claims = study
    main = [r for r in spec["runs"] if r["method"] == "at" and math.isclose(r["eps"], spec["main_eps"])]
    runs = {r["seed"]: read_run(out / "runs" / r["name"]) for r in main}
    assert all(r["best"] == r["recorded_best"] for r in runs.values())   # the trainer chose the same best epoch
    seeds = sorted(runs)
    numbers = claims["3"]["numbers"]
    np.testing.assert_allclose([runs[s]["gap"] for s in seeds], numbers["gap"], atol=1e-9)
    np.testing.assert_allclose([runs[s]["dcas"] for s in seeds], numbers["dcas"], atol=1e-9)
    np.testing.assert_allclose(paired_interval([runs[s]["dcas"] for s in seeds]), numbers["dcas_ci"][1:], atol=1e-9)


def test_control_excess_recomputed(study):
    out, spec, claims = study
    control = {r["seed"]: r for r in spec["runs"] if r["method"] == "at_clean"}
    if not control: pytest.skip(f"{out.name} has no matched control")
    excess = []
    for r in sorted((r for r in spec["runs"] if r["method"] == "at" and math.isclose(r["eps"], spec["main_eps"])),
                    key=lambda r: r["seed"]):
        run, twin = read_run(out / "runs" / r["name"]), read_run(out / "runs" / control[r["seed"]]["name"])
        excess.append(run["dcas"] - (twin["cas"][run["best"]] - twin["cas"][run["last"]]))
    numbers = claims["3"]["numbers"]
    np.testing.assert_allclose(excess, numbers["dcas_excess"], atol=1e-9)
    np.testing.assert_allclose(paired_interval(excess), numbers["dcas_excess_ci"][1:], atol=1e-9)


def test_every_verdict_carries_its_stability(study):
    out, spec, claims = study
    for c in claims.values():
        assert 0 <= c["stability"] <= 1, c
        stable = c["stability"] >= 0.9 and c.get("twin_verdict", c["verdict"]) == c["verdict"]
        assert c["shown"] == c["verdict"] if stable else c["shown"].startswith("unstable ("), c


def test_the_twin_differs_from_the_main_study_by_float_noise():
    "The float-noise twin starts from perturbed weights: every run's first epoch differs, but only in the digits far out."
    main, twin = RESULTS / "fmnist-main", RESULTS / "fmnist-main-twin"
    for run in sorted(p.name for p in (main / "runs").iterdir()):
        first = [json.loads((d / "runs" / run / "metrics.jsonl").read_text().splitlines()[0]) for d in (main, twin)]
        a, b = (r["train_loss"] for r in first)
        assert a != b and abs(a - b) < 1e-3 * abs(a), (run, a, b)


def test_a_study_that_is_not_a_twin_is_refused():
    from crossclass_nb.core import InputError
    from crossclass_nb.report import twin_rows
    from crossclass_nb.studies import load_study
    with pytest.raises(InputError, match="is not a float-noise twin of fmnist-main"):
        twin_rows(load_study(RESULTS / "fmnist-main"), RESULTS / "fmnist-noise")
