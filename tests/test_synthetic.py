"""Tests of crossclass_nb.synthetic: the closed forms against brute force, and the simulation checks (a)-(e) of the
synthetic chapter with their stated tolerances (smaller samples than the notebook, same tolerance formulas)."""
import itertools
import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

from crossclass_nb.core import InputError
from crossclass_nb.synthetic import (
    NORMS, add_nuisance, adv_correct_prob, block_weights, effective_weights, eps0, eps1, expected_cas, expected_max,
    linear_cas, margin_loss, optimal_full_weights, optimal_weights, pairwise_robust_ce, pgd_linear, plot_fit_history,
    plot_theory, robust_accuracy, robust_fit_history, robust_objective, sample, sampled_objective, surrogate_loss, sweep,
    symmetric_objective, symmetric_weight_matrix, torch_threads, train_linear, vertex_loss, weight_matrix)


@pytest.fixture(autouse=True)
def one_thread():
    "The tensors here are tiny: one torch thread is fastest (restored afterwards for the rest of the suite)."
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SLACK_INTERIOR, SLACK_KINK = 1e-3, 0.07   # optimiser slack where the optimum is interior / at the kink w2 = 0


def sampling_tol(n, sigma=1.0, lam=1.0, slack=SLACK_INTERIOR):
    "Five standard errors of a feature mean, divided by lam, plus the optimiser's slack."
    return 5 * sigma / (lam * math.sqrt(n)) + slack


# ---------------------------------------------------------------- closed forms

def test_eps0_pinned():
    assert round(eps0(mu=1, sigma=1), 4) == 0.2179
    assert eps0() == pytest.approx((1 - 1 / math.sqrt(math.pi)) / 2, abs=1e-15)
    assert eps0(2.0, 1.0, k=4) == pytest.approx((2.0 - 1.5 / math.sqrt(math.pi)) / 2, abs=1e-9)


def test_paper_notes_check_point():
    "mu = sigma = lam = 1, alpha = 0.2: eps1 in (0.30, 0.35); at eps = 0.2 w2_LS ~ 0.227 vs w2* ~ 0.034 (notes, rounded)."
    assert 0.30 < eps1(0.2) < 0.35
    assert eps1(0.2) == pytest.approx(0.3429, abs=1e-4)
    w2_ls, w2_hard = optimal_weights(0.2, alpha=0.2)[1], optimal_weights(0.2)[1]
    assert w2_ls == pytest.approx(0.2286, abs=1e-4) and w2_hard == pytest.approx(0.0358, abs=1e-4)
    assert abs(w2_ls - 0.227) < 0.003 and abs(w2_hard - 0.034) < 0.003


def test_theorem1_threshold():
    e0 = eps0()
    assert optimal_weights(e0 - 1e-6)[1] > 0 and optimal_weights(e0 + 1e-9)[1] == 0
    assert all(optimal_weights(e)[0] > 0 for e in np.linspace(0, 0.4999, 50))
    assert optimal_weights(0.5)[0] == 0


def test_theorem3_label_smoothing():
    for alpha in np.linspace(0.05, 0.5, 10):
        assert eps1(alpha) > eps0()
        es = torch.linspace(0, eps1(alpha) - 1e-6, 200, dtype=torch.float64)
        assert bool((optimal_weights(es, alpha=alpha)[1] > optimal_weights(es)[1]).all())
        assert optimal_weights(eps1(alpha) + 1e-9, alpha=alpha)[1] == 0


@pytest.mark.parametrize("norm,alpha,k", list(itertools.product(NORMS, (0.0, 0.2, 0.7), (3, 4))))
def test_closed_form_is_the_minimum(norm, alpha, k):
    "optimal_weights against Nelder-Mead on the exact objective, including alpha > 1/2 and k = 4."
    for eps in (0.05, 0.25, 0.45):
        w = optimal_weights(eps, 1.2, 0.8, 0.7, alpha, norm, k)
        f = lambda v: robust_objective(v[0], v[1], eps, 1.2, 0.8, 0.7, alpha, norm, k)
        best = min((minimize(f, x0, method="Nelder-Mead", options=dict(xatol=1e-9, fatol=1e-13, maxiter=4000))
                    for x0 in [(0.5, 0.5), (0.1, -0.1)]), key=lambda r: r.fun)
        assert f(w) <= best.fun + 1e-12
        assert np.abs(np.array(w) - best.x).max() < 1e-5


