"""Contract tests for crossclass_nb.attribution: the one-pass class attributions against the naive definition,
similarity/CAS extremes, input errors, order and batching independence, streaming memory, the report and the plots."""
import json
import weakref

import pytest
import torch
import torch.nn as nn
from hypothesis import given, settings, strategies as st

from crossclass_nb.attribution import (AttributionResult, attribution_report, cas, class_attributions,
                                       plot_cas_curve, plot_difference, plot_similarity, similarity_matrix)
from crossclass_nb.core import InputError


class Tiny(nn.Module):
    "features = Dropout(ReLU(linear)), head = linear; dropout makes the train/eval mode matter."
    def __init__(self, d=6, n=5, K=3, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(d, n), nn.ReLU(), nn.Dropout(0.5))
        self.head = nn.Linear(n, K)

    def features(self, x): return self.body(x)
    def forward(self, x): return self.head(self.features(x))


class Probe(nn.Module):
    "features = the input pixels; head weight = W."
    def __init__(self, W):
        super().__init__()
        self.head = nn.Linear(W.shape[1], W.shape[0])
        with torch.no_grad(): self.head.weight.copy_(W)

    def features(self, x): return x.flatten(1)
    def forward(self, x): return self.head(self.features(x))


def naive(model, x, y, K):
    "The definition, class by class: mean over class-i examples of g(x) * W[i] (eval mode)."
    was = model.training
    model.eval()
    with torch.no_grad():
        A = torch.stack([(model.features(x[y == i]) * model.head.weight[i]).mean(0) for i in range(K)])
    model.train(was)
    return A


