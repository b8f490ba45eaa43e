"""Operators dispatched per attack forward pass under CPU bf16 autocast: the attack as it was, with the parameters
frozen for its duration (before), against the package's `pgd`, which leaves them alone (after). Not a test: run it by
hand; it takes seconds.

    python bench/attack_casts.py            # writes bench/attack_casts.json (read by the Performance page)

Autocast casts a weight to bf16 where a layer uses it and keeps the cast copy until the autocast region ends, but only
for leaf tensors that require grad. Frozen parameters are therefore cast again at every attack step. The script
counts the ATen operators with `crossclass_nb.attacks.OpCounter`: those of each forward pass of the attack (between
the model's forward pre-hook and forward hook), the first and the later ones apart, and of a whole later step
(forward, input backward, projection), with the casts (`_to_copy`) among them. It also checks that in float32 the two
variants give the same adversarial examples for the same seed, and that no parameter receives a `.grad`.
"""
import argparse
import contextlib
import json
import os
import platform
from datetime import date
from pathlib import Path

import torch

from crossclass_nb.attacks import OpCounter, pgd
from crossclass_nb.models import get_model

MODELS = {"small_cnn": 1, "preact_resnet18": 3}
SIZES = {"small_cnn": 28, "preact_resnet18": 32}
EPS, ALPHA = 8 / 255, 2 / 255


@contextlib.contextmanager
def frozen(model):
    "The parameters' `requires_grad` off for the duration, as the attack used to do."
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters(): p.requires_grad_(False)
    try: yield
    finally:
        for p, f in zip(model.parameters(), flags): p.requires_grad_(f)


def per_forward(model, x, y, steps):
    "Operator counts of each forward pass of a bf16 PGD run, and of the whole run."
    forwards, starts = [], []
    pre = model.register_forward_pre_hook(lambda m, a: starts.append(ops.counts.copy()))
    post = model.register_forward_hook(lambda m, a, o: forwards.append(ops.counts - starts[-1]))
    try:
        with OpCounter() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
            pgd(model, x, y, EPS, ALPHA, steps, random_start=False)
    finally:
        pre.remove()
        post.remove()
    return forwards, ops.counts


def summary(counts) -> dict:
    return {"ops": sum(counts.values()), "casts": counts["_to_copy"]}


def measure(model, x, y, steps: int) -> dict:
    "Ops and casts of the first forward, of each later forward, and of each later step."
    forwards, total = per_forward(model, x, y, steps)
    _, one_step = per_forward(model, x, y, 1)
    later = [summary(f) for f in forwards[1:]]
    assert all(f == later[0] for f in later), "later forward passes differ from each other"
    step = summary(total - one_step)
    return {"first_forward": summary(forwards[0]), "later_forward": later[0],
            "later_step": {k: v / (steps - 1) for k, v in step.items()}}


def same_fp32_result(model, x, y) -> bool:
    torch.manual_seed(1)
    with frozen(model): before = pgd(model, x, y, EPS, ALPHA, 5)
    torch.manual_seed(1)
    return torch.equal(before, pgd(model, x, y, EPS, ALPHA, 5))


def run_model(name: str, batch: int, steps: int) -> dict:
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=MODELS[name]).eval()
    x, y = torch.rand(batch, MODELS[name], SIZES[name], SIZES[name]), torch.randint(0, 10, (batch,))
    with frozen(model): before = measure(model, x, y, steps)
    after = measure(model, x, y, steps)
    return {"parameter_tensors": len(list(model.parameters())), "before": before, "after": after,
            "same_fp32_result": same_fp32_result(model, x, y),
            "parameter_grads_after": sum(p.grad is not None for p in model.parameters())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8, help="images per attack batch")
    ap.add_argument("--steps", type=int, default=5, help="attack steps (at least 2)")
    ap.add_argument("--out", default=str(Path(__file__).with_name("attack_casts.json")), help="the JSON file to write")
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"date": date.today().isoformat(), "torch": torch.__version__,
              "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpus": os.cpu_count(), "threads": torch.get_num_threads()},
              "autocast": "cpu bfloat16", "attack": f"PGD-{args.steps} linf eps 8/255 alpha 2/255, no random start",
              "batch": args.batch, "models": {n: run_model(n, args.batch, args.steps) for n in MODELS}}
    for name, r in result["models"].items():
        b, a = r["before"]["later_forward"], r["after"]["later_forward"]
        print(f"{name:16s} later forward: ops {b['ops']} -> {a['ops']}, casts {b['casts']} -> {a['casts']}; "
              f"first forward casts {r['before']['first_forward']['casts']} -> {r['after']['first_forward']['casts']}; "
              f"fp32 result unchanged: {r['same_fp32_result']}")
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
