"""Launchers against what this machine lacks: a SLURM cluster (sbatch, srun, sacct and scancel played by small scripts,
around submitit's real executor and job objects), several GPUs (torchrun on the CPU) and, on purpose, submitit itself.
The chapter (nbs/api/13_launchers.ipynb) tests the scheduler, the in-process and pool engines and a real training run."""
import json
import os
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from crossclass_nb import launchers
from crossclass_nb.core import InputError, MissingExtraError
from crossclass_nb.launchers import Job, JobError, TimedCall, launch, slurm_executor

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

TESTS = str(Path(__file__).resolve().parent)


# Jobs: top-level functions of this module, which the launched processes import (PYTHONPATH points here).
def seeded_numbers(seed: int, path: str) -> None:
    "A tiny deterministic job: three seeded random numbers, written as JSON."
    torch.manual_seed(seed)
    Path(path).write_text(json.dumps(torch.randn(3).tolist()))

def fail(message: str) -> None:
    raise ValueError(message)

def write_rank(folder: str) -> None:
    "Each torchrun process writes a file named after its rank, holding the world size."
    Path(folder, f"rank{os.environ['RANK']}").write_text(os.environ["WORLD_SIZE"])


@pytest.fixture
def importable(monkeypatch):
    "Processes started afresh (submitit, torchrun) import this module's jobs."
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, os.environ.get("PYTHONPATH", "")]))


def test_local_and_processes_give_the_numbers_of_this_process(tmp_path, importable):
    for seed in (0, 1): seeded_numbers(seed, str(tmp_path / f"here{seed}"))
    for engine in ("processes", "local"):
        jobs = [Job(f"{engine}{seed}", seeded_numbers, (seed, str(tmp_path / f"{engine}{seed}"))) for seed in (0, 1)]
        results = launch(jobs, engine, workers=2, log_dir=tmp_path / "logs")
        assert all(isinstance(seconds, float) for seconds in results.values()), results
        for seed in (0, 1):
            assert (tmp_path / f"{engine}{seed}").read_text() == (tmp_path / f"here{seed}").read_text()


def test_local_failing_dependency_stops_its_dependents(tmp_path, importable):
    heard = []
    jobs = [Job("student", seeded_numbers, (0, str(tmp_path / "student")), after="teacher"),
            Job("teacher", fail, ("no weights",))]
    results = launch(jobs, "local", log_dir=tmp_path / "logs", on_done=lambda name, result: heard.append(name))
    assert heard == ["teacher", "student"]
    assert isinstance(results["teacher"], JobError) and "ValueError: no weights" in str(results["teacher"])
    log = re.search(r"log: (\S+)\)", str(results["teacher"])).group(1)
    assert "no weights" in Path(log).read_text()
    assert str(results["student"]).startswith("student was not run: it needs teacher, which failed (JobError: ")
    assert not (tmp_path / "student").exists()


def test_on_done_that_raises_stops_the_launch(tmp_path):
    def stop(name, result): raise KeyboardInterrupt
    start = time.perf_counter()
    with pytest.raises(KeyboardInterrupt):
        launch([Job("quick", time.sleep, (0,)), Job("slow", time.sleep, (120,))], "processes", workers=2, on_done=stop)
    assert time.perf_counter() - start < 60   # the slow job was stopped, not waited for


def test_missing_submitit_is_one_line_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "submitit", None)   # `import submitit` now raises ImportError
    for engine in ("local", "slurm"):
        with pytest.raises(MissingExtraError) as error:
            launch([Job("a", time.sleep, (0,))], engine, log_dir=tmp_path)
        assert 'pip install -e ".[cluster]"' in str(error.value) and "\n" not in str(error.value)
    assert not any(tmp_path.iterdir())


def test_timeout_requeues_the_same_call():
    call = TimedCall(time.sleep, (0,))
    assert call.checkpoint().function is call


