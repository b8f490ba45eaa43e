"""The bad-input catalogue: what a user can get wrong, and what the package must answer.

Each `Case` is one mistake a user can make (a typo, 0..255 pixels, a truncated checkpoint, a directory that already
holds a run, ...). Running it must raise an error of the package's own family (`CrossclassError`), or, on the command
line, print one line on stderr and exit with code 2, and the message must contain its `words`: the problem and the
fix. Nothing on disk may change (`snapshot` before and after).

Shared by `tests/test_bad_input.py` (one pytest case each) and `nbs/10_what_happens_when.ipynb` (the table).
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import os
import shutil
import stat
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from unittest import mock

import numpy as np
import torch
import torch.nn as nn

from crossclass_nb import core, data
from crossclass_nb.attacks import PGD, accuracy, autoattack_accuracy, pgd
from crossclass_nb.attribution import attribution_report, cas, class_attributions, similarity_matrix
from crossclass_nb.core import (CheckpointError, CrossclassError, DataError, InputError, RunDirError, get_device,
                                parse_number, safe_load, set_seed)
from crossclass_nb.data import Dataset, TensorLoader, load_dataset, make_fake_cifar, stratified_subset, \
    train_val_split, write_idx
from crossclass_nb.models import get_model

# --------------------------------------------------------------------------------------------------- disk snapshots

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
    out += [f"changed {k}: {before[k]} -> {after[k]}" for k in sorted(before.keys() & after.keys()) if before[k] != after[k]]
    return out

# ------------------------------------------------------------------------------------------- shared small objects

# a run small enough to train in a couple of seconds on one CPU thread, big enough to hold every file a run writes
TINY = dict(train_size=100, val_size=50, test_size=50, batch_size=25, epochs=2, eval_steps=2, figures=False)

_TINY_RUN: list[Path] = []


def tiny_run() -> Path:
    "A finished 2-epoch run of the tiny preset, trained once per process (read-only: cases copy from it)."
    if not _TINY_RUN:
        from crossclass_nb.training import get_config, train
        d = Path(tempfile.mkdtemp(prefix="crossclass_tiny_")) / "run"
        train(get_config("fmnist-tiny", **TINY), d, quiet=True)
        _TINY_RUN.append(d)
    return _TINY_RUN[0]


def copy_run(dst: Path) -> Path:
    "A copy of the tiny run at `dst` (timestamps kept)."
    shutil.copytree(tiny_run(), dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def tiny_checkpoint() -> dict:
    "The tiny run's last.pt, loaded (a fresh copy each call)."
    return torch.load(tiny_run() / "last.pt", weights_only=True)


def mlp(num_classes: int = 10):
    torch.manual_seed(0)
    return get_model("mlp", num_classes, 1, input_shape=(1, 28, 28), hidden=(16,)).eval()


def batch(n: int = 4, c: int = 1, size: int = 28):
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

# ------------------------------------------------------------------------------------------------------ the cases

@dataclass
class Case:
    "One user mistake and what must come back."
    id: str # short name, the pytest id
    area: str # which part of the package
    what: str # what the user did, in words
    call: Callable | None = None # call(d): does the wrong thing in the sandbox directory d (API cases)
    argv: Callable | None = None # argv(d) -> list of str (command-line cases)
    error: type = CrossclassError # the exception class expected (API cases)
    words: tuple = () # each a word the message must contain, or a tuple of alternatives (case-insensitive)
    setup: Callable | None = None # setup(d) prepares files; may return a cleanup called after the disk is compared
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


def run_cli(argv: list[str]) -> Outcome:
    "Run `crossclass ARGV` in this process, capturing the exit code, stdout and stderr."
    from crossclass_nb.cli import main
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try: code = main([str(a) for a in argv])
        except SystemExit as e: code = e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    return Outcome(code=code, stderr=err.getvalue(), stdout=out.getvalue())


def run_case(case: Case, d: Path) -> Outcome:
    "Run `case` in the prepared sandbox `d`."
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
        lines = [l for l in res.stderr.splitlines() if l.strip()]
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

# ---- attacks


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
    def call(d):
        x, y = batch()
        pgd(mlp(), x, f(y), 0.1, 0.025, 2)
    return call


CASES: list[Case] = [
    Case("pgd-eps-negative", "attacks", "pgd with eps=-0.1", _pgd(eps=-0.1), error=InputError, words=("eps", ">= 0")),
    Case("pgd-eps-nan", "attacks", "pgd with eps=NaN", _pgd(eps=float("nan")), error=InputError,
         words=("eps", "finite number")),
    Case("pgd-eps-in-255-units", "attacks", "pgd with eps=8 (meant 8/255)", _pgd(eps=8), error=InputError,
         words=("eps=8", "[0, 1]", "8/255")),
    Case("pgd-l2-eps-huge", "attacks", "l2 pgd with eps=100 on 28x28 images", _pgd(eps=100, norm="l2"),
         error=InputError, words=("eps=100", "exceeds", "128/255")),
    Case("pgd-alpha-zero", "attacks", "pgd with alpha=0", _pgd(alpha=0), error=InputError,
         words=("alpha", "> 0", "eps/4")),
    Case("pgd-alpha-inf", "attacks", "pgd with alpha=inf", _pgd(alpha=float("inf")), error=InputError,
         words=("alpha", "finite number")),
    Case("pgd-steps-negative", "attacks", "pgd with steps=-5", _pgd(steps=-5), error=InputError,
         words=("steps", "non-negative integer")),
    Case("pgd-steps-fraction", "attacks", "pgd with steps=2.5", _pgd(steps=2.5), error=InputError,
         words=("steps", "integer", "2.5")),
    Case("pgd-unknown-norm", "attacks", "PGD with norm='L2' (capital L)", lambda d: PGD(8 / 255, norm="L2"),
         error=InputError, words=("'L2'", "linf, l2")),
    Case("pgd-eps-text-typo", "attacks", "PGD with eps='8//255'", lambda d: PGD("8//255"), error=InputError,
         words=("8//255", "8/255")),
    Case("pgd-pixels-0-255", "attacks", "images with pixels in 0..255", _x(lambda x: x * 255), error=InputError,
         words=("[0, 1]", "divide", "255")),
    Case("pgd-uint8-images", "attacks", "uint8 images", _x(lambda x: (x * 255).to(torch.uint8)), error=InputError,
         words=("uint8", "float", "/255")),
    Case("pgd-float64-images", "attacks", "float64 images (NumPy's default) on a float32 model",
         _x(lambda x: x.double()), error=InputError, words=(("float64", "double"), ("x.float()", ".float()"))),
    Case("pgd-nan-pixels", "attacks", "images containing NaN", _x(lambda x: x.index_fill(0, torch.tensor([1]), float("nan"))),
         error=InputError, words=("NaN", ("nan_to_num", "check the data", "clean", "preprocessing", "remove"))),
    Case("pgd-no-batch-dim", "attacks", "one image without its batch dimension (C x H x W)",
         lambda d: pgd(mlp(), batch()[0][0], batch()[1][:1], 0.1, 0.025, 2), error=InputError,
         words=("N x 1 x H x W", "(1, 28, 28)")),
    Case("pgd-wrong-channels", "attacks", "colour images for a grey-scale model", _x(lambda x: x.expand(-1, 3, -1, -1)),
         error=InputError, words=("N x 1 x H x W", "in_channels")),
    Case("mlp-wrong-image-size", "models", "32x32 images for an MLP built for 28x28",
         lambda d: mlp()(torch.rand(2, 1, 32, 32)), error=InputError,
         words=(("32", "1024"), ("28", "784"), ("input_shape", "image size", "get_model"))),
    Case("pgd-labels-out-of-range", "attacks", "labels 8..11 for a 10-class model", _y(lambda y: y + 8),
         error=InputError, words=("labels", "[0, 9]")),
    Case("pgd-float-labels", "attacks", "labels as floats", _y(lambda y: y.float()), error=InputError,
         words=("integer", "class indices")),
    Case("pgd-one-hot-labels", "attacks", "one-hot labels (N x K)", _y(lambda y: nn.functional.one_hot(y, 10)),
         error=InputError, words=("1-d", "class indices")),
    Case("pgd-labels-count", "attacks", "4 images but 2 labels", _y(lambda y: y[:2]), error=InputError,
         words=("4 examples", "2 labels")),
    Case("accuracy-batch-size-zero", "attacks", "accuracy with batch_size=0",
         lambda d: accuracy(mlp(), *batch(), batch_size=0), error=InputError, words=("batch_size", "positive integer")),
    Case("autoattack-unknown-version", "attacks", "autoattack_accuracy with version='fast'",
         lambda d: autoattack_accuracy(mlp(), *batch(), eps=0.1, version="fast"), error=InputError,
         words=("'fast'", "standard, cheap")),
    # ---- models
    Case("model-unknown", "models", "get_model('resnet50')", lambda d: get_model("resnet50"), error=InputError,
         words=("resnet50", "choose one of", "preact_resnet18")),
    Case("model-zero-classes", "models", "get_model with num_classes=0", lambda d: get_model("small_cnn", 0),
         error=InputError, words=("num_classes", "positive integer")),
    Case("model-unknown-option", "models", "small_cnn with hidden_size=64 (the option is hidden)",
         lambda d: get_model("small_cnn", 10, 1, hidden_size=64), error=InputError, words=("hidden_size", "options are", "hidden")),
    Case("model-std-zero", "models", "normalisation with std=0", lambda d: get_model("small_cnn", 10, 1, std=0),
         error=InputError, words=("std", "positive")),
    # ---- attribution
    Case("attribution-model-softmax-output", "attribution", "a model whose output is a softmax, not a linear layer's",
         lambda d: class_attributions(SoftmaxOut(), *batch(10)), error=InputError,
         words=(("softmax", "not the output of any nn.Linear"), "head=")),
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
         words=("NaN", "recompute")),
    Case("cas-not-square", "attribution", "cas of a 3 x 4 matrix", lambda d: cas(torch.zeros(3, 4)), error=InputError,
         words=("square", "(3, 4)")),
    Case("report-class-names", "attribution", "3 class names for a 10-class model",
         lambda d: attribution_report(mlp(), batch(), classes=["a", "b", "c"]), error=InputError,
         words=("3 class names", "10 classes")),
    # ---- core
    Case("parse-number-typo", "core", "the number '8//255'", lambda d: parse_number("8//255"), error=InputError,
         words=("8//255", "8/255")),
    Case("device-unknown", "core", "device 'gpu'", lambda d: get_device("gpu"), error=InputError,
         words=("'gpu'", "'cpu'", "'cuda'")),
    Case("device-cuda-missing", "core", "device 'cuda' on a machine without one", lambda d: get_device("cuda"),
         error=InputError, words=("CUDA is not available", "device='cpu'"),
         skip=lambda: "this machine has CUDA" if torch.cuda.is_available() else None),
    Case("seed-negative", "core", "seed -1", lambda d: set_seed(-1), error=InputError,
         words=("seed", "non-negative integer")),
    Case("load-missing-file", "core", "safe_load of a file that does not exist", lambda d: safe_load(d / "nope.pt"),
         error=CheckpointError, words=("no checkpoint", "check the path")),
]

# ---- data


def _truncate(p: Path, keep: float = 0.5):
    b = p.read_bytes(); p.write_bytes(b[:int(len(b) * keep)])


def _fashion_setup(corrupt):
    def setup(d):
        write_fashion(d / "fm")
        corrupt(d / "fm")
    return setup


def _load_fashion(d):
    with no_system_data(): load_dataset("fashion_mnist", root=d / "fm")


def _cifar_setup(corrupt=None):
    def setup(d):
        folder = make_fake_cifar(d / "cifar", n_train=20, n_test=10)
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
    Case("dataset-unknown", "data", "load_dataset('mnist')", lambda d: load_dataset("mnist"), error=InputError,
         words=("mnist", "choose one of", "fashion_mnist")),
    Case("fashion-missing", "data", "Fashion-MNIST not installed, root points nowhere",
         lambda d: _load_fashion(d), error=DataError, words=("not found", "apt-get install", "root=")),
    Case("fashion-truncated-idx", "data", "a truncated IDX image file", _load_fashion,
         setup=_fashion_setup(lambda f: _truncate(f / "train-images-idx3-ubyte")), error=DataError,
         words=("truncated", "replace it")),
    Case("fashion-wrong-magic", "data", "the images file copied over the labels file", _load_fashion,
         setup=_fashion_setup(lambda f: shutil.copy(f / "train-images-idx3-ubyte", f / "train-labels-idx1-ubyte")),
         error=DataError, words=("wrong magic number", "replace it")),
    Case("fashion-broken-gzip", "data", "a half-downloaded .gz file", _load_fashion, setup=_fashion_setup(_gzip_cut),
         error=DataError, words=("not a valid gzip", "replace it")),
    Case("fashion-labels-missing", "data", "the images file without its labels file", _load_fashion,
         setup=_fashion_setup(lambda f: (f / "train-labels-idx1-ubyte").unlink()), error=DataError,
         words=("train-labels-idx1-ubyte", "copy the missing file")),
    Case("cifar-dir-missing", "data", "CIFAR-10 from a directory that does not exist",
         _load_cifar, error=DataError,
         words=("CIFAR-10 not found", "root=DIR", "download")),
    Case("cifar-dir-empty", "data", "CIFAR-10 from an empty directory", _load_cifar,
         setup=lambda d: (d / "cifar").mkdir(), error=DataError, words=("not found", "extract it")),
    Case("cifar-truncated", "data", "a truncated CIFAR batch file", _load_cifar,
         setup=_cifar_setup(lambda f: _truncate(f / "data_batch_1")), error=DataError,
         words=("truncated", "extract")),
    Case("cifar-wrong-file", "data", "an IDX file in place of a CIFAR batch", _load_cifar,
         setup=_cifar_setup(lambda f: write_idx(f / "data_batch_2", np.zeros((3, 4), np.uint8))), error=DataError,
         words=("not a readable pickle", "extract")),
    Case("cifar-batch-missing", "data", "a CIFAR folder without data_batch_3", _load_cifar,
         setup=_cifar_setup(lambda f: (f / "data_batch_3").unlink()), error=DataError,
         words=("no data_batch_3", "extract")),
    Case("dataset-pixels-0-255", "data", "a Dataset built from 0..255 pixels",
         lambda d: Dataset(torch.rand(2, 1, 4, 4) * 255, torch.tensor([0, 1]), ["a", "b"]), error=InputError,
         words=("[0, 1]", "divide", "255")),
    Case("dataset-labels-out-of-range", "data", "a label 5 with two class names",
         lambda d: Dataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 5]), ["a", "b"]), error=InputError,
         words=("labels", "0..1")),
    Case("dataset-empty", "data", "a balanced subset of an empty dataset", lambda d: stratified_subset(_EMPTY, 2),
         error=InputError, words=("empty", ("at least one", "non-empty", "check the", "pass data", "load"))),
    Case("subset-class-without-examples", "data", "a balanced subset when a class has no examples",
         lambda d: stratified_subset(Dataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 0, 2, 2]), ["a", "b", "c"]), 3),
         error=InputError, words=("class 1", "no examples", "at most")),
    Case("split-fraction", "data", "val_size=1.5", lambda d: train_val_split(
        Dataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]), ["a", "b"]), 1.5), error=InputError,
         words=("val_size", "(0, 1)")),
    Case("loader-batch-size-zero", "data", "TensorLoader with batch_size=0",
         lambda d: TensorLoader(Dataset(torch.rand(4, 1, 4, 4), torch.tensor([0, 1, 0, 1]), ["a", "b"]), 0, device="cpu"),
         error=InputError, words=("batch_size", "integer >= 1")),
]

# ---- configs, runs and checkpoints


def _cfg(**kw):
    from crossclass_nb.training import get_config
    return get_config("fmnist-tiny", **{**TINY, **kw})


def _train(cfg_kw=None, out="run", **kw):
    def call(d):
        from crossclass_nb.training import train
        train(_cfg(**(cfg_kw or {})) if cfg_kw is not False else None, d / out, quiet=True, **kw)
    return call


def _with_run(extra=None):
    def setup(d):
        copy_run(d / "run")
        if extra: return extra(d)
    return setup


def _save_ck(name: str, change):
    "setup: a modified copy of the tiny checkpoint at d/name (change(ck) returns the object to save)."
    def setup(d):
        torch.save(change(tiny_checkpoint()), d / name)
    return setup


def _load_model(name):
    def call(d):
        from crossclass_nb.training import load_model
        load_model(d / name)
    return call


def _load_weights(change_model, change_state=lambda s: s):
    def call(d):
        from crossclass_nb.training import build_model, load_weights
        ck = tiny_checkpoint()
        from crossclass_nb.training import TrainConfig
        cfg = TrainConfig.from_dict(ck["config"])
        load_weights(change_model(cfg), change_state(ck["model"]), "last.pt", ck["model_info"])
    return call


def _bm(model=None, classes=10, **kw):
    def make(cfg):
        from crossclass_nb.training import TrainConfig, build_model
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
    from crossclass_nb.training import TrainConfig, build_model
    cfg = TrainConfig.from_dict({**ck["config"], "dataset": "digits"})
    torch.manual_seed(0)
    ck["model"] = build_model(cfg, 10, (1, 8, 8)).state_dict()
    ck["config"] = cfg.to_dict()
    ck["model_info"] = {**ck["model_info"], "input_shape": [1, 8, 8], "classes": [str(i) for i in range(10)]}
    return ck


def _hold_lock(d):
    "setup: the run directory is in use (its lock held, as by a running training process); cleanup releases it."
    from crossclass_nb.training import RunLock
    copy_run(d / "run")
    lock = RunLock(d / "run").acquire()
    return lock.release


def _foreign_dir(d):
    (d / "photos").mkdir()
    (d / "photos" / "cat.jpg").write_bytes(b"\xff\xd8\xff")


def _not_writable_parent(d):
    (d / "a_file").write_text("not a directory\n")


def _bad_json(d):
    (d / "config.json").write_text('{"epochs": 3,}\n')


def _config_from_json(name):
    def call(d):
        from crossclass_nb.training import TrainConfig
        TrainConfig.from_json(d / name)
    return call


def _load_metrics(d):
    from crossclass_nb.training import load_metrics
    load_metrics(d)


def _config(**kw):
    def call(d):
        from crossclass_nb.training import get_config
        get_config("fmnist-tiny", **kw)
    return call


def _from_dict(dd):
    def call(d):
        from crossclass_nb.training import TrainConfig
        TrainConfig.from_dict(dd)
    return call


def _preset(d):
    from crossclass_nb.training import get_config
    get_config("cifar11")


def _newer(ck): return {**ck, "format_version": 99}


def _missing_key(ck):
    del ck["model"]["head.bias"]; return ck


def _truncated_last(d):
    copy_run(d / "run"); _truncate(d / "run" / "last.pt", 0.6)


CASES += [
    Case("preset-unknown", "training", "get_config('cifar11')", _preset, error=InputError,
         words=("cifar11", "use one of", "fmnist-tiny")),
    Case("setting-typo", "training", "a setting named lr_rate", _from_dict({"lr_rate": 0.1}), error=InputError,
         words=("lr_rate", "did you mean 'lr'")),
    Case("setting-wrong-type", "training", "epochs='ten'", _from_dict({"epochs": "ten"}), error=InputError,
         words=("epochs", "must be int")),
    Case("loss-unknown", "training", "loss='madry'", _config(loss="madry"), error=InputError,
         words=("madry", "standard, pgd, trades")),
    Case("config-eps-255-units", "training", "a config with eps=8 (meant 8/255)", _config(eps=8), error=InputError,
         words=("eps=8", "8/255")),
    Case("config-epochs-zero", "training", "epochs=0", _config(epochs=0), error=InputError,
         words=("epochs", "at least 1")),
    Case("config-lr-negative", "training", "lr=-0.1", _config(lr=-0.1), error=InputError, words=("lr", "> 0")),
    Case("config-kd-without-teacher", "training", "kd='teacher' without a teacher checkpoint", _config(kd="teacher"),
         error=InputError, words=("kd='teacher'", "kd_teacher=PATH")),
    Case("config-json-invalid", "training", "a config file with a trailing comma", _config_from_json("config.json"),
         setup=_bad_json, error=InputError, words=("not valid JSON", "fix the file")),
    Case("config-json-missing", "training", "a config file that does not exist", _config_from_json("nope.json"),
         error=InputError, words=("no config file", "config.json")),
    Case("train-dataset-unknown", "training", "train on dataset='mnist'", _train({"dataset": "mnist"}),
         error=InputError, words=("mnist", "choose one of")),
    Case("train-cifar-missing", "training", "train on CIFAR-10 with data_root pointing nowhere",
         _train({"dataset": "cifar10", "data_root": "/nonexistent/cifar", "model": "small_cnn", "model_kwargs": {}}),
         error=DataError, words=("not found", "--data")),
    Case("train-val-size-too-big", "training", "val_size larger than the training split", _train({"val_size": 10**6}),
         error=InputError, words=("val_size=1000000", "lower it")),
    Case("train-resume-and-overwrite", "training", "resume=True together with overwrite=True",
         _train(resume=True, overwrite=True), setup=_with_run(), error=InputError,
         words=("resume", "overwrite", "exclude")),
    Case("train-into-existing-run", "training", "a new run into a directory that holds one", _train(),
         setup=_with_run(), error=RunDirError, words=("already holds a run", "resume", "overwrite")),
    Case("train-into-foreign-dir", "training", "a run into a directory holding other files", _train(out="photos"),
         setup=_foreign_dir,
         error=RunDirError, words=("not a crossclass run", "new or empty directory")),
    Case("train-dir-not-creatable", "training", "an output directory below a file", _train(out="a_file/run"),
         setup=_not_writable_parent, error=RunDirError, words=("cannot create", "writable directory")),
    Case("train-dir-in-use", "training", "a second training on a run directory in use", _train(False, resume=True),
         setup=_hold_lock, error=RunDirError, words=("in use by another process", "wait", "another output directory")),
    Case("resume-other-config", "training", "resume with lr=0.2 instead of the run's 0.05", _train({"lr": 0.2}, resume=True),
         setup=_with_run(), error=RunDirError, words=("differs", "lr", "own config")),
    Case("resume-fewer-epochs", "training", "resume a 2-epoch run asking for epochs=1", _train({"epochs": 1}, resume=True),
         setup=_with_run(), error=InputError, words=("already has 2 epochs", "more epochs")),
    Case("resume-truncated-checkpoint", "training", "resume from a truncated last.pt", _train(False, resume=True),
         setup=_truncated_last, error=CheckpointError, words=("truncated", "another checkpoint")),
    Case("resume-newer-checkpoint", "training", "resume from a checkpoint of a newer format", _train(False, resume=True),
         setup=_with_run(lambda d: torch.save(_newer(tiny_checkpoint()), d / "run" / "last.pt")),
         error=CheckpointError, words=("newer", "upgrade")),
    Case("checkpoint-missing", "training", "load_model of a path that does not exist", _load_model("nope.pt"),
         error=CheckpointError, words=("no checkpoint", "check the path")),
    Case("checkpoint-plain-state-dict", "training", "load_model of a bare state_dict",
         _load_model("weights.pt"), setup=_save_ck("weights.pt", lambda ck: ck["model"]), error=CheckpointError,
         words=("not a crossclass_nb checkpoint", "last.pt")),
    Case("checkpoint-newer-format", "training", "load_model of a checkpoint from a newer version",
         _load_model("newer.pt"), setup=_save_ck("newer.pt", _newer), error=CheckpointError,
         words=("newer", "upgrade")),
    Case("checkpoint-missing-keys", "training", "a checkpoint whose weights lack head.bias", _load_model("damaged.pt"),
         setup=_save_ck("damaged.pt", _missing_key), error=CheckpointError, words=("missing weights", "head.bias")),
    Case("checkpoint-other-class-count", "training", "10-class weights into a 5-class model",
         _load_weights(_bm(classes=5)), error=CheckpointError, words=("10 classes", "model has 5", "load_model")),
    Case("checkpoint-other-architecture", "training", "MLP weights into a small CNN",
         _load_weights(_bm(model="small_cnn")), error=CheckpointError, words=("another architecture", "load_model")),
    Case("checkpoint-extra-keys", "training", "weights with an extra tensor",
         _load_weights(_bm(), lambda s: {**s, "head.extra": torch.zeros(1)}), error=CheckpointError,
         words=("unexpected weights", "head.extra")),
    Case("teacher-missing", "training", "kd_teacher pointing to no file",
         _train({"kd": "teacher", "kd_teacher": "/nonexistent/teacher.pt"}), error=CheckpointError,
         words=("no checkpoint", "check the path")),
    Case("teacher-other-class-count", "training", "a 3-class teacher for 10-class data",
         lambda d: _train({"kd": "teacher", "kd_teacher": str(d / "teacher.pt")})(d),
         setup=_save_ck("teacher.pt", _teacher_classes), error=CheckpointError, words=("3 classes", "same dataset")),
    Case("teacher-other-image-size", "training", "a teacher trained on 8x8 digits for 28x28 Fashion-MNIST",
         lambda d: _train({"kd": "teacher", "kd_teacher": str(d / "teacher.pt")})(d),
         setup=_save_ck("teacher.pt", _teacher_digits), error=CheckpointError,
         words=(("8, 8", "8 x 8", "8x8"), ("28, 28", "28 x 28", "28x28"), "same dataset")),
    Case("metrics-not-a-run", "training", "load_metrics of a directory that is not a run", _load_metrics,
         error=RunDirError, words=("no metrics.jsonl", "run directory")),
]

# ---- the command line: `crossclass ...` run in-process; exit code 2 and one line on stderr


def _notes(d):
    (d / "notes.txt").write_text("not a checkpoint\n")


def _digits_ckpt(d):
    copy_run(d / "run")
    torch.save(_teacher_digits(tiny_checkpoint()), d / "digits.pt")


def _cli(*args):
    "argv(d): the arguments, with '{d}' in each replaced by the sandbox directory."
    return lambda d: [str(a).replace("{d}", str(d)) for a in args]


CASES += [
    Case("cli-unknown-command", "cli", "crossclass trian (typo)", argv=_cli("trian"), words=("trian", "train")),
    Case("cli-train-nothing", "cli", "crossclass train with no preset, config or run", argv=_cli("train"),
         words=("--preset", "--config", "--resume")),
    Case("cli-train-unknown-preset", "cli", "--preset cifar11", argv=_cli("train", "--preset", "cifar11", "--out", "{d}/run"),
         words=("cifar11", "fmnist-tiny")),
    Case("cli-train-epochs-not-a-number", "cli", "--epochs ten",
         argv=_cli("train", "--preset", "fmnist-tiny", "--epochs", "ten", "--out", "{d}/run"), words=("--epochs", "ten")),
    Case("cli-train-eps-255-units", "cli", "--eps 8 (meant 8/255)",
         argv=_cli("train", "--preset", "fmnist-tiny", "--eps", "8", "--out", "{d}/run"), words=("eps", "8/255")),
    Case("cli-train-set-typo", "cli", "--set lr_rate=0.1",
         argv=_cli("train", "--preset", "fmnist-tiny", "--set", "lr_rate=0.1", "--out", "{d}/run"),
         words=("lr_rate", "did you mean 'lr'")),
    Case("cli-train-set-without-value", "cli", "--set label_smoothing",
         argv=_cli("train", "--preset", "fmnist-tiny", "--set", "label_smoothing", "--out", "{d}/run"),
         words=("KEY=VALUE", "label_smoothing")),
    Case("cli-train-resume-and-overwrite", "cli", "--resume DIR --overwrite", setup=_with_run(),
         argv=_cli("train", "--resume", "{d}/run", "--overwrite"), words=("--resume", "--overwrite", "exclude")),
    Case("cli-train-resume-other-out", "cli", "--resume DIR --out OTHER", setup=_with_run(),
         argv=_cli("train", "--resume", "{d}/run", "--out", "{d}/other"), words=("--out", "--resume", "different")),
    Case("cli-train-existing-run", "cli", "a new run into a directory that holds one", setup=_with_run(),
         argv=_cli("train", "--preset", "fmnist-tiny", "--out", "{d}/run"), words=("already holds a run", "--resume", "--overwrite")),
    Case("cli-train-resume-nothing", "cli", "--resume of an empty directory", setup=lambda d: (d / "empty").mkdir(),
         argv=_cli("train", "--resume", "{d}/empty"), words=("no run to resume", "--preset")),
    Case("cli-train-config-missing", "cli", "--config of a file that does not exist",
         argv=_cli("train", "--config", "{d}/nope.json", "--out", "{d}/run"), words=("no config file", "nope.json")),
    Case("cli-train-config-invalid", "cli", "--config of a file with a JSON error", setup=_bad_json,
         argv=_cli("train", "--config", "{d}/config.json", "--out", "{d}/run"), words=("not valid JSON", "fix the file")),
    Case("cli-train-in-use", "cli", "--resume of a run directory another process is training", setup=_hold_lock,
         argv=_cli("train", "--resume", "{d}/run"), words=("in use by another process", "wait")),
    Case("cli-train-no-cuda", "cli", "--device cuda on a machine without one",
         argv=_cli("train", "--preset", "fmnist-tiny", "--device", "cuda", "--out", "{d}/run"),
         words=("CUDA is not available", "cpu"), skip=lambda: "this machine has CUDA" if torch.cuda.is_available() else None),
    Case("cli-eval-missing", "cli", "crossclass eval of a file that does not exist", argv=_cli("eval", "{d}/nope.pt"),
         words=("no checkpoint", "check the path")),
    Case("cli-eval-not-a-checkpoint", "cli", "crossclass eval of a text file", setup=_notes,
         argv=_cli("eval", "{d}/notes.txt"), words=("notes.txt", ("not a torch checkpoint", "not a readable checkpoint"), ".pt")),
    Case("cli-eval-truncated", "cli", "crossclass eval of a truncated checkpoint", setup=_truncated_last,
         argv=_cli("eval", "{d}/run/last.pt"), words=("truncated", "best.pt")),
    Case("cli-eval-dir-without-best", "cli", "crossclass eval of a directory without best.pt",
         setup=lambda d: (d / "empty").mkdir(), argv=_cli("eval", "{d}/empty"), words=("no checkpoint", "best.pt")),
    Case("cli-eval-eps-typo", "cli", "crossclass eval --eps 8//255", setup=_with_run(),
         argv=_cli("eval", "{d}/run/best.pt", "--eps", "8//255"), words=("8//255", "8/255")),
    Case("cli-eval-batch-size-zero", "cli", "crossclass eval --batch-size 0", setup=_with_run(),
         argv=_cli("eval", "{d}/run/best.pt", "--batch-size", "0"), words=("--batch-size", "at least 1")),
    Case("cli-eval-unknown-autoattack", "cli", "crossclass eval --autoattack fast", setup=_with_run(),
         argv=_cli("eval", "{d}/run/best.pt", "--autoattack", "fast"), words=("fast", "cheap")),
    Case("cli-cas-missing", "cli", "crossclass cas of a file that does not exist", argv=_cli("cas", "{d}/nope.pt"),
         words=("no checkpoint", "check the path")),
    Case("cli-cas-same-checkpoint-twice", "cli", "crossclass cas with the same checkpoint twice", setup=_with_run(),
         argv=_cli("cas", "{d}/run/best.pt", "{d}/run/best.pt"), words=("same files", "distinct checkpoints")),
    Case("cli-cas-different-datasets", "cli", "crossclass cas of a Fashion-MNIST and a digits checkpoint",
         setup=_digits_ckpt, argv=_cli("cas", "{d}/run/best.pt", "{d}/digits.pt", "--n", "20", "--out", "{d}/cas"),
         words=("different classes", ("same dataset", "one dataset", "of one run", "separately"))),
]

# ---- models of your own on the command line: --arch with --weights, --robustbench, and the optional extras

_ABSENT = object()


def _hide_module(name: str, then=None):
    "setup: `import name` fails, as on an installation without that optional extra; the cleanup undoes it."
    def setup(d):
        if then: then(d)
        saved = sys.modules.get(name, _ABSENT)
        sys.modules[name] = None
        def cleanup():
            if saved is _ABSENT: sys.modules.pop(name, None)
            else: sys.modules[name] = saved
        return cleanup
    return setup


def _user_module(source: str, then=None):
    "setup: a module `crossclass_case_nets` with `source`, importable from a folder outside the sandbox."
    def setup(d):
        if then: then(d)
        folder = Path(tempfile.mkdtemp(prefix="crossclass_nets_"))
        (folder / "crossclass_case_nets.py").write_text(source)
        sys.path.insert(0, str(folder))
        def cleanup():
            sys.path.remove(str(folder))
            sys.modules.pop("crossclass_case_nets", None)
            shutil.rmtree(folder)
        return cleanup
    return setup


def _weights(make):
    "setup: the small CIFAR-10 folder, and `make()` saved as d/W.pt."
    def setup(d):
        _cifar_setup()(d)
        torch.manual_seed(0)
        torch.save(make(), d / "W.pt")
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
         argv=_cli("cas", "--arch", "resnet18", *_ON_CIFAR), words=("resnet18", "torchvision:NAME")),
    Case("cli-cas-arch-not-a-module", "cli", "--arch mymodule:make where make returns a string, not a network",
         setup=_user_module("def make(num_classes=10):\n    return 'a network'\n", then=_cifar_setup()),
         argv=_cli("cas", "--arch", "crossclass_case_nets:make", *_ON_CIFAR), words=("returned a str", "nn.Module")),
    Case("cli-cas-weights-do-not-fit", "cli", "--weights of a 3-class ResNet-18 for the 10 classes of CIFAR-10",
         setup=_weights(_resnet18_state(3)), argv=_cli("cas", "--arch", "torchvision:resnet18", "--weights", "{d}/W.pt",
                                                        *_ON_CIFAR), words=("do not fit", "number of classes")),
    Case("cli-cas-weights-pickled-module", "cli", "--weights of a whole pickled module (torch.save(model, path))",
         setup=_weights(lambda: nn.Linear(2, 2)),
         argv=_cli("cas", "--arch", "torchvision:resnet18", "--weights", "{d}/W.pt", *_ON_CIFAR),
         words=("W.pt", "torch.save(model.state_dict(), path)")),
    Case("cli-cas-arch-without-dataset", "cli", "crossclass cas --arch without --dataset",
         argv=_cli("cas", "--arch", "torchvision:resnet18"), words=("--dataset", "test data")),
    Case("cli-cas-two-sources", "cli", "crossclass cas of a run directory and --arch at once", setup=_with_run(),
         argv=_cli("cas", "{d}/run", "--arch", "torchvision:resnet18"), words=("exclude each other", "name one model")),
    Case("cli-cas-robustbench-without-extra", "cli", "crossclass cas --robustbench without the [zoo] extra",
         setup=_hide_module("robustbench", then=_cifar_setup()),
         argv=_cli("cas", "--robustbench", "Standard", "--data-root", "{d}/cifar", "--n", "0"),
         words=("robustbench", '.[zoo]')),
    Case("cli-eval-autoattack-without-extra", "cli", "crossclass eval --autoattack cheap without the [eval] extra",
         setup=_hide_module("torchattacks", then=_with_run()), argv=_cli("eval", "{d}/run", "--autoattack", "cheap"),
         words=("torchattacks", '.[eval]')),
]
