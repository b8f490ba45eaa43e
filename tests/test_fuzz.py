"""Fuzzing the numerical core with hypothesis: attacks, attribution and the synthetic theory. For valid inputs no NaN
or inf comes out and the invariants hold (the eps-ball, the [0, 1] box, the model left as found, symmetry and range
of the similarity, CAS bounds and invariances); invalid inputs get an `InputError`, never a crash from deep inside.
Example counts are small and fixed so the file runs in well under a minute."""
import math

import pytest
import torch
import torch.nn as nn
from hypothesis import HealthCheck, assume, given, settings, strategies as st

from crossclass_nb.attacks import PGD, fgsm, fgsm_rs, pgd, trades_adv
from crossclass_nb.attribution import cas, class_attributions, similarity_matrix
from crossclass_nb.core import CrossclassError, InputError
from crossclass_nb.models import get_model

FUZZ = settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))

# ------------------------------------------------------------------------------------------------------- attacks


@st.composite
def problems(draw):
    "A small model (MLP or CNN, any scale of logits) and a batch of images that may sit on the box's faces."
    name = draw(st.sampled_from(["mlp", "small_cnn"]))
    c, size, k, n = draw(st.sampled_from([1, 3])), draw(st.integers(4, 9)), draw(st.integers(2, 5)), draw(st.integers(1, 4))
    seed, scale = draw(st.integers(0, 2**16)), draw(st.sampled_from([1.0, 1e3, 1e6]))
    kw = dict(input_shape=(c, size, size), hidden=(8,)) if name == "mlp" else dict(width=2, hidden=6)
    torch.manual_seed(seed)
    model = get_model(name, k, c, **kw)
    with torch.no_grad(): model.head.weight.mul_(scale)
    model.train(draw(st.booleans()))
    g = torch.Generator().manual_seed(seed)
    kind = draw(st.sampled_from(["rand", "zeros", "ones", "binary"]))
    x = {"rand": lambda s: torch.rand(s, generator=g), "zeros": torch.zeros, "ones": torch.ones,
         "binary": lambda s: (torch.rand(s, generator=g) > 0.5).float()}[kind]((n, c, size, size))
    y = torch.randint(0, k, (n,), generator=g)
    return model, x, y


def _state(model):
    return ([m.training for m in model.modules()], [p.requires_grad for p in model.parameters()],
            [b.clone() for b in model.buffers()])


def check_attack_output(model, x, x0, x_adv, eps, norm, before):
    "The invariants every attack must keep."
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert torch.isfinite(x_adv).all(), "NaN/inf in the adversarial images"
    assert x_adv.min() >= 0 and x_adv.max() <= 1, "left the [0, 1] box"
    d = (x_adv - x).flatten(1)
    if norm == "linf": assert d.abs().max() <= eps + 1e-6, f"left the linf ball: {d.abs().max()} > {eps}"
    else: assert (d.norm(dim=1) <= eps * (1 + 1e-5) + 1e-6).all(), f"left the l2 ball: {d.norm(dim=1).max()} > {eps}"
    assert torch.equal(x, x0), "the clean images were modified in place"
    after = _state(model)
    assert after[0] == before[0] and after[1] == before[1], "model modes or requires_grad not restored"
    assert all(torch.equal(a, b) for a, b in zip(after[2], before[2])), "BatchNorm statistics changed"
    assert all(p.grad is None for p in model.parameters()), "parameter gradients were touched"


@FUZZ
@given(problems(), st.floats(0, 0.5), st.floats(1e-4, 0.5), st.integers(0, 4), st.sampled_from(["linf", "l2"]),
       st.booleans(), st.integers(1, 2), st.booleans(), st.booleans())
def test_pgd_valid(prob, eps, alpha, steps, norm, random_start, restarts, targeted, train_mode):
    model, x, y = prob
    if norm == "l2": eps *= math.sqrt(x[0].numel())          # l2 radii in proportion to the image
    x0, before = x.clone(), _state(model)
    x_adv = pgd(model, x, y, eps, alpha, steps, norm=norm, random_start=random_start, restarts=restarts,
                targeted=targeted, train_mode=train_mode)
    check_attack_output(model, x, x0, x_adv, eps, norm, before)
    if steps == 0 and not random_start: assert torch.equal(x_adv, x)
    if eps == 0: assert torch.equal(x_adv, x)


@FUZZ
@given(problems(), st.floats(0, 0.5), st.booleans())
def test_fgsm_family_and_class_valid(prob, eps, rs):
    model, x, y = prob
    x0, before = x.clone(), _state(model)
    x_adv = (fgsm_rs if rs else fgsm)(model, x, y, eps)
    check_attack_output(model, x, x0, x_adv, eps, "linf", before)
    x_adv = PGD(eps, steps=2)(model, x, y)
    check_attack_output(model, x, x0, x_adv, eps, "linf", before)


