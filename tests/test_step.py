"""The training step: no host synchronisation per step, flags read a fixed lag later, and
torch.compile leaving what is trained and saved unchanged."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cifarlab import checkpoint
from cifarlab.config import AugmentConfig, apply_dict
from cifarlab.data.resident import build_resident_loader
from cifarlab.errors import UserError
from cifarlab.models import create_model
from cifarlab.presets import seed
from cifarlab.step import StepFlags, TrainStep
from cifarlab.train import fit

# Operations after which a GPU's host waits for the device: reading a value (.item(),
# bool(), int()), and ops whose output size depends on the data (boolean-mask indexing,
# nonzero, unique, repeat_interleave without an output size).
SYNCING = ("_local_scalar_dense", "nonzero", "masked_select", "unique", "equal",
           "is_nonzero", "repeat_interleave")


class SyncOps(TorchDispatchMode):
    """Records every syncing operation run inside it (forward, backward and optimizer)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name()
        bool_index = name.startswith("aten::index") and any(
            isinstance(i, torch.Tensor) and i.dtype == torch.bool
            for a in args if isinstance(a, (list, tuple)) for i in a)
        if bool_index or any(s in name for s in SYNCING):
            self.seen.append(name)
        return func(*args, **(kwargs or {}))


def test_the_detector_sees_syncing_operations():
    x = torch.arange(6.0)
    with SyncOps() as mode:
        _ = x.sum().item()
        _ = x[x > 2]
        _ = bool(x.max() > 0)
    assert len(mode.seen) >= 3


def step_parts(fused: bool):
    model = create_model("resnet18", num_classes=10, width=4)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=fused)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0 / (s + 1))
    # The GradScaler as an fp16 run on CUDA uses it: enabled, with the fused optimizer.
    scaler = torch.amp.GradScaler("cpu", enabled=fused)
    return TrainStep(model, nn.CrossEntropyLoss(label_smoothing=0.1), optimizer,
                            scaler, scheduler, amp_dtype=None)


