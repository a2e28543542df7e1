"""A run folder really trained by `cifarlab train`, shared by the tests of reports and
prediction (tests/fake_runs.py writes made-up ones)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifarlab.cli import main

TINY_TRAIN = ["train", "--data", "synthetic:300", "--epochs", "2", "--workers", "0",
              "--set", "model.width=4", "--set", "optim.warmup_epochs=1", "--batch-size", "64"]


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """2 epochs on 300 synthetic images, width 4: a few seconds on a CPU."""
    out = tmp_path_factory.mktemp("trained")
    assert main([*TINY_TRAIN, "--out", str(out), "--name", "tiny"]) == 0
    return out / "tiny"
