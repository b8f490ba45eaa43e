"""The attacks' numerics and costs: what changed when the parameters stopped being frozen, fp16 loss scaling, and
the host reads of the attack and evaluation loops.

- fp32 results are bit for bit those of the earlier implementation, which froze the parameters (reproduced here);
- no weight gradient is computed and none is stored, although the parameters keep `requires_grad`;
- under bf16 autocast the weights are cast once per attack, not once per step (autocast caches casts of leaves that
  require grad);
- under fp16 a confident example, whose unscaled input gradient underflows to exactly zero, keeps its gradient sign;
- the loops read nothing back to the host per batch (counted as `aten::_local_scalar_dense` dispatches and `.tolist()`
  calls, since `torch.cuda.set_sync_debug_mode` works only on a GPU).
"""
import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from crossclass_nb.attacks import PGD, OpCounter, _input_grad, accuracy, fgsm, fgsm_rs, pgd, trades_adv
from crossclass_nb.core import InputError, images_checked
from crossclass_nb.models import get_model

torch.set_num_threads(1)
MODELS = {"small_cnn": (1, 28), "preact_resnet18": (3, 32)}


@contextlib.contextmanager
def frozen(model):
    "What `attack_mode` used to do to the parameters."
    flags = [p.requires_grad for p in model.parameters()]
    for p in model.parameters(): p.requires_grad_(False)
    try: yield
    finally:
        for p, f in zip(model.parameters(), flags): p.requires_grad_(f)


def model_and_batch(name, n=2, seed=0):
    torch.manual_seed(seed)
    c, size = MODELS[name]
    model = get_model(name, num_classes=10, in_channels=c).eval()
    return model, torch.rand(n, c, size, size), torch.randint(0, 10, (n,))


def reference_pgd(model, x, y, eps, alpha, steps):
    "The earlier l_inf PGD, written out: parameters frozen, eval mode, summed float32 cross-entropy."
    model.eval()
    with frozen(model):
        x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            g, = torch.autograd.grad(F.cross_entropy(model(x_adv).float(), y, reduction="sum"), x_adv)
            x_adv = torch.minimum(torch.maximum(x_adv.detach() + alpha * g.sign(), x - eps), x + eps).clamp(0, 1)
    return x_adv.detach()


@pytest.mark.parametrize("name", MODELS)
def test_fp32_results_unchanged(name):
    model, x, y = model_and_batch(name)
    torch.manual_seed(1); ref = reference_pgd(model, x, y, 8 / 255, 2 / 255, 3)
    torch.manual_seed(1); ours = pgd(model, x, y, 8 / 255, 2 / 255, 3)
    assert torch.equal(ours, ref)
    settings = [dict(norm="l2", eps=0.5, alpha=0.1), dict(restarts=2), dict(targeted=True), dict(train_mode=True)]
    for kw in settings:
        args = dict(eps=8 / 255, alpha=2 / 255, steps=2) | kw
        torch.manual_seed(2)
        with frozen(model): before = pgd(model, x, y, **args)
        torch.manual_seed(2); after = pgd(model, x, y, **args)
        assert torch.equal(before, after), kw
    torch.manual_seed(3)
    with frozen(model): before = trades_adv(model, x, 8 / 255, 2 / 255, 2)
    torch.manual_seed(3); assert torch.equal(before, trades_adv(model, x, 8 / 255, 2 / 255, 2))


@pytest.mark.parametrize("name", MODELS)
def test_no_weight_gradient_computed_or_stored(name):
    model, x, y = model_and_batch(name)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    with frozen(model), OpCounter() as before: pgd(model, x, y, 8 / 255, 2 / 255, 2, random_start=False)
    with OpCounter() as after: pgd(model, x, y, 8 / 255, 2 / 255, 2, random_start=False)
    assert after.flops == before.flops > 0  # the backward pass computes the input gradient only, as when frozen
    assert after.counts == before.counts
    for attack in (lambda: fgsm(model, x, y, 0.1), lambda: fgsm_rs(model, x, y, 0.1), lambda: PGD(0.1)(model, x, y),
                   lambda: trades_adv(model, x, 0.1, 0.03, 2), lambda: accuracy(model, x, y, attack=PGD(0.1, steps=1))):
        attack()
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def casts_per_step(model, x, y, steps):
    with OpCounter() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        pgd(model, x, y, 8 / 255, 2 / 255, steps, random_start=False)
    return ops.counts["_to_copy"]


