import pytest

from cifarlab.config import apply_dict
from cifarlab.errors import UserError
from cifarlab.presets import seed
from cifarlab.train import EarlyStopping, fit, resolve_amp, resolve_device


def test_early_stopping_stops_after_patience_epochs_without_a_new_best():
    stopper = EarlyStopping(patience=3)
    history = [50.0, 60.0, 59.0, 60.0, 61.0, 55.0, 61.0, 60.0, 99.0]
    stopped_at = None
    for epoch, acc in enumerate(history, start=1):
        stopper.update(epoch, acc)
        if stopper.should_stop:
            stopped_at = epoch
            break
    # A tie (60.0 at epoch 4, 61.0 at epoch 7) is not an improvement.
    assert stopped_at == 8 and stopper.best == 61.0 and stopper.best_epoch == 5


def test_patience_zero_never_stops():
    stopper = EarlyStopping(patience=0)
    for epoch in range(1, 200):
        stopper.update(epoch, 10.0)
    assert not stopper.should_stop and stopper.best_epoch == 1


def test_amp_resolution():
    cpu = resolve_device("cpu")
    assert resolve_amp("auto", cpu) is None
    assert str(resolve_amp("bf16", cpu)) == "torch.bfloat16"
    assert resolve_amp("off", cpu) is None


def test_bad_data_writes_nothing(tmp_path):
    config = apply_dict(seed(), {"data": {"source": str(tmp_path / "nope")},
                                 "out": str(tmp_path / "runs"), "name": "r"})
    with pytest.raises(UserError, match="nope"):
        fit(config)
    assert not (tmp_path / "runs").exists()


def test_used_run_folder_is_refused(tmp_path):
    (tmp_path / "runs" / "r").mkdir(parents=True)
    (tmp_path / "runs" / "r" / "metrics.csv").write_text("x")
    config = apply_dict(seed(), {"data": {"source": "synthetic"},
                                 "out": str(tmp_path / "runs"), "name": "r"})
    with pytest.raises(UserError, match="already exists"):
        fit(config)


def test_unwritable_output_is_refused_before_training(tmp_path):
    (tmp_path / "file").write_text("x")
    config = apply_dict(seed(), {"data": {"source": "synthetic"},
                                 "out": str(tmp_path / "file" / "runs"), "name": "r"})
    with pytest.raises(UserError, match="not a writable folder"):
        fit(config)
