"""Bring your own model: networks that end in their own nn.Linear, read through as_classifier, in every analysis."""
import pytest
import torch
import torch.nn as nn
import torchvision

from crossclass_nb.attribution import attribution_report, class_attributions, cas, similarity_matrix
from crossclass_nb.core import CheckpointError, InputError
from crossclass_nb.models import as_classifier, check_model_name, get_model, load_arch


def resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4).eval(), torch.rand(12, 3, 32, 32), "fc"


def sequential_mlp():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(48, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    return net.eval(), torch.rand(12, 3, 4, 4), "5"


def cas_from_hook(net, head, x, y, K):
    "CAS computed independently: the head's input recorded by a forward hook, then the paper's definitions by hand."
    seen = []
    hook = head.register_forward_hook(lambda module, args, out: seen.append(args[0].detach()))
    with torch.no_grad(): net(x)
    hook.remove()
    A = torch.stack([(seen[0][y == i].double() * head.weight[i].detach().double()).mean(0) for i in range(K)])
    C = torch.nn.functional.cosine_similarity(A[:, None], A[None], dim=-1)
    return float(C[~torch.eye(K, dtype=torch.bool)].clamp_min(0).sum())


@pytest.mark.parametrize("make", [resnet18, sequential_mlp])
def test_as_classifier_keeps_the_network(make):
    net, x, head_name = make()
    with torch.no_grad(): own = net(x)
    m = as_classifier(net)
    assert m.head_name == head_name
    assert m.head is net.get_submodule(head_name)                     # the network's own layer, not a copy
    with torch.no_grad():
        torch.testing.assert_close(m(x), own, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.head(m.features(x)), own, rtol=0, atol=1e-5)
    assert {id(p) for p in m.parameters()} == {id(p) for p in net.parameters()}
    assert sorted(m.state_dict()) == sorted(f"model.{k}" for k in net.state_dict())  # every weight once


@pytest.mark.parametrize("make", [resnet18, sequential_mlp])
def test_cas_equals_a_forward_hook_computation(make):
    net, x, _ = make()
    y = torch.arange(len(x)) % 4
    expected = cas_from_hook(net, net.get_submodule(make()[2]), x, y, 4)
    res = attribution_report(as_classifier(net), (x, y))
    assert res.cas == pytest.approx(expected, abs=1e-5)
    raw = attribution_report(net, (x, y))                              # the network itself works too
    assert raw.cas == pytest.approx(expected, abs=1e-5)
    assert cas(similarity_matrix(class_attributions(net, x, y))) == pytest.approx(expected, abs=1e-5)
    assert raw.settings["model"] == type(net).__name__


class TwoHeads(nn.Module):
    def __init__(self, combine):
        super().__init__()
        self.body, self.a, self.b, self.combine = nn.Sequential(nn.Linear(8, 16), nn.ReLU()), nn.Linear(16, 3), nn.Linear(16, 3), combine
    def forward(self, x):
        g = self.body(x)
        return (self.a(g) + self.b(g)) / 2 if self.combine else (self.a(g), self.b(g))


@pytest.mark.parametrize("combine", [True, False])
def test_two_heads_refused_naming_head(combine):
    with pytest.raises(InputError) as e: as_classifier(TwoHeads(combine))   # chapter 03 asserts the words
    if not combine: assert "a, b" in str(e.value)                      # it says what it found
    with pytest.raises(InputError): attribution_report(TwoHeads(combine), (torch.rand(6, 8), torch.arange(6) % 3))


def test_softmax_at_the_end_refused():
    with pytest.raises(InputError): as_classifier(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3), nn.Softmax(1)))


def test_head_by_name_is_checked():
    vgg = torchvision.models.vgg11(num_classes=3)
    assert as_classifier(vgg).head_name == "classifier.6"
    assert as_classifier(vgg, head="classifier.6").head is vgg.classifier[6]
    with pytest.raises(InputError): as_classifier(vgg, head="classifier.0")  # its message: chapter 03
    with pytest.raises(InputError, match="classifier.6"): as_classifier(vgg, head="fc")


def test_vit_and_timm():
    vit = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16,
                                               mlp_dim=32, num_classes=5)
    assert as_classifier(vit).head_name == "heads.head"
    timm = pytest.importorskip("timm")
    net = timm.create_model("resnet10t", num_classes=3, in_chans=1)
    m = as_classifier(net)
    assert m.head is net.fc
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(m.eval()(x), net(x), rtol=0, atol=0)


def test_get_model_zoo_names():
    m = get_model("torchvision:resnet18", num_classes=10, in_channels=1, mean=0.3, std=0.4)
    assert m.head_name == "net.fc" and m.head.out_features == 10
    assert m.model.net.conv1.in_channels == 1
    x = torch.rand(2, 1, 28, 28)
    with torch.no_grad(): torch.testing.assert_close(m.eval()(x), m.model.net((x - 0.3) / 0.4))
    assert check_model_name("torchvision:wide_resnet50_2") == "torchvision:wide_resnet50_2"
    with pytest.raises(InputError): check_model_name("torchvision:resnet1")  # messages: chapter 03
    with pytest.raises(InputError): check_model_name("vgg16")
    with pytest.raises(InputError, match="model_kwargs"): get_model("torchvision:resnet18", width=3)


def test_load_arch_bad_inputs_change_nothing(tmp_path):
    net = torchvision.models.resnet18(num_classes=3)
    torch.save(net.state_dict(), tmp_path / "w.pt")
    torch.save(net, tmp_path / "pickled.pt")
    before = sorted(tmp_path.iterdir())
    m = load_arch("torchvision:resnet18", 3, weights=tmp_path / "w.pt")
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad(): torch.testing.assert_close(m(x), net.eval()(x), rtol=0, atol=0)
    # (call, error, words no chapter checks); the other messages are checked in chapter 03, under load_arch
    cases = [(lambda: load_arch("torchvision:resnet_18", 3), InputError, None),
             (lambda: load_arch("resnet18", 3), InputError, None),
             (lambda: load_arch("no_such_package.models:net", 3), InputError, "cannot import"),
             (lambda: load_arch("collections:OrderedDict", 3), InputError, None),
             (lambda: load_arch("torchvision:resnet34", 3, weights=tmp_path / "w.pt"), CheckpointError, None),
             (lambda: load_arch("torchvision:resnet18", 10, weights=tmp_path / "w.pt"), CheckpointError, None),
             (lambda: load_arch("torchvision:resnet18", 3, weights=tmp_path / "pickled.pt"), CheckpointError, None),
             (lambda: load_arch("torchvision:resnet18", 3, weights=tmp_path / "missing.pt"), CheckpointError, None)]
    for call, error, text in cases:
        with pytest.raises(error) as e: call()
        assert text is None or text in str(e.value), str(e.value)
    assert sorted(tmp_path.iterdir()) == before


def test_load_arch_user_callable(tmp_path, monkeypatch):
    (tmp_path / "my_nets.py").write_text("import torch.nn as nn\n"
                                         "def mlp(num_classes, hidden=8):\n"
                                         "    return nn.Sequential(nn.Flatten(), nn.Linear(12, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    m = load_arch("my_nets:mlp", 5, hidden=6)
    assert m.head.out_features == 5 and m.head.in_features == 6 and not m.training


def test_as_classifier_leaves_the_random_state_and_mode_alone():
    net = torchvision.models.resnet18(num_classes=3).train()
    state = torch.get_rng_state()
    m = as_classifier(net)
    assert torch.equal(torch.get_rng_state(), state)
    assert m.training and net.training and net.bn1.num_batches_tracked.item() == 0   # the check ran in eval mode
