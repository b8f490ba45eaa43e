"""Tests of crossclass_nb.data: real Fashion-MNIST, CIFAR-format files written here, corrupted and malicious files,
missing data, and the device-resident loader (determinism per (seed, epoch), DDP sharding, augmentation)."""
import gzip
import hashlib
import os
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import crossclass_nb.data as data
from crossclass_nb.core import CrossclassError, DataError, InputError
from crossclass_nb.data import (DATASET_NAMES, DATASET_STATS, Dataset, DataWarning, SafeUnpickler, TensorLoader,
                                channel_stats, crop_flip, epoch_plan, load_dataset, make_dataloader, make_fake_cifar,
                                read_idx, safe_unpickle, show_examples, stratified_subset, train_val_split, write_idx)

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


@pytest.fixture(autouse=True)
def no_data_env(monkeypatch):
    monkeypatch.delenv("CROSSCLASS_DATA", raising=False)


@pytest.fixture
def no_system_data(monkeypatch, tmp_path):
    "Pretend the Debian package is not installed."
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", tmp_path/"not-installed")


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion_mnist"), load_dataset("fashion_mnist", train=False)


def tiny_fashion(d: Path, n=20, gz=False, layout=""):
    "A miniature Fashion-MNIST copy (n train and n test images) in directory d (optionally in torchvision's layout)."
    sub = d/layout if layout else d
    sub.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for prefix in ("train", "t10k"):
        write_idx(sub/f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(sub/f"{prefix}-labels-idx1-ubyte{'.gz' if gz else ''}", np.arange(n, dtype=np.uint8) % 10)
    return sub


def load_quiet(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DataWarning)
        return load_dataset(*args, **kw)


# ---------------------------------------------------------------- real Fashion-MNIST

def test_fashion_mnist_real(fashion):
    train, test = fashion
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert train.x.min() == 0 and train.x.max() == 1
    assert torch.equal(torch.bincount(train.y), torch.full((10,), 6000))
    assert torch.equal(torch.bincount(test.y), torch.full((10,), 1000))
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot" and train.num_classes == 10
    # the values are the file's bytes / 255
    raw = gzip.decompress((DEBIAN/"t10k-images-idx3-ubyte.gz").read_bytes())
    first = np.frombuffer(raw, np.uint8, count=784, offset=16).reshape(28, 28)
    assert torch.equal((test.x[0, 0] * 255).round().to(torch.uint8), torch.from_numpy(first.copy()))


def test_debian_files_match_published_content_checksums():
    "Debian recompressed the .gz files (so the README's .gz MD5s differ) but their content is the published one."
    readme_gz_md5 = {"train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d"}
    gz = (DEBIAN/"train-images-idx3-ubyte.gz").read_bytes()
    assert hashlib.md5(gz).hexdigest() != readme_gz_md5["train-images-idx3-ubyte"]
    for f in FILES:
        assert hashlib.md5(gzip.decompress((DEBIAN/f"{f}.gz").read_bytes())).hexdigest() == data._FASHION_MD5[f]


def test_loads_return_fresh_tensors(fashion):
    "The in-process cache holds the verified bytes; every load gets its own tensors."
    a = load_dataset("fashion_mnist", train=False)
    a.x.zero_()
    assert load_dataset("fashion_mnist", train=False).x.max() == 1


def test_stats_match_data(fashion):
    for name, ds in [("fashion_mnist", fashion[0]), ("digits", load_dataset("digits"))]:
        m, s = channel_stats(ds)
        np.testing.assert_allclose(m, DATASET_STATS[name][0], atol=1e-3)
        np.testing.assert_allclose(s, DATASET_STATS[name][1], atol=1e-3)
    assert set(DATASET_STATS) == set(DATASET_NAMES)
    assert all(len(DATASET_STATS[n][0]) == 3 for n in ("cifar10", "cifar100"))


# ---------------------------------------------------------------- lookup order and layouts

@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("layout", ["", "FashionMNIST/raw"])
def test_root_first_in_both_layouts(tmp_path, gz, layout):
    tiny_fashion(tmp_path, n=20, gz=gz, layout=layout)
    with pytest.warns(DataWarning):
        ds = load_dataset("fashion_mnist", root=tmp_path)
    assert ds.x.shape == (20, 1, 28, 28)  # root wins over the Debian copy
    assert len(load_quiet("fashion_mnist", train=False, root=str(tmp_path))) == 20


def test_env_var_then_debian(tmp_path, monkeypatch):
    tiny_fashion(tmp_path/"env", n=30)
    monkeypatch.setenv("CROSSCLASS_DATA", str(tmp_path/"env"))
    assert len(load_quiet("fashion_mnist", root=tmp_path/"empty-root")) == 30  # root has nothing: env is next
    monkeypatch.delenv("CROSSCLASS_DATA")
    assert len(load_dataset("fashion_mnist", train=False, root=tmp_path/"empty-root")) == 10000  # then Debian


def test_missing_everywhere_says_where_and_how(tmp_path, no_system_data, monkeypatch, snapshot):
    monkeypatch.setenv("CROSSCLASS_DATA", str(tmp_path/"env-dir"))
    (tmp_path/"root").mkdir()
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", root=tmp_path/"root")
    msg = str(e.value)
    for part in [f"root {tmp_path/'root'}: no train-images-idx3-ubyte(.gz)", f"$CROSSCLASS_DATA {tmp_path/'env-dir'}: no such directory",
                 f"Debian package {tmp_path/'not-installed'}: no such directory", "apt-get install dataset-fashion-mnist",
                 "--data-root DIR", "download=True"]:
        assert part in msg
    assert snapshot(tmp_path) == before


def test_missing_with_nothing_set(no_system_data):
    with pytest.raises(DataError, match=r"root: not set; \$CROSSCLASS_DATA: not set"):
        load_dataset("fashion_mnist")


def test_download_path_uses_torchvision(tmp_path, no_system_data, monkeypatch):
    import torchvision.datasets

    class FakeFashion:  # stands in for torchvision's downloader: writes the files where torchvision would
        def __init__(self, root, train=True, download=False):
            assert download
            tiny_fashion(Path(root), n=12, gz=True, layout="FashionMNIST/raw")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashion)
    assert len(load_quiet("fashion_mnist", root=tmp_path/"dl", download=True)) == 12

    class Offline:
        def __init__(self, *a, **k): raise OSError("Network is unreachable")
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    with pytest.raises(DataError, match="downloading Fashion-MNIST into .* failed .*Network is unreachable.*apt-get install"):
        load_dataset("fashion_mnist", root=tmp_path/"dl2", download=True)