@FUZZ
@given(problems(), st.floats(0.001, 0.5), st.floats(1e-4, 0.3), st.integers(0, 3), st.sampled_from(["linf", "l2"]))
def test_trades_valid(prob, eps, alpha, steps, norm):
    model, x, _ = prob
    x0, before = x.clone(), _state(model)
    x_adv = trades_adv(model, x, eps, alpha, steps, norm=norm)
    check_attack_output(model, x, x0, x_adv, eps, norm, before)


BAD_NUMBERS = st.sampled_from([-1e-3, -1.0, float("nan"), float("inf"), -float("inf"), 2.0, 255.0, 8])
BAD_STEPS = st.sampled_from([-1, -100, 2.5, float("nan"), "10", None, True])


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(problems(), st.sampled_from(["eps", "alpha", "steps", "norm", "restarts"]), st.data())
def test_pgd_invalid_settings(prob, which, data):
    model, x, y = prob
    args = dict(eps=0.1, alpha=0.02, steps=2, norm="linf", restarts=1)
    args[which] = data.draw({"eps": BAD_NUMBERS, "alpha": st.sampled_from([0.0, -0.1, float("nan"), float("inf")]),
                             "steps": BAD_STEPS, "restarts": st.sampled_from([0, -1, 1.5, None]),
                             "norm": st.sampled_from(["L2", "l1", "inf", "", None, 2])}[which])
    with pytest.raises(InputError) as e: pgd(model, x, y, **args)
    assert which in str(e.value), str(e.value)


@FUZZ
@given(problems(), st.sampled_from(["255", "nan", "inf", "neg", "int", "bool", "1d", "labels_hi", "labels_neg",
                                    "labels_float", "labels_len"]))
def test_pgd_invalid_data(prob, how):
    model, x, y = prob
    k = model.head.out_features
    x, y = {"255": lambda: (x * 255 + 2, y), "nan": lambda: (x.index_fill(0, torch.tensor([0]), float("nan")), y),
            "inf": lambda: (x.index_fill(0, torch.tensor([0]), float("inf")), y), "neg": lambda: (x - 1.5, y),
            "int": lambda: ((x * 255).to(torch.uint8), y), "bool": lambda: (x > 0.5, y), "1d": lambda: (x.flatten(), y),
            "labels_hi": lambda: (x, y + k), "labels_neg": lambda: (x, y - k), "labels_float": lambda: (x, y.float()),
            "labels_len": lambda: (x, torch.cat([y, y]))}[how]()
    with pytest.raises(InputError): pgd(model, x, y, 0.1, 0.02, 2)

# --------------------------------------------------------------------------------------------------- attribution


class Probe(nn.Module):
    "features = ReLU(linear(x)) (any scale), head = a linear layer."
    def __init__(self, d, n, k, seed, scale):
        super().__init__()
        torch.manual_seed(seed)
        self.body, self.head = nn.Linear(d, n), nn.Linear(n, k)
        with torch.no_grad(): self.body.weight.mul_(scale)
    def features(self, x): return torch.relu(self.body(x.flatten(1)))
    def forward(self, x): return self.head(self.features(x))


@FUZZ
@given(st.integers(1, 6), st.integers(2, 6), st.integers(1, 5), st.integers(0, 2**16), st.sampled_from([1e-3, 1.0, 1e4]),
       st.integers(1, 7))
def test_class_attributions_valid(d, k, per_class, seed, scale, batch_size):
    n = 5
    model = Probe(d, n, k, seed, scale).eval()
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(k).repeat_interleave(per_class)
    x = torch.rand(len(y), 1, 1, d, generator=g)
    A = class_attributions(model, x, y, batch_size=batch_size)
    assert A.shape == (k, n) and torch.isfinite(A).all()
    with torch.no_grad(): logits = model(x) - model.head.bias
    means = torch.stack([logits[y == i, i].double().mean() for i in range(k)])
    assert torch.allclose(A.double().sum(1), means, rtol=1e-4, atol=1e-5 * scale), "rows of A must sum to the mean logit"
    same = class_attributions(model, [(x[i:i + 2], y[i:i + 2]) for i in range(0, len(y), 2)])
    assert torch.allclose(A, same, rtol=1e-5, atol=1e-6 * scale), "batching changed A"


MATRICES = st.tuples(st.integers(1, 7), st.integers(1, 9), st.integers(0, 2**16),
                     st.sampled_from([1e-30, 1e-6, 1.0, 1e6, 1e30]), st.booleans())


