"""Our PGD against an independent implementation (torchattacks) on a small CNN trained on Fashion-MNIST.

Robust accuracy on 1000 test images under our `pgd` and under `torchattacks.PGD` / `torchattacks.PGDL2` at identical
settings (10 steps, step eps/4, random start) must agree within 1 point. The budgets are chosen where robust accuracy
sits mid-range (about 45-60 %), where a wrong step or projection would show, and a 2-step attack (far weaker) must
differ by much more than the tolerance, so the tolerance has power. Also checks the cheap AutoAttack on a handful of
examples. About 20-25 s of CPU time on one thread.
"""
import pytest
import torch
import torch.nn.functional as F

from crossclass_nb.attacks import PGD, accuracy, autoattack_accuracy
from crossclass_nb.core import set_seed
from crossclass_nb.data import DATASET_STATS, load_dataset, stratified_subset
from crossclass_nb.models import get_model

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

torchattacks = pytest.importorskip("torchattacks", reason='the torchattacks extra: pip install -e ".[eval]"')

N_TEST, BATCH = 1000, 500


@pytest.fixture(scope="module")
def trained():
    torch.set_num_threads(1)
    set_seed(0)
    train = stratified_subset(load_dataset("fashion_mnist", train=True), 2000, seed=0)
    test = stratified_subset(load_dataset("fashion_mnist", train=False), N_TEST, seed=1)
    model = get_model("small_cnn", num_classes=10, in_channels=1, mean=DATASET_STATS["fashion_mnist"][0],
                      std=DATASET_STATS["fashion_mnist"][1])
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(2):
        for idx in torch.randperm(len(train)).split(64):
            loss = F.cross_entropy(model(train.x[idx]), train.y[idx])
            opt.zero_grad(); loss.backward(); opt.step()
    model.eval()
    clean = accuracy(model, test.x, test.y)
    assert clean > 0.65, f"the tiny model did not train (clean accuracy {clean:.3f})"
    return model, test.x, test.y, clean


def torchattacks_accuracy(attack, model, x, y):
    correct = 0
    for i in range(0, len(x), BATCH):
        xa = attack(x[i:i + BATCH], y[i:i + BATCH])
        with torch.no_grad(): correct += (model(xa).argmax(1) == y[i:i + BATCH]).sum().item()
    return correct / len(x)


@pytest.mark.parametrize("norm,eps", [("linf", 0.05), ("l2", 1.0)])
def test_pgd_agrees_with_torchattacks(trained, norm, eps):
    model, x, y, clean = trained
    alpha, steps = eps / 4, 10
    set_seed(1)
    ours = accuracy(model, x, y, attack=PGD(eps, alpha, steps=steps, norm=norm), batch_size=BATCH)
    cls = torchattacks.PGD if norm == "linf" else torchattacks.PGDL2
    set_seed(1)
    theirs = torchattacks_accuracy(cls(model, eps=eps, alpha=alpha, steps=steps, random_start=True), model, x, y)
    print(f"{norm} eps={eps}: clean {clean:.3f}, ours {ours:.3f}, torchattacks {theirs:.3f}")
    assert 0.2 < theirs < clean - 0.1, "the budget should leave robust accuracy mid-range for a meaningful comparison"
    assert abs(ours - theirs) <= 0.01
    # power: a much weaker attack is far outside the tolerance
    weak = accuracy(model, x, y, attack=PGD(eps, alpha, steps=2, norm=norm), batch_size=BATCH)
    assert weak - theirs > 0.03


def test_cheap_autoattack_on_a_handful(trained):
    model, x, y, _ = trained
    xs, ys = x[:40], y[:40]
    modes, rng = [m.training for m in model.modules()], torch.get_rng_state()
    aa = autoattack_accuracy(model, xs, ys, 0.05, norm="linf", version="cheap")
    assert torch.equal(torch.get_rng_state(), rng)  # torchattacks reseeds torch; we fork the RNG around it
    assert [m.training for m in model.modules()] == modes and all(p.requires_grad for p in model.parameters())
    set_seed(2)
    pg = accuracy(model, xs, ys, attack=PGD(0.05, steps=10))
    assert 0 <= aa <= pg + 2 / 40  # APGD-CE + APGD-T is at least as strong as PGD-10 (up to 2 examples of noise)
    assert aa < accuracy(model, xs, ys)
    l2 = autoattack_accuracy(model, xs[:10], ys[:10], 1.0, norm="l2", version="cheap")
    assert 0 <= l2 <= 1
