"""training/board.py: `--tensorboard` writes per-epoch scalars and the run's hyperparameters
with its final metrics; read back here as TensorBoard reads them."""

import csv
import json

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifarlab.cli import main
from cifarlab.errors import UserError
from cifarlab.training import board

TINY = ["train", "--data", "synthetic:300", "--epochs", "2", "--workers", "0", "--batch-size",
        "64", "--set", "model.width=4", "--set", "optim.warmup_epochs=1"]


def scalars(folder):
    events = EventAccumulator(str(folder))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)]
            for tag in events.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("board")
    assert main([*TINY, "--tensorboard", "--set", "ema.enabled=true", "--out", str(out),
                 "--name", "tb"]) == 0
    return out / "tb"


def test_per_epoch_scalars_are_the_rows_of_metrics_csv(run):
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    logged = scalars(run / "tensorboard")
    assert set(logged) == set(board.TAGS.values())
    for column, tag in board.TAGS.items():
        assert [step for step, _ in logged[tag]] == [1, 2], tag
        for (_, value), row in zip(logged[tag], rows, strict=True):
            assert value == pytest.approx(float(row[column]), rel=1e-4, abs=1e-6), tag


def test_hyperparameters_come_with_the_final_metrics(run):
    result = json.loads((run / "result.json").read_text())
    logged = scalars(run / "tensorboard" / "hparams")
    assert logged["final/best_val_acc"] == [(0, pytest.approx(result["best_val_acc"]))]
    assert logged["final/test_acc"] == [(0, pytest.approx(result["test_acc"]))]
    assert logged["final/epochs_run"] == [(0, 2.0)]
    events = EventAccumulator(str(run / "tensorboard" / "hparams"))
    events.Reload()
    plugin = events.PluginTagToContent("hparams")
    assert b"optim.lr" in plugin["_hparams_/session_start_info"]
    assert b"ema.decay" in plugin["_hparams_/session_start_info"]


def test_off_by_default_and_values_as_tensorboard_takes_them(tmp_path):
    assert main([*TINY, "--epochs", "1", "--out", str(tmp_path), "--name", "plain"]) == 0
    assert not (tmp_path / "plain" / "tensorboard").exists()
    assert board.hparam_value([0.5, 0.75]) == "[0.5, 0.75]"
    assert board.hparam_value(None) == "None" and board.hparam_value(0.1) == 0.1


def test_missing_package_is_refused_before_anything_is_written(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name == "tensorboard":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UserError, match="pip install tensorboard"):
        board.check_available()