def test_l2_keeps_the_ratio():
    es = torch.tensor([0.0, 0.1, 0.2, 0.3])
    w1, w2 = optimal_weights(es, norm="l2")
    torch.testing.assert_close(w2 / w1, torch.full((4,), 1 - 1 / math.sqrt(math.pi)), rtol=0, atol=1e-6)


def test_expected_max():
    assert expected_max(2) == pytest.approx(1 / math.sqrt(math.pi))
    g = torch.Generator().manual_seed(0)
    assert expected_max(4) == pytest.approx(torch.randn(400_000, 4, generator=g).amax(1).mean().item(), abs=0.006)


def test_floats_and_tensors():
    assert isinstance(robust_objective(0.5, 0.2, 0.1), float)
    w1, w2 = optimal_weights(torch.tensor([0.1, 0.2]))
    assert w1.dtype == torch.float32 and w1.shape == (2,)
    assert isinstance(adv_correct_prob(0.5, 0.2, 0.1), float)
    assert robust_accuracy(torch.tensor([0.5, 1.0]), 0.3, 0.1).shape == (2,)


def test_bad_inputs():
    "Each public entry point refuses bad settings (the messages are asserted in the notebook, 02_synthetic)."
    with pytest.raises(InputError): robust_objective(1, 1, 0.1, lam=0)
    with pytest.raises(InputError): optimal_weights(-0.1)
    with pytest.raises(InputError): optimal_weights(0.1, norm="l1")
    with pytest.raises(InputError): eps1(1.0)
    with pytest.raises(InputError): sample(10, k=1)
    with pytest.raises(InputError): robust_accuracy(1, 1, 0.1, sigma=0)
    with pytest.raises(InputError): train_linear(*sample(10), 0.1, model="mlp")


# ---------------------------------------------------------------- the inner maximisation and the objective

def test_margin_loss_is_the_corner_maximum():
    g = torch.Generator().manual_seed(1)
    W = torch.randn(4, 3, 6, generator=g, dtype=torch.float64)
    x, y = sample(60, seed=2, dtype=torch.float64)
    eps = torch.tensor([0.0, 0.1, 0.3, 0.5], dtype=torch.float64)
    for alpha in (0.0, 0.3, 0.8):
        torch.testing.assert_close(margin_loss(W, x, y, eps, alpha), vertex_loss(W, x, y, eps, alpha), rtol=0, atol=1e-10)


def test_exact_objective_matches_sampled():
    "Exact expectation vs mean of the exact per-example inner max, n = 100 000 (4 standard errors ~ 0.012)."
    for k in (3, 4):
        x, y = sample(100_000, 1.3, 0.7, k=k, seed=1, dtype=torch.float64)
        for alpha, norm, (w1, w2) in itertools.product((0.0, 0.2, 0.7), NORMS, [(0.7, 0.3), (0.5, -0.2)]):
            exact = robust_objective(w1, w2, 0.15, 1.3, 0.7, 0.5, alpha, norm, k)
            assert exact == pytest.approx(sampled_objective(w1, w2, x, y, 0.15, 0.5, alpha, norm), abs=0.012)


def test_symmetric_objective_matches_sampled():
    x, y = sample(100_000, 1.1, 0.9, seed=4, dtype=torch.float64)
    for v, alpha, norm in [((0.5, -0.2, 0.1, 0.3), 0.0, "linf"), ((0.4, 0.1, -0.3, 0.2), 0.2, "linf"),
                           ((0.3, 0.05, 0.1, 0.2), 0.6, "l2")]:
        W = symmetric_weight_matrix(*v)
        sampled = margin_loss(W, x, y, 0.2, alpha, norm).mean() + 0.35 * (W**2).sum()
        assert symmetric_objective(*v, 0.2, 1.1, 0.9, 0.7, alpha, norm) == pytest.approx(float(sampled), abs=0.012)


