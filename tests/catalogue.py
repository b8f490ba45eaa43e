"""The catalogue of mistakes: one `Case` for each wrong thing a user can do (a typo, 0..255 pixels, a truncated
checkpoint, a run directory in use, a model of their own that does not fit...), and what must come back.

`tests/test_bad_input.py` runs every case as a pytest case in an empty sandbox directory. A case passes when the
package answers with the right error class (on the command line: exit code 2, one line on stderr, no traceback) and
nothing under the sandbox changed. The message texts are asserted where each error is raised, in the notebooks;
a case's `words` hold only what no notebook asserts (mostly the messages that only the command line reaches).

The other test files import the helpers: `snapshot`, `run_cli`, `copy_run`, `TINY` and the session fixture
`tiny_run` (a finished 2-epoch run, trained once per session under pytest's temporary directory)."""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn as nn

from crossclass_nb import data
from crossclass_nb.attacks import PGD, accuracy, autoattack_accuracy, pgd
from crossclass_nb.attribution import attribution_report, cas, class_attributions, similarity_matrix
from crossclass_nb.checkpoint import build_model, load_model, load_weights
from crossclass_nb.config import TrainConfig, get_config
from crossclass_nb.core import CheckpointError, CrossclassError, DataError, InputError, RunDirError
from crossclass_nb.core import get_device, parse_number, safe_load, set_seed
from crossclass_nb.data import Dataset, DataWarning, TensorLoader, load_dataset, make_fake_cifar
from crossclass_nb.data import stratified_subset, train_val_split, write_idx
from crossclass_nb.models import get_model
from crossclass_nb.rundir import RunLock, load_metrics
from crossclass_nb.training import train

# ------------------------------------------------------------------------------------------------ disk snapshots


def snapshot(root: Path) -> dict:
    "Every entry under `root`: relative path -> (kind, size, mtime_ns, sha256 of the content or None)."
    root, out = Path(root), {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            kind = "dir" if stat.S_ISDIR(st.st_mode) else "link" if stat.S_ISLNK(st.st_mode) else "file"
            digest = hashlib.sha256(p.read_bytes()).hexdigest() if kind == "file" else None
            out[str(p.relative_to(root))] = (kind, st.st_size if kind == "file" else None, st.st_mtime_ns, digest)
    return out


def diff_snapshots(before: dict, after: dict) -> list[str]:
    "Human-readable differences between two snapshots (empty if the disk did not change)."
    out = [f"created {k}" for k in sorted(after.keys() - before.keys())]
    out += [f"removed {k}" for k in sorted(before.keys() - after.keys())]
    both = sorted(before.keys() & after.keys())
    out += [f"changed {k}: {before[k]} -> {after[k]}" for k in both if before[k] != after[k]]
    return out

# -------------------------------------------------------------------------------------------- what cases share

TINY = dict(train_size=100, val_size=50, test_size=50, batch_size=25, epochs=2, eval_steps=2, figures=False)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    "A finished 2-epoch run of the tiny preset, trained once per session (read-only: tests copy from it)."
    home = tmp_path_factory.getbasetemp() / "tiny_run"   # one place per session, whichever test file asks first
    if not (home / "done").exists():
        shutil.rmtree(home, ignore_errors=True)
        train(get_config("fmnist-tiny", **TINY), home / "run", quiet=True)
        (home / "done").touch()
    return home / "run"


def copy_run(run: Path, dst: Path) -> Path:
    "A copy of the run directory `run` at `dst` (timestamps kept, the lock file left out)."
    shutil.copytree(run, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def mlp(num_classes: int = 10):
    "A small seeded MLP for 28x28 grey images."
    torch.manual_seed(0)
    return get_model("mlp", num_classes, 1, input_shape=(1, 28, 28), hidden=(16,)).eval()


def batch(n: int = 4, c: int = 1, size: int = 28):
    "`n` seeded random images with labels 0, 1, 2, ..."
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, c, size, size, generator=g), torch.arange(n) % 10


def write_fashion(root: Path, n: int = 20) -> Path:
    "A small Fashion-MNIST-format training split (IDX files) in `root`."
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_idx(root / "train-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
    write_idx(root / "train-labels-idx1-ubyte", (np.arange(n) % 10).astype(np.uint8))
    return root


def no_system_data():
    "Hide the Debian copy of Fashion-MNIST and $CROSSCLASS_DATA, so only `root` is looked at."
    stack = contextlib.ExitStack()
    stack.enter_context(mock.patch.object(data, "FASHION_MNIST_DEBIAN_DIR", Path("/nonexistent/crossclass-fmnist")))
    stack.enter_context(mock.patch.dict(os.environ, {"CROSSCLASS_DATA": ""}))
    return stack


class SoftmaxOut(nn.Module):
    "A classifier whose output is a softmax: no nn.Linear gives its output, so there is no head W to split off."
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 10), nn.Softmax(dim=1))
    def forward(self, x): return self.net(x)

# --------------------------------------------------------------------------------------- a case and its outcome