def _matrix(k, n, seed, scale, nonneg):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(k, n, generator=g, dtype=torch.float64)
    return (A.abs() if nonneg else A).mul(scale).float()


@FUZZ
@given(MATRICES, st.integers(0, 2**16))
def test_similarity_and_cas_valid(spec, seed):
    A = _matrix(*spec)
    assume(bool((A.norm(dim=1) > 0).all()))
    k = len(A)
    C = similarity_matrix(A)
    assert C.shape == (k, k) and torch.isfinite(C).all()
    assert torch.equal(C, C.T), "C must be symmetric"
    assert C.abs().max() <= 1 + 1e-5 and torch.allclose(C.diagonal(), torch.ones(k), atol=1e-5)
    s = cas(C)
    assert math.isfinite(s) and 0 <= s <= k * (k - 1) + 1e-4
    g = torch.Generator().manual_seed(seed)
    D = torch.rand(k, 1, generator=g, dtype=torch.float64).add(0.1).float()       # positive rescaling of each class
    P, Q = torch.randperm(k, generator=g), torch.randperm(A.shape[1], generator=g)
    assert torch.allclose(similarity_matrix(A * D), C, atol=1e-5), "C must not depend on the scale of a class"
    assert torch.allclose(similarity_matrix(A[:, Q]), C, atol=1e-5), "C must not depend on the order of features"
    assert torch.allclose(similarity_matrix(A[P]), C[P][:, P], atol=1e-5), "permuting classes permutes C"
    assert abs(cas(C[P][:, P]) - s) <= 1e-6 * max(1.0, s)
    if spec[4]: assert C.min() >= -1e-6, "non-negative attributions have non-negative similarities"


@FUZZ
@given(st.sampled_from(["nan", "inf", "1d", "3d", "empty", "list"]), MATRICES)
def test_similarity_invalid(how, spec):
    A = _matrix(*spec)
    bad = {"nan": lambda: A.index_fill(1, torch.tensor([0]), float("nan")),
           "inf": lambda: A.index_fill(1, torch.tensor([0]), float("inf")), "1d": lambda: A.flatten(),
           "3d": lambda: A[None], "empty": lambda: A[:0], "list": lambda: A.tolist()}[how]()
    with pytest.raises(InputError): similarity_matrix(bad)


@FUZZ
@given(st.sampled_from(["nan", "rect", "1d", "list"]), st.integers(1, 6))
def test_cas_invalid(how, k):
    C = torch.eye(k)
    bad = {"nan": lambda: C.index_fill(0, torch.tensor([0]), float("nan")), "rect": lambda: torch.zeros(k, k + 1),
           "1d": lambda: C.flatten(), "list": lambda: C.tolist()}[how]()
    with pytest.raises(InputError): cas(bad)

# ---------------------------------------------------------------------------------------------- synthetic theory

THEORY = dict(eps=st.floats(0, 2), mu=st.floats(0.05, 3), sigma=st.floats(0, 3), lam=st.floats(0.05, 5),
              k=st.integers(2, 5), norm=st.sampled_from(["linf", "l2"]))


@FUZZ
@given(**THEORY, alpha=st.sampled_from([0.0, 0.0, 0.1, 0.5, 0.9]), d=st.tuples(st.floats(-1, 1), st.floats(-1, 1)))
def test_theory_optimum(eps, mu, sigma, lam, k, norm, alpha, d):
    "The closed-form optimum is finite, non-negative and no worse than a nearby point (the objective is convex)."
    from crossclass_nb import synthetic as syn
    w1, w2 = syn.optimal_weights(eps, mu, sigma, lam, alpha, norm, k)
    assert math.isfinite(w1) and math.isfinite(w2) and w1 >= 0 and w2 >= 0
    best = syn.robust_objective(w1, w2, eps, mu, sigma, lam, alpha, norm, k)
    assert math.isfinite(best)
    for t in (1e-3, 0.1, 1.0):
        other = syn.robust_objective(w1 + t * d[0], w2 + t * d[1], eps, mu, sigma, lam, alpha, norm, k)
        assert other >= best - 1e-7 * max(1.0, abs(best)), (t, other, best)
    w2_more = syn.optimal_weights(eps + 0.05, mu, sigma, lam, alpha, norm, k)[1]
    assert w2_more <= w2 + 1e-7, "a larger radius must not increase the cross-class weight"