# ---------------------------------------------------------------- (a) sampled objective minimised

@pytest.mark.parametrize("mu,sigma,lam", [(1.0, 1.0, 1.0), (1.5, 0.5, 0.5), (0.8, 1.2, 2.0)])
def test_a_sampled_minimiser(mu, sigma, lam):
    n = 10_000
    x, y = sample(n, mu, sigma, seed=11, dtype=torch.float64)
    for eps, alpha, norm in [(0.1, 0.0, "linf"), (0.25, 0.0, "linf"), (0.15, 0.2, "l2")]:
        eps = eps * mu
        f = lambda v: sampled_objective(v[0], v[1], x, y, eps, lam, alpha, norm)
        got = minimize(f, (0.3, 0.1), method="Nelder-Mead", options=dict(xatol=1e-5, fatol=1e-10)).x
        want = optimal_weights(eps, mu, sigma, lam, alpha, norm)
        assert np.abs(got - np.array(want)).max() <= sampling_tol(n, sigma, lam)


# ---------------------------------------------------------------- (b) real PGD training

EPS = torch.tensor([0.0, 0.15, 0.25, 0.35], dtype=torch.float64)


@pytest.fixture(scope="module")
def train_set():
    return sample(1000, seed=0, dtype=torch.float64)


def test_pgd_is_exact_for_linear_models(train_set):
    x, y = train_set
    W = torch.stack([weight_matrix(0.6, 0.3), symmetric_weight_matrix(0.4, -0.2, -0.1, 0.3)])
    eps = torch.tensor([0.1, 0.3], dtype=torch.float64)
    for norm, alpha in [("linf", 0.0), ("linf", 0.2), ("l2", 0.0), ("l2", 0.3)]:
        found = margin_loss(W, pgd_linear(W, x, y, eps, alpha=alpha, norm=norm), y, 0.0, alpha)
        torch.testing.assert_close(found, margin_loss(W, x, y, eps, alpha, norm), rtol=0, atol=1e-6)
    ce = surrogate_loss(pgd_linear(W, x, y, eps, loss="ce") @ W.transpose(-1, -2), y, loss="ce")
    assert float((vertex_loss(W, x, y, eps, loss="ce") - ce).max()) < 1e-6
    assert float((pgd_linear(W, x, y, eps) - x).abs().amax((-1, -2)).sub(eps).abs().max()) < 1e-12


def test_untargeted_pgd_falls_short(train_set):
    "Plain untargeted PGD on the max-margin loss misses the best wrong class on some examples (why we multi-target)."
    x, y = train_set
    W = weight_matrix(0.6, 0.3)
    found = margin_loss(W, pgd_linear(W, x, y, 0.2, multi_target=False), y)
    assert float((found < margin_loss(W, x, y, 0.2) - 1e-9).double().mean()) > 0.02


def test_b_two_weight_pgd_training(train_set):
    "Interior optima: exact up to 1e-3; at the kink w2 = 0 gradient descent may stop up to 0.07 short (flat side)."
    x, y = train_set
    P = train_linear(x, y, EPS)
    for e, w in zip(EPS.tolist(), P.numpy()):
        f = lambda v: sampled_objective(v[0], v[1], x, y, e)
        r = minimize(f, (0.3, 0.1), method="Nelder-Mead", options=dict(xatol=1e-8, fatol=1e-13))
        slack = SLACK_KINK if r.x[1] <= 0.01 else SLACK_INTERIOR
        assert np.abs(w - r.x).max() < slack                                    # the attack and the optimiser
        assert f(w) - r.fun < 0.005                                             # in objective value, even at the kink
        assert np.abs(w - np.array(optimal_weights(e))).max() < sampling_tol(len(y), slack=slack)   # plus sampling


