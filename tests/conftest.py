"""A run folder really trained by `cifarlab train`, shared by the tests of reports,
prediction and distillation (tests/fake_runs.py writes made-up ones); torch.compile made
quick for the tests of compiled training."""

from __future__ import annotations

import os

# One thread per test process (and the runs it starts): `make test` runs one pytest worker per
# core, and the tiny models here train as fast on one thread as on two. Set before torch is
# imported; a test that needs more threads sets OMP_NUM_THREADS for its subprocess itself.
os.environ.setdefault("OMP_NUM_THREADS", "1")

from pathlib import Path

import pytest
import torch

from cifarlab.cli import main

TINY_TRAIN = ["train", "--data", "synthetic:300", "--epochs", "2", "--workers", "0",
              "--set", "model.width=4", "--set", "optim.warmup_epochs=1", "--batch-size", "64"]


def shared_root(tmp_path_factory) -> Path:
    """The folder all of the session's pytest workers share (xdist's workers' temporary
    folders have it as their parent)."""
    root = tmp_path_factory.getbasetemp()
    return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def speed_cache_of_the_session(tmp_path_factory):
    """The measured speeds (speed_cache.py) of the session's runs kept in one folder that
    every worker and every run it starts shares, not in the user's ~/.cache: each run of a
    command then takes the same precision, as on a user's machine."""
    os.environ["XDG_CACHE_HOME"] = str(shared_root(tmp_path_factory) / "xdg-cache")


@pytest.fixture(scope="session")
def once(tmp_path_factory):
    """`once(name, make)`: the folder `make(folder)` fills, made by one pytest worker and
    read by all (xdist's workers share the parent of their temporary folders), for slow
    things that tests only read, such as an uninterrupted reference run."""
    import fcntl

    root = shared_root(tmp_path_factory)

    def made(name, make):
        folder, done = root / name, root / f"{name}.done"
        with open(root / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not done.exists():
                folder.mkdir(exist_ok=True)
                make(folder)
                done.touch()
        return folder

    return made


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory) -> Path:
    """2 epochs on 300 synthetic images, width 4: a few seconds on a CPU."""
    out = tmp_path_factory.mktemp("trained")
    assert main([*TINY_TRAIN, "--out", str(out), "--name", "tiny"]) == 0
    return out / "tiny"


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend: the same tracing and autograd graphs as
    inductor, without generating kernels (seconds instead of minutes on a CPU)."""
    calls = []
    real = torch.compile

    def compile_eager(model, **kwargs):
        calls.append(kwargs)
        return real(model, dynamic=kwargs["dynamic"], backend="aot_eager")

    monkeypatch.setattr(torch, "compile", compile_eager)
    return calls
