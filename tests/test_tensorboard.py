"""TensorBoard as an option: the event file holds every epoch's scalars and the C heat maps; without the package, a
one-line error names the extra and nothing is written."""
import builtins

import pytest

from crossclass_nb.core import MissingExtraError
from crossclass_nb.config import get_config
from crossclass_nb.rundir import load_metrics
from crossclass_nb.training import train

pytestmark = pytest.mark.slow  # whole runs, subprocesses or DDP groups: `pytest -m "not slow"` leaves them out


def test_event_file_holds_the_scalars_and_heat_maps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = train(get_config("fmnist-tiny", epochs=2, figures=False, tensorboard=True), tmp_path / "run")
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0}).Reload()
    tags = acc.Tags()
    for tag in ("train_loss", "train_robust_acc", "val_robust_acc", "test_clean_acc", "test_robust_acc", "cas", "lr"):
        assert tag in tags["scalars"], tag
    rows = load_metrics(run)
    for tag in ("train_loss", "test_robust_acc", "cas", "lr"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [1, 2]
        assert [e.value for e in events] == pytest.approx([r[tag] for r in rows], rel=1e-6)
    assert [e.step for e in acc.Images("similarity_C")] == [1, 2]


def test_missing_tensorboard_names_the_extra_and_writes_nothing(tmp_path, monkeypatch):
    real_import = builtins.__import__
    def no_tensorboard(name, *args, **kwargs):
        if name.split(".")[0] == "tensorboard": raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(MissingExtraError, match=r"\[tb\]"):  # names its extra; the wording: core.import_extra
        train(get_config("fmnist-tiny", epochs=1, tensorboard=True), tmp_path / "run")
    assert not (tmp_path / "run").exists()