def test_b_full_matrix_pgd_training(train_set):
    x, y = train_set
    W = train_linear(x, y, EPS, model="full")
    pred = torch.tensor([optimal_full_weights(e) for e in EPS.tolist()], dtype=torch.float64)
    assert float((block_weights(W) - pred).abs().max()) < sampling_tol(len(y), slack=SLACK_KINK)
    assert float(W.sum(-2).abs().max()) < 1e-4                                 # zero column sums, as predicted
    w1, w2 = optimal_weights(EPS, lam=2.0)                                    # effective weights: lam -> (k-1) lam
    assert float((effective_weights(W) - torch.stack([w1, w2], -1)).abs().max()) < sampling_tol(len(y), slack=SLACK_KINK)


def test_full_matrix_with_label_smoothing(train_set):
    "The numerical optimum of the free classifier under label smoothing vs exact-adversary training."
    x, y = train_set
    W = train_linear(x, y, EPS, alpha=0.2, model="full", attack="exact")
    pred = torch.tensor([optimal_full_weights(e, alpha=0.2) for e in EPS.tolist()], dtype=torch.float64)
    assert float((block_weights(W) - pred).abs().max()) < sampling_tol(len(y), slack=SLACK_KINK)
    eff = effective_weights(W)
    assert float(eff[0, 1]) < optimal_weights(0.0, lam=2.0)[1] - 0.03         # smoothing lowers d - c here


# ---------------------------------------------------------------- (c) probabilities against Monte Carlo

def test_c_probabilities_monte_carlo():
    n = 40_000
    x, y = sample(3 * n, seed=5, dtype=torch.float64)
    x0 = x[y == 0]
    for (w1, w2, e), norm in itertools.product([(0.6, 0.036, 0.2), (0.5, 0.7, 0.1), (0.4, -0.2, 0.1)], NORMS):
        c = weight_matrix(w1, w2)[1] - weight_matrix(w1, w2)[0]
        gain = e * (c.abs().sum() if norm == "linf" else c.norm())
        p_mc = float((x0 @ c + gain < 0).double().mean())
        p = adv_correct_prob(w1, w2, e, norm=norm)
        assert abs(p - p_mc) <= 4 * math.sqrt(p * (1 - p) / len(x0))
        r, r_mc = robust_accuracy(w1, w2, e, norm=norm), robust_accuracy(w1, w2, e, n=n, norm=norm, seed=7)
        assert abs(r - r_mc) <= 4 * math.sqrt(r * (1 - r) / n)


def test_c_exact_special_cases():
    assert robust_accuracy(1.0, 1.0, 0.5) == pytest.approx(1 / 3, abs=1e-9)     # Sheppard: corr 1/2 orthant
    assert adv_correct_prob(1.0, 1.0, 0.5) == pytest.approx(0.5, abs=1e-12)
    assert robust_accuracy(1.0, 1 - 1e-7, 0.1) == pytest.approx(robust_accuracy(1 - 1e-7, 1.0, 0.1), abs=1e-6)
    assert robust_accuracy(1.0, 0.0, 0.1) == pytest.approx(adv_correct_prob(1.0, 0.0, 0.1), abs=1e-9)
    w2 = torch.linspace(0, 1, 101, dtype=torch.float64)
    assert bool((adv_correct_prob(1.0, w2, 0.2).diff() >= -1e-15).all())        # Theorem 2: monotone on [0, w1]


# ---------------------------------------------------------------- (d) label smoothing, (e) cross-entropy

def test_d_label_smoothing_keeps_w2(train_set):
    x, y = train_set
    eps = torch.tensor([0.1, 0.25, 0.28], dtype=torch.float64)              # below eps0, and between eps0 and eps1
    hard, soft = train_linear(x, y, eps), train_linear(x, y, eps, alpha=0.2)
    assert bool((soft[:, 1] > hard[:, 1] + 0.02).all())
    assert bool((hard[1:, 1] < SLACK_KINK).all())                            # past eps0: zero up to the optimiser's slack
    pred = torch.tensor([optimal_weights(e, alpha=0.2) for e in eps.tolist()], dtype=torch.float64)
    assert float((soft - pred).abs().max()) < sampling_tol(len(y))            # all interior: no kink slack needed