def data(N=60, d=6, K=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(N, d, generator=g), torch.arange(N) % K


def test_equals_naive_definition():
    m = Tiny()
    x, y = data()
    for bs in (1, 7, 256):
        torch.testing.assert_close(class_attributions(m, x, y, batch_size=bs), naive(m, x, y, 3), rtol=0, atol=1e-6)


def test_attribution_sums_to_logit_minus_bias_per_class():
    m = Probe(torch.randn(3, 6))
    x, y = data()
    A = class_attributions(m, x, y)
    with torch.no_grad(): logits = m(x) - m.head.bias
    torch.testing.assert_close(A.sum(1), torch.stack([logits[y == i, i].mean() for i in range(3)]), rtol=0, atol=1e-5)


def test_mode_restored_and_eval_used():
    m = Tiny().train()
    x, y = data()
    torch.testing.assert_close(class_attributions(m, x, y), naive(m, x, y, 3), rtol=0, atol=1e-6)
    assert m.training
    m.eval(); class_attributions(m, x, y); assert not m.training


def test_mode_restored_after_error():
    m = Tiny().train()
    x, y = data()
    def boom(model, xb, yb): raise RuntimeError("attack failed")
    with pytest.raises(RuntimeError): class_attributions(m, x, y, attack=boom)
    assert m.training


@settings(max_examples=20, deadline=None)
@given(seed=st.integers(0, 10_000), cuts=st.lists(st.integers(1, 59), max_size=6))
def test_order_and_batching_independent(seed, cuts):
    m = Tiny()
    x, y = data()
    ref = class_attributions(m, x, y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    xp, yp = x[perm], y[perm]
    bounds = [0, *sorted(set(cuts)), len(x)]
    batches = [(xp[a:b], yp[a:b]) for a, b in zip(bounds, bounds[1:])]
    torch.testing.assert_close(class_attributions(m, batches), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(class_attributions(m, xp, yp), ref, rtol=0, atol=1e-6)


def test_iterable_of_batches_equals_tensors_and_dataset_like():
    m = Tiny()
    x, y = data()
    ref = class_attributions(m, x, y)
    torch.testing.assert_close(class_attributions(m, (x, y)), ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(class_attributions(m, ((x[i:i + 9], y[i:i + 9]) for i in range(0, 60, 9))), ref,
                               rtol=0, atol=1e-6)
    class DS: pass
    ds = DS(); ds.x, ds.y = x, y
    torch.testing.assert_close(class_attributions(m, ds), ref, rtol=0, atol=1e-6)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16, shuffle=True)
    torch.testing.assert_close(class_attributions(m, loader), ref, rtol=0, atol=1e-6)


def test_streaming_memory_no_per_example_features():
    "The pass pulls batches lazily and keeps no features tensor beyond its batch."
    class Watched(Tiny):
        def __init__(self): super().__init__(); self.refs, self.calls = [], 0
        def features(self, x):
            g = super().features(x); self.calls += 1; self.refs.append(weakref.ref(g)); return g
    m = Watched()
    lead = []
    def stream():
        for b in range(50):
            lead.append(b - m.calls)
            yield torch.rand(32, 6), torch.arange(32) % 3
    class_attributions(m, stream())
    assert m.calls == 50 and max(lead) <= 0
    assert all(r() is None for r in m.refs)


def test_disjoint_rows_give_cas_zero():
    K, n = 5, 15
    W = torch.zeros(K, n)
    for i in range(K): W[i, 3 * i:3 * i + 3] = torch.rand(3) + 0.1
    x, y = torch.rand(50, n), torch.arange(50) % K
    C = similarity_matrix(class_attributions(Probe(W), x, y))
    torch.testing.assert_close(C, torch.eye(K), rtol=0, atol=1e-7)
    assert cas(C) == 0.0


def test_identical_rows_give_k_times_k_minus_1():
    K, n = 5, 8
    W = torch.randn(n).repeat(K, 1)
    x = torch.rand(7, n).repeat(K, 1)
    y = torch.arange(K).repeat_interleave(7)
    assert cas(similarity_matrix(class_attributions(Probe(W), x, y))) == pytest.approx(K * (K - 1), abs=1e-4)


def test_similarity_and_cas_definitions():
    A = torch.randn(6, 9)
    C = similarity_matrix(A)
    ref = torch.tensor([[float(torch.cosine_similarity(A[i], A[j], dim=0)) for j in range(6)] for i in range(6)])
    torch.testing.assert_close(C, ref, rtol=0, atol=1e-6)
    assert torch.equal(C, C.T)
    off = C[~torch.eye(6, dtype=torch.bool)]
    assert cas(C) == pytest.approx(float(off.clamp_min(0).sum()), abs=1e-6)
    assert 0 <= cas(C) <= 30


# the messages themselves are asserted in the attribution chapter; here: every one is an InputError
@pytest.mark.parametrize("bad", [
    lambda m, x, y: class_attributions(m, x, torch.where(y == 0, 7, y)),
    lambda m, x, y: class_attributions(m, x, y - 1),
    lambda m, x, y: class_attributions(m, torch.where(x > 0.9, float("nan"), x), y),
    lambda m, x, y: class_attributions(m, x, y % 2),
    lambda m, x, y: class_attributions(m, x * 255, y),
    lambda m, x, y: class_attributions(m, x, y.float()),
    lambda m, x, y: class_attributions(m, x),
    lambda m, x, y: class_attributions(m, x, y, num_classes=4),
    lambda m, x, y: class_attributions(m, x, y, batch_size=0),
    lambda m, x, y: class_attributions(nn.Linear(6, 3), x, y),
    lambda m, x, y: class_attributions(m, [], None),
])
def test_clear_input_errors(bad):
    m = Tiny()
    x, y = data()
    with pytest.raises(InputError): bad(m, x, y)


def test_attack_is_applied_in_eval_mode():
    m = Tiny().train()
    x, y = data()
    seen = []
    def attack(model, xb, yb):
        seen.append(model.training)
        return (xb + 0.3).clamp(0, 1)
    A = class_attributions(m, x, y, attack=attack, batch_size=16)
    assert seen == [False] * 4 and m.training
    torch.testing.assert_close(A, naive(m, (x + 0.3).clamp(0, 1), y, 3), rtol=0, atol=1e-6)


def test_report_json_roundtrip_and_accuracy():
    m = Tiny()
    x, y = data(N=90)
    res = attribution_report(m, (x, y), classes=["a", "b", "c"], batch_size=32)
    with torch.no_grad(): pred = m.eval()(x).argmax(1)
    torch.testing.assert_close(res.per_class_acc, torch.stack([(pred[y == i] == i).float().mean() for i in range(3)]))
    assert res.accuracy == pytest.approx((pred == y).float().mean().item())
    assert res.cas == pytest.approx(cas(res.C)) and res.settings["classes"] == ["a", "b", "c"]
    assert res.settings["num_examples"] == 90 and res.settings["attack"] is None
    back = AttributionResult.from_dict(json.loads(json.dumps(res.to_dict())))
    assert torch.equal(back.A, res.A) and torch.equal(back.C, res.C) and back.settings == res.settings
    with pytest.raises(InputError): AttributionResult.from_dict({"C": []})


def test_plots_have_fixed_scales_and_names():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    C = similarity_matrix(torch.rand(3, 5))
    ax = plot_similarity(C, ["x", "y", "z"])
    assert ax.images[0].get_clim() == (0.0, 1.0) and ax.images[0].get_cmap().name == "Blues"
    assert [t.get_text() for t in ax.get_yticklabels()] == ["x", "y", "z"]
    assert plot_difference(C, C * 0.5).images[0].get_clim() == (0.0, 0.5)
    ax = plot_cas_curve([1, 2, 3], [1.0, 2.0, 1.5], best_epoch=2, last_epoch=3, lr_decays=[2])
    assert len(ax.lines) >= 3
    with pytest.raises(InputError): plot_cas_curve([1, 2, 3], [1.0, 2.0, 1.5], best_epoch=7)
    with pytest.raises(InputError): plot_similarity(C, ["x", "y"])
    plt.close("all")
