#!/usr/bin/env bash
# The GPU path in one command: every check of the GPU path, one line each, then a summary line.
#
#   bench/gpu_check.sh                  # on a GPU (--device cuda, the default): about 10 minutes on one modern GPU
#   bench/gpu_check.sh --device cpu     # the same checks, shrunk to a minute or two on a CPU (run by the tests)
#   bench/gpu_check.sh --out DIR        # logs and benchmark JSON go here (default: artifacts/gpu_check, git-ignored;
#                                       #   give --out bench/gpu_check to keep a GPU's output with the repository)
#
# CIFAR-10 comes from $CROSSCLASS_DATA (or the other places the data module looks) if it is there; otherwise a small
# fake in torchvision's CIFAR format is written. The attribution benchmark needs Fashion-MNIST (the Debian package or
# $CROSSCLASS_DATA) and is skipped, with the reason, without it. Only the venv is needed. Exit status: 0 if no check failed.
set -u -f    # -f: no globbing, so settings such as milestones=[1] pass through as typed
DEVICE=cuda
OUT=artifacts/gpu_check
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1 (use --device cuda|cpu and --out DIR)" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.." || exit 2
if [ -x .venv/bin/python ]; then PY=${PYTHON:-.venv/bin/python}; else PY=${PYTHON:-python}; fi
OUT=$(mkdir -p "$OUT/logs" && cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export CROSSCLASS_QUIET=1 MPLBACKEND=Agg PYTHONHASHSEED=0 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$DEVICE" = cpu ]; then    # shrunk so that the logic runs in a minute or two on a CPU
  MODEL=small_cnn; TRAIN=200; VAL=50; TEST=100; BATCH=50; STEPS=2; EVAL_STEPS=2; FAKE_TRAIN=400; FAKE_TEST=100
else                            # the cifar10-paper recipe with fewer images and epochs
  MODEL=preact_resnet18; TRAIN=5000; VAL=500; TEST=1000; BATCH=128; STEPS=10; EVAL_STEPS=20; FAKE_TRAIN=6000; FAKE_TEST=1000
fi
PASSED=0; FAILED=0; SKIPPED=0; START=$SECONDS

check() {  # check NAME FUNCTION [ARGS]: run it, keep its output in logs/NAME.log, print one line
  local name=$1 t0=$SECONDS; shift
  if "$@" >"$OUT/logs/$name.log" 2>&1; then
    PASSED=$((PASSED + 1)); printf 'PASS  %-22s %5ds  %s\n' "$name" $((SECONDS - t0)) "$(tail -n 1 "$OUT/logs/$name.log")"
  else
    FAILED=$((FAILED + 1)); printf 'FAIL  %-22s %5ds  %s (log: %s)\n' "$name" $((SECONDS - t0)) \
      "$(tail -n 1 "$OUT/logs/$name.log")" "$OUT/logs/$name.log"
  fi
}

skip() { SKIPPED=$((SKIPPED + 1)); printf 'SKIP  %-22s        %s\n' "$1" "$2"; }

data() {  # the CIFAR-10 the checks train on: the real one if present, else a fake written here
  if "$PY" -c "from crossclass_nb.data import load_dataset; load_dataset('cifar10', train=False)"; then
    DATA_ROOT=""; echo "CIFAR-10 found"
  else
    "$PY" -c "from crossclass_nb.data import make_fake_cifar; make_fake_cifar('$WORK/data', n_train=$FAKE_TRAIN, n_test=$FAKE_TEST)" &&
      DATA_ROOT="$WORK/data" && echo "no CIFAR-10 here: a fake one, $FAKE_TRAIN + $FAKE_TEST images in torchvision's format"
  fi
}

recipe() {  # the cifar10-paper preset, shrunk, as CLI arguments
  echo --preset cifar10-paper --device "$DEVICE" --epochs 2 --batch-size $BATCH --set model=$MODEL \
    --set train_size=$TRAIN --set val_size=$VAL --set test_size=$TEST --set "milestones=[1]" --set steps=$STEPS \
    --set eval_steps=$EVAL_STEPS --set save_every=0 --set kd_start=0 --set kd_end=0 ${DATA_ROOT:+--data-root $DATA_ROOT}
}

precision() {  # precision AMP: train in AMP with channels-last, then eval and cas on the checkpoint
  local dir="$WORK/runs/$1"
  # shellcheck disable=SC2046
  "$PY" -m crossclass_nb train $(recipe) --amp "$1" --set channels_last=true --out "$dir" --quiet &&
    "$PY" -m crossclass_nb eval "$dir" --device "$DEVICE" --n "$TEST" --steps "$EVAL_STEPS" --autoattack none --out "$dir/eval" &&
    "$PY" -m crossclass_nb cas "$dir" --device "$DEVICE" --n "$TEST" --steps "$EVAL_STEPS" --out "$dir/cas_cli" &&
    "$PY" - "$dir" <<'EOF'
import json, sys
from pathlib import Path
from crossclass_nb.rundir import load_metrics
run = Path(sys.argv[1])
row, final = load_metrics(run)[-1], json.loads((run / "final_eval.json").read_text())
assert list(run.glob("eval/*.json")) and list(run.glob("cas_cli/*.json")), "eval or cas wrote no JSON"
print(f"test robust acc {row['test_robust_acc']:.3f}, CAS {row['cas']:.2f}; fp32 final eval of best (epoch "
      f"{final['best_epoch']}): test robust {final['best']['test_robust_acc']:.3f}, CAS {final['best']['cas']:.2f}")
EOF
}

compiled() {  # compile=True from the fp32 run's config; reports the graphs dynamo compiled
  "$PY" - "$WORK/runs" "$DEVICE" <<'EOF'
import functools, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from crossclass_nb.config import TrainConfig
from crossclass_nb.rundir import load_metrics
from crossclass_nb.training import COMPILE_RECOMPILE_LIMIT, train
runs, device = Path(sys.argv[1]), sys.argv[2]
if device == "cpu":   # the same tracing and graph count; inductor's C++ code generation would take minutes here
    torch.compile = functools.partial(torch.compile, backend="eager")
cfg = TrainConfig.from_dict({**TrainConfig.from_json(runs / "none" / "config.json").to_dict(), "compile": True}).validate()
run = train(cfg, runs / "compiled")
graphs = counters["stats"]["unique_graphs"]
assert graphs < COMPILE_RECOMPILE_LIMIT, f"{graphs} graphs reached the recompile limit {COMPILE_RECOMPILE_LIMIT}"
print(f"{graphs} graphs compiled, {counters['frames']['ok']} frames (recompile limit {COMPILE_RECOMPILE_LIMIT}); "
      f"test robust acc {load_metrics(run)[-1]['test_robust_acc']:.3f}")
EOF
}

resume() {  # deterministic=True: a run killed (SIGKILL) in its second epoch and resumed equals one run straight
  "$PY" - "$WORK/runs" <<'EOF'
import os, signal, subprocess, sys
from pathlib import Path
import torch
from crossclass_nb.config import TrainConfig
from crossclass_nb.rundir import load_metrics
from crossclass_nb.checkpoint import load_checkpoint
from crossclass_nb.training import train
runs = Path(sys.argv[1])
base = TrainConfig.from_json(runs / "none" / "config.json").to_dict()
cfg = TrainConfig.from_dict({**base, "deterministic": True, "epochs": 3, "milestones": [2], "final_eval": False,
                             "figures": False, "cas_every": 1}).validate()
cfg.to_json(runs / "deterministic.json")
train(cfg, runs / "straight")
killer = f"""
import os, signal
from crossclass_nb.learner import Callback
from crossclass_nb.config import TrainConfig
from crossclass_nb.training import train
class Kill(Callback):
    def before_batch(self, t):
        if t.epoch == 1 and t.iter == 1: os.kill(os.getpid(), signal.SIGKILL)
train(TrainConfig.from_json({str(runs / 'deterministic.json')!r}), {str(runs / 'killed')!r}, cbs=[Kill()])
"""
rc = subprocess.run([sys.executable, "-c", killer]).returncode
assert rc == -signal.SIGKILL, f"the run was to be killed, it exited with {rc}"
train(None, runs / "killed", resume=True)
a, b = load_checkpoint(runs / "straight" / "last.pt"), load_checkpoint(runs / "killed" / "last.pt")
same = all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
rows = [[{k: v for k, v in r.items() if not k.startswith("time")} for r in load_metrics(runs / d)] for d in ("straight", "killed")]
assert same and rows[0] == rows[1], "the resumed run differs from the straight one"
print(f"killed in epoch 2, resumed to epoch 3: weights and {len(rows[0][0])} metric columns bit-identical")
EOF
}

ddp() {  # torchrun over NPROC processes (gloo on the CPU, NCCL on GPUs)
  local port
  port=$("$PY" -c "import socket; s = socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])")
  # shellcheck disable=SC2046
  "$PY" -m torch.distributed.run --nproc_per_node="$1" --master_addr=127.0.0.1 --master_port="$port" \
    -m crossclass_nb train $(recipe) --out "$WORK/runs/ddp" --quiet &&
    "$PY" - "$WORK/runs/ddp" "$1" "$TRAIN" <<'EOF'
import sys
from crossclass_nb.rundir import load_metrics
from crossclass_nb.checkpoint import load_checkpoint
run, nproc, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rows = load_metrics(run)
shard = n // nproc   # each process trains on every nproc-th image, the remainder left out
assert all(r["train_n"] == shard * nproc for r in rows), f"the processes did not share the {n} training images"
assert len(load_checkpoint(run + "/last.pt")["rng"]) == nproc
print(f"{nproc} processes, {len(rows)} epochs, {n} training images per epoch over all; test robust acc "
      f"{rows[-1]['test_robust_acc']:.3f}")
EOF
}

bench_at_step() {
  if [ "$DEVICE" = cpu ]; then
    "$PY" bench/at_step.py --device cpu --models small_cnn --precisions fp32 --rounds 1 --iters 1 --batch 8 \
      --accuracy-epochs 0 --out "$OUT/at_step_cpu.json"
  else
    "$PY" bench/at_step.py --device "$DEVICE" --threads 4 --accuracy-epochs 0 --out "$OUT/at_step_cuda.json"
  fi
}

bench_attribution() {
  if [ "$DEVICE" = cpu ]; then
    "$PY" bench/attribution.py --device cpu --models small_cnn --per-class 100 --steps 2 --repeats 1 --bf16 off \
      --train-epochs 0 --json "$OUT/attribution_cpu.json"
  else
    "$PY" bench/attribution.py --device "$DEVICE" --threads 4 --json "$OUT/attribution_cuda.json"
  fi
}

echo "gpu_check on $DEVICE ($("$PY" -c "import torch; print(torch.__version__)"))"
check data data
for amp in none bf16 fp16; do check "train-eval-cas-$amp" precision "$amp"; done
check compile compiled
check resume-after-kill resume
if [ "$DEVICE" = cpu ]; then
  check ddp-2-processes ddp 2
else
  NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
  if [ "$NGPU" -ge 2 ]; then check "ddp-$NGPU-gpus" ddp "$NGPU"; else skip ddp "one GPU visible: DDP needs two"; fi
fi
check bench-at-step bench_at_step
if "$PY" -c "from crossclass_nb.data import load_dataset; load_dataset('fashion_mnist', train=False)" >/dev/null 2>&1; then
  check bench-attribution bench_attribution
else skip bench-attribution "no Fashion-MNIST here (install dataset-fashion-mnist or set CROSSCLASS_DATA)"; fi
echo "gpu_check summary: $PASSED passed, $FAILED failed, $SKIPPED skipped on $DEVICE in $((SECONDS - START)) s (logs: $OUT/logs)"
[ "$FAILED" -eq 0 ]
