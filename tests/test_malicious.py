"""Malicious files: a pickle that runs code when loaded (its payload writes a marker file) is refused everywhere the
package loads a file (core.safe_load, load_checkpoint/load_model, trainer resume, the KD teacher, `crossclass eval`,
`crossclass cas`, `crossclass train --resume`, CIFAR files), and the marker proves the payload never ran."""
import pickle
import re
from pathlib import Path

import pytest
import torch

from catalogue import TINY, copy_run, run_cli, snapshot, tiny_run  # noqa: F401 (tiny_run: a fixture)
from crossclass_nb.checkpoint import load_checkpoint, load_model
from crossclass_nb.config import get_config
from crossclass_nb.core import CheckpointError, CrossclassError, DataError, safe_load
from crossclass_nb.data import load_dataset, make_fake_cifar
from crossclass_nb.training import train


class Payload:
    "Unpickling this runs `exec`, which writes the marker file."
    def __init__(self, marker): self.marker = str(marker)
    def __reduce__(self): return (exec, (f"open({self.marker!r}, 'w').write('the payload ran')",))


def _checkpoint_with(run: Path, payload, where: str) -> dict:
    "A real checkpoint of the run `run` with the payload hidden at `where`."
    ck = torch.load(run / "last.pt", weights_only=True)
    if where == "top": ck["extra"] = payload
    elif where == "weights": ck["model"]["head.weight"] = payload
    elif where == "rng": ck["rng"][0]["python"] = payload
    elif where == "config": ck["config"]["name"] = payload
    elif where == "whole": ck = payload
    return ck


FORMATS = {
    "zip": lambda obj, f: torch.save(obj, f),
    "legacy": lambda obj, f: torch.save(obj, f, _use_new_zipfile_serialization=False),
    "pickle": lambda obj, f: pickle.dump(obj, f, protocol=2),
}


def evil_file(run: Path, path: Path, marker: Path, where: str = "weights", fmt: str = "zip") -> Path:
    "A copy of `run`'s last.pt at `path`, with a payload that writes `marker`."
    with open(path, "wb") as f: FORMATS[fmt](_checkpoint_with(run, Payload(marker), where), f)
    return path


VARIANTS = [(w, f) for f in FORMATS for w in ("top", "weights", "rng", "config", "whole")]


def test_the_payload_is_real(tmp_path, tiny_run):
    "Loaded without protection, each evil file does run its payload: the refusals below are not vacuous."
    for where, fmt in [("top", "zip"), ("weights", "zip"), ("rng", "zip"), ("config", "zip"), ("weights", "legacy"),
                       ("whole", "legacy"), ("whole", "pickle")]:
        marker = tmp_path / f"ran_{where}_{fmt}"
        p = evil_file(tiny_run, tmp_path / f"{where}_{fmt}.pt", marker, where, fmt)
        try:
            if fmt == "pickle":
                with open(p, "rb") as f: pickle.load(f)
            else: torch.load(p, weights_only=False)
        except Exception: pass  # (torch cannot rebuild legacy storages after the payload; the payload ran first)
        assert marker.exists(), (where, fmt)


def _refused(exc_info, marker, *, also=CheckpointError):
    assert isinstance(exc_info.value, also), exc_info.value
    assert not marker.exists(), "THE PAYLOAD RAN"