def test_e_cross_entropy(train_set):
    x, y = train_set
    for model in ("two_weight", "full"):
        hard = effective_weights(train_linear(x, y, EPS, loss="ce", model=model, epochs=60))
        soft = effective_weights(train_linear(x, y, EPS, alpha=0.2, loss="ce", model=model, epochs=60))
        r_hard, r_soft = hard[:, 1] / hard[:, 0], soft[:, 1] / soft[:, 0]
        assert bool((r_hard.diff() < 0).all())                              # the share of cross-class weight falls
        assert bool((hard[:, 1] > 0.5 * hard[:, 0]).all())                  # but w2 never comes near zero
        assert bool((r_soft <= r_hard + 0.005).all())                       # and smoothing does not raise it


def test_ce_pgd_training_matches_exact_adversary(train_set):
    x, y = train_set
    x, y = x[:400], y[:400]
    eps = torch.tensor([0.1, 0.3], dtype=torch.float64)
    a = train_linear(x, y, eps, loss="ce", epochs=40)
    b = train_linear(x, y, eps, loss="ce", attack="exact", epochs=40)
    assert float((a - b).abs().max()) < 1e-6


# ---------------------------------------------------------------- CAS

def test_expected_cas_closed_form_and_monte_carlo():
    for (w1, w2), e in itertools.product([(0.6, 0.036), (0.8, 0.24), (0.5, 0.0)], (0.0, 0.2)):
        r, s = w1**2 * (1 - e)**2, w2**2 * (1 - e / 2)**2
        assert float(expected_cas(weight_matrix(w1, w2), e)) == pytest.approx(6 * s / (r + 2 * s), abs=1e-12)
    x, y = sample(40_000, seed=9, dtype=torch.float64)
    for W in (weight_matrix(0.8, 0.24), symmetric_weight_matrix(0.3, -0.15, -0.1, 0.05)):
        assert float(linear_cas(W, pgd_linear(W, x, y, 0.2), y)) == pytest.approx(float(expected_cas(W, 0.2)), abs=0.015)
    assert float(linear_cas(torch.eye(3, 6, dtype=torch.float64), x, y)) == 0.0


def test_sweep_cas_collapses_past_eps0():
    s = sweep(torch.tensor([0.0, 0.1, 0.3]), n=1000, n_test=3000)
    assert s["cas"][0] > s["cas"][1] > s["cas"][2] and float(s["cas"][2]) < 0.05
    assert set(s) >= {"eps", "W", "w", "robust_acc", "cas", "settings"}


def test_label_smoothing_does_not_buy_robust_accuracy():
    "Documented finding: the LS optimum has the higher pairwise probability but the lower robust accuracy at eps >= 0.15."
    for e in (0.15, 0.2, 0.3):
        wh, ws = optimal_weights(e), optimal_weights(e, alpha=0.2)
        assert robust_accuracy(*ws, e) < robust_accuracy(*wh, e)
        assert adv_correct_prob(*ws, e) > adv_correct_prob(*wh, e)


def test_playground_figure():
    import matplotlib
    matplotlib.use("Agg")
    fig = plot_theory(mu=1.2, sigma=0.8, eps=0.3, alpha=0.3, lam=2.0)
    assert len(fig.axes) == 3
    fig2 = plot_theory(eps=0.6)                                             # past mu/2: a message instead of a curve
    assert len(fig2.axes) == 3


# The model in high dimension: nuisance coordinates, no penalty, robust overfitting