@dataclass
class Sandbox:
    "Where a case runs: the empty directory `d` that is compared before and after, and what a setup may use."
    d: Path # the sandbox (also the working directory while the case runs)
    outside: Path # a directory that is not compared, for files the case only reads (a module of the user's)
    monkeypatch: pytest.MonkeyPatch # undone when the test ends
    get_tiny: Callable # () -> the tiny run (trained on first use)
    finalizers: list = field(default_factory=list) # called after the disk is compared (e.g. release a lock)

    @property
    def tiny(self) -> Path: return self.get_tiny()

    def checkpoint(self) -> dict:
        "The tiny run's last.pt, loaded (a fresh copy each call)."
        return torch.load(self.tiny / "last.pt", weights_only=True)


@dataclass
class Case:
    "One user mistake and what must come back."
    id: str # short name, the pytest id
    area: str # which part of the package
    what: str # what the user did, in words
    call: Callable | None = None # call(d): does the wrong thing in the sandbox directory d (API cases)
    argv: Callable | None = None # argv(d) -> list of str (command-line cases)
    error: type = CrossclassError # the exception class expected (API cases)
    words: tuple = () # words the message must hold that no notebook asserts; each a word or a tuple of alternatives
    setup: Callable | None = None # setup(sandbox) prepares files before the disk snapshot
    skip: Callable | None = None # skip() -> reason or None

    @property
    def cli(self) -> bool: return self.argv is not None


@dataclass
class Outcome:
    "What running a case gave."
    error: BaseException | None = None # API: the exception raised (None if nothing was raised)
    code: int | None = None # CLI: the exit code
    stderr: str = ""
    stdout: str = ""

    @property
    def message(self) -> str:
        return self.stderr.strip() if self.code is not None else (str(self.error) if self.error is not None else "")


def run_cli(argv: list) -> Outcome:
    "Run `crossclass ARGV` in this process, capturing the exit code, stdout and stderr."
    from crossclass_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return Outcome(code=code, stderr=err.getvalue(), stdout=out.getvalue())


def run_case(case: Case, d: Path) -> Outcome:
    "Run `case` in the prepared sandbox directory `d`."
    if case.cli: return run_cli(case.argv(d))
    try: case.call(d)
    except Exception as e: return Outcome(error=e)
    return Outcome()


def missing_words(case: Case, message: str) -> list:
    "The entries of `case.words` the message lacks."
    low = message.lower()
    return [w for w in case.words if not any(a.lower() in low for a in ((w,) if isinstance(w, str) else w))]


def problems(case: Case, res: Outcome) -> list[str]:
    "Everything wrong with the outcome of a case (empty: the package answered as it should)."
    out = []
    if case.cli:
        lines = [line for line in res.stderr.splitlines() if line.strip()]
        if res.code != 2: out.append(f"exit code {res.code}, expected 2")
        if "Traceback" in res.stderr: out.append("a traceback was printed")
        if len(lines) != 1: out.append(f"{len(lines)} lines on stderr, expected one")
        elif not lines[0].startswith("crossclass"): out.append("the error line does not start with 'crossclass'")
    else:
        if res.error is None: out.append("no error was raised")
        elif not isinstance(res.error, case.error):
            out.append(f"raised {type(res.error).__name__}, expected {case.error.__name__} (a CrossclassError)")
    if res.message: out += [f"message lacks {w!r}" for w in missing_words(case, res.message)]
    return out


def check_case(case: Case, s: Sandbox) -> tuple[Outcome, list[str]]:
    "Run `case` in the sandbox: what it gave, and what changed on disk (empty: nothing)."
    try:
        if case.setup: case.setup(s)
        before = snapshot(s.d)
        with contextlib.chdir(s.d), warnings.catch_warnings():   # a stray relative write lands in the sandbox
            warnings.simplefilter("ignore", DataWarning)          # the small CIFAR folder is not the published one
            res = run_case(case, s.d)
        return res, diff_snapshots(before, snapshot(s.d))
    finally:
        for f in s.finalizers: f()

# ------------------------------------------------------------------------------- attacks, models, attribution, core

CASES: list[Case] = []  # filled area by area below
def _pgd(**kw):
    "A pgd call on a good model and batch, with the settings `kw` changed."
    def call(d):
        pgd(mlp(), *batch(), **{**dict(eps=0.1, alpha=0.025, steps=2, norm="linf"), **kw})
    return call


def _x(f):
    "A pgd call on images transformed by f."
    def call(d):
        x, y = batch()
        pgd(mlp(), f(x), y, 0.1, 0.025, 2)
    return call

def _y(f):
    "A pgd call on labels transformed by f."
    def call(d):
        x, y = batch()
        pgd(mlp(), x, f(y), 0.1, 0.025, 2)
    return call

