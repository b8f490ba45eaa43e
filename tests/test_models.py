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
    with pytest.raises(InputError, match="small_cnn"):
        get_model("densenet")
    with pytest.raises(InputError, match="one value per channel"):
        get_model("small_cnn", in_channels=3, mean=(0.1, 0.2))
    with pytest.raises(InputError, match="std must be positive"):
        get_model("small_cnn", in_channels=1, std=-1)
    with pytest.raises(InputError, match="its options are"):
        get_model("resnet18", width=3)
    with pytest.raises(InputError, match="in_channels"):
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
