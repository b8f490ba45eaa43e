"""Images per second of one PGD-10 adversarial-training step: our trainer's step against a re-implementation of the
authors' step, same model, data and seed, runs interleaved. Not a test: run it by hand.

    python bench/at_step.py                      # both models, fp32 and bf16, a few minutes on a 2-core CPU
    python bench/at_step.py --models small_cnn --rounds 5 --iters 3
    python bench/at_step.py --device cuda        # on a GPU

Ours: `crossclass_nb.training`'s own step (Trainer.one_batch with the PGD-AT loss and its metrics callback): the attack
in eval mode with parameter gradients off (it differentiates only with respect to the input), normalisation inside the
model, channels-last memory layout, optionally bf16 autocast.
Authors' (re-implemented from the description of their train.py, not copied): fp32, the attack in train mode,
`loss.backward()` through every parameter at each of the 10 attack steps, normalisation as a separate call before a
model without it, then the update.

It also counts the floating-point operations of each step (torch.utils.flop_counter) and prints the achieved rate next
to the machine's measured matmul rate, and writes everything to bench/at_step_results.json (read by the Performance
page).
"""
import argparse
import copy
import json
import platform
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from crossclass_nb.core import get_device
from crossclass_nb.data import DATASET_STATS
from crossclass_nb.models import get_model
from crossclass_nb.losses import make_loss
from crossclass_nb.learner import TrainMetricsCB, Trainer
from crossclass_nb.config import TrainConfig

EPS, ALPHA, STEPS = 8 / 255, 2 / 255, 10


def authors_step(model, normalize, opt, x, y):
    "One PGD-10 AT step the way the authors' script does it (fp32, train mode, full backward at every attack step)."
    model.train()
    delta = torch.zeros_like(x).uniform_(-EPS, EPS)
    delta = torch.max(torch.min(delta, 1 - x), -x)               # keep x + delta in [0, 1]
    delta.requires_grad = True
    for _ in range(STEPS):
        loss = F.cross_entropy(model(normalize(x + delta)), y)
        loss.backward()                                          # gradients for delta AND every parameter
        d = torch.clamp(delta + ALPHA * delta.grad.detach().sign(), -EPS, EPS)
        delta.data = torch.max(torch.min(d, 1 - x), -x)
        delta.grad.zero_()
    loss = F.cross_entropy(model(normalize(torch.clamp(x + delta.detach(), 0, 1))), y)
    opt.zero_grad()
    loss.backward()
    opt.step()


def make_pair(name, device, seed=0):
    "Our model (normalises inside) and the authors' form (same weights, no normalisation inside + separate call)."
    mean, std = DATASET_STATS["cifar10"]
    torch.manual_seed(seed)
    ours = get_model(name, num_classes=10, in_channels=3, mean=mean, std=std).to(device)
    theirs = copy.deepcopy(ours)
    theirs.norm = nn.Identity()
    m, s = torch.tensor(mean, device=device).view(1, 3, 1, 1), torch.tensor(std, device=device).view(1, 3, 1, 1)
    return ours, theirs, (lambda x: (x - m) / s)


def our_trainer(model, amp, device):
    cfg = TrainConfig(loss="pgd", eps=EPS, alpha=ALPHA, steps=STEPS)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    channels_last = True
    model = model.to(memory_format=torch.channels_last)
    metrics = TrainMetricsCB()
    t = Trainer(model, make_loss(cfg), opt, dl=None, epochs=1, cbs=[metrics], amp=amp, channels_last=channels_last)
    metrics.before_epoch(t)
    return t


def sync(device):
    if device.type == "cuda": torch.cuda.synchronize()


def timed(fn, device, iters):
    sync(device); t0 = time.perf_counter()
    for _ in range(iters): fn()
    sync(device)
    return (time.perf_counter() - t0) / iters


def count_flops(fn):
    "Floating-point operations of matmuls and convolutions (forward and backward) executed by `fn()`."
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry   # torch's FLOP formulas; FlopCounterMode's module tracker
                                                         # cannot follow autograd.grad w.r.t. a leaf, so count directly
    class Count(TorchDispatchMode):
        total = 0
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            f = flop_registry.get(func._overloadpacket)
            if f is not None: Count.total += f(*args, **(kwargs or {}), out_val=out)
            return out
    with Count(): fn()
    return Count.total