CASES += [
    Case("pgd-eps-negative", "attacks", "pgd with eps=-0.1", _pgd(eps=-0.1), error=InputError),
    Case("pgd-eps-nan", "attacks", "pgd with eps=NaN", _pgd(eps=float("nan")), error=InputError,
         words=("eps", "finite number")),
    Case("pgd-eps-in-255-units", "attacks", "pgd with eps=8 (meant 8/255)", _pgd(eps=8), error=InputError,
         words=("eps=8",)),
    Case("pgd-l2-eps-huge", "attacks", "l2 pgd with eps=100 on 28x28 images", _pgd(eps=100, norm="l2"),
         error=InputError, words=("eps=100", "exceeds", "128/255")),
    Case("pgd-alpha-zero", "attacks", "pgd with alpha=0", _pgd(alpha=0), error=InputError,
         words=("> 0", "eps/4")),
    Case("pgd-alpha-inf", "attacks", "pgd with alpha=inf", _pgd(alpha=float("inf")), error=InputError),
    Case("pgd-steps-negative", "attacks", "pgd with steps=-5", _pgd(steps=-5), error=InputError,
         words=("non-negative integer",)),
    Case("pgd-steps-fraction", "attacks", "pgd with steps=2.5", _pgd(steps=2.5), error=InputError,
         words=("2.5",)),
    Case("pgd-unknown-norm", "attacks", "PGD with norm='L2' (capital L)", lambda d: PGD(8 / 255, norm="L2"),
         error=InputError, words=("'L2'",)),
    Case("pgd-eps-text-typo", "attacks", "PGD with eps='8//255'", lambda d: PGD("8//255"), error=InputError),
    Case("pgd-pixels-0-255", "attacks", "images with pixels in 0..255", _x(lambda x: x * 255), error=InputError),
    Case("pgd-uint8-images", "attacks", "uint8 images", _x(lambda x: (x * 255).to(torch.uint8)), error=InputError,
         words=("uint8", "/255")),
    Case("pgd-float64-images", "attacks", "float64 images (NumPy's default) on a float32 model",
         _x(lambda x: x.double()), error=InputError, words=(("float64", "double"),)),
    Case("pgd-nan-pixels", "attacks", "images containing NaN",
         _x(lambda x: x.index_fill(0, torch.tensor([1]), float("nan"))),
         error=InputError, words=(("nan_to_num", "check the data", "clean", "preprocessing", "remove"),)),
    Case("pgd-no-batch-dim", "attacks", "one image without its batch dimension (C x H x W)",
         lambda d: pgd(mlp(), batch()[0][0], batch()[1][:1], 0.1, 0.025, 2), error=InputError,
         words=("N x 1 x H x W", "(1, 28, 28)")),
    Case("pgd-wrong-channels", "attacks", "colour images for a grey-scale model", _x(lambda x: x.expand(-1, 3, -1, -1)),
         error=InputError),
    Case("mlp-wrong-image-size", "models", "32x32 images for an MLP built for 28x28",
         lambda d: mlp()(torch.rand(2, 1, 32, 32)), error=InputError,
         words=(("32", "1024"),)),
    Case("pgd-labels-out-of-range", "attacks", "labels 8..11 for a 10-class model", _y(lambda y: y + 8),
         error=InputError),
    Case("pgd-float-labels", "attacks", "labels as floats", _y(lambda y: y.float()), error=InputError,
         words=("class indices",)),
    Case("pgd-one-hot-labels", "attacks", "one-hot labels (N x K)", _y(lambda y: nn.functional.one_hot(y, 10)),
         error=InputError, words=("1-d",)),
    Case("pgd-labels-count", "attacks", "4 images but 2 labels", _y(lambda y: y[:2]), error=InputError,
         words=("4 examples", "2 labels")),
    Case("accuracy-batch-size-zero", "attacks", "accuracy with batch_size=0",
         lambda d: accuracy(mlp(), *batch(), batch_size=0), error=InputError),
    Case("autoattack-unknown-version", "attacks", "autoattack_accuracy with version='fast'",
         lambda d: autoattack_accuracy(mlp(), *batch(), eps=0.1, version="fast"), error=InputError,
         words=("'fast'",)),
    Case("model-unknown", "models", "get_model('resnet50')", lambda d: get_model("resnet50"), error=InputError,
         words=("resnet50", "choose one of")),
    Case("model-zero-classes", "models", "get_model with num_classes=0", lambda d: get_model("small_cnn", 0),
         error=InputError, words=("num_classes",)),
    Case("model-unknown-option", "models", "small_cnn with hidden_size=64 (the option is hidden)",
         lambda d: get_model("small_cnn", 10, 1, hidden_size=64), error=InputError, words=("hidden_size",)),
    Case("model-std-zero", "models", "normalisation with std=0", lambda d: get_model("small_cnn", 10, 1, std=0),
         error=InputError),
    Case("attribution-model-softmax-output", "attribution", "a model whose output is a softmax, not a linear layer's",
         lambda d: class_attributions(SoftmaxOut(), *batch(10)), error=InputError),
    Case("attribution-empty-class", "attribution", "data where classes 4..9 have no example",
         lambda d: class_attributions(mlp(), *batch()), error=InputError, words=("no examples", "stratified subset")),
    Case("attribution-num-classes", "attribution", "num_classes=5 for a 10-class model",
         lambda d: class_attributions(mlp(), *batch(), num_classes=5), error=InputError,
         words=("num_classes=5", "num_classes=10")),
    Case("attribution-labels-out-of-range", "attribution", "a label 12 for 10 classes",
         lambda d: class_attributions(mlp(), batch()[0], torch.tensor([0, 1, 2, 12])), error=InputError,
         words=("label 12", "0..9")),
    Case("similarity-nan", "attribution", "an attribution matrix with NaN",
         lambda d: similarity_matrix(torch.tensor([[1.0, float("nan")], [0.0, 1.0]])), error=InputError,
         words=("recompute",)),
    Case("cas-not-square", "attribution", "cas of a 3 x 4 matrix", lambda d: cas(torch.zeros(3, 4)), error=InputError,
         words=("(3, 4)",)),
    Case("report-class-names", "attribution", "3 class names for a 10-class model",
         lambda d: attribution_report(mlp(), batch(), classes=["a", "b", "c"]), error=InputError,
         words=("3 class names", "10 classes")),
    Case("parse-number-typo", "core", "the number '8//255'", lambda d: parse_number("8//255"), error=InputError,
         words=("8//255",)),
    Case("device-unknown", "core", "device 'gpu'", lambda d: get_device("gpu"), error=InputError,
         words=("'gpu'", "'cpu'", "'cuda'")),
    Case("device-cuda-missing", "core", "device 'cuda' on a machine without one", lambda d: get_device("cuda"),
         error=InputError, words=("device='cpu'",),
         skip=lambda: "this machine has CUDA" if torch.cuda.is_available() else None),
    Case("seed-negative", "core", "seed -1", lambda d: set_seed(-1), error=InputError,
         words=("seed",)),
    Case("load-missing-file", "core", "safe_load of a file that does not exist", lambda d: safe_load(d / "nope.pt"),
         error=CheckpointError, words=("check the path",)),
]