# A fake SLURM: sbatch records the script and starts a runner that waits for the job's pickle and its afterok
# dependencies, then runs the script; srun runs its command with the log files; sacct and scancel read/write states.
SBATCH = """
import os, subprocess, sys
from pathlib import Path
root = Path(os.environ["FAKE_SLURM"])
job_id = str(100 + len(list(root.glob("*.sh"))))
(root / f"{job_id}.sh").write_text(Path(sys.argv[-1]).read_text())
(root / f"{job_id}.state").write_text("PENDING")
with open(root / f"{job_id}.runner.log", "w") as log:   # not sbatch's stdout, which submitit reads to its end
    runner = [sys.executable, str(root / "bin" / "runner"), job_id]
    subprocess.Popen(runner, stdout=log, stderr=log, start_new_session=True)
print(f"Submitted batch job {job_id}")
"""
RUNNER = """
import os, re, shlex, subprocess, sys, time
from pathlib import Path
root, job_id = Path(os.environ["FAKE_SLURM"]), sys.argv[1]
script = (root / f"{job_id}.sh").read_text()
folder = Path(shlex.split(re.search(r"submitit.core._submit (.+)", script).group(1))[0])
needs = re.search(r"--dependency=afterok:([0-9:]+)", script)
needs = needs.group(1).split(":") if needs else []
state = lambda j: (root / f"{j}.state").read_text()
pending = lambda: any(state(j) in ("PENDING", "RUNNING") for j in needs)
waiting = lambda: not (folder / f"{job_id}_submitted.pkl").exists() or pending()
while state(job_id) != "CANCELLED" and waiting():
    time.sleep(0.05)
if state(job_id) == "CANCELLED" or any(state(j) != "COMPLETED" for j in needs):
    (root / f"{job_id}.state").write_text("CANCELLED"); sys.exit()
(root / f"{job_id}.state").write_text("RUNNING")
env = dict(os.environ, SLURM_JOB_ID=job_id, SLURM_NTASKS="1", SLURM_JOB_NUM_NODES="1", SLURM_NODEID="0",
           SLURM_JOB_NODELIST="localhost", SLURM_PROCID="0", SLURM_LOCALID="0")
status = subprocess.run(["bash", str(root / f"{job_id}.sh")], env=env).returncode
(root / f"{job_id}.state").write_text("COMPLETED" if status == 0 else "FAILED")
"""
SRUN = """
import os, subprocess, sys
args, files = sys.argv[1:], {}
while args[0].startswith("--"):
    flag = args.pop(0)
    if flag in ("--output", "--error"):
        files[flag] = open(args.pop(0).replace("%j", os.environ["SLURM_JOB_ID"]).replace("%t", "0"), "a")
sys.exit(subprocess.run(args, stdout=files.get("--output"), stderr=files.get("--error")).returncode)
"""
SACCT = """
import os, sys
from pathlib import Path
root, args = Path(os.environ["FAKE_SLURM"]), sys.argv[1:]
print("JobID|State|NodeList")
for job_id in [args[i + 1] for i, a in enumerate(args) if a == "-j"]:
    print(f"{job_id}|{(root / f'{job_id}.state').read_text()}|localhost")
"""
SCANCEL = """
import os, sys
from pathlib import Path
state = Path(os.environ["FAKE_SLURM"]) / f"{sys.argv[1]}.state"
if state.read_text() in ("PENDING", "RUNNING"): state.write_text("CANCELLED")
"""

@pytest.fixture
def fake_slurm(tmp_path, monkeypatch, importable):
    "A directory of fake SLURM commands, first on PATH; returns the directory that holds the jobs' scripts and states."
    root = tmp_path / "slurm"
    (root / "bin").mkdir(parents=True)
    for name, code in dict(sbatch=SBATCH, runner=RUNNER, srun=SRUN, sacct=SACCT, scancel=SCANCEL).items():
        (root / "bin" / name).write_text(f"#!{sys.executable}\n{code}")
        (root / "bin" / name).chmod(0o755)
    monkeypatch.setenv("FAKE_SLURM", str(root))
    monkeypatch.setenv("PATH", f"{root / 'bin'}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(launchers, "SLURM_POLL_S", 0.2)
    return root


def sbatch_text(executor) -> str:
    "The job script that the executor would hand to sbatch."
    return executor._make_submission_file_text("python -u -m submitit.core._submit LOGS", "uid")


def test_slurm_job_scripts(fake_slurm, tmp_path):
    settings = {"partition": "gpu", "time": 1440, "gpus_per_run": 1, "account": "lab", "cpus_per_task": 8}
    student = sbatch_text(slurm_executor(Job("student", time.sleep, after="teacher"), tmp_path, settings, ["4242"]))
    for line in ("--job-name=student", "--partition=gpu", "--time=1440", "--gpus-per-node=1", "--account=lab",
                 "--cpus-per-task=8", "--ntasks-per-node=1", "--dependency=afterok:4242", "--kill-on-invalid-dep=yes"):
        assert f"#SBATCH {line}\n" in student, line
    assert f"--output={tmp_path / 'student'}/%j_0_log.out" in student
    teacher = sbatch_text(slurm_executor(Job("teacher", time.sleep, gpus=4), tmp_path, settings))
    assert "#SBATCH --gpus-per-node=4\n" in teacher and "dependency" not in teacher
    with pytest.raises(InputError, match=r"slurm\['time'\]"):
        slurm_executor(Job("a", time.sleep), tmp_path, {"partition": "gpu"})
    with pytest.raises(InputError, match="Unavailable parameter.*'colour'.*SlurmExecutor parameters"):
        slurm_executor(Job("a", time.sleep), tmp_path, {"time": 5, "colour": "blue"})


def test_no_slurm_here(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))   # no srun
    with pytest.raises(InputError):                 # the message: the launchers chapter
        launch([Job("a", time.sleep, (0,))], "slurm", log_dir=tmp_path / "logs", slurm={"time": 5})
    assert not (tmp_path / "logs").exists()


