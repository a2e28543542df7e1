"""A package that only some commands need, missing: the other commands work, and those
that need it stop with one line naming the package and its install command, exit 2, before
anything is written. Simulated with sys.modules[name] = None, which makes `import name`
fail as it does when the package is not installed."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from cifarlab.cli import main

TINY = ["--data", "synthetic:300", "--epochs", "1", "--workers", "0", "--set",
        "model.width=4", "--set", "optim.warmup_epochs=1", "--batch-size", "64"]

WITHOUT = textwrap.dedent("""
    import sys
    sys.modules[sys.argv[1]] = None  # as if not installed
    from cifarlab.cli import main
    sys.exit(main(sys.argv[2:]))
""")


def without(module, *args, cwd):
    """`cifarlab ARGS` in a fresh process where `module` cannot be imported."""
    src = str(Path(__file__).parents[1] / "src")  # this checkout's cifarlab, from any cwd
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", WITHOUT, module, *args], cwd=cwd,
                          capture_output=True, text=True, timeout=240,
                          env={**os.environ, "PYTHONPATH": path})
    return proc.returncode, proc.stdout, proc.stderr


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_without_torchinfo_training_works_and_only_the_layer_table_asks_for_it(tmp_path):
    code, _, err = without("torchinfo", "train", *TINY, "--out", str(tmp_path), "--name", "r",
                           cwd=tmp_path)
    assert code == 0, err
    report = (tmp_path / "r" / "report.md").read_text()
    assert "The layer table needs the torchinfo package (pip install torchinfo)" in report
    assert "MACs per image" in report  # counted without torchinfo
    code, out, _ = without("torchinfo", "summary", str(tmp_path / "r"), "--json", cwd=tmp_path)
    assert code == 0 and '"macs"' in out
    code, out, _ = without("torchinfo", "models", "--width", "8", cwd=tmp_path)
    assert code == 0 and "resnet18" in out
    code, out, err = without("torchinfo", "summary", "--model", "resnet18", cwd=tmp_path)
    assert code == 2 and out == ""
    assert "the layer table needs the torchinfo package; install it with: pip install " \
           "torchinfo" in one_line(err)


def test_the_mac_count_is_torchinfos():
    torchinfo = pytest.importorskip("torchinfo")
    import torch

    from cifarlab.models import MODELS, create_model, model_args
    from cifarlab.profile import count_macs

    for name in MODELS:
        with torch.device("meta"):
            model = create_model(**model_args(name, 10, 24 if name == "airbench" else 16))
        stats = torchinfo.summary(model, input_size=(1, 3, 32, 32), verbose=0, device="meta",
                                  mode="eval")
        assert count_macs(model) == stats.total_mult_adds, name


def write_study(path):
    path.write_text(yaml.safe_dump({
        "preset": "seed", "seeds": 1, "sampler": "grid",
        "settings": {"epochs": 1, "model.width": 4, "data.workers": 0,
                     "data.source": "synthetic:200"}}))
    return path


@pytest.mark.parametrize("command", ["sweep", "ablate", "study"])
def test_without_optuna_the_study_commands_stop_before_writing(command, tmp_path, capsys,
                                                               monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)
    out = tmp_path / "study"
    args = {"sweep": ["sweep", str(write_study(tmp_path / "s.yaml")), "--out", str(out)],
            "ablate": ["ablate", "--seeds", "1", "--out", str(out)],
            "study": ["study", str(out)]}[command]
    assert main(args) == 2
    assert f"cifarlab {command} needs the optuna package; install it with: pip install " \
           "optuna" in one_line(capsys.readouterr().err)
    assert not out.exists()


def test_without_torch_pruning_prune_stops_before_writing(trained_run, tmp_path, capsys,
                                                          monkeypatch):
    monkeypatch.setitem(sys.modules, "torch_pruning", None)
    assert main(["prune", str(trained_run / "best.pt"), "--ratio", "0.5", "--out",
                 str(tmp_path / "o")]) == 2
    assert "prune needs the torch-pruning package; install it with: pip install " \
           "'cifarlab[compress]'" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()
