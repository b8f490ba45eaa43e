"""Contract tests for crossclass_nb.models: the feature/head split, normalisation inside, errors."""
import pytest
import torch
import torch.nn as nn

from crossclass_nb.core import InputError
from crossclass_nb.models import MODEL_NAMES, Normalize, get_model

SHAPES = {"small_cnn": (1, 28, 28), "mlp": (1, 28, 28), "preact_resnet18": (3, 32, 32), "resnet18": (3, 32, 32)}


def test_model_names():
    assert set(MODEL_NAMES) == {"preact_resnet18", "resnet18", "wrn34_10", "small_cnn", "mlp"}


@pytest.mark.parametrize("name", list(SHAPES))
@pytest.mark.parametrize("num_classes", [3, 100])
def test_forward_is_head_of_features(name, num_classes):
    torch.manual_seed(0)
    c = SHAPES[name][0]
    m = get_model(name, num_classes=num_classes, in_channels=c).eval()
    x = torch.rand(3, *SHAPES[name])
    with torch.no_grad():
        g = m.features(x)
        out = m(x)
    assert g.dim() == 2 and g.shape[0] == 3 and (g >= 0).all()
    assert isinstance(m.head, nn.Linear) and m.head.in_features == g.shape[1]
    assert m.head.out_features == num_classes
    torch.testing.assert_close(out, m.head(g), rtol=0, atol=1e-6)


def test_forward_is_head_of_features_train_mode():
    torch.manual_seed(0)
    m = get_model("small_cnn", in_channels=1).train()
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(m(x), m.head(m.features(x)))


def test_wrn34_10_shape():
    m = get_model("wrn34_10", num_classes=10).eval()
    assert m.head.in_features == 640
    with torch.no_grad():
        assert m(torch.rand(1, 3, 32, 32)).shape == (1, 10)


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (1, 8, 8)])
def test_small_cnn_any_size(shape):
    m = get_model("small_cnn", num_classes=10, in_channels=shape[0]).eval()
    with torch.no_grad():
        assert m(torch.rand(2, *shape)).shape == (2, 10)


def test_normalize_buffers_and_stats():
    m = get_model("small_cnn", in_channels=3, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
    buffers = dict(m.named_buffers())
    assert torch.allclose(buffers["norm.mean"].flatten(), torch.tensor([0.49, 0.48, 0.45]))
    assert torch.allclose(buffers["norm.std"].flatten(), torch.tensor([0.25, 0.24, 0.26]))
    d = get_model("resnet18")
    assert torch.allclose(d.norm.mean, torch.full((1, 3, 1, 1), 0.5))
    # normalising inside: shifting the stats is the same as shifting the input
    x = torch.rand(2, 3, 4, 4)
    n = Normalize(0.2, 0.5, in_channels=3)
    torch.testing.assert_close(n(x), (x - 0.2) / 0.5)


def test_channels_last_matches():
    m = get_model("resnet18", num_classes=10).eval()
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        ref = m(x)
        out = m.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_errors():
    with pytest.raises(InputError):
        get_model("densenet")
    with pytest.raises(InputError):
        get_model("small_cnn", in_channels=3, mean=(0.1, 0.2))
    with pytest.raises(InputError):
        get_model("small_cnn", in_channels=1, std=-1)
    with pytest.raises(InputError):
        get_model("resnet18", width=3)
    with pytest.raises(InputError):
        get_model("small_cnn", in_channels=1)(torch.rand(2, 3, 28, 28))
    with pytest.raises(InputError, match="6k \\+ 4"):
        get_model("wrn34_10", depth=20)


def test_mlp_lazy_and_eager():
    lazy = get_model("mlp", num_classes=4, in_channels=1, hidden=(32, 16))
    with torch.no_grad():
        assert lazy(torch.rand(2, 1, 28, 28)).shape == (2, 4)
    eager = get_model("mlp", num_classes=4, in_channels=1, input_shape=(1, 28, 28), hidden=(32, 16))
    assert eager.features(torch.rand(2, 1, 28, 28)).shape == (2, 16)
    # the lazy model, once materialised, loads the eager model's weights
    lazy.load_state_dict(eager.state_dict())


# --- deterministic on CUDA: no pooling without a deterministic CUDA backward, and every model under deterministic mode
from torch.utils._python_dispatch import TorchDispatchMode

NONDETERMINISTIC_ON_CUDA = {"_adaptive_avg_pool2d_backward", "_adaptive_avg_pool3d_backward", "adaptive_max_pool2d_backward",
                            "avg_pool3d_backward", "fractional_max_pool2d_backward", "fractional_max_pool3d_backward",
                            "max_unpool2d", "max_unpool3d", "upsample_bilinear2d_backward", "upsample_bicubic2d_backward"}
CASES = [*SHAPES.items(), ("small_cnn", (3, 32, 32)), ("wrn34_10", (3, 32, 32))]  # small_cnn: 7x7 and 8x8 maps


class OpRecorder(TorchDispatchMode):
    def __init__(self): super().__init__(); self.ops = set()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func._schema.name.split("::")[-1]); return func(*args, **(kwargs or {}))