@pytest.mark.parametrize("where,fmt", VARIANTS, ids=[f"{w}-{f}" for w, f in VARIANTS])
def test_safe_load_refuses(tmp_path, where, fmt, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    p = evil_file(tiny_run, tmp_path / "evil.pt", marker, where, fmt)
    with pytest.raises(CrossclassError) as e: safe_load(p)
    _refused(e, marker)
    msg = str(e.value)
    assert "evil.pt" in msg, msg  # which file; the message text itself is checked in chapter 00


@pytest.mark.parametrize("where,fmt", [("weights", "zip"), ("config", "legacy"), ("whole", "pickle")])
def test_load_checkpoint_and_load_model_refuse(tmp_path, where, fmt, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    p = evil_file(tiny_run, tmp_path / "best.pt", marker, where, fmt)
    for load in (load_checkpoint, load_model, lambda p: load_model(p.parent)):   # a run directory means its best.pt
        with pytest.raises(CrossclassError) as e: load(p)
        _refused(e, marker)


def test_resume_refuses_evil_last_checkpoint(tmp_path, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    run = copy_run(tiny_run, tmp_path / "run")
    evil_file(tiny_run, run / "last.pt", marker, "rng")
    before = snapshot(tmp_path)
    with pytest.raises(CrossclassError) as e: train(None, run, resume=True, quiet=True)
    _refused(e, marker)
    assert "last.pt" in str(e.value)                         # which file (chapter 11 asserts the refusal's words)
    assert snapshot(tmp_path) == before


def test_resume_with_evil_best_checkpoint_never_runs_it(tmp_path, tiny_run):
    "A planted best.pt is only ever opened with weights_only=True (the resume treats it as unusable)."
    marker = tmp_path / "PAYLOAD_RAN"
    run = copy_run(tiny_run, tmp_path / "run")
    evil_file(tiny_run, run / "best.pt", marker, "weights")
    try: train(get_config("fmnist-tiny", **{**TINY, "epochs": 3}), run, resume=True, quiet=True)
    except CrossclassError: pass      # refusing the run is fine too; running the payload is not
    assert not marker.exists(), "THE PAYLOAD RAN"


def test_kd_teacher_refuses(tmp_path, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    teacher = evil_file(tiny_run, tmp_path / "teacher.pt", marker, "weights")
    before = snapshot(tmp_path)
    with pytest.raises(CrossclassError) as e:
        train(get_config("fmnist-tiny", **TINY, kd="teacher", kd_teacher=str(teacher)), tmp_path / "kd", quiet=True)
    _refused(e, marker)
    assert "teacher.pt" in str(e.value)
    assert snapshot(tmp_path) == before


def _cli_refuses(tmp_path, argv, marker):
    before = snapshot(tmp_path)
    res = run_cli(argv)
    assert not marker.exists(), "THE PAYLOAD RAN"
    assert res.code == 2, (res.code, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    assert snapshot(tmp_path) == before, "the refusal changed the disk"


def test_cli_eval_refuses(tmp_path, monkeypatch, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    monkeypatch.chdir(tmp_path)
    evil_file(tiny_run, tmp_path / "evil.pt", marker, "weights")
    _cli_refuses(tmp_path, ["eval", tmp_path / "evil.pt"], marker)


def test_cli_cas_refuses(tmp_path, monkeypatch, tiny_run):
    "Alone, or as the second of two checkpoints (after a good one)."
    marker = tmp_path / "PAYLOAD_RAN"
    monkeypatch.chdir(tmp_path)
    run = copy_run(tiny_run, tmp_path / "run")
    evil_file(tiny_run, tmp_path / "evil.pt", marker, "top", "legacy")
    _cli_refuses(tmp_path, ["cas", tmp_path / "evil.pt", "--out", tmp_path / "cas_out"], marker)
    _cli_refuses(tmp_path, ["cas", run / "best.pt", tmp_path / "evil.pt", "--out", tmp_path / "cas_out"], marker)


def test_cli_train_resume_refuses(tmp_path, monkeypatch, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    monkeypatch.chdir(tmp_path)
    run = copy_run(tiny_run, tmp_path / "run")
    evil_file(tiny_run, run / "last.pt", marker, "config")
    _cli_refuses(tmp_path, ["train", "--resume", run], marker)


def test_cli_train_kd_teacher_refuses(tmp_path, monkeypatch, tiny_run):
    marker = tmp_path / "PAYLOAD_RAN"
    monkeypatch.chdir(tmp_path)
    evil_file(tiny_run, tmp_path / "teacher.pt", marker, "whole", "pickle")
    _cli_refuses(tmp_path, ["train", "--preset", "fmnist-tiny", "--out", tmp_path / "kd", "--set", "kd=teacher",
                            "--set", f"kd_teacher={tmp_path / 'teacher.pt'}"], marker)


@pytest.mark.parametrize("victim", ["batches.meta", "data_batch_2", "test_batch"])
def test_cifar_files_refuse(tmp_path, victim, monkeypatch):
    monkeypatch.setenv("CROSSCLASS_DATA", "")
    marker = tmp_path / "PAYLOAD_RAN"
    folder = make_fake_cifar(tmp_path / "data", n_train=20, n_test=10)
    d = pickle.loads((folder / victim).read_bytes())
    d["labels" if "labels" in d else "label_names"] = Payload(marker)
    (folder / victim).write_bytes(pickle.dumps(d, protocol=2))
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", train=victim != "test_batch", root=tmp_path / "data")
    _refused(e, marker, also=DataError)
    assert victim in str(e.value)                            # which file (chapter 01 asserts the refusal's words)
    assert snapshot(tmp_path) == before


def _trusted_pickle_site(f: Path, src: str, at: int) -> bool:
    """The one pickle the package reads on purpose: `launchers.run_pickled` loads the call that `run_torchrun` wrote
    a moment before into its own private temporary folder (mode 0700), for the torchrun processes it starts."""
    import inspect
    from crossclass_nb import launchers
    if f.name != "launchers.py": return False
    start = src.index("def run_pickled(")
    inside = start < at < src.index("\ndef ", start + 1)
    return inside and "tempfile.TemporaryDirectory()" in inspect.getsource(launchers.run_torchrun)


def test_every_load_in_the_package_is_safe():
    "Static guard for load sites added later: torch.load only with weights_only=True, no bare pickle loads."
    import crossclass_nb
    pkg = Path(crossclass_nb.__file__).parent
    bad = []
    for f in sorted(pkg.glob("*.py")):
        src = f.read_text(encoding="utf-8")
        for m in re.finditer(r"torch\.load\((?:[^()]|\([^()]*\))*\)", src):
            if "weights_only=True" not in m.group(0): bad.append(f"{f.name}: {m.group(0)}")
        for m in re.finditer(r"\b(?:pickle|cPickle|dill|joblib)\.loads?\(|\bnp\.load\([^)]*allow_pickle=True|"
                             r"\bpickle\.Unpickler\(", src):
            if not _trusted_pickle_site(f, src, m.start()): bad.append(f"{f.name}: {m.group(0)}")
        for m in re.finditer(r"class\s+(\w+)\(pickle\.Unpickler\)", src):
            if "find_class" not in src: bad.append(f"{f.name}: {m.group(0)} without find_class")
    assert not bad, bad