# ---------------------------------------------------------------- corrupted IDX files

@pytest.fixture(scope="module")
def real_copy(tmp_path_factory):
    "The real test split, compressed and uncompressed, in a scratch directory."
    d = tmp_path_factory.mktemp("fm")
    for f in FILES[2:]:
        shutil.copy(DEBIAN/f"{f}.gz", d/f"{f}.gz")
        (d/f).write_bytes(gzip.decompress((DEBIAN/f"{f}.gz").read_bytes()))
    return d


def broken_dir(real_copy, tmp_path, name, mutate):
    "tmp_path/case holding the real test split with file `name` changed by `mutate(bytes) -> bytes`."
    d = tmp_path/"case"
    d.mkdir()
    other = "t10k-labels-idx1-ubyte" if "images" in name else "t10k-images-idx3-ubyte"
    shutil.copy(real_copy/other, d/other)
    (d/name).write_bytes(mutate((real_copy/name).read_bytes()))
    return d


def flip_byte(b: bytes, at: int) -> bytes:
    return b[:at] + bytes([b[at] ^ 0x5A]) + b[at + 1:]


CORRUPTIONS = [  # (file, change, what the message must say; None where 01_data asserts the message)
    ("t10k-images-idx3-ubyte", lambda b: b[:-100], "the header promises 10000 x 28 x 28"),
    ("t10k-images-idx3-ubyte", lambda b: b + b"\0" * 7, "longer than its header says"),
    ("t10k-images-idx3-ubyte", lambda b: flip_byte(b, 5_000_000), "has the size of the published Fashion-MNIST file but not its content"),
    ("t10k-labels-idx1-ubyte", lambda b: flip_byte(b, 5000), "has the size of the published Fashion-MNIST file but not its content"),
    ("t10k-images-idx3-ubyte", lambda b: b"\x00\x00\x08\x01" + b[4:], "wrong magic number (0x00000801, expected 0x00000803)"),
    ("t10k-labels-idx1-ubyte", lambda b: b"PK\x03\x04" + b[4:], None),
    ("t10k-labels-idx1-ubyte", lambda b: b[:2], "wrong magic number (only 2 bytes"),
    ("t10k-images-idx3-ubyte", lambda b: b"", "wrong magic number (only 0 bytes"),
    ("t10k-images-idx3-ubyte.gz", lambda b: b[: len(b) // 2], None),
    ("t10k-images-idx3-ubyte.gz", lambda b: flip_byte(b, len(b) // 2), None),
    ("t10k-labels-idx1-ubyte.gz", lambda b: b[:-4], None),
]


@pytest.mark.parametrize("name,mutate,says", CORRUPTIONS, ids=[f"{c[0]}-{i}" for i, c in enumerate(CORRUPTIONS)])
def test_corrupted_idx_is_refused(real_copy, tmp_path, name, mutate, says, snapshot):
    d = broken_dir(real_copy, tmp_path, name, mutate)
    before = snapshot(d)
    with pytest.raises(DataError) as e:
        load_dataset("fashion_mnist", train=False, root=d)
    msg = str(e.value)
    assert (says is None or says in msg) and str(d/name) in msg
    assert "download=True" in msg  # the fix for a copy outside the Debian directory
    assert snapshot(d) == before


def test_debian_copy_fix_names_reinstall(monkeypatch, real_copy, tmp_path):
    d = broken_dir(real_copy, tmp_path, "t10k-labels-idx1-ubyte", lambda b: b[:-1])
    monkeypatch.setattr(data, "FASHION_MNIST_DEBIAN_DIR", d)
    with pytest.raises(DataError, match="apt-get install --reinstall dataset-fashion-mnist"):
        load_dataset("fashion_mnist", train=False)


def test_pair_checks(tmp_path):
    tiny_fashion(tmp_path, n=20)
    write_idx(tmp_path/"train-labels-idx1-ubyte", np.zeros(10, np.uint8))
    with pytest.raises(DataError, match="has 10 labels for the 20 images"):
        load_quiet("fashion_mnist", root=tmp_path)
    write_idx(tmp_path/"train-labels-idx1-ubyte", np.full(20, 12, np.uint8))
    with pytest.raises(DataError, match="holds label 12"):
        load_quiet("fashion_mnist", root=tmp_path)
    write_idx(tmp_path/"train-images-idx3-ubyte", np.zeros((20, 32, 32), np.uint8))
    with pytest.raises(DataError, match="28 x 28"):
        load_quiet("fashion_mnist", root=tmp_path)
    (tmp_path/"train-labels-idx1-ubyte").unlink()
    with pytest.raises(DataError):    # the catalogue (tests/catalogue.py) asserts what no chapter does
        load_quiet("fashion_mnist", root=tmp_path)


def test_unreadable_file(tmp_path, monkeypatch):
    tiny_fashion(tmp_path, n=5)
    real = Path.read_bytes
    def deny(self):
        if self.name == "train-images-idx3-ubyte": raise PermissionError(13, "Permission denied")
        return real(self)
    monkeypatch.setattr(Path, "read_bytes", deny)
    with pytest.raises(DataError, match="cannot read .*train-images-idx3-ubyte \\(Permission denied\\)"):
        load_quiet("fashion_mnist", root=tmp_path)


def test_read_idx_generic(tmp_path):
    for a in [np.arange(12, dtype=np.int32).reshape(3, 4) - 5, np.linspace(-1, 1, 7), np.zeros((2, 2, 2, 2), np.uint8)]:
        np.testing.assert_array_equal(read_idx(write_idx(tmp_path/"a.idx.gz", a)), a)
    with pytest.raises(DataError):
        read_idx(tmp_path/"a.idx.gz", md5="0" * 32)
    with pytest.raises(DataError, match="no file at"):
        read_idx(tmp_path/"nothing")
    with pytest.raises(InputError, match="IDX cannot hold"):
        write_idx(tmp_path/"b", np.zeros(3, np.uint64))


# ---------------------------------------------------------------- CIFAR in torchvision's format

@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_tiny(tmp_path, name, k):
    folder = make_fake_cifar(tmp_path, name, n_train=3 * k, n_test=k)
    with pytest.warns(DataWarning, match="not the published"):
        train = load_dataset(name, root=tmp_path)
    test = load_quiet(name, train=False, root=folder)  # the folder itself works too
    assert train.x.shape == (3 * k, 3, 32, 32) and test.x.shape == (k, 3, 32, 32)
    assert train.x.dtype == torch.float32 and 0 <= train.x.min() and train.x.max() <= 1
    assert train.num_classes == k and torch.equal(torch.bincount(train.y, minlength=k), torch.full((k,), 3))
    # pixel layout: row i of 'data' is the R, G, B planes of image i
    first = pickle.loads((folder/("data_batch_1" if k == 10 else "train")).read_bytes(), encoding="latin1")
    assert torch.equal((train.x[0] * 255).round().to(torch.uint8), torch.from_numpy(first["data"][0].reshape(3, 32, 32)))


def test_cifar_matches_torchvision(tmp_path, monkeypatch):
    "Our reader and torchvision's read the same files the same way (torchvision's checksum check switched off)."
    import torchvision.datasets as tvd
    make_fake_cifar(tmp_path, "cifar10", n_train=25, n_test=10)
    import torchvision.datasets.cifar as tvc
    monkeypatch.setattr(tvd.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(tvc, "check_integrity", lambda *a, **k: True)
    tv = tvd.CIFAR10(str(tmp_path), train=True, download=False)
    ours = load_quiet("cifar10", root=tmp_path)
    assert torch.equal((ours.x * 255).round().to(torch.uint8).permute(0, 2, 3, 1), torch.from_numpy(tv.data))
    assert ours.y.tolist() == tv.targets and ours.classes == tv.classes


def test_cifar_missing(tmp_path, monkeypatch, snapshot):
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", root=tmp_path)
    msg = str(e.value)
    assert str(tmp_path) in msg and "$CROSSCLASS_DATA: not set" in msg     # 01_data and the catalogue assert the rest
    assert "cifar-10-python.tar.gz" in msg
    assert snapshot(tmp_path) == before
    with pytest.raises(DataError, match="CIFAR-100 not found.*root: not set"):
        load_dataset("cifar100")


def test_cifar_env_var(tmp_path, monkeypatch):
    make_fake_cifar(tmp_path, "cifar10")
    monkeypatch.setenv("CROSSCLASS_DATA", str(tmp_path))
    assert len(load_quiet("cifar10", train=False)) == 20


def write_batch(path, obj):
    path.write_bytes(pickle.dumps(obj, protocol=2))


CIFAR_BREAKS = [  # (what to do to data_batch_3, what the message must say; None where the catalogue asserts it)
    (lambda p: p.write_bytes(p.read_bytes()[:-500]), None),
    (lambda p: p.write_bytes(b""), None),
    (lambda p: p.unlink(), None),
    (lambda p: write_batch(p, [1, 2, 3]), "does not hold CIFAR images"),
    (lambda p: write_batch(p, {"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}), "does not hold CIFAR images"),
    (lambda p: write_batch(p, {"data": np.zeros((4, 3072), np.uint8), "labels": [0] * 3}), "has 4 images but 3 'labels'"),
    (lambda p: write_batch(p, {"data": np.zeros((4, 3072), np.uint8)}), "has 4 images but no 'labels'"),
    (lambda p: write_batch(p, {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 10]}), "labels outside 0..9"),
]


@pytest.mark.parametrize("brk,says", CIFAR_BREAKS)
def test_cifar_broken_files(tmp_path, brk, says, snapshot):
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=25)
    brk(folder/"data_batch_3")
    before = snapshot(tmp_path)
    with pytest.raises(DataError) as e:
        load_quiet("cifar10", root=tmp_path)
    assert (says is None or says in str(e.value)) and "extract https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz again" in str(e.value)
    assert snapshot(tmp_path) == before


def test_cifar_bad_meta(tmp_path):
    folder = make_fake_cifar(tmp_path, "cifar100")
    write_batch(folder/"meta", {"fine_label_names": ["a", "b"]})
    with pytest.raises(DataError, match="does not list 100 class names"):
        load_quiet("cifar100", root=tmp_path)


def test_cifar_full_size_batch_must_match_checksum(tmp_path):
    "A batch with the published 10000 images is checked against torchvision's MD5: a corrupted original is caught."
    folder = make_fake_cifar(tmp_path, "cifar10", n_train=25)
    rng = np.random.default_rng(0)
    write_batch(folder/"data_batch_1", {"data": rng.integers(0, 256, (10000, 3072), dtype=np.uint8),
                                        "labels": (np.arange(10000) % 10).tolist()})
    with pytest.raises(DataError, match="data_batch_1 has the size of the published CIFAR-10 file but not its checksum"):
        load_quiet("cifar10", root=tmp_path)


# ---------------------------------------------------------------- malicious pickles

class Payload:
    "Runs `func(*args)` when unpickled."
    def __init__(self, func, args): self.func, self.args = func, args
    def __reduce__(self): return (self.func, self.args)


def payloads(marker: Path):
    import builtins
    return {
        "os.system": Payload(os.system, (f"touch {marker}",)),
        "builtins.exec": Payload(builtins.exec, (f"open({str(marker)!r}, 'w').write('x')",)),
        "builtins.eval": Payload(builtins.eval, (f"open({str(marker)!r}, 'w').write('x')",)),
        "subprocess.call": Payload(subprocess.call, (["touch", str(marker)],)),
        "Path.touch": Payload(Path.touch, (marker,)),
    }


def test_payloads_are_live(tmp_path):
    "Control: with plain pickle each payload really runs (so the refusals below prove something)."
    for i, p in enumerate(payloads(tmp_path/"ran").values()):
        pickle.loads(pickle.dumps({"data": p}, protocol=2))
        assert (tmp_path/"ran").exists(), i
        (tmp_path/"ran").unlink()


@pytest.mark.parametrize("kind", list(payloads(Path("x"))))
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_malicious_cifar_pickle_never_runs(tmp_path, kind, protocol):
    folder = make_fake_cifar(tmp_path/"data", "cifar10", n_train=25)
    marker = tmp_path/"pwned"
    # the payload hides inside an otherwise valid batch
    good = pickle.loads((folder/"data_batch_2").read_bytes(), encoding="latin1")
    good["labels"] = [payloads(marker)[kind]] + good["labels"][1:]
    (folder/"data_batch_2").write_bytes(pickle.dumps(good, protocol=protocol))
    with pytest.raises(DataError):
        load_quiet("cifar10", root=tmp_path/"data")
    with pytest.raises(DataError):
        safe_unpickle(folder/"data_batch_2")
    assert not marker.exists()


def test_malicious_meta_and_codecs(tmp_path):
    folder = make_fake_cifar(tmp_path/"data", "cifar10")
    marker = tmp_path/"pwned"
    (folder/"batches.meta").write_bytes(pickle.dumps(payloads(marker)["os.system"], protocol=0))
    with pytest.raises(DataError):                 # chapter 01 asserts the refusal's words
        load_quiet("cifar10", root=tmp_path/"data")
    # _codecs.encode is allowed only as the latin-1 bytes helper of protocol 2
    evil = b"c_codecs\nencode\n(Vabc\nVrot13\ntR."
    with pytest.raises(pickle.UnpicklingError, match="unexpected encoding"):
        SafeUnpickler(__import__("io").BytesIO(evil)).load()
    assert not marker.exists()


def test_safe_unpickler_loads_numpy_at_every_protocol(tmp_path):
    obj = {"data": np.arange(6, dtype=np.uint8).reshape(2, 3), "labels": [np.int64(1), 2], "f": np.float32(0.5), "b": b"\xff"}
    for protocol in range(0, pickle.HIGHEST_PROTOCOL + 1):
        (tmp_path/"p").write_bytes(pickle.dumps(obj, protocol=protocol))
        out = safe_unpickle(tmp_path/"p")
        np.testing.assert_array_equal(out["data"], obj["data"])
        assert out["labels"] == [1, 2] and out["f"] == np.float32(0.5) and out["b"] == b"\xff"


# ---------------------------------------------------------------- bad inputs

def test_bad_names_and_arguments():
    with pytest.raises(InputError):
        load_dataset("mnist")
    with pytest.raises(InputError):
        load_dataset(None)
    with pytest.raises(InputError):
        load_dataset("digits", train="test")
    with pytest.raises(InputError, match="root must be a directory path"):
        load_dataset("fashion_mnist", root=3)
    assert len(load_dataset("Fashion-MNIST", train=False)) == 10000
    assert issubclass(DataError, CrossclassError) and issubclass(InputError, ValueError)


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_digits(digits):
    test = load_dataset("digits", train=False)
    assert digits.x.shape == (1437, 1, 8, 8) and len(test) == 360 and digits.x.max() == 1 and digits.x.min() == 0
    assert torch.bincount(test.y).min() >= 35


def test_dataset_validation():
    y = torch.tensor([0, 1])
    with pytest.raises(InputError):
        Dataset(torch.rand(2, 1, 4, 4) * 255, y, ["a", "b"])
    with pytest.raises(InputError):
        Dataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), y, ["a", "b"])
    with pytest.raises(InputError, match=r"values in \[0, 1\]"):
        Dataset(torch.full((2, 1, 4, 4), float("nan")), y, ["a", "b"])
    with pytest.raises(InputError):
        Dataset(torch.rand(2, 4, 4), y, ["a", "b"])
    with pytest.raises(InputError, match="int64"):
        Dataset(torch.rand(2, 1, 4, 4), y.float(), ["a", "b"])
    with pytest.raises(InputError):
        Dataset(torch.rand(2, 1, 4, 4), torch.tensor([0, 2]), ["a", "b"])
    with pytest.raises(InputError, match="classes is empty"):
        Dataset(torch.rand(2, 1, 4, 4), y, [])


def test_subset_and_split_errors(digits):
    empty = digits.subset([])
    no_threes = digits.subset(digits.y != 3)
    for call, says in [
        (lambda: stratified_subset(empty, 10), "empty"),
        (lambda: stratified_subset(no_threes, 100), "class 3 ('3') has no examples"),
        (lambda: stratified_subset(digits, 1438), "larger than the dataset"),
        (lambda: stratified_subset(digits.subset(torch.cat([torch.nonzero(digits.y == 0)[:2, 0],
                                                            torch.nonzero(digits.y != 0)[:, 0]])), 100), "has only 2 examples"),
        (lambda: stratified_subset(digits, -5), "integer >= 1"),
        (lambda: stratified_subset(digits, 10.0), "integer >= 1"),
        (lambda: stratified_subset(digits, 10, seed=-1), "seed must be an integer >= 0"),
        (lambda: train_val_split(empty, 0.1), "empty"),
        (lambda: train_val_split(digits, 0), "integer >= 1"),
        (lambda: train_val_split(digits, 1.0), "(0, 1)"),
        (lambda: train_val_split(digits, float("nan")), "(0, 1)"),
        (lambda: train_val_split(digits, 1437), "nothing to train on"),
        (lambda: digits.subset([5000]), "out of range"),
        (lambda: digits.subset(torch.ones(3, dtype=torch.bool)), "boolean mask must have shape"),
        (lambda: TensorLoader(empty, 10, device="cpu"), "empty"),
        (lambda: TensorLoader(digits, 0, device="cpu"), "batch_size must be an integer >= 1"),
        (lambda: TensorLoader(digits, 10, device="cpu", rank=3, world_size=2), "rank must be in 0..1"),
        (lambda: TensorLoader(digits, 10, device="cpu", world_size=0), "world_size"),
        (lambda: TensorLoader(digits.subset([0]), 1, device="cpu", world_size=2), "cannot be shared by 2 ranks"),
        (lambda: TensorLoader(digits, 2000, device="cpu", drop_last=True), "gives no batches"),
        (lambda: TensorLoader(digits, 10, augment=True, pad=8, device="cpu"), "smaller than the image size"),
        (lambda: TensorLoader(digits, 10, device="tpu"), "unknown device"),
        (lambda: make_dataloader(empty, 10), "empty"),
        (lambda: make_dataloader(digits, 0), "batch_size"),
        (lambda: show_examples(empty), "empty"),
        (lambda: make_fake_cifar("/tmp", "svhn"), "cifar10"),
    ]:
        with pytest.raises(InputError, match=None) as e:
            call()
        assert says in str(e.value), (says, str(e.value))


def test_stratified_subset(digits):
    ids = Dataset((torch.arange(len(digits)) / len(digits)).view(-1, 1, 1, 1), digits.y, digits.classes)
    pos = lambda d: set((d.x.flatten() * len(digits)).round().long().tolist())
    prev = set()
    for n in (10, 37, 100, 500):
        s = stratified_subset(ids, n, seed=4)
        counts = torch.bincount(s.y, minlength=10)
        assert len(s) == n and counts.max() - counts.min() <= 1
        assert prev <= pos(s)  # nested for one seed
        prev = pos(s)
    assert pos(stratified_subset(ids, 100, seed=5)) != pos(stratified_subset(ids, 100, seed=4))


def test_train_val_split(digits):
    ids = Dataset((torch.arange(len(digits)) / len(digits)).view(-1, 1, 1, 1), digits.y, digits.classes)
    pos = lambda d: set((d.x.flatten() * len(digits)).round().long().tolist())
    tr, va = train_val_split(ids, 300, seed=1)
    assert len(va) == 300 and pos(tr).isdisjoint(pos(va)) and pos(tr) | pos(va) == set(range(len(digits)))
    frac = torch.bincount(va.y, minlength=10) / 300 - torch.bincount(digits.y) / len(digits)
    assert frac.abs().max() < 0.01
    assert pos(train_val_split(ids, 300, seed=1)[1]) == pos(va) != pos(train_val_split(ids, 300, seed=2)[1])


def test_show_examples(digits, tmp_path):
    import matplotlib.figure
    fig = show_examples(digits, n_per_class=4)
    assert isinstance(fig, matplotlib.figure.Figure) and len(fig.axes) == 1
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == digits.classes
    fig = show_examples(digits.subset(digits.y != 2), n_per_class=2)
    assert "2 (none)" in [t.get_text() for t in fig.axes[0].get_yticklabels()]
    fig.savefig(tmp_path/"x.png")


# ---------------------------------------------------------------- loaders

def batches(loader):
    return [(x.clone(), y.clone()) for x, y in loader]


def test_tensor_loader_is_pure_function_of_seed_and_epoch(digits):
    a = TensorLoader(digits, 128, augment=True, pad=2, device="cpu", seed=11)
    e0, e1, e2 = batches(a), batches(a), batches(a)
    torch.manual_seed(999)  # global RNG must not matter
    b = TensorLoader(digits, 128, augment=True, pad=2, device="cpu", seed=11)
    b.set_epoch(1)
    for (xa, ya), (xb, yb) in zip(e1, batches(b)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert b.epoch == 2 and all(torch.equal(x, y) for (x, _), (y, _) in zip(e2, batches(b)))
    assert not torch.equal(torch.cat([y for _, y in e0]), torch.cat([y for _, y in e1]))
    c = TensorLoader(digits, 128, augment=True, pad=2, device="cpu", seed=12)
    assert not torch.equal(torch.cat([x for x, _ in batches(c)]), torch.cat([x for x, _ in e0]))
    b.set_epoch(2)
    it = iter(b)  # the epoch is fixed when iter() is called, not at the first batch
    b.set_epoch(0)
    assert torch.equal(next(it)[0], e2[0][0])
    # every example exactly once per epoch, and len() is the number of batches
    assert len(e0) == len(a) == 12 and torch.equal(torch.cat([y for _, y in e0]).sort().values, digits.y.sort().values)


def test_augmentation_keeps_range_and_shape(digits):
    for ds, pad in [(digits, 3), (Dataset(torch.rand(64, 3, 32, 32), torch.arange(64) % 10, [str(i) for i in range(10)]), 4)]:
        for x, y in TensorLoader(ds, 50, augment=True, pad=pad, device="cpu"):
            assert x.shape[1:] == ds.x.shape[1:] and x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
        plain = next(iter(TensorLoader(ds, len(ds), shuffle=False, device="cpu")))[0]
        assert torch.equal(plain, ds.x)
        aug = next(iter(TensorLoader(ds, len(ds), shuffle=False, augment=True, pad=pad, device="cpu")))[0]
        assert not torch.equal(aug, ds.x)


def test_crop_flip_matches_pad_crop_flip():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, 3, 9, 7, generator=g)
    for pad in (0, 1, 3, 6):
        oy = torch.randint(0, 2 * pad + 1, (40,), generator=g)
        ox = torch.randint(0, 2 * pad + 1, (40,), generator=g)
        flip = torch.rand(40, generator=g) < 0.5
        padded = F.pad(x, (pad,) * 4, mode="reflect") if pad else x
        ref = torch.stack([padded[i, :, oy[i]:oy[i] + 9, ox[i]:ox[i] + 7] for i in range(40)])
        ref = torch.where(flip[:, None, None, None], ref.flip(-1), ref)
        assert torch.equal(crop_flip(x, oy, ox, flip, pad), ref)


@pytest.mark.parametrize("n,ws", [(100, 3), (101, 2), (64, 4), (7, 7)])
def test_sharding_disjoint_equal_shares(n, ws):
    ds = Dataset(torch.rand(n, 1, 4, 4), torch.arange(n) % 3, ["a", "b", "c"])
    for epoch in (0, 5):
        shares = [epoch_plan(n, 3, epoch, rank=r, world_size=ws)["idx"] for r in range(ws)]
        assert {len(s) for s in shares} == {n // ws}
        flat = torch.cat(shares)
        assert len(set(flat.tolist())) == len(flat)  # disjoint
        assert set(flat.tolist()) <= set(range(n))
    loaders = [TensorLoader(ds, 5, device="cpu", seed=3, rank=r, world_size=ws) for r in range(ws)]
    assert len({len(l) for l in loaders}) == 1  # every rank does the same number of steps
    seen = [torch.cat([x for x, _ in l]) for l in loaders]
    rows = [tuple(r) for s in seen for r in s.flatten(1).tolist()]
    assert len(set(rows)) == len(rows) == ws * (n // ws)


def test_drop_last(digits):
    full = TensorLoader(digits, 100, device="cpu")
    dropped = TensorLoader(digits, 100, device="cpu", drop_last=True)
    assert (len(full), len(dropped)) == (15, 14)
    assert [len(y) for _, y in dropped] == [100] * 14
    assert [len(y) for _, y in full][-1] == 37


def test_make_dataloader(digits):
    a = [y for _, y in make_dataloader(digits, 100, seed=1)]
    b = [y for _, y in make_dataloader(digits, 100, seed=1)]
    assert all(torch.equal(u, v) for u, v in zip(a, b)) and len(a) == 15
    unshuffled = next(iter(make_dataloader(digits, 10, shuffle=False)))[1]
    assert torch.equal(unshuffled, digits.y[:10])