@pytest.mark.parametrize("fused", [True, False], ids=["fused+scaler", "plain"])
def test_batches_steps_and_flags_never_synchronise(fused):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8, generator=g)
    loader = build_resident_loader(images, torch.arange(64) % 10, AugmentConfig(),
                                   (0.5,) * 3, (0.25,) * 3, batch_size=16, seed=0,
                                   device="cpu")
    loader.set_epoch(1)
    batches = iter(loader)
    train_step = step_parts(fused)
    flags = StepFlags(torch.device("cpu"), lag=2)
    loss_sum, correct = torch.zeros((), dtype=torch.float64), torch.zeros((), dtype=torch.int64)
    with SyncOps() as mode:
        for step in range(1, 4):
            x, y = next(batches)
            loss, logits = train_step(x, y)
            loss_sum += loss.double() * len(y)
            correct += (logits.argmax(1) == y).sum()
            flags.record(step, loss, stop_requested=False)
    assert mode.seen == []
    assert [f.step for f in flags.ready()] == [1]  # steps 2 and 3 are not read yet


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_steps_never_wait_for_the_device():
    """CUDA's own check: any synchronising call inside raises (fp16 with the GradScaler and
    the fused optimizer, as `seed` runs on a GPU)."""
    device = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 32, 32, 3), dtype=torch.uint8, generator=g)
    loader = build_resident_loader(images, torch.arange(256) % 10, AugmentConfig(),
                                   (0.5,) * 3, (0.25,) * 3, batch_size=64, seed=0,
                                   device=device)
    loader.set_epoch(1)
    batches = iter(loader)
    model = create_model("resnet18", num_classes=10, width=8).to(
        device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    train_step = TrainStep(model, nn.CrossEntropyLoss(label_smoothing=0.1), optimizer,
                           torch.amp.GradScaler("cuda"), scheduler, torch.float16)
    flags = StepFlags(device, lag=2)
    train_step(*next(batches))  # first step: cuDNN autotuning, lazy state
    torch.cuda.synchronize()
    read = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            x, y = next(batches)
            loss, _ = train_step(x, y)
            flags.record(step, loss, stop_requested=False)
            read += flags.ready()  # waits on an event only: not a synchronising call
    finally:
        torch.cuda.set_sync_debug_mode("default")
    read += flags.drain()
    assert [(f.step, f.loss_not_finite) for f in read] == [(1, False), (2, False), (3, False)]


def test_step_flags_are_read_lag_steps_later():
    flags = StepFlags(torch.device("cpu"), lag=2)
    losses = [1.0, float("nan"), 2.0, 3.0, float("inf")]
    read = []
    for step, loss in enumerate(losses, start=1):
        read.append([f.step for f in flags.ready()])
        flags.record(step, torch.tensor(loss), stop_requested=step == 3)
    assert read == [[], [], [], [1], [2]]
    rest = flags.drain()
    assert [(f.step, f.loss_not_finite, f.stop_requested) for f in rest] == [
        (3, False, True), (4, False, False), (5, True, False)]
    assert flags.drain() == []
    # Host buffers are reused once read, and never while their flags are unread.
    for step in range(6, 10):
        flags.record(step, torch.tensor(float("nan") if step == 6 else 0.0), False)
    assert [f.loss_not_finite for f in flags.drain()] == [True, False, False, False]


@pytest.fixture
def eager_compile(monkeypatch):
    """torch.compile with the aot_eager backend: the same tracing and autograd graphs as
    inductor, without generating kernels (seconds instead of minutes on a CPU)."""
    calls = []
    real = torch.compile

    def compile_eager(model, **kwargs):
        calls.append(kwargs)
        return real(model, **{**kwargs, "mode": None, "backend": "aot_eager"})

    monkeypatch.setattr(torch, "compile", compile_eager)
    return calls


def tiny(tmp_path, name, **changes):
    settings = {"data": {"source": "synthetic:200", "loader": "resident"}, "epochs": 2,
                "batch_size": 64, "model": {"width": 4}, "optim": {"warmup_epochs": 1},
                "device": "cpu", "out": str(tmp_path), "name": name} | changes
    return apply_dict(seed(), settings)


def test_compiled_augmentation_gives_the_same_batches(eager_compile):
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (40, 32, 32, 3), dtype=torch.uint8, generator=g)
    loaders = [build_resident_loader(images, torch.arange(40) % 10, AugmentConfig(),
                                     (0.5,) * 3, (0.25,) * 3, batch_size=16, seed=0,
                                     device="cpu", compile_mode=mode)
               for mode in ("off", "default")]
    for loader in loaders:
        loader.set_epoch(2, 1)
    eager, compiled = list(loaders[0]), list(loaders[1])
    assert len(eager) == len(compiled) == 2
    for (x, y), (xc, yc) in zip(eager, compiled, strict=True):
        assert torch.equal(y, yc) and torch.allclose(x, xc, atol=1e-5)
    assert len(eager_compile) == 1


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, eager_compile):
    torch._dynamo.reset()
    eager = fit(tiny(tmp_path, "eager"))
    compiled = fit(tiny(tmp_path, "compiled", compile="reduce-overhead"))
    # The model and the augmentation of the resident loader.
    assert eager_compile == [{"mode": "reduce-overhead", "dynamic": False}] * 2
    a = json.loads((tmp_path / "eager" / "result.json").read_text())
    b = json.loads((tmp_path / "compiled" / "result.json").read_text())
    assert b["best_val_acc"] == pytest.approx(a["best_val_acc"], abs=2.0)
    eager_rows = (tmp_path / "eager" / "metrics.csv").read_text().splitlines()[1:]
    compiled_rows = (tmp_path / "compiled" / "metrics.csv").read_text().splitlines()[1:]
    for row_a, row_b in zip(eager_rows, compiled_rows, strict=True):
        loss_a, loss_b = float(row_a.split(",")[2]), float(row_b.split(",")[2])
        assert loss_b == pytest.approx(loss_a, rel=1e-3)
    saved = checkpoint.load(tmp_path / "compiled" / "best.pt")["model"]
    assert set(saved) == set(create_model("resnet18", num_classes=10, width=4).state_dict())
    assert eager.best_epoch >= 1 and compiled.epochs_run == 2


def test_compile_without_a_cpu_compiler_is_refused_before_anything_is_written(tmp_path,
                                                                              monkeypatch):
    inductor = pytest.importorskip("torch._inductor.config")
    monkeypatch.setattr(inductor.cpp, "cxx", ("no-such-c++-compiler",))
    with pytest.raises(UserError, match="--compile default: .*needs a C\\+\\+ compiler"):
        fit(tiny(tmp_path, "r", compile="default"))
    assert not (tmp_path / "r").exists()
