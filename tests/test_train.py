import csv
import json
import logging

import pytest
import torch

from cifarlab.config import apply_dict
from cifarlab.data.splits import prepare_splits
from cifarlab.devices import resolve_amp, resolve_device
from cifarlab.errors import UserError
from cifarlab.evaluate import evaluate
from cifarlab.models import create_model
from cifarlab.presets import seed
from cifarlab.train import fit
from cifarlab.training.progress import EarlyStopping


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


def tiny(tmp_path, name, **changes):
    settings = {"data": {"source": "synthetic:300", "workers": 0}, "epochs": 2,
                "batch_size": 64, "model": {"width": 4}, "optim": {"warmup_epochs": 1},
                "device": "cpu", "out": str(tmp_path), "name": name} | changes
    return apply_dict(seed(), settings)


def test_ema_run_selects_on_the_ema_and_saves_its_weights(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="cifarlab")
    config = tiny(tmp_path, "ema", ema={"enabled": True, "decay": 0.9, "select": "ema"},
                  mix={"mixup_alpha": 0.2, "cutmix_alpha": 1.0}, epochs=3)
    result = fit(config)
    run = tmp_path / "ema"
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                             "ema_val_loss", "ema_val_acc", "seconds"]
    ema_accs = [float(r["ema_val_acc"]) for r in rows]
    assert result.selected == "ema"
    assert result.best_val_acc == pytest.approx(max(ema_accs), abs=1e-3)
    assert result.best_epoch == 1 + ema_accs.index(max(ema_accs))
    saved = json.loads((run / "result.json").read_text())
    assert saved["selected"] == "ema" and saved["best_val_acc"] == result.best_val_acc
    assert "chosen on the validation accuracy of the EMA weights" in caplog.text
    assert "(ema weights, epoch" in caplog.text
    last = torch.load(run / "last.pt", weights_only=True)
    best = torch.load(run / "best.pt", weights_only=True)
    ema = last["train_state"]["ema"]
    assert ema["updates"] == 3 * 5  # 270 training images at batch 64: 5 steps an epoch
    # best.pt holds the EMA weights of its epoch, not the model's
    assert best["val_acc"] == result.best_val_acc
    splits = prepare_splits(config.data)
    net = create_model(**best["model_args"])
    net.load_state_dict(best["model"])
    val = evaluate(net, splits.val, splits.mean, splits.std, torch.device("cpu"))
    assert val.acc == pytest.approx(float(rows[result.best_epoch - 1]["ema_val_acc"]), abs=1e-3)
    if result.best_epoch == 3:
        assert all(torch.equal(best["model"][k], ema["weights"][k]) for k in ema["weights"])
    assert not all(torch.equal(last["model"][k], ema["weights"][k]) for k in ema["weights"])


def test_without_ema_the_metrics_columns_and_selection_are_the_models(tmp_path):
    result = fit(tiny(tmp_path, "plain", optim={"name": "adamw", "lr": 1e-3,
                                                  "schedule": "onecycle"}))
    header = (tmp_path / "plain" / "metrics.csv").read_text().splitlines()[0]
    assert header == "epoch,lr,train_loss,train_acc,val_loss,val_acc,seconds"
    assert result.selected == "model"
    assert "ema" not in torch.load(tmp_path / "plain" / "last.pt",
                                   weights_only=True)["train_state"]