def step_flops(ours_model, theirs_model, normalize, x, y, device, batch, small=8):
    "FLOPs of one step of each kind, counted on `small` examples and scaled to `batch` (convolutions and matmuls are linear in it)."
    o, t = copy.deepcopy(ours_model), copy.deepcopy(theirs_model)
    tr = our_trainer(o, "none", device)
    xs, ys = x[:small], y[:small]
    def ours():
        tr.x, tr.y = xs, ys
        tr.one_batch()
    opt = torch.optim.SGD(t.parameters(), lr=0.1)
    return {"ours": count_flops(ours) * batch / small, "authors": count_flops(lambda: authors_step(t, normalize, opt, xs, ys)) * batch / small}


def matmul_rate(device, dtype, n=1024, reps=10):
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2): a @ b
    t = timed(lambda: a @ b, device, reps)
    return 2 * n**3 / t / 1e9


def bench_model(name, device, batch, rounds, iters, precisions, warmup=True):
    torch.manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, device=device)              # CIFAR-shaped inputs; content does not change the cost
    y = torch.randint(0, 10, (batch,), device=device)
    ours_model, theirs_model, normalize = make_pair(name, device)
    theirs_opt = torch.optim.SGD(theirs_model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    trainers = {p: our_trainer(copy.deepcopy(ours_model), {"fp32": "none", "bf16": "bf16"}[p], device) for p in precisions}

    def ours(p):
        t = trainers[p]
        def step():
            t.x, t.y = x, y
            t.one_batch()
        return step
    fns = {"authors": lambda: authors_step(theirs_model, normalize, theirs_opt, x, y), **{p: ours(p) for p in precisions}}
    if warmup:
        for f in fns.values(): f()                                # warm-up (kernel selection, allocations)
    times = {k: [] for k in fns}
    order = list(fns)
    for r in range(rounds):                                       # interleaved, order alternating per round
        for k in (order if r % 2 == 0 else order[::-1]):
            torch.manual_seed(100 + r)
            times[k].append(timed(fns[k], device, iters))
        print(f"  {name} round {r + 1}/{rounds}: " + ", ".join(f"{k} {times[k][-1]:.3f}s" for k in order), flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    flops = step_flops(ours_model, theirs_model, normalize, x, y, device, batch)
    rows = []
    for p in precisions:
        rows.append({"model": name, "precision": p, "batch": batch, "authors_s": med["authors"], "ours_s": med[p],
                     "authors_ips": batch / med["authors"], "ours_ips": batch / med[p], "ratio": med["authors"] / med[p],
                     "ours_gflop_per_step": flops["ours"] / 1e9, "authors_gflop_per_step": flops["authors"] / 1e9,
                     "ours_gflops": flops["ours"] / med[p] / 1e9, "authors_gflops": flops["authors"] / med["authors"] / 1e9,
                     "times": {"authors": times["authors"], "ours": times[p]}})
    return rows


def accuracy_check(device, epochs, seeds):
    "Short PGD-AT runs in fp32 and in bf16 (same seeds): robust test accuracy of each, evaluated in fp32."
    import tempfile
    from crossclass_nb.config import get_config
    from crossclass_nb.rundir import load_metrics
    from crossclass_nb.training import train
    out = {"none": [], "bf16": [], "epochs": epochs,
           "setting": "small_cnn, Fashion-MNIST 1000 train / 1000 test, PGD-5 eps 0.1 training, PGD-10 evaluation"}
    for seed in range(seeds):
        for amp in ("none", "bf16"):
            cfg = get_config("fmnist-cnn", epochs=epochs, train_size=1000, val_size=200, test_size=1000, milestones=[epochs],
                             batch_size=50, amp=amp, amp_eval=False, figures=False, cas_every=0, device=str(device),
                             num_threads=None, seed=seed)
            d = train(cfg, Path(tempfile.mkdtemp()) / amp, quiet=True)
            out[amp].append(load_metrics(d)[-1]["test_robust_acc"])
            print(f"  short run ({epochs} epochs, seed {seed}), amp={amp}: test robust acc {out[amp][-1]:.4f}", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", nargs="+", default=["small_cnn", "preact_resnet18"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=None, help="interleaved rounds (default: 3 small_cnn, 1 others)")
    ap.add_argument("--iters", type=int, default=None, help="steps per timing (default: 1)")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: stable on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--accuracy-epochs", type=int, default=3, help="epochs of the fp32-vs-bf16 accuracy check (0: skip)")
    ap.add_argument("--accuracy-seeds", type=int, default=2, help="seeds of the accuracy check")
    ap.add_argument("--only-accuracy", action="store_true", help="redo only the accuracy check, keeping the timings in --out")
    ap.add_argument("--out", default=str(Path(__file__).with_name("at_step_results.json")))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    device = get_device(a.device)
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()} CPU: {_cpu_name()}, {a.threads} thread(s)")
    print(f"machine: {machine}; torch {torch.__version__}", flush=True)
    if a.only_accuracy:
        res = json.loads(Path(a.out).read_text())
        res["accuracy_check"] = accuracy_check(device, a.accuracy_epochs, a.accuracy_seeds)
        res["accuracy_command"] = "python " + " ".join(sys.argv)
        Path(a.out).write_text(json.dumps(res, indent=1) + "\n"); print(f"updated {a.out}"); return
    rates = {"fp32": matmul_rate(device, torch.float32), "bf16": matmul_rate(device, torch.bfloat16, reps=3)}
    print(f"measured 1024x1024 matmul: fp32 {rates['fp32']:.1f} GFLOP/s, bf16 {rates['bf16']:.1f} GFLOP/s", flush=True)
    slow_bf16 = device.type == "cpu" and rates["bf16"] < rates["fp32"] / 4
    if slow_bf16: print("  this CPU has no fast bf16 path (no AVX512-BF16/AMX): bf16 is timed for small_cnn only", flush=True)
    rows = []
    for m in a.models:
        small = m == "small_cnn"
        precs = [p for p in a.precisions if small or p == "fp32" or not slow_bf16]
        rows += bench_model(m, device, a.batch, a.rounds or (3 if small else 1), a.iters or (1 if small else 1), precs,
                            warmup=small or device.type == "cuda")
    acc = accuracy_check(device, a.accuracy_epochs, a.accuracy_seeds) if a.accuracy_epochs else {}
    print(f"\n{'model':<16}{'prec.':<6}{'authors img/s':>14}{'ours img/s':>12}{'speed-up':>10}{'ours GFLOP/s':>14}{'authors GFLOP/s':>17}")
    for r in rows:
        print(f"{r['model']:<16}{r['precision']:<6}{r['authors_ips']:>14.1f}{r['ours_ips']:>12.1f}{r['ratio']:>9.2f}x"
              f"{r['ours_gflops']:>14.1f}{r['authors_gflops']:>17.1f}")
    for r in rows:
        print(f"  {r['model']} {r['precision']}: our step {r['ratio']:.2f}x the authors' speed; work per step ours "
              f"{r['ours_gflop_per_step']:.0f} GFLOP vs authors {r['authors_gflop_per_step']:.0f} GFLOP")
    if acc:
        diffs = [100 * (b - f) for b, f in zip(acc["bf16"], acc["none"])]
        print(f"  bf16 - fp32 robust accuracy per seed: {', '.join(f'{d:+.1f}' for d in diffs)} points; "
              f"fp32 spread over seeds: {100 * (max(acc['none']) - min(acc['none'])):.1f} points")
    if slow_bf16: print(f"  preact_resnet18 not timed in bf16: bf16 matmul runs at {rates['bf16']:.1f} GFLOP/s "
                        f"against {rates['fp32']:.1f} in fp32 on this CPU")
    res = {"machine": machine, "date": str(date.today()), "torch": torch.__version__, "threads": a.threads,
           "device": str(device), "matmul_gflops": rates, "rows": rows, "accuracy_check": acc, "slow_bf16": slow_bf16,
           "command": "python " + " ".join(sys.argv)}
    Path(a.out).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.out}")


def _cpu_name():
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"): return line.split(":", 1)[1].strip()
    except OSError: pass
    return platform.processor() or "unknown"


if __name__ == "__main__":
    main()