# ---------------------------------------------------------------------------------------------------------- data


def _truncate(p: Path, keep: float = 0.5):
    "Keep only the first `keep` share of the file's bytes."
    p.write_bytes(p.read_bytes()[:int(p.stat().st_size * keep)])


def _fashion_setup(corrupt):
    def setup(s):
        write_fashion(s.d / "fm")
        corrupt(s.d / "fm")
    return setup


def _load_fashion(d):
    with no_system_data(): load_dataset("fashion_mnist", root=d / "fm")

def _cifar_setup(corrupt=None):
    def setup(s):
        folder = make_fake_cifar(s.d / "cifar", n_train=20, n_test=10)
        if corrupt: corrupt(folder)
    return setup


def _load_cifar(d):
    with no_system_data(): load_dataset("cifar10", root=d / "cifar")


def _gzip_cut(folder: Path):
    import gzip
    raw = gzip.compress((folder / "train-images-idx3-ubyte").read_bytes())
    (folder / "train-images-idx3-ubyte").unlink()
    (folder / "train-images-idx3-ubyte.gz").write_bytes(raw[:len(raw) // 2])

_EMPTY = Dataset(torch.zeros(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), ["a", "b"], "empty")

CASES += [
    Case("dataset-unknown", "data", "load_dataset('mnist')", lambda d: load_dataset("mnist"), error=InputError),
    Case("fashion-missing", "data", "Fashion-MNIST not installed, root points nowhere",
         lambda d: _load_fashion(d), error=DataError, words=("not found", "apt-get install", "root=")),
    Case("fashion-truncated-idx", "data", "a truncated IDX image file", _load_fashion,
         setup=_fashion_setup(lambda f: _truncate(f / "train-images-idx3-ubyte")), error=DataError,
         words=("replace it",)),
    Case("fashion-wrong-magic", "data", "the images file copied over the labels file", _load_fashion,
         setup=_fashion_setup(lambda f: shutil.copy(f / "train-images-idx3-ubyte", f / "train-labels-idx1-ubyte")),
         error=DataError, words=("replace it",)),
    Case("fashion-broken-gzip", "data", "a half-downloaded .gz file", _load_fashion, setup=_fashion_setup(_gzip_cut),
         error=DataError, words=("replace it",)),
    Case("fashion-labels-missing", "data", "the images file without its labels file", _load_fashion,
         setup=_fashion_setup(lambda f: (f / "train-labels-idx1-ubyte").unlink()), error=DataError,
         words=("train-labels-idx1-ubyte", "copy the missing file")),
    Case("cifar-dir-missing", "data", "CIFAR-10 from a directory that does not exist",
         _load_cifar, error=DataError,
         words=("CIFAR-10 not found", "root=DIR", "download")),
    Case("cifar-dir-empty", "data", "CIFAR-10 from an empty directory", _load_cifar,
         setup=lambda s: (s.d / "cifar").mkdir(), error=DataError, words=("not found", "extract it")),
    Case("cifar-truncated", "data", "a truncated CIFAR batch file", _load_cifar,
         setup=_cifar_setup(lambda f: _truncate(f / "data_batch_1")), error=DataError,
         words=("extract",)),
    Case("cifar-wrong-file", "data", "an IDX file in place of a CIFAR batch", _load_cifar,
         setup=_cifar_setup(lambda f: write_idx(f / "data_batch_2", np.zeros((3, 4), np.uint8))), error=DataError,
         words=("not a readable pickle", "extract")),
    Case("cifar-batch-missing", "data", "a CIFAR folder without data_batch_3", _load_cifar,
         setup=_cifar_setup(lambda f: (f / "data_batch_3").unlink()), error=DataError,
         words=("no data_batch_3", "extract")),
    Case("dataset-pixels-0-255", "data", "a Dataset built from 0..255 pixels",
         lambda d: Dataset(torch.rand(2, 1, 4, 4) * 255, torch.tensor([0, 1]), ["a", "b"]), error=InputError),
    Case("dataset-labels-out-of-range", "data", "a label 5 with two class names",
         lambda d: Dataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 5]), ["a", "b"]), error=InputError),
    Case("dataset-empty", "data", "a balanced subset of an empty dataset", lambda d: stratified_subset(_EMPTY, 2),
         error=InputError, words=(("at least one", "non-empty", "check the", "pass data", "load"),)),
    Case("subset-class-without-examples", "data", "a balanced subset when a class has no examples",
         lambda d: stratified_subset(Dataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 0, 2, 2]), ["a", "b", "c"]), 3),
         error=InputError, words=("class 1", "no examples", "at most")),
    Case("split-fraction", "data", "val_size=1.5", lambda d: train_val_split(
        Dataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]), ["a", "b"]), 1.5), error=InputError,
         words=("val_size",)),
    Case("loader-batch-size-zero", "data", "TensorLoader with batch_size=0",
         lambda d: TensorLoader(Dataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]), ["a", "b"]), 0,
                                device="cpu"),
         error=InputError),
]

