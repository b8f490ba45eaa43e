"""Repeated DDP runs under load: does the trainer's DDP teardown ever abort?

Runs `crossclass train` through torchrun (gloo, 2 processes, the fmnist-tiny preset for one epoch) again and again
while busy processes keep every core occupied, and counts the runs that fail: a non-zero exit, an abort at teardown
("terminate called without an active exception", SIGABRT), or a run directory without its metrics.

    python bench/ddp_stress.py                  # 30 runs, one busy process per core
    python bench/ddp_stress.py --runs 50 --busy 4 --out /tmp/stress
    python bench/ddp_stress.py --json bench/ddp_stress.json     # also store the summary as JSON

Exit status 0 when no run failed; the log of every failed run is kept under --out.
"""
import argparse
import json
import multiprocessing as mp
import platform
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def spin() -> None:
    "Keep one core busy until killed."
    while True: pass


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_run(out: Path, nproc: int, timeout: int) -> tuple[bool, str]:
    "One torchrun training; (ok, why not)."
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "crossclass_nb", "train", "--preset", "fmnist-tiny", "--epochs", "1",
           "--set", "figures=false", "--out", str(out / "run"), "--quiet"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    try: p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        (out / "log.txt").write_text(f"timed out after {timeout} s\n{e.stdout or ''}\n{e.stderr or ''}")
        return False, f"timed out after {timeout} s"
    (out / "log.txt").write_text(p.stdout + "\n" + p.stderr)
    if "terminate called" in p.stderr or "SIGABRT" in p.stderr: return False, "abort at teardown"
    if p.returncode != 0: return False, f"exit status {p.returncode}"
    if not (out / "run" / "metrics.jsonl").is_file(): return False, "no metrics.jsonl"
    return True, ""


def write_summary(path: Path, a, failures: list, seconds: list, total: float) -> None:
    "The run's summary as JSON: settings, failures (run number and reason), seconds per run, the machine."
    import torch
    failed_runs = [{"run": i, "why": why} for i, why in failures]
    summary = {"runs": a.runs, "failures": len(failures), "failed_runs": failed_runs,
               "processes_per_run": a.nproc, "backend": "gloo", "busy_processes": a.busy, "cpu_count": os.cpu_count(),
               "seconds_total": round(total), "seconds_per_run": seconds, "torch": torch.__version__,
               "python": platform.python_version(), "machine": platform.machine(),
               "command": "python bench/ddp_stress.py " + " ".join(sys.argv[1:]),
               "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=1) + "\n")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=30, help="DDP runs (default: %(default)s)")
    ap.add_argument("--nproc", type=int, default=2, help="processes per run (default: %(default)s)")
    ap.add_argument("--busy", type=int, default=os.cpu_count(),
                    help="busy processes kept running (default: one per core)")
    ap.add_argument("--timeout", type=int, default=300, help="seconds allowed per run (default: %(default)s)")
    ap.add_argument("--out", default=None, help="directory for the runs and logs (default: a temporary one)")
    ap.add_argument("--json", default=None, help="also write the summary to this JSON file")
    a = ap.parse_args()
    root = Path(a.out or tempfile.mkdtemp(prefix="ddp_stress_"))
    root.mkdir(parents=True, exist_ok=True)
    spinners = [mp.Process(target=spin, daemon=True) for _ in range(a.busy)]
    for s in spinners: s.start()
    failures, seconds, t0 = [], [], time.time()
    try:
        for i in range(a.runs):
            out = root / f"run_{i + 1:03d}"
            out.mkdir(exist_ok=True)
            start = time.time()
            ok, why = one_run(out, a.nproc, a.timeout)
            seconds.append(round(time.time() - start, 1))
            if not ok: failures.append((i + 1, why))
            print(f"run {i + 1:3d}/{a.runs}: {'ok' if ok else 'FAILED: ' + why}", flush=True)
    finally:
        for s in spinners: s.terminate()
        for s in spinners: s.join()
    print(f"ddp_stress: {len(failures)} failures in {a.runs} runs ({a.nproc} processes each, gloo, {a.busy} busy "
          f"processes, {time.time() - t0:.0f} s); logs in {root}")
    for i, why in failures: print(f"  run {i}: {why} (log: {root / f'run_{i:03d}' / 'log.txt'})")
    if a.json: write_summary(Path(a.json), a, failures, seconds, time.time() - t0)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