def test_add_nuisance_appends_label_free_noise():
    x, y = sample(3000, seed=0, dtype=torch.float64)
    xn = add_nuisance(x, 40, noise=0.5, seed=1)
    assert xn.shape == (3000, 46) and torch.equal(xn[:, :6], x) and torch.equal(add_nuisance(x, 40, 0.5, seed=1), xn)
    assert not torch.equal(add_nuisance(x, 40, 0.5, seed=2), xn)
    assert float(xn[:, 6:].std()) == pytest.approx(0.5, rel=0.02)
    class_means = torch.stack([xn[y == c, 6:].mean(0) for c in range(3)])       # independent of the label
    assert float(class_means.abs().max()) < 4 * 0.5 / math.sqrt(1000)
    assert add_nuisance(x, 0).shape == x.shape and add_nuisance(x.float(), 2).dtype == torch.float32
    for bad in (-1, 2.5, True):
        with pytest.raises(InputError): add_nuisance(x, bad)    # message asserted in the notebook
    with pytest.raises(InputError, match="noise must be"): add_nuisance(x, 3, noise=-0.1)


def test_pairwise_robust_ce_is_exact_for_two_classes_and_an_upper_bound_for_three():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64)
    for k in (2, 3, 4):
        W, y = torch.randn(k, 6, generator=g, dtype=torch.float64), torch.arange(64) % k
        exact = vertex_loss(W, x, y, 0.25, loss="ce")
        bound = pairwise_robust_ce(W, x, y, 0.25)
        if k == 2: assert torch.allclose(bound, exact, atol=1e-10)
        else: assert bool((bound >= exact - 1e-12).all()) and float((bound - exact).max()) > 1e-3
    W = torch.randn(3, 6, generator=g, dtype=torch.float64)
    assert torch.allclose(pairwise_robust_ce(W, x, torch.arange(64) % 3, 0.0),
                          surrogate_loss(x @ W.T, torch.arange(64) % 3, loss="ce"))


def test_robust_fit_history_overfits_with_nuisance_and_not_without():
    x, y = sample(60, seed=20, dtype=torch.float64)
    xt, yt = sample(1500, seed=21, dtype=torch.float64)
    high = robust_fit_history(add_nuisance(x, 80, seed=22), y, add_nuisance(xt, 80, seed=23), yt, steps=600, points=10)
    low = robust_fit_history(x, y, xt, yt, steps=600, points=10)
    assert list(high["step"]) == sorted(set(high["step"])) and high["step"][-1] == 600 and len(high["step"]) <= 10
    assert high["W"].shape == (3, 86)
    b = high["test_robust"].argmax()
    assert high["test_robust"][b] - high["test_robust"][-1] > 0.05                # robust overfitting ...
    assert high["train_robust"][-1] - high["test_robust"][-1] > 0.15              # ... while the training set is fitted
    assert low["test_robust"].max() - low["test_robust"][-1] < 0.02               # none without nuisance coordinates
    W, xn = high["W"], add_nuisance(xt, 80, seed=23)                              # the memorised weight is on coordinates
    A = torch.stack([xn[yt == c].mean(0) for c in range(3)]) * W                  # that class means do not see
    assert float(W[:, 6:].abs().sum() / W.abs().sum()) > 0.3 and float(A[:, 6:].norm() / A.norm()) < 0.1
    again = robust_fit_history(x, y, xt, yt, steps=600, points=10)
    assert np.array_equal(again["test_robust"], low["test_robust"]) and np.array_equal(again["cas_adv"], low["cas_adv"])


def test_plot_fit_history():
    import matplotlib
    matplotlib.use("Agg")
    x, y = sample(30, seed=0, dtype=torch.float64)
    fig = plot_fit_history(robust_fit_history(x, y, x, y, steps=20, points=4), "t")
    assert len(fig.axes) == 2 and fig.axes[0].get_xscale() == "log"


def test_torch_threads_sets_and_restores_the_thread_count():
    before = torch.get_num_threads()
    with pytest.raises(ValueError):
        with torch_threads(2):
            assert torch.get_num_threads() == 2
            raise ValueError
    assert torch.get_num_threads() == before
    with torch_threads(None): assert torch.get_num_threads() == before
