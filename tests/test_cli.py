"""End to end: the `cifarlab` command on synthetic data."""

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import cifarlab
from cifarlab import checkpoint
from cifarlab.cli import main

TRAIN = ["train", "--data", "synthetic:1500", "--epochs", "4", "--workers", "0",
         "--set", "model.width=8", "--set", "optim.warmup_epochs=1", "--batch-size", "64"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs")
    proc = subprocess.run(
        [sys.executable, "-m", "cifarlab", *TRAIN, "--out", str(out), "--name", "e2e"],
        capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stderr
    return out / "e2e", proc.stdout


def test_resident_loader_learns_as_well_as_the_torchvision_loader(run, tmp_path):
    run_dir, _ = run
    assert main([*TRAIN, "--loader", "resident", "--out", str(tmp_path), "--name", "r"]) == 0
    reference = json.loads((run_dir / "result.json").read_text())
    resident = json.loads((tmp_path / "r" / "result.json").read_text())
    assert resident["best_val_acc"] > 70
    assert abs(resident["best_val_acc"] - reference["best_val_acc"]) < 15
    assert abs(resident["test_acc"] - reference["test_acc"]) < 15


def test_train_writes_every_file(run):
    run_dir, _ = run
    for name in ("config.yaml", "metrics.csv", "best.pt", "last.pt", "result.json", "train.log"):
        assert (run_dir / name).is_file(), name


def test_train_learns_the_synthetic_data(run):
    run_dir, stdout = run
    result = json.loads((run_dir / "result.json").read_text())
    assert result["best_val_acc"] > 70  # chance is 10 %
    assert result["test_acc"] > 70
    assert result["epochs_run"] == 4 and result["stopped_early"] is False
    assert result["device"] == "cpu" and result["torch_version"] == torch.__version__
    assert 1 <= result["best_epoch"] <= 4 and result["train_seconds"] > 0
    assert stdout.count("epoch ") >= 4


def test_metrics_csv_has_one_row_per_epoch(run):
    run_dir, _ = run
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert list(rows[0]) == ["epoch", "lr", "train_loss", "train_acc", "val_loss", "val_acc",
                             "seconds"]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    result = json.loads((run_dir / "result.json").read_text())
    assert max(float(r["val_acc"]) for r in rows) == pytest.approx(result["best_val_acc"],
                                                                   abs=1e-3)
    lrs = [float(r["lr"]) for r in rows]
    assert lrs[0] == pytest.approx(0.1, rel=1e-3)  # end of the one warm-up epoch
    assert lrs[0] > lrs[1] > lrs[2] > lrs[3]  # cosine decay
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])


def test_config_yaml_is_the_resolved_config(run, tmp_path):
    run_dir, _ = run
    code = main(["train", "--config", str(run_dir / "config.yaml"), "--print-config"])
    assert code == 0
    import yaml
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["width"] == 8 and saved["batch_size"] == 64
    assert saved["data"]["source"] == "synthetic:1500" and saved["optim"]["lr"] == 0.1