# ---------------------------------------------------------------------------------- configs, runs and checkpoints


def _cfg(**kw):
    return get_config("fmnist-tiny", **{**TINY, **kw})


def _train(cfg_kw=None, out="run", **kw):
    def call(d):
        train(_cfg(**(cfg_kw or {})) if cfg_kw is not False else None, d / out, quiet=True, **kw)
    return call

def _with_run(extra=None):
    "setup: a copy of the tiny run at d/run, then `extra(sandbox)`."
    def setup(s):
        copy_run(s.tiny, s.d / "run")
        if extra: extra(s)
    return setup

def _save_ck(name: str, change):
    "setup: a modified copy of the tiny checkpoint at d/name (change(ck) returns the object to save)."
    def setup(s):
        torch.save(change(s.checkpoint()), s.d / name)
    return setup


def _load_model(name):
    def call(d):
        load_model(d / name)
    return call

def _load_weights(change_model, change_state=lambda s: s):
    "A call: the tiny run's weights (copied to d/run), changed by `change_state`, into `change_model(config)`."
    def call(d):
        ck = torch.load(d / "run" / "last.pt", weights_only=True)
        cfg = TrainConfig.from_dict(ck["config"])
        load_weights(change_model(cfg), change_state(ck["model"]), "last.pt", ck["model_info"])
    return call

def _bm(model=None, classes=10, **kw):
    def make(cfg):
        c = TrainConfig.from_dict({**cfg.to_dict(), **({"model": model, "model_kwargs": {}} if model else {}), **kw})
        return build_model(c, classes, (1, 28, 28))
    return make

def _teacher_classes(ck):
    "The tiny checkpoint cut down to a 3-class model."
    ck["model"]["head.weight"], ck["model"]["head.bias"] = ck["model"]["head.weight"][:3], ck["model"]["head.bias"][:3]
    ck["model_info"] = {**ck["model_info"], "num_classes": 3, "classes": ck["model_info"]["classes"][:3]}
    return ck

def _teacher_digits(ck):
    "A valid checkpoint of an MLP trained on 8x8 digits (same 10 classes as Fashion-MNIST, other image size)."
    cfg = TrainConfig.from_dict({**ck["config"], "dataset": "digits"})
    torch.manual_seed(0)
    ck["model"] = build_model(cfg, 10, (1, 8, 8)).state_dict()
    ck["config"] = cfg.to_dict()
    ck["model_info"] = {**ck["model_info"], "input_shape": [1, 8, 8], "classes": [str(i) for i in range(10)]}
    return ck

def _hold_lock(s):
    "setup: the run directory is in use (its lock held, as by a running training process) until the case ends."
    copy_run(s.tiny, s.d / "run")
    s.finalizers.append(RunLock(s.d / "run").acquire().release)