def test_slurm_launch_on_a_fake_cluster(fake_slurm, tmp_path):
    (tmp_path / "ranks").mkdir()
    jobs = [Job("student", seeded_numbers, (1, str(tmp_path / "student")), after="teacher"),
            Job("teacher", seeded_numbers, (0, str(tmp_path / "teacher"))),
            Job("broken", fail, ("no data",)),
            Job("after-broken", seeded_numbers, (2, str(tmp_path / "no")), after="broken"),
            Job("two-gpus", write_rank, (str(tmp_path / "ranks"),), gpus=2)]
    heard = []
    results = launch(jobs, "slurm", log_dir=tmp_path / "logs", slurm={"partition": "cpu", "time": 10},
                     on_done=lambda name, result: heard.append(name))
    scripts = {re.search(r"--job-name=(.+)", p.read_text()).group(1): p for p in fake_slurm.glob("*.sh")}
    teacher_id = scripts["teacher"].stem
    assert f"#SBATCH --dependency=afterok:{teacher_id}\n" in scripts["student"].read_text()
    assert heard.index("teacher") < heard.index("student") and sorted(heard) == sorted(job.name for job in jobs)
    seeded_numbers(1, str(tmp_path / "here"))
    assert (tmp_path / "student").read_text() == (tmp_path / "here").read_text()
    assert isinstance(results["teacher"], float) and isinstance(results["student"], float)
    assert "ValueError: no data (log: " in str(results["broken"])
    assert str(results["after-broken"]).startswith("after-broken was not run: it needs broken")
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["rank0", "rank1"]
    assert (tmp_path / "ranks" / "rank0").read_text() == "2"
    assert not (tmp_path / "no").exists()


def test_torchrun_failure_is_a_job_error(monkeypatch):
    "(The real torchrun runs in the fake cluster's two-GPU job; here only its exit status matters.)"
    exit_3 = [sys.executable, "-c", "raise SystemExit(3)"]
    monkeypatch.setattr(launchers, "torchrun_command", lambda call_file, gpus: exit_3)
    with pytest.raises(JobError, match="torchrun with 2 processes exited with status 3"):
        TimedCall(fail, ("rank error",), gpus=2)()


def _children(pid: int) -> list[int]:
    "The live processes whose parent is `pid` (Linux /proc)."
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try: fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError: continue
        if int(fields[1]) == pid and fields[0] != "Z": out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try: return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError: return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads the process table from /proc (Linux)")
def test_sigterm_stops_every_worker_and_resume_gives_the_same_numbers(quick_study, tmp_path):
    "SIGTERM to `crossclass reproduce --jobs 2` stops its workers within 30 s; `--resume` then finishes the study with the numbers of an uninterrupted one."
    import signal
    import subprocess
    out = tmp_path / "killed"
    cmd = [sys.executable, "-c", "import sys; from crossclass_nb.cli import main; sys.exit(main())", "reproduce", "--quick",
           "--methods", "at", "--seeds", "1", "--jobs", "2", "--out", str(out)]
    parent = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while time.time() < deadline and not any(len(p.read_text().splitlines()) >= 2
                                             for p in out.glob("runs/*/metrics.jsonl")):
        time.sleep(0.5)
    workers = _children(parent.pid)
    assert workers and parent.poll() is None, "the study ended before it could be stopped"
    t0 = time.time()
    parent.send_signal(signal.SIGTERM)
    assert parent.wait(timeout=30) != 0
    while any(_alive(w) for w in workers) and time.time() - t0 < 30: time.sleep(0.5)
    assert not [w for w in workers if _alive(w)], "workers outlived the study by 30 s"
    resumed = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    own = ("seconds", "dcas_control", "dcas_excess")   # timing, and the control the subset of the study does not have
    numbers = lambda d, names: json.dumps([{k: v for k, v in r.items() if k not in own}
                                           for r in json.loads((d / "summary.json").read_text()) if r["name"] in names])
    names = {r["name"] for r in json.loads((out / "summary.json").read_text())}
    assert len(names) == 3 and numbers(out, names) == numbers(quick_study.out, names)