@pytest.mark.parametrize("name", MODELS)
def test_bf16_weight_casts_are_reused_across_steps(name):
    model, x, y = model_and_batch(name, n=2)
    with frozen(model): frozen_first, frozen_later = casts_per_step(model, x, y, 1), casts_per_step(model, x, y, 2)
    first, later = casts_per_step(model, x, y, 1), casts_per_step(model, x, y, 2)
    assert first == frozen_first  # the first step casts every weight either way
    weights = sum(p.dim() > 1 for p in model.parameters())  # conv and linear weights at least
    assert (frozen_later - frozen_first) - (later - first) >= weights  # later steps reuse the cached casts


def confident_linear(d=16, margin=40.0):
    "A linear classifier that puts class 0 ahead by `margin` logits everywhere in [0, 1]^d."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, 3)).eval()
    with torch.no_grad(): model[1].bias.copy_(torch.tensor([margin, 0.0, 0.0]))
    return model


def test_fp16_attack_keeps_the_gradient_sign_of_a_confident_example():
    model = confident_linear()
    x, y = torch.rand(4, 1, 4, 4), torch.zeros(4, dtype=torch.long)
    loss_fn = lambda logits: F.cross_entropy(logits, y, reduction="sum")
    xg = x.clone().requires_grad_(True)
    g32 = torch.autograd.grad(loss_fn(model(xg)), xg)[0]
    assert (g32 != 0).all()  # float32 sees the gradient ...
    with torch.autocast("cpu", dtype=torch.float16):
        unscaled = torch.autograd.grad(loss_fn(model(xg).float()), xg)[0]
        scaled = _input_grad(model, xg, loss_fn)
    assert (unscaled == 0).all()  # ... float16 without scaling loses it entirely (the sign would be 0) ...
    assert torch.equal(scaled.sign(), g32.sign())  # ... and with the loss scale keeps every sign
    with torch.autocast("cpu", dtype=torch.float16): x16 = pgd(model, x, y, 0.1, 0.1, 1, random_start=False)
    interior = (x > 0.1) & (x < 0.9)
    assert torch.equal((x16 - x)[interior].sign(), g32[interior].sign())  # the attack moves every pixel as in float32


def test_fp16_scale_in_train_mode_is_one_factor_per_batch():
    "In train mode BatchNorm couples the examples; one factor for the batch keeps the fp32 direction."
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).train()
    x, y = torch.rand(6, 1, 4, 4), torch.randint(0, 3, (6,))
    loss_fn = lambda logits: F.cross_entropy(logits, y, reduction="sum")
    xg = x.clone().requires_grad_(True)
    g32 = torch.autograd.grad(loss_fn(model(xg)), xg)[0]
    with torch.autocast("cpu", dtype=torch.float16): g16 = _input_grad(model, xg, loss_fn)
    cos = F.cosine_similarity(g16.flatten(), g32.flatten(), dim=0)
    assert cos > 0.999


def host_reads(monkeypatch, f) -> int:
    "Reads of tensor values back to the host while `f()` runs: `_local_scalar_dense` dispatches and `.tolist()` calls."
    calls = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: calls.append(1) or tolist(t))
    with OpCounter() as ops: f()
    monkeypatch.undo()
    return ops.counts["_local_scalar_dense"] + len(calls)


def test_attack_and_evaluation_loops_read_nothing_back(monkeypatch):
    model, x, y = model_and_batch("small_cnn", n=24)
    attack = PGD(0.1, steps=2)
    one, eight = (host_reads(monkeypatch, lambda: accuracy(model, x, y, attack=attack, batch_size=b)) for b in (24, 3))
    assert one == eight  # checks once where the data enter, then nothing per batch
    batches = list(zip(x.split(3), y.split(3)))
    with images_checked():  # data checked when they were loaded: the loop reads only its result
        assert host_reads(monkeypatch, lambda: accuracy(model, batches, attack=attack)) == 1
        for run in (lambda: pgd(model, x, y, 0.1, 0.03, 2), lambda: pgd(model, x, y, 0.1, 0.03, 2, restarts=2),
                    lambda: fgsm_rs(model, x, y, 0.1), lambda: trades_adv(model, x, 0.1, 0.03, 2)):
            assert host_reads(monkeypatch, run) == 0
    assert host_reads(monkeypatch, lambda: pgd(model, x, y, 0.1, 0.03, 2)) > 0  # outside, the values are checked


def test_public_entry_points_still_reject_bad_labels():
    model, x, y = model_and_batch("small_cnn")
    for call in (lambda: pgd(model, x, y + 10, 0.1, 0.03, 1), lambda: accuracy(model, x, y + 10),
                 lambda: accuracy(model, [(x, y + 10)], attack=PGD(0.1, steps=1)), lambda: fgsm(model, x, y - 11, 0.1)):
        with pytest.raises(InputError): call()    # the message is asserted in 04_attacks