def test_a_runs_config_yaml_repeats_it_under_a_new_name(run, capsys):
    run_dir, _ = run
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert Path(saved["out"]) / saved["name"] == run_dir
    assert main(["train", "--config", str(run_dir / "config.yaml"), "--print-config"]) == 0
    captured = capsys.readouterr()
    assert yaml.safe_load(captured.out)["name"] is None  # <preset>-<timestamp> when it runs
    assert f"names the run '{saved['name']}', whose folder exists" in captured.err
    assert main(["train", "--config", str(run_dir / "config.yaml"), "--name", "again",
                 "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["name"] == "again"


def test_best_checkpoint_loads_safely_and_evaluates_to_the_test_accuracy(run, capsys):
    run_dir, _ = run
    ckpt = checkpoint.load(run_dir / "best.pt")
    result = json.loads((run_dir / "result.json").read_text())
    assert ckpt["epoch"] == result["best_epoch"]
    assert ckpt["classes"] == result["classes"] and len(ckpt["mean"]) == 3
    assert main(["evaluate", str(run_dir / "best.pt"), "--data", "synthetic:1500",
                 "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["acc"] == pytest.approx(result["test_acc"], abs=1e-9)
    assert set(report["per_class_acc"]) == set(result["classes"])


def test_evaluate_without_data_scores_the_runs_own_test_split_and_says_so(run, capsys):
    run_dir, _ = run
    assert main(["evaluate", str(run_dir), "--json"]) == 0
    captured = capsys.readouterr()
    result = json.loads((run_dir / "result.json").read_text())
    assert json.loads(captured.out)["acc"] == pytest.approx(result["test_acc"], abs=1e-9)
    assert "evaluating on the run's own data: --data synthetic:1500 (its data.source)" \
        in captured.err


def test_evaluate_without_data_never_reads_a_path_the_checkpoint_records(run, tmp_path, capsys):
    run_dir, _ = run
    ckpt = checkpoint.load(run_dir / "best.pt")
    ckpt["config"]["data"]["source"] = str(tmp_path / "someone-elses-data")
    checkpoint.save_atomic(ckpt, tmp_path / "handed-over.pt")
    assert main(["evaluate", str(tmp_path / "handed-over.pt")]) == 2
    err = capsys.readouterr().err
    assert "reads no path a model file records; give the data with --data SPEC" in err
    assert err.count("\n") == 1


def run_cli(args, capsys):
    code = main(args)
    captured = capsys.readouterr()
    return code, captured.err


@pytest.mark.parametrize("args, message", [
    (["--set", "optim.lrr=1"], "unknown setting 'optim.lrr'"),
    (["--set", "epochs=many"], "setting 'epochs' needs an integer"),
    (["--data", "/no/such/place"], "/no/such/place"),
    (["--config", "/no/such.yaml"], "no such file"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(tmp_path, capsys, args, message):
    code, err = run_cli(["train", "--out", str(tmp_path / "runs"), *args], capsys)
    assert code == 2
    assert message in err and err.startswith("cifarlab: error:")
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


def test_unknown_preset_exits_2(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--preset", "fastest"])
    assert exit_info.value.code == 2
    assert "invalid choice: 'fastest'" in capsys.readouterr().err


def test_evaluate_refuses_a_foreign_file(tmp_path, capsys):
    bogus = tmp_path / "model.pt"
    bogus.write_bytes(b"not a checkpoint")
    code, err = run_cli(["evaluate", str(bogus), "--data", "synthetic"], capsys)
    assert code == 2 and str(bogus) in err and err.count("\n") == 1


def test_summary_json(capsys):
    assert main(["summary", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == 11_173_962
    assert summary["flops_forward"] == pytest.approx(2 * summary["macs"], rel=1e-3)


def test_bad_images_are_caught_before_training(tmp_path, capsys):
    from PIL import Image
    for name in ("cat", "dog"):
        (tmp_path / "imgs" / name).mkdir(parents=True)
        for i in range(5):
            Image.new("RGB", (32, 32), (i * 40, 0, 0)).save(tmp_path / "imgs" / name / f"{i}.png")
    (tmp_path / "imgs" / "dog" / "empty.png").write_bytes(b"")
    code, err = run_cli(["train", "--data", str(tmp_path / "imgs"), "--out",
                         str(tmp_path / "runs")], capsys)
    assert code == 2 and "empty.png: cannot decode image (empty file)" in err
    assert err.count("\n") == 1 and not (tmp_path / "runs").exists()


def test_argparse_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--epochs", "many"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.count("\n") == 1
    assert "invalid int value: 'many'" in err


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"cifarlab {cifarlab.__version__}\n"


def test_init_from_starts_a_new_run_from_trained_weights_and_transfers_to_other_classes(
        run, tmp_path, capsys):
    run_dir, _ = run
    parent = checkpoint.load(run_dir / "best.pt")["model"]
    folder = tmp_path / "three"  # data of 3 classes: a new classifier, the rest transferred
    for i, name in enumerate(["a", "b", "c"]):
        (folder / name).mkdir(parents=True)
        for j in range(6):
            pixels = np.full((32, 32, 3), 40 * i + 5 * j, np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{j}.png")
    tiny = ["--epochs", "1", "--lr", "1e-12", "--workers", "0", "--batch-size", "8",
            "--set", "optim.warmup_epochs=0", "--device", "cpu", "--out", str(tmp_path)]
    assert main(["train", "--init-from", str(run_dir), "--data", str(folder), *tiny,
                 "--name", "transfer"]) == 0
    captured = capsys.readouterr()
    assert f"starting from the weights of {run_dir / 'best.pt'} (resnet18 width 8, 10 " \
        "classes)" in captured.err
    assert "a new classifier for the data's 3 classes: fc.weight, fc.bias" in captured.out
    child = checkpoint.load(tmp_path / "transfer" / "best.pt")
    assert child["model"]["fc.weight"].shape[0] == 3 and child["classes"] == ["a", "b", "c"]
    for key in ("stem.0.weight", "layer4.1.conv2.weight"):  # lr 1e-12: as they started
        assert torch.allclose(child["model"][key], parent[key], atol=1e-6)
    assert child["model"]["layer1.0.conv1.weight"].ne(0).any()


def test_init_from_refuses_resume_and_another_model(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["train", "--init-from", str(run_dir), "--resume", str(run_dir)]) == 2
    assert "--init-from starts a new run and --resume continues one" in capsys.readouterr().err
    assert main(["train", "--init-from", str(run_dir), "--model", "resnet20",
                 "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "its model is resnet18, not resnet20" in err and err.count("error") == 1
    assert list(tmp_path.iterdir()) == []