def training_step_ops(model, x):
    x = x.clone().requires_grad_()
    with OpRecorder() as rec: model.train()(x).logsumexp(1).sum().backward()
    return rec.ops, x.grad


@pytest.mark.parametrize("name, shape", CASES)
def test_deterministic_forward_backward(name, shape):
    torch.manual_seed(0)
    model = get_model(name, num_classes=10, in_channels=shape[0])
    torch.use_deterministic_algorithms(True)
    try: ops, grad = training_step_ops(model, torch.rand(2, *shape))
    finally: torch.use_deterministic_algorithms(False)
    assert grad is not None and torch.isfinite(grad).all()
    assert not ops & NONDETERMINISTIC_ON_CUDA, name


def test_the_recorder_sees_adaptive_pooling():
    old = nn.Sequential(nn.Conv2d(1, 4, 3), nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(64, 2))
    assert "_adaptive_avg_pool2d_backward" in training_step_ops(old, torch.rand(2, 1, 28, 28))[0]


def test_small_cnn_unchanged_by_the_pool():
    "Same parameters (71,802 for 28x28 grey images and 10 classes) and the outputs of AdaptiveAvgPool2d(4)."
    torch.manual_seed(0)
    m = get_model("small_cnn", num_classes=10, in_channels=1).eval()
    assert sum(p.numel() for p in m.parameters()) == 71_802
    reference = nn.Sequential(*m.body[:4], nn.AdaptiveAvgPool2d(4), *m.body[5:])
    for shape in [(4, 1, 28, 28), (4, 1, 32, 32), (4, 1, 8, 8)]:
        x = torch.rand(shape)
        with torch.no_grad(): torch.testing.assert_close(m.body(m.norm(x)), reference(m.norm(x)), rtol=0, atol=1e-6)


# --- RobustBench through the optional extra, offline: a checkpoint placed in its model directory
def test_load_robustbench_offline(tmp_path):
    from crossclass_nb.core import MissingExtraError
    from crossclass_nb.models import _robustbench, load_robustbench
    try: _, registry, enums = _robustbench()
    except MissingExtraError: pytest.skip("robustbench (extra [zoo]) is not installed")
    torch.manual_seed(0)
    net = registry[enums.BenchmarkDataset("cifar10")][enums.ThreatModel("Linf")]["Wong2020Fast"]["model"]()  # PreActResNet-18
    (tmp_path / "cifar10" / "Linf").mkdir(parents=True)
    torch.save(net.state_dict(), tmp_path / "cifar10" / "Linf" / "Wong2020Fast.pt")
    m = load_robustbench("Wong2020Fast", model_dir=tmp_path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(m(x), net.eval()(x), rtol=0, atol=0)
    assert m.head is m.model.linear and not m.training
    with pytest.raises(InputError): load_robustbench("Wong2020Fst", model_dir=tmp_path)
    with pytest.raises(InputError, match="L3"): load_robustbench("Wong2020Fast", threat_model="L3", model_dir=tmp_path)


def test_missing_extra_is_named(monkeypatch):
    import sys
    from crossclass_nb.core import MissingExtraError
    from crossclass_nb.models import load_robustbench
    monkeypatch.setitem(sys.modules, "robustbench", None)                # as if it were not installed
    with pytest.raises(MissingExtraError): load_robustbench("Wong2020Fast")   # message: the catalogue
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(MissingExtraError, match=r"\[zoo\]"): get_model("timm:resnet18")