def _foreign_dir(s):
    (s.d / "photos").mkdir()
    (s.d / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")


def _not_writable_parent(s):
    (s.d / "a_file").write_text("not a directory\n")

def _bad_json(s):
    (s.d / "config.json").write_text('{"epochs": 3,}\n')

def _config_from_json(name):
    def call(d):
        TrainConfig.from_json(d / name)
    return call


def _load_metrics(d):
    load_metrics(d)

def _config(**kw):
    def call(d):
        get_config("fmnist-tiny", **kw)
    return call


def _from_dict(dd):
    def call(d):
        TrainConfig.from_dict(dd)
    return call

def _preset(d):
    get_config("cifar11")


def _newer(checkpoint): return {**checkpoint, "format_version": 99}


def _missing_key(checkpoint):
    "The checkpoint without one of its tensors."
    del checkpoint["model"]["head.bias"]
    return checkpoint


def _truncated_last(s):
    "setup: a copy of the tiny run whose last.pt lost its last 40 %."
    copy_run(s.tiny, s.d / "run")
    _truncate(s.d / "run" / "last.pt", 0.6)

CASES += [
    Case("preset-unknown", "training", "get_config('cifar11')", _preset, error=InputError,
         words=("cifar11", "fmnist-tiny")),
    Case("setting-typo", "training", "a setting named lr_rate", _from_dict({"lr_rate": 0.1}), error=InputError,
         words=("lr_rate",)),
    Case("setting-wrong-type", "training", "epochs='ten'", _from_dict({"epochs": "ten"}), error=InputError,
         words=("epochs",)),
    Case("loss-unknown", "training", "loss='madry'", _config(loss="madry"), error=InputError,
         words=("madry", "standard, pgd, trades")),
    Case("config-eps-255-units", "training", "a config with eps=8 (meant 8/255)", _config(eps=8), error=InputError,
         words=("eps=8",)),
    Case("config-epochs-zero", "training", "epochs=0", _config(epochs=0), error=InputError,
         words=("epochs",)),
    Case("config-lr-negative", "training", "lr=-0.1", _config(lr=-0.1), error=InputError, words=("lr", "> 0")),
    Case("config-kd-without-teacher", "training", "kd='teacher' without a teacher checkpoint", _config(kd="teacher"),
         error=InputError, words=("kd='teacher'", "kd_teacher=PATH")),
    Case("config-json-invalid", "training", "a config file with a trailing comma", _config_from_json("config.json"),
         setup=_bad_json, error=InputError, words=("not valid JSON", "fix the file")),
    Case("config-json-missing", "training", "a config file that does not exist", _config_from_json("nope.json"),
         error=InputError, words=("config.json",)),
    Case("train-dataset-unknown", "training", "train on dataset='mnist'", _train({"dataset": "mnist"}),
         error=InputError),
    Case("train-cifar-missing", "training", "train on CIFAR-10 with data_root pointing nowhere",
         _train({"dataset": "cifar10", "data_root": "/nonexistent/cifar", "model": "small_cnn", "model_kwargs": {}}),
         error=DataError),
    Case("train-val-size-too-big", "training", "val_size larger than the training split", _train({"val_size": 10**6}),
         error=InputError, words=("val_size=1000000", "lower it")),
    Case("train-resume-and-overwrite", "training", "resume=True together with overwrite=True",
         _train(resume=True, overwrite=True), setup=_with_run(), error=InputError,
         words=("resume", "overwrite", "exclude")),
    Case("train-into-existing-run", "training", "a new run into a directory that holds one", _train(),
         setup=_with_run(), error=RunDirError, words=("resume", "overwrite")),
    Case("train-into-foreign-dir", "training", "a run into a directory holding other files", _train(out="photos"),
         setup=_foreign_dir,
         error=RunDirError, words=("not a crossclass run", "new or empty directory")),
    Case("train-dir-not-creatable", "training", "an output directory below a file", _train(out="a_file/run"),
         setup=_not_writable_parent, error=RunDirError, words=("cannot create", "writable directory")),
    Case("train-dir-in-use", "training", "a second training on a run directory in use", _train(False, resume=True),
         setup=_hold_lock, error=RunDirError, words=("wait", "another output directory")),
    Case("resume-other-config", "training", "resume with lr=0.2 instead of the run's 0.05",
         _train({"lr": 0.2}, resume=True),
         setup=_with_run(), error=RunDirError, words=("lr", "own config")),
    Case("resume-fewer-epochs", "training", "resume a 2-epoch run asking for epochs=1",
         _train({"epochs": 1}, resume=True),
         setup=_with_run(), error=InputError, words=("already has 2 epochs", "more epochs")),
    Case("resume-truncated-checkpoint", "training", "resume from a truncated last.pt", _train(False, resume=True),
         setup=_truncated_last, error=CheckpointError, words=("another checkpoint",)),
    Case("resume-newer-checkpoint", "training", "resume from a checkpoint of a newer format",
         _train(False, resume=True),
         setup=_with_run(lambda s: torch.save(_newer(s.checkpoint()), s.d / "run" / "last.pt")),
         error=CheckpointError),
    Case("checkpoint-missing", "training", "load_model of a path that does not exist", _load_model("nope.pt"),
         error=CheckpointError),
    Case("checkpoint-plain-state-dict", "training", "load_model of a bare state_dict",
         _load_model("weights.pt"), setup=_save_ck("weights.pt", lambda ck: ck["model"]), error=CheckpointError,
         words=("last.pt",)),
    Case("checkpoint-newer-format", "training", "load_model of a checkpoint from a newer version",
         _load_model("newer.pt"), setup=_save_ck("newer.pt", _newer), error=CheckpointError,
         words=("upgrade",)),
    Case("checkpoint-missing-keys", "training", "a checkpoint whose weights lack head.bias", _load_model("damaged.pt"),
         setup=_save_ck("damaged.pt", _missing_key), error=CheckpointError, words=("head.bias",)),
    Case("checkpoint-other-class-count", "training", "10-class weights into a 5-class model",
         _load_weights(_bm(classes=5)), setup=_with_run(), error=CheckpointError, words=("load_model",)),
    Case("checkpoint-other-architecture", "training", "MLP weights into a small CNN",
         _load_weights(_bm(model="small_cnn")), setup=_with_run(), error=CheckpointError),
    Case("checkpoint-extra-keys", "training", "weights with an extra tensor",
         _load_weights(_bm(), lambda s: {**s, "head.extra": torch.zeros(1)}), setup=_with_run(),
         error=CheckpointError,
         words=("unexpected weights", "head.extra")),
    Case("teacher-missing", "training", "kd_teacher pointing to no file",
         _train({"kd": "teacher", "kd_teacher": "/nonexistent/teacher.pt"}), error=CheckpointError),
    Case("teacher-other-class-count", "training", "a 3-class teacher for 10-class data",
         lambda d: _train({"kd": "teacher", "kd_teacher": str(d / "teacher.pt")})(d),
         setup=_save_ck("teacher.pt", _teacher_classes), error=CheckpointError, words=("same dataset",)),
    Case("teacher-other-image-size", "training", "a teacher trained on 8x8 digits for 28x28 Fashion-MNIST",
         lambda d: _train({"kd": "teacher", "kd_teacher": str(d / "teacher.pt")})(d),
         setup=_save_ck("teacher.pt", _teacher_digits), error=CheckpointError,
         words=(("8, 8", "8 x 8", "8x8"), ("28, 28", "28 x 28", "28x28"), "same dataset")),
    Case("metrics-not-a-run", "training", "load_metrics of a directory that is not a run", _load_metrics,
         error=RunDirError, words=("run directory",)),
]

# ---------------------------------------------------------------------------------------------- the command line


def _notes(s):
    (s.d / "notes.txt").write_text("not a checkpoint\n")


def _digits_ckpt(s):
    copy_run(s.tiny, s.d / "run")
    torch.save(_teacher_digits(s.checkpoint()), s.d / "digits.pt")


def _cli(*args):
    "argv(d): the arguments, with '{d}' in each replaced by the sandbox directory."
    return lambda d: [str(a).replace("{d}", str(d)) for a in args]

CASES += [
    Case("cli-unknown-command", "cli", "crossclass trian (typo)", argv=_cli("trian")),
    Case("cli-train-nothing", "cli", "crossclass train with no preset, config or run", argv=_cli("train")),
    Case("cli-train-unknown-preset", "cli", "--preset cifar11 (and no --out: the default directory is relative)",
         argv=_cli("train", "--preset", "cifar11")),
    Case("cli-train-epochs-not-a-number", "cli", "--epochs ten",
         argv=_cli("train", "--preset", "fmnist-tiny", "--epochs", "ten", "--out", "{d}/run")),
    Case("cli-train-eps-255-units", "cli", "--eps 8 (meant 8/255)",
         argv=_cli("train", "--preset", "fmnist-tiny", "--eps", "8", "--out", "{d}/run")),
    Case("cli-train-eps-negative", "cli", "--eps -1", argv=_cli("train", "--preset", "fmnist-tiny", "--eps", "-1")),
    Case("cli-train-loss-unknown", "cli", "--loss madry",
         argv=_cli("train", "--preset", "fmnist-tiny", "--loss", "madry")),
    Case("cli-train-epochs-zero", "cli", "--set epochs=0",
         argv=_cli("train", "--preset", "fmnist-tiny", "--set", "epochs=0")),
    Case("cli-train-set-typo", "cli", "--set lr_rate=0.1",
         argv=_cli("train", "--preset", "fmnist-tiny", "--set", "lr_rate=0.1", "--out", "{d}/run")),
    Case("cli-train-set-without-value", "cli", "--set label_smoothing",
         argv=_cli("train", "--preset", "fmnist-tiny", "--set", "label_smoothing", "--out", "{d}/run")),
    Case("cli-train-resume-and-overwrite", "cli", "--resume DIR --overwrite", setup=_with_run(),
         argv=_cli("train", "--resume", "{d}/run", "--overwrite")),
    Case("cli-train-resume-other-out", "cli", "--resume DIR --out OTHER", setup=_with_run(),
         argv=_cli("train", "--resume", "{d}/run", "--out", "{d}/other")),
    Case("cli-train-existing-run", "cli", "a new run into a directory that holds one", setup=_with_run(),
         argv=_cli("train", "--preset", "fmnist-tiny", "--out", "{d}/run")),
    Case("cli-train-resume-nothing", "cli", "--resume of an empty directory", setup=lambda s: (s.d / "empty").mkdir(),
         argv=_cli("train", "--resume", "{d}/empty")),
    Case("cli-train-resume-missing-dir", "cli", "--resume of a directory that does not exist",
         argv=_cli("train", "--resume", "{d}/nothing")),
    Case("cli-train-config-missing", "cli", "--config of a file that does not exist",
         argv=_cli("train", "--config", "{d}/nope.json", "--out", "{d}/run")),
    Case("cli-train-config-invalid", "cli", "--config of a file with a JSON error", setup=_bad_json,
         argv=_cli("train", "--config", "{d}/config.json", "--out", "{d}/run")),
    Case("cli-train-in-use", "cli", "--resume of a run directory another process is training", setup=_hold_lock,
         argv=_cli("train", "--resume", "{d}/run")),
    Case("cli-train-no-cuda", "cli", "--device cuda on a machine without one",
         argv=_cli("train", "--preset", "fmnist-tiny", "--device", "cuda", "--out", "{d}/run"),
         skip=lambda: "this machine has CUDA" if torch.cuda.is_available() else None),
    Case("cli-eval-missing", "cli", "crossclass eval of a file that does not exist", argv=_cli("eval", "{d}/nope.pt")),
    Case("cli-eval-not-a-checkpoint", "cli", "crossclass eval of a text file", setup=_notes,
         argv=_cli("eval", "{d}/notes.txt"),
         words=("notes.txt", ("not a torch checkpoint", "not a readable checkpoint"), ".pt")),
    Case("cli-eval-truncated", "cli", "crossclass eval of a truncated checkpoint", setup=_truncated_last,
         argv=_cli("eval", "{d}/run/last.pt"), words=("best.pt",)),
    Case("cli-eval-dir-without-best", "cli", "crossclass eval of a directory without best.pt",
         setup=lambda s: (s.d / "empty").mkdir(), argv=_cli("eval", "{d}/empty"), words=("best.pt",)),
    Case("cli-eval-eps-typo", "cli", "crossclass eval --eps 8//255", setup=_with_run(),
         argv=_cli("eval", "{d}/run/best.pt", "--eps", "8//255")),
    Case("cli-eval-batch-size-zero", "cli", "crossclass eval --batch-size 0", setup=_with_run(),
         argv=_cli("eval", "{d}/run/best.pt", "--batch-size", "0")),
    Case("cli-eval-unknown-autoattack", "cli", "crossclass eval --autoattack fast", setup=_with_run(),
         argv=_cli("eval", "{d}/run/best.pt", "--autoattack", "fast")),
    Case("cli-cas-missing", "cli", "crossclass cas of a file that does not exist", argv=_cli("cas", "{d}/nope.pt")),
    Case("cli-cas-not-a-checkpoint", "cli", "crossclass cas of a text file", setup=_notes,
         argv=_cli("cas", "{d}/notes.txt")),
    Case("cli-cas-no-model", "cli", "crossclass cas with no model at all", argv=_cli("cas")),
    Case("cli-cas-same-checkpoint-twice", "cli", "crossclass cas with the same checkpoint twice", setup=_with_run(),
         argv=_cli("cas", "{d}/run/best.pt", "{d}/run/best.pt")),
    Case("cli-cas-different-datasets", "cli", "crossclass cas of a Fashion-MNIST and a digits checkpoint",
         setup=_digits_ckpt, argv=_cli("cas", "{d}/run/best.pt", "{d}/digits.pt", "--n", "20", "--out", "{d}/cas")),
]

# ------------------------------------------------------------------------------- models of your own, the extras


def _hide_module(name: str, then=None):
    "setup: `import name` fails, as on an installation without that optional extra (until the test ends)."
    def setup(s):
        if then: then(s)
        s.monkeypatch.setitem(sys.modules, name, None)
    return setup


def _user_module(source: str, then=None):
    "setup: a module `crossclass_case_nets` with `source`, importable from a folder outside the sandbox."
    def setup(s):
        if then: then(s)
        (s.outside / "crossclass_case_nets.py").write_text(source)
        s.monkeypatch.syspath_prepend(str(s.outside))
        s.finalizers.append(lambda: sys.modules.pop("crossclass_case_nets", None))
    return setup


def _weights(make):
    "setup: the small CIFAR-10 folder, and `make()` saved as d/W.pt."
    def setup(s):
        _cifar_setup()(s)
        torch.manual_seed(0)
        torch.save(make(), s.d / "W.pt")
    return setup


def _resnet18_state(classes: int):
    import torchvision
    return lambda: torchvision.models.resnet18(num_classes=classes).state_dict()


_ON_CIFAR = ("--dataset", "cifar10", "--data-root", "{d}/cifar", "--n", "0")

CASES += [
    Case("cli-cas-arch-unknown", "cli", "crossclass cas --arch torchvision:resnet99 (no such network)",
         setup=_cifar_setup(), argv=_cli("cas", "--arch", "torchvision:resnet99", *_ON_CIFAR),
         words=("resnet99", ("close names", "list of models"))),
    Case("cli-cas-arch-no-source", "cli", "crossclass cas --arch resnet18 (without torchvision:)", setup=_cifar_setup(),
         argv=_cli("cas", "--arch", "resnet18", *_ON_CIFAR)),
    Case("cli-cas-arch-not-a-module", "cli", "--arch mymodule:make where make returns a string, not a network",
         setup=_user_module("def make(num_classes=10):\n    return 'a network'\n", then=_cifar_setup()),
         argv=_cli("cas", "--arch", "crossclass_case_nets:make", *_ON_CIFAR), words=("returned a str",)),
    Case("cli-cas-weights-do-not-fit", "cli", "--weights of a 3-class ResNet-18 for the 10 classes of CIFAR-10",
         setup=_weights(_resnet18_state(3)), argv=_cli("cas", "--arch", "torchvision:resnet18", "--weights", "{d}/W.pt",
                                                        *_ON_CIFAR), words=("number of classes",)),
    Case("cli-cas-weights-pickled-module", "cli", "--weights of a whole pickled module (torch.save(model, path))",
         setup=_weights(lambda: nn.Linear(2, 2)),
         argv=_cli("cas", "--arch", "torchvision:resnet18", "--weights", "{d}/W.pt", *_ON_CIFAR),
         words=("W.pt",)),
    Case("cli-cas-arch-without-dataset", "cli", "crossclass cas --arch without --dataset",
         argv=_cli("cas", "--arch", "torchvision:resnet18")),
    Case("cli-eval-weights-without-arch", "cli", "crossclass eval of a run with --weights (which go with --arch)",
         setup=_weights(_resnet18_state(10)), argv=_cli("eval", "{d}/run", "--weights", "{d}/W.pt")),
    Case("cli-cas-two-sources", "cli", "crossclass cas of a run directory and --arch at once", setup=_with_run(),
         argv=_cli("cas", "{d}/run", "--arch", "torchvision:resnet18")),
    Case("cli-cas-robustbench-without-extra", "cli", "crossclass cas --robustbench without the [zoo] extra",
         setup=_hide_module("robustbench", then=_cifar_setup()),
         argv=_cli("cas", "--robustbench", "Standard", "--data-root", "{d}/cifar", "--n", "0"),
         words=("robustbench", ".[zoo]")),
    Case("cli-eval-autoattack-without-extra", "cli", "crossclass eval --autoattack cheap without the [eval] extra",
         setup=_hide_module("torchattacks", then=_with_run()), argv=_cli("eval", "{d}/run", "--autoattack", "cheap")),
]
