#!/usr/bin/env python
"""Benchmark: crossclass_nb's one-pass attribution against a re-implementation of the authors' loop.

Both sides get the same model, the same examples and the same adversarial settings (PGD, l_inf, step eps/4, random
start, model in eval mode) and return the attribution similarity matrix C, CAS and the robust accuracy.

- ours:    `attribution_report(model, (x, y), attack=PGD(eps, steps=S), batch_size=B)`: one streaming pass over all
           classes; PGD takes gradients with respect to the input only (parameters frozen during the attack); the
           features are computed once per batch, under no_grad, and the logits come from the same features.
- authors: written here from the description of the authors' `evaluate_matrix.py` / `utils.py` (not copied): a loop
           over classes, each cut into batches of exactly 100 (the remainder dropped); PGD with the perturbation
           `delta` as the leaf, mean cross-entropy and `loss.backward()` through the whole model at every step (the
           parameters keep `requires_grad=True`, so weight gradients are computed, and accumulated, at every step);
           normalisation applied as a separate call before the network; the features of each batch recomputed
           (with autograd recording) and multiplied by W[i], then one more full forward for the accuracy; per-class
           feature tensors kept, averaged, normalised, and C filled by a double loop.

To make the matrices comparable element by element, the examples are sorted by class with a multiple of 100 per
class (so the authors' loop drops nothing) and the generator is reseeded before every run: both draw the random
starts from the same stream in the same order, so they attack with the same starting points. Runs are interleaved
(ours/authors, then authors/ours, ...) and the medians are compared; wall-clock and process CPU time are both
reported (CPU time is the steadier figure on a shared machine).

bf16 (`--bf16 on`, or by default where the device computes in bf16 natively): ours runs a second time under
`torch.autocast(<device>, dtype=torch.bfloat16)`; its time is compared with the
authors' fp32 loop (the authors' code has no mixed precision) and its C / CAS / accuracy with our fp32 result.

Example (sizes for a shared 2-core CPU, a few minutes each):
    python bench/attribution.py --models small_cnn --per-class 100 --steps 20 --repeats 5 --bf16 off --diagnose
    python bench/attribution.py --models small_cnn --per-class 100 --steps 20 --repeats 3 --bf16 on
    python bench/attribution.py --models preact_resnet18 --num-classes 2 --steps 2 --repeats 3 --bf16 on
    python bench/attribution.py --models preact_resnet18 --image-size 8 --steps 5 --repeats 2 --bf16 off --diagnose
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

from crossclass_nb.attacks import PGD
from crossclass_nb.attribution import attribution_report
from crossclass_nb.core import InputError, get_device, set_seed
from crossclass_nb.data import DATASET_STATS, load_dataset
from crossclass_nb.models import get_model


# ---------------------------------------------------------------------------------------------------------------
# The authors' procedure, re-implemented
# ---------------------------------------------------------------------------------------------------------------
class AuthorsPGD:
    "PGD as in the authors' `Attack.perturb` (l_inf): a `delta` leaf, `loss.backward()` through the whole model."
    def __init__(self, steps: int, alpha: float, eps: float, normalize):
        self.steps, self.alpha, self.eps, self.normalize = steps, alpha, eps, normalize

    def perturb(self, net, x, y):
        delta = torch.zeros_like(x)
        delta.uniform_(-self.eps, self.eps)
        delta = torch.clamp(delta, -x, 1 - x)
        delta.requires_grad = True
        for _ in range(self.steps):
            loss = F.cross_entropy(net(self.normalize(x + delta)), y)
            loss.backward()  # also fills (and accumulates) the gradients of every parameter
            g = delta.grad.detach()
            d = torch.clamp(delta + self.alpha * torch.sign(g), min=-self.eps, max=self.eps)
            d = torch.clamp(d, -x, 1 - x)
            delta.data = d
            delta.grad.zero_()
        return delta.detach()


def authors_similarity(model, x, y, num_classes, eps, alpha, steps, batch=100):
    "The authors' per-class loop on `model` (a crossclass Classifier): returns (C, CAS, robust accuracy)."
    mean, std = model.norm.mean, model.norm.std
    normalize = lambda z: (z - mean) / std           # normalisation as a separate call, outside the network
    net = lambda z: model.head(model.body(z))        # the network without its own normalisation
    def get_feature(z, target):                      # their get_feature(x, target_class)
        out = model.body(z)
        with torch.no_grad(): out = out * model.head.weight[target]
        return out
    model.eval()
    for p in model.parameters(): p.requires_grad_(True); p.grad = None
    attack = AuthorsPGD(steps, alpha, eps, normalize)
    all_features, acc, cnt = [], 0., 0
    for i in range(num_classes):
        sel = y == i
        xi, yi = x[sel], y[sel]
        feats = []
        for k in range(len(xi) // batch):            # the remainder of each class is dropped
            xb = xi[batch * k: batch * (k + 1)].clone()
            yb = yi[batch * k: batch * (k + 1)]
            delta = attack.perturb(net, xb, yb)
            feats.append(get_feature(normalize(xb + delta), i).detach())
            acc += (net(normalize(xb + delta)).max(1)[1] == yb).float().sum()
            cnt += len(yb)
        all_features.append(torch.cat(feats, dim=0).cpu())
    cwf = []
    for f in all_features:
        m = f.mean(0)
        cwf.append(m / torch.norm(m, p=2))
    C = torch.zeros(num_classes, num_classes)
    for i in range(num_classes):
        for j in range(num_classes):
            C[i, j] = (cwf[i] * cwf[j]).sum()
    for p in model.parameters(): p.grad = None
    return C, C.clamp(0, 1).sum().item() - num_classes, float(acc / cnt)


def ours_similarity(model, x, y, eps, alpha, steps, batch_size, bf16=False):
    dev = x.device.type
    ctx = torch.autocast(dev, dtype=torch.bfloat16) if bf16 else nullcontext()
    with ctx:
        res = attribution_report(model, (x, y), attack=PGD(eps, alpha=alpha, steps=steps), batch_size=batch_size)
    return res.C, res.cas, res.accuracy


# ---------------------------------------------------------------------------------------------------------------
# Setup: data, model, timing
# ---------------------------------------------------------------------------------------------------------------
def bench_data(per_class: int, num_classes: int, image_size: int, device):
    "The first `per_class` Fashion-MNIST test images of each of the first `num_classes` classes, sorted by class."
    if per_class < 100 or per_class % 100:
        raise InputError(f"--per-class must be a positive multiple of 100 (the authors' batch), got {per_class}")
    ds = load_dataset("fashion_mnist", train=False)
    idx = torch.cat([(ds.y == c).nonzero().flatten()[:per_class] for c in range(num_classes)])
    x, y = ds.x[idx], ds.y[idx]
    if image_size != x.shape[-1]: x = F.interpolate(x, size=image_size, mode="area").clamp(0, 1)
    return x.to(device), y.to(device)


def make_model(name: str, num_classes: int, train_examples: int, train_epochs: int, eps: float, device, seed: int):
    "The model under test; small_cnn is first trained briefly with PGD-2 AT (seconds), the ResNet is left at init."
    set_seed(seed)
    mean, std = DATASET_STATS["fashion_mnist"]
    model = get_model(name, num_classes, in_channels=1, mean=mean, std=std).to(device)
    if name == "small_cnn" and train_epochs > 0:
        ds = load_dataset("fashion_mnist", train=True)
        keep = (ds.y < num_classes).nonzero().flatten()[:train_examples]
        xs, ys = ds.x[keep].to(device), ds.y[keep].to(device)
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)
        attack = PGD(eps, alpha=eps / 2, steps=2)
        for _ in range(train_epochs):
            model.train()
            for b in torch.randperm(len(xs), device=device).split(128):
                loss = F.cross_entropy(model(attack(model, xs[b], ys[b])), ys[b])
                opt.zero_grad(); loss.backward(); opt.step()
        opt.zero_grad(set_to_none=True)
    return model.eval()


def timed(fn, seed: int):
    set_seed(seed)  # the same random starts for every run of either side
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def cpu_name() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=10).stdout
        info = dict(l.split(":", 1) for l in out.splitlines() if ":" in l)
        flags = info.get("Flags", "")
        isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags.split()]
        return f"{info.get('Model name', '?').strip()}, {info.get('CPU(s)', '?').strip()} CPUs, flags: {' '.join(isa)}"
    except Exception:
        return platform.processor() or "unknown CPU"


def run_model(name, args, device):
    K = args.num_classes
    size = args.image_size or 28
    x, y = bench_data(args.per_class, K, size, device)
    model = make_model(name, K, args.train_examples, args.train_epochs, args.eps, device, args.seed)
    eps, alpha, steps = args.eps, args.eps / 4, args.steps
    print(f"\n== {name}: {len(x)} Fashion-MNIST test images ({args.per_class}/class, {K} classes, {size}x{size}), "
          f"PGD-{steps} l_inf eps={eps:g} alpha={alpha:g}, random start, our batch {args.batch_size}", flush=True)
    ours = lambda bf16=False: ours_similarity(model, x, y, eps, alpha, steps, args.batch_size, bf16)
    theirs = lambda: authors_similarity(model, x, y, K, eps, alpha, steps)
    # warm-up (kernel selection, allocator), not timed
    ours_similarity(model, x[::10], y[::10], eps, alpha, 1, args.batch_size)
    AuthorsPGD(1, alpha, eps, lambda z: z).perturb(lambda z: model(z), x[:100], y[:100])
    for p in model.parameters(): p.grad = None
    t = {"ours": [], "authors": []}
    res = {}
    for r in range(args.repeats):
        order = ("ours", "authors") if r % 2 == 0 else ("authors", "ours")
        for side in order:
            out, wall, cpu = timed(ours if side == "ours" else theirs, args.seed)
            t[side].append((wall, cpu)); res[side] = out
            print(f"  run {r + 1} {side:8s} wall {wall:7.2f} s  cpu {cpu:7.2f} s  CAS {out[1]:.4f}  acc {out[2]:.4f}", flush=True)
    med = {k: (statistics.median(w for w, _ in v), statistics.median(c for _, c in v)) for k, v in t.items()}
    (C_o, cas_o, acc_o), (C_a, cas_a, acc_a) = res["ours"], res["authors"]
    diff = (C_o - C_a).abs().max().item()
    summary = {"model": name, "n": len(x), "steps": steps, "image_size": size, "repeats": args.repeats,
               "ours_wall": med["ours"][0], "authors_wall": med["authors"][0], "ours_cpu": med["ours"][1],
               "authors_cpu": med["authors"][1], "ratio_wall": med["authors"][0] / med["ours"][0],
               "ratio_cpu": med["authors"][1] / med["ours"][1], "max_abs_diff_C": diff,
               "cas_ours": cas_o, "cas_authors": cas_a, "acc_ours": acc_o, "acc_authors": acc_a}
    if args.diagnose:  # where the two differ: the same PGD in two floating-point formulations (x_adv vs x + delta)
        set_seed(args.seed)
        xa = torch.cat([PGD(eps, alpha=alpha, steps=steps)(model, x[i:i + 100], y[i:i + 100]) for i in range(0, len(x), 100)])
        set_seed(args.seed)
        atk = AuthorsPGD(steps, alpha, eps, lambda z: (z - model.norm.mean) / model.norm.std)
        xb = torch.cat([x[i:i + 100] + atk.perturb(lambda z: model.head(model.body(z)), x[i:i + 100], y[i:i + 100])
                        for i in range(0, len(x), 100)])
        for p in model.parameters(): p.grad = None
        far = (xa - xb).abs().flatten(1) > 1e-6
        summary.update(pixels_differing=far.float().mean().item(), examples_differing=far.any(1).float().mean().item())
        print(f"  diagnose: the two PGDs end at different points (> 1e-6 apart) in {far.float().mean().item():.4%} of "
              f"pixels, {far.any(1).sum().item()} of {len(x)} examples; max |x_ours - x_authors| "
              f"{(xa - xb).abs().max().item():.3g}", flush=True)
    print(f"  fp32: authors/ours time ratio {summary['ratio_wall']:.2f}x wall (medians {med['authors'][0]:.2f} / "
          f"{med['ours'][0]:.2f} s), {summary['ratio_cpu']:.2f}x CPU; max |C_ours - C_authors| = {diff:.2e}; "
          f"CAS {cas_o:.4f} vs {cas_a:.4f}; robust acc {acc_o:.4f} vs {acc_a:.4f}", flush=True)
    if args.bf16 == "off": return summary
    tb = []
    for r in range(args.bf16_repeats):
        out, wall, cpu = timed(lambda: ours(bf16=True), args.seed)
        tb.append((wall, cpu))
        print(f"  run {r + 1} ours-bf16 wall {wall:7.2f} s  cpu {cpu:7.2f} s  CAS {out[1]:.4f}  acc {out[2]:.4f}", flush=True)
    C_b, cas_b, acc_b = out
    bw, bc = statistics.median(w for w, _ in tb), statistics.median(c for _, c in tb)
    summary.update(bf16_wall=bw, bf16_cpu=bc, ratio_bf16_wall=med["authors"][0] / bw, ratio_bf16_cpu=med["authors"][1] / bc,
                   bf16_max_abs_diff_C=(C_b - C_o).abs().max().item(), bf16_cas=cas_b, bf16_acc=acc_b)
    print(f"  bf16: authors(fp32)/ours(bf16) time ratio {summary['ratio_bf16_wall']:.2f}x wall, "
          f"{summary['ratio_bf16_cpu']:.2f}x CPU; ours bf16 vs fp32: max |dC| = {summary['bf16_max_abs_diff_C']:.3f}, "
          f"CAS {cas_b:.3f} vs {cas_o:.3f} ({cas_b - cas_o:+.3f}), robust acc {acc_b:.4f} vs {acc_o:.4f}", flush=True)
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("Example", 1)[1].join(["Example", ""]))
    p.add_argument("--models", default="small_cnn,preact_resnet18", help="comma-separated model names")
    p.add_argument("--per-class", type=int, default=100, help="test images per class, a multiple of 100")
    p.add_argument("--num-classes", type=int, default=10, help="use the first K Fashion-MNIST classes (model has K outputs)")
    p.add_argument("--image-size", type=int, default=0, help="resize images to this size (0: native 28x28)")
    p.add_argument("--steps", type=int, default=20, help="PGD steps (paper: 20)")
    p.add_argument("--eps", type=float, default=0.1, help="l_inf radius (Fashion-MNIST: 0.1); step eps/4")
    p.add_argument("--batch-size", type=int, default=256, help="our batch size (the authors' is fixed at 100)")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs of each side")
    p.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                   help="also run ours under bf16 autocast: on, off, or auto (only where the device computes in bf16 natively)")
    p.add_argument("--bf16-repeats", type=int, default=1, help="timed bf16 runs")
    p.add_argument("--train-examples", type=int, default=2000, help="small_cnn: PGD-2 AT on this many training images")
    p.add_argument("--train-epochs", type=int, default=2, help="small_cnn: epochs of that training (0: untrained)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0: torch's default)")
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: best available)")
    p.add_argument("--diagnose", action="store_true",
                   help="also run both PGDs once more and count the adversarial pixels where they end apart")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=str(Path(__file__).with_name("attribution_results.json")),
                   help="write the measurements to this JSON file (default bench/attribution_results.json; '' for none)")
    args = p.parse_args(argv)
    if args.threads > 0: torch.set_num_threads(args.threads)
    device = get_device(args.device)
    machine = cpu_name() if device.type == "cpu" else torch.cuda.get_device_name(device)
    print(f"machine: {machine}; torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {device}")
    native = (torch.cuda.is_bf16_supported() if device.type == "cuda" else
              torch.ops.mkldnn._is_mkldnn_bf16_supported() if device.type == "cpu" else False)
    if args.bf16 == "auto": args.bf16 = "on" if native else "off"
    if args.bf16 == "on" and not native:
        print("note: no native bf16 on this device (oneDNN reports none: no AVX512-BF16/AMX): bf16 autocast runs on slow "
              "fallback kernels here, so the bf16 timing cannot show a speed-up; its accuracy effect is still measured")
    elif not native:
        print("bf16 skipped: no native bf16 on this device (use --bf16 on to measure it anyway)")
    out = [run_model(m.strip(), args, device) for m in args.models.split(",") if m.strip()]
    if args.json: write_results(args.json, machine, device, args, out)
    return out


def write_results(path, machine: str, device, args, rows: list[dict]) -> None:
    "The measurements with the machine, threads, settings and the command that produced them, as JSON."
    doc = {"benchmark": "attribution: one pass (ours) against the authors' class-by-class loop", "machine": machine,
           "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "load_average_1min": os.getloadavg()[0],                      # other jobs on the machine slow wall-clock times
           "device": str(device), "command": "python bench/attribution.py " + " ".join(sys.argv[1:]),
           "settings": {k: v for k, v in vars(args).items() if k != "json"},
           "columns": {"ratio_wall": "authors' time / ours (wall clock, medians)", "ratio_cpu": "the same in process CPU time",
                       "max_abs_diff_C": "largest |C_ours - C_authors|", "ours_wall": "seconds", "authors_wall": "seconds"},
           "rows": rows}
    Path(path).write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
