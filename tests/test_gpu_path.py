"""The GPU path's logic, checked without a GPU: which device each process takes (alone and under torchrun), that the
trainer hands `torch.cuda.set_device` an indexed device, that only the GPUs a run uses have their random state saved
and restored, the bf16 warning on GPUs that only emulate it, and every model under deterministic algorithms."""
import warnings

import pytest
import torch

from crossclass_nb import core
from crossclass_nb.core import InputError, get_device, get_rng_state, set_rng_state
from crossclass_nb.models import MODEL_NAMES, get_model
from crossclass_nb.config import TrainConfig
from crossclass_nb.training import _setup_device, check_bf16

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out

TORCHRUN = {"WORLD_SIZE": "2", "LOCAL_RANK": "1", "RANK": "1"}


@pytest.mark.parametrize("choice, env, expected", [
    ("cuda", {}, 0), ("cuda:1", {}, 1), (None, {}, 0),                                 # one process
    ("cuda", TORCHRUN, 1), ("cuda:0", TORCHRUN, 1), ("cuda:2", TORCHRUN, 3), (None, TORCHRUN, 1),   # local rank 1 of 2
    (None, {"CROSSCLASS_DEVICE": "cuda:2"}, 2), ("cuda", {"WORLD_SIZE": "1", "LOCAL_RANK": "0"}, 0)])
def test_device_resolution(choice, env, expected):
    assert get_device(choice, env, cuda_count=4) == torch.device("cuda", expected)


def test_resolving_a_resolved_device_changes_nothing():
    "The trainer resolves its device once and hands the torch.device on (e.g. to the data loader): no second shift."
    for choice in ("cuda", "cuda:0", "cuda:2", None):
        once = get_device(choice, TORCHRUN, cuda_count=4)
        assert get_device(once, TORCHRUN, cuda_count=4) == once


def test_device_resolution_refuses_what_cannot_be():
    with pytest.raises(InputError): get_device("cuda:3", TORCHRUN, cuda_count=4)  # the messages: chapter 00
    with pytest.raises(InputError): get_device("cuda", {}, cuda_count=0)
    assert get_device(None, {}, cuda_count=0).type in ("cpu", "mps")
    assert get_device("cpu", TORCHRUN, cuda_count=4) == torch.device("cpu")


class FakeCuda:
    "Four pretend GPUs: records set_device and the random states set on each."
    def __init__(self, monkeypatch, bf16=True):
        self.current, self.states = None, {}
        for name, fn in {"is_available": lambda: True, "device_count": lambda: 4, "set_device": self.set_device,
                         "get_rng_state": lambda i: torch.tensor([i], dtype=torch.uint8),
                         "set_rng_state": lambda s, i: self.states.__setitem__(i, int(s[0])),
                         "current_device": lambda: 0, "get_device_name": lambda d=None: "pretend GPU",
                         "is_bf16_supported": lambda including_emulation=True: bf16}.items():
            monkeypatch.setattr(torch.cuda, name, fn)
    def set_device(self, d):
        if isinstance(d, torch.device) and d.index is None: raise ValueError("Expected a torch.device with a specified index")
        self.current = d


@pytest.mark.parametrize("device, env, expected", [("cuda", {}, 0), (None, {}, 0), ("cuda:0", TORCHRUN, 1)])
def test_trainer_sets_an_indexed_device(monkeypatch, device, env, expected):
    for k in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "CROSSCLASS_DEVICE"): monkeypatch.delenv(k, raising=False)
    for k, v in env.items(): monkeypatch.setenv(k, v)
    fake = FakeCuda(monkeypatch)
    assert _setup_device(TrainConfig(device=device, amp="none")) == torch.device("cuda", expected)
    assert fake.current == torch.device("cuda", expected)


def test_rng_state_holds_the_devices_used(monkeypatch):
    fake = FakeCuda(monkeypatch)
    st = get_rng_state([torch.device("cuda", 2)])
    assert list(st["cuda"]) == [2] and int(st["cuda"][2][0]) == 2
    set_rng_state(st)
    assert fake.states == {2: 2}
    fake.states.clear()
    set_rng_state(st, devices=[torch.device("cuda", 0)])          # resumed with the run on another GPU
    assert fake.states == {0: 2}
    fake.states.clear()
    old = dict(st, cuda=[torch.tensor([7 + i], dtype=torch.uint8) for i in range(8)])   # old format: every visible GPU
    set_rng_state(old)                                            # 8 saved, 4 visible: no IndexError
    assert fake.states == {0: 7, 1: 8, 2: 9, 3: 10}
    assert get_rng_state([torch.device("cpu")])["cuda"] == {}


def test_cpu_checkpoint_saves_no_gpu_state(tmp_path):
    from crossclass_nb.config import get_config
    from crossclass_nb.checkpoint import load_checkpoint
    from crossclass_nb.training import train
    train(get_config("fmnist-tiny", epochs=1, figures=False, cas_every=0), tmp_path / "r")
    assert load_checkpoint(tmp_path / "r" / "last.pt")["rng"][0]["cuda"] == {}


def test_bf16_on_an_emulating_gpu_names_fp16(monkeypatch):
    FakeCuda(monkeypatch, bf16=False)
    with pytest.warns(UserWarning, match="amp='fp16'"): check_bf16("bf16", torch.device("cuda", 0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_bf16("fp16", torch.device("cuda", 0))


def test_bf16_on_a_cpu_without_bf16_instructions_is_named(monkeypatch):
    from crossclass_nb import training
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(UserWarning, match="no native bf16 arithmetic"): check_bf16("bf16", torch.device("cpu"))
    monkeypatch.setattr(training, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_bf16("bf16", torch.device("cpu"))
        check_bf16("none", torch.device("cpu"))


@pytest.fixture
def deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_every_model_runs_under_deterministic_algorithms(deterministic, name):
    torch.manual_seed(0)
    kw = {"input_shape": (3, 32, 32)} if name == "mlp" else {}
    model = get_model(name, num_classes=10, in_channels=3, **kw).eval()
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    loss = torch.nn.functional.cross_entropy(model(x), torch.tensor([1, 2]))
    grad_x, = torch.autograd.grad(loss, x, retain_graph=True)     # the attack's input gradient
    loss.backward()                                              # the training step's parameter gradients
    assert torch.isfinite(grad_x).all() and grad_x.abs().sum() > 0
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_gpu_check_script_runs_to_the_end_on_the_cpu(tmp_path):
    "bench/gpu_check.sh --device cpu: every check passes on a fake CIFAR, one line each, and a summary line."
    import os
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "LOCAL_RANK", "RANK", "CROSSCLASS_DEVICE")}
    p = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), "--device", "cpu", "--out", str(tmp_path)],
                       cwd=root, env={**env, "CROSSCLASS_DATA": str(tmp_path / "no-data")}, capture_output=True,
                       text=True, timeout=900)
    lines = p.stdout.strip().splitlines()
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-2000:]
    checks = [l.split()[1] for l in lines if l.startswith(("PASS", "FAIL", "SKIP"))]
    assert checks == ["data", "train-eval-cas-none", "train-eval-cas-bf16", "train-eval-cas-fp16", "compile",
                      "resume-after-kill", "ddp-2-processes", "bench-at-step", "bench-attribution"]
    assert all(l.startswith("PASS") for l in lines[1:-1]), p.stdout
    assert lines[-1].startswith("gpu_check summary: 9 passed, 0 failed, 0 skipped on cpu")
    assert (tmp_path / "at_step_cpu.json").is_file() and (tmp_path / "attribution_cpu.json").is_file()