@FUZZ
@given(**THEORY, alpha=st.floats(0, 0.95))
def test_theory_thresholds(eps, mu, sigma, lam, k, norm, alpha):
    "Theorems 1 and 3 (l_inf): beyond eps0 (hard labels) or eps1(alpha) (smoothing) the cross-class weight is 0."
    from crossclass_nb import synthetic as syn
    e0, e1 = syn.eps0(mu, sigma, k), syn.eps1(alpha, mu, sigma, lam, k)
    assert math.isfinite(e0) and math.isfinite(e1) and e0 >= 0 and e1 >= 0
    w2 = syn.optimal_weights(eps, mu, sigma, lam, 0.0, "linf", k)[1]
    assert (w2 == 0) == (eps >= e0) or abs(eps - e0) < 1e-9, (eps, e0, w2)
    w2s = syn.optimal_weights(eps, mu, sigma, lam, alpha, "linf", k)[1]
    if eps >= e1 + 1e-9: assert w2s == 0, (eps, e1, w2s)
    if eps < e1 - 1e-9: assert w2s > 0, (eps, e1, w2s)


@FUZZ
@given(st.integers(2, 3), st.integers(1, 12), st.integers(0, 2**16), st.floats(0, 1), st.floats(0, 0.9),
       st.sampled_from([1e-3, 1.0, 1e3]))
def test_margin_loss_is_the_exact_worst_case(k, n, seed, eps, alpha, scale):
    "The closed-form worst case equals brute force over the corners of the box, is finite, and grows with eps."
    from crossclass_nb import synthetic as syn
    x, y = syn.sample(n, 1.0, 1.0, k, seed, torch.float64)
    W = torch.randn(k, 2 * k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale
    m = syn.margin_loss(W, x, y, eps, alpha, "linf")
    assert m.shape == (n,) and torch.isfinite(m).all()
    v = syn.vertex_loss(W, x, y, eps, alpha, "margin")
    assert torch.allclose(m, v, rtol=1e-9, atol=1e-9 * scale), (m - v).abs().max()
    assert (syn.margin_loss(W, x, y, eps + 0.1, alpha, "linf") >= m - 1e-9 * scale).all()
    assert (syn.margin_loss(W, x, y, eps, alpha, "l2") <= m + 1e-9 * scale).all(), "the l2 ball lies inside the linf ball"


@FUZZ
@given(st.floats(-2, 2), st.floats(-2, 2), st.floats(0, 1), st.floats(0.05, 3), st.floats(0.05, 3),
       st.sampled_from(["linf", "l2"]))
def test_probabilities_and_cas(w1, w2, eps, mu, sigma, norm):
    "Probabilities lie in [0, 1], all margins are harder than one, more eps never helps; CAS stays in [0, k(k-1)]."
    from crossclass_nb import synthetic as syn
    p = syn.adv_correct_prob(w1, w2, eps, mu, sigma, norm)
    ra = syn.robust_accuracy(w1, w2, eps, mu, sigma, k=3, norm=norm)
    assert 0 <= p <= 1 and 0 <= ra <= 1
    assert ra <= p + 1e-3, (ra, p)
    assert syn.robust_accuracy(w1, w2, eps + 0.1, mu, sigma, k=3, norm=norm) <= ra + 1e-3
    W = syn.weight_matrix(w1, w2, 3)
    x, y = syn.sample(30, mu, sigma, 3, 0, torch.float64)
    c = float(syn.linear_cas(W, x, y))
    e = float(syn.expected_cas(W, eps, mu))
    assert math.isfinite(c) and math.isfinite(e) and 0 <= c <= 6 + 1e-9 and 0 <= e <= 6 + 1e-9


BAD_THEORY = [("eps", -0.1), ("eps", float("nan")), ("mu", 0.0), ("mu", -1.0), ("sigma", -1.0), ("lam", 0.0),
              ("alpha", 1.0), ("alpha", -0.1), ("norm", "l3"), ("k", 1), ("k", 2.5)]


@pytest.mark.parametrize("name,value", BAD_THEORY, ids=[f"{n}={v}" for n, v in BAD_THEORY])
def test_theory_invalid(name, value):
    from crossclass_nb import synthetic as syn
    args = {**dict(eps=0.1, mu=1.0, sigma=1.0, lam=1.0, alpha=0.0, norm="linf", k=3), name: value}
    for f in (lambda: syn.optimal_weights(**args), lambda: syn.robust_objective(0.5, 0.5, **args)):
        with pytest.raises(InputError) as e: f()
        assert name in str(e.value), str(e.value)
    if name in ("eps", "norm"):
        x, y = syn.sample(5)
        with pytest.raises(InputError): syn.margin_loss(syn.weight_matrix(1.0, 0.5), x, y, args["eps"], 0.0, args["norm"])
