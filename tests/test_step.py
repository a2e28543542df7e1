"""The training step: no host synchronisation per step, flags read a fixed lag later, and
torch.compile leaving what is trained and saved unchanged."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from cifarlab import checkpoint
from cifarlab.config import AugmentConfig, MixConfig, apply_dict
from cifarlab.data.resident import build_resident_loader
from cifarlab.devices import channels_last_is_safe, memory_format
from cifarlab.errors import UserError
from cifarlab.models import create_model
from cifarlab.presets import seed
from cifarlab.step import StepFlags, TrainStep
from cifarlab.train import fit
from cifarlab.training.ema import ModelEma
from cifarlab.training.mixing import Mixer, SoftTargetCrossEntropy

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
                     scaler, scheduler, amp_dtype=None, clip_grad_norm=1.0)


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


@pytest.mark.parametrize("scaled", [False, True], ids=["float32", "loss-scaled"])
def test_gradients_are_clipped_to_the_norm_before_the_step(scaled):
    def one_step(clip):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # the update is the gradient
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=scaled)
        before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
        step = TrainStep(model, nn.CrossEntropyLoss(), optimizer, scaler, scheduler, None,
                         clip_grad_norm=clip)
        step(torch.randn(8, 3, 2, 2) * 10, torch.arange(8) % 5)
        return (before - torch.cat([p.detach().flatten() for p in model.parameters()])).norm()

    free = one_step(0.0)
    assert free > 0.5  # the true gradient's norm, fp16's loss scale divided out
    assert one_step(0.1).item() == pytest.approx(0.1, rel=1e-4)
    assert one_step(1e3).item() == pytest.approx(free.item(), rel=1e-5)  # under the norm


def test_mixup_cutmix_and_ema_steps_never_synchronise():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(16, 3, 32, 32, generator=g), torch.arange(16) % 10
    train_step = step_parts(fused=True)
    train_step.criterion = SoftTargetCrossEntropy()
    train_step.ema = ModelEma(train_step.model, decay=0.99)
    mixer = Mixer(MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0), 10, 0.1, seed=0)
    assert {mixer.draw(1, s, 32, 32).box is None for s in range(4)} == {True, False}
    correct = torch.zeros((), dtype=torch.int64)
    with SyncOps() as mode:
        for step in range(4):
            mixed, targets, labels = mixer(x, y, 1, step)
            loss, logits = train_step(mixed, targets)
            correct += (logits.argmax(1) == labels).sum()
    assert mode.seen == []
    assert train_step.ema.updates == 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("recipe", ["seed", "mix+ema"])
def test_on_a_gpu_steps_never_wait_for_the_device(recipe):
    """CUDA's own check: any synchronising call inside raises (fp16 with the GradScaler and
    the fused optimizer, as `seed` runs on a GPU; and with mixup/CutMix and the EMA)."""
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
    mixer = None
    if recipe == "mix+ema":
        train_step.criterion = SoftTargetCrossEntropy()
        train_step.ema = ModelEma(model, decay=0.99)
        mixer = Mixer(MixConfig(mixup_alpha=0.2, cutmix_alpha=1.0), 10, 0.1, seed=0)
    flags = StepFlags(device, lag=2)
    x, y = next(batches)
    if mixer is not None:
        x, y, _ = mixer(x, y, 1, 0)
    train_step(x, y)  # first step: cuDNN autotuning, lazy state
    torch.cuda.synchronize()
    read = []
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 4):
            x, y = next(batches)
            if mixer is not None:
                x, y, _ = mixer(x, y, 1, step)
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


def test_compiled_training_matches_eager_and_saves_plain_weights(tmp_path, eager_compile,
                                                                 caplog):
    torch._dynamo.reset()
    with caplog.at_level(logging.INFO, "cifarlab"):
        eager = fit(tiny(tmp_path, "eager"))
        assert "torch.compile" not in caplog.text
        compiled = fit(tiny(tmp_path, "compiled", compile="max-autotune"))
    assert "torch.compile (max-autotune) compiles the step" in caplog.text
    # The model and the augmentation of the resident loader; on the CPU, the mode's options
    # with inductor's channels-last layout switched off (devices.memory_format).
    from torch._inductor import list_mode_options

    cpu_options = {**list_mode_options("max-autotune"), "layout_optimization": False}
    assert cpu_options["max_autotune"]
    assert eager_compile == [{"options": cpu_options, "dynamic": False}] * 2
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


def test_cuda_graphs_on_a_cpu_are_refused_before_anything_is_written(tmp_path):
    with pytest.raises(UserError, match="reduce-overhead replays CUDA graphs.*--compile default"):
        fit(tiny(tmp_path, "r", compile="reduce-overhead"))
    assert not (tmp_path / "r").exists()


# --- the CPU's layout: away from oneDNN's faulty kernel (devices.memory_format) ---------------
# oneDNN's AVX2 weight gradient of a 1x1 stride-2 convolution with channels-last input and
# fewer than 8 input channels hangs, aborts or is silently wrong (uxlfoundation/oneDNN#6035).
# ONEDNN_MAX_CPU_ISA=AVX2 sends any x86 CPU, Intel or AMD, to those kernels; the checks run
# in a subprocess with a hard time limit, so that a hang fails the test, not the suite.
AVX2 = {"ONEDNN_MAX_CPU_ISA": "AVX2", "OMP_NUM_THREADS": "2"}


def run_on_avx2_kernels(args: list[str], timeout: float, what: str
                        ) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **AVX2})
    except subprocess.TimeoutExpired:
        pytest.fail(f"{what}: no result within {timeout} s on oneDNN's AVX2 kernels (hung)",
                    pytrace=False)


@pytest.mark.parametrize("width, given, expected", [
    (4, torch.channels_last, torch.contiguous_format),  # shortcuts from 4 and 8 channels
    (16, torch.contiguous_format, torch.channels_last),  # from 16, 32 and 64: the fast one
])
def test_the_step_gives_the_cpu_the_models_layout_whatever_it_is_given(width, given, expected):
    model = create_model("resnet18", num_classes=10, width=width)
    seen = []
    for conv in (m for m in model.modules() if isinstance(m, nn.Conv2d)):
        conv.register_forward_pre_hook(
            lambda _, args: seen.append(args[0].is_contiguous(memory_format=expected)))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train_step = TrainStep(model, nn.CrossEntropyLoss(), optimizer,
                           torch.amp.GradScaler("cpu", enabled=False),
                           torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), None)
    train_step(torch.randn(8, 3, 32, 32).contiguous(memory_format=given), torch.arange(8))
    assert len(seen) == 20 and all(seen)  # every convolution got its input in that layout
    assert memory_format("cpu", model) == expected
    assert memory_format("cpu") == torch.contiguous_format  # no model: the safe one
    assert memory_format("cuda", model) == torch.channels_last


def test_channels_last_is_safe_only_without_narrow_strided_1x1_convolutions():
    assert channels_last_is_safe(create_model("resnet18", width=64))
    assert not channels_last_is_safe(create_model("resnet18", width=8))  # 8 -> 16 shortcut
    assert channels_last_is_safe(create_model("resnet20"))  # no 1x1 convolutions at all
    assert not channels_last_is_safe(nn.Conv2d(15, 32, 1, stride=2))
    assert channels_last_is_safe(nn.Conv2d(16, 32, 1, stride=2))
    assert channels_last_is_safe(nn.Conv2d(4, 32, 1, stride=1))
    assert channels_last_is_safe(nn.Conv2d(4, 32, 3, stride=2))


# Each convolution's weight gradient, as the step computed it, against the same gradient
# computed in float64 by ATen (not oneDNN) from the same float32 input and output gradient:
# this isolates the kernel (about 1e-7 when right; 9 % to 99 % with the fault). A script
# fragment, for the subprocesses that run on oneDNN's AVX2 kernels (test_prune.py uses it
# too): `weight_gradient_errors(model, x, y)` steps `model` once on the channels-last batch
# (the layout that can break it) and returns {convolution: relative error} and the layout
# its first convolution was given.
WEIGHT_GRADIENT_ERRORS = """
import torch
from torch import nn
from cifarlab.step import TrainStep
def weight_gradient_errors(model, x, y):
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    seen = {}
    def keep(name):
        def hook(conv, inputs, output):
            seen[name] = [inputs[0].detach()]
            output.register_hook(lambda grad: seen[name].append(grad))
        return hook
    for name, conv in convs.items():
        conv.register_forward_hook(keep(name))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # keeps the gradients, no change
    step = TrainStep(model, nn.CrossEntropyLoss(), optimizer,
                     torch.amp.GradScaler("cpu", enabled=False),
                     torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0), None)
    step(x.contiguous(memory_format=torch.channels_last), y)
    errors = {}
    for name, conv in convs.items():
        inputs, grad = seen[name]
        expected = torch.nn.grad.conv2d_weight(inputs.double(), conv.weight.shape,
                                               grad.double(), conv.stride, conv.padding,
                                               groups=conv.groups)
        error = (conv.weight.grad.double() - expected).norm() / expected.norm()
        errors[name] = error.item()
    first = seen[next(iter(convs))][0]
    layout = "channels_last" if first.is_contiguous(memory_format=torch.channels_last) else "nchw"
    return errors, layout
"""

GRADIENTS = WEIGHT_GRADIENT_ERRORS + """
import json
from cifarlab.config import AugmentConfig
from cifarlab.data.resident import build_resident_loader
from cifarlab.models import create_model
from cifarlab.devices import memory_format
torch.manual_seed(0)
images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
loader = build_resident_loader(images, torch.arange(64) % 10, AugmentConfig(), (0.5,) * 3,
                               (0.25,) * 3, batch_size=64, seed=0, device="cpu")
loader.set_epoch(1)
x, y = next(iter(loader))
errors, layouts = {}, {}
# Shortcuts from 2, 3, 4 and 6 input channels (NCHW), and from 16 on (channels-last).
for width in (2, 3, 4, 16):
    model = create_model("resnet18", num_classes=10, width=width)
    model = model.to(memory_format=memory_format("cpu", model))  # as train.py does
    width_errors, layouts[width] = weight_gradient_errors(model, x, y)
    errors.update({f"{width}:{name}": e for name, e in width_errors.items()})
print(json.dumps({"errors": errors, "layouts": layouts}))
"""

def test_narrow_resnets_get_correct_gradients_on_avx2_kernels():
    proc = run_on_avx2_kernels([sys.executable, "-c", GRADIENTS], 120, "a narrow step")
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["layouts"] == {"2": "nchw", "3": "nchw", "4": "nchw", "16": "channels_last"}
    errors = result["errors"]
    assert len(errors) == 4 * 20 and "4:layer2.0.shortcut.0" in errors
    worst = max(errors.items(), key=lambda kv: kv[1])
    assert worst[1] < 1e-4, worst


def test_a_width_4_run_on_the_resident_loader_finishes_on_avx2_kernels(tmp_path):
    """The command that hung on an AMD EPYC (AVX2, no AVX-512)."""
    proc = run_on_avx2_kernels(
        [sys.executable, "-m", "cifarlab", "train", "--data", "synthetic:200", "--loader",
         "resident", "--device", "cpu", "--set", "model.width=4", "--epochs", "2",
         "--batch-size", "64", "--out", str(tmp_path), "--name", "narrow"],
        120, "cifarlab train at width 4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((tmp_path / "narrow" / "result.json").read_text())["epochs_run"] == 2


COMPILED_GRADIENT = """
import torch
from torch import nn
from cifarlab.devices import compiled
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 4, 3, 1, 1), nn.ReLU(), nn.Conv2d(4, 8, 1, 2, bias=False))
x, g = torch.randn(64, 3, 32, 32), torch.randn(64, 8, 16, 16)
reference = [p.detach().double().requires_grad_() for p in model.parameters()]
h = torch.relu(nn.functional.conv2d(x.double(), reference[0], reference[1], padding=1))
nn.functional.conv2d(h, reference[2], stride=2).backward(g.double())
compiled(model, "default", "cpu")(x).backward(g)
w = model[2].weight.grad.double()
print(((w - reference[2].grad).norm() / reference[2].grad.norm()).item())
"""


def test_compiled_cpu_steps_keep_nchw_and_correct_gradients_on_avx2_kernels():
    """Inductor would make every convolution channels-last on the CPU (measured: 54 %
    relative error in this shortcut's weight gradient); compiled() switches that off."""
    pytest.importorskip("torch._inductor")
    proc = run_on_avx2_kernels([sys.executable, "-c", COMPILED_GRADIENT], 240,
                               "a compiled step")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert float(proc.stdout.split()[-1]) < 1e-4


@pytest.mark.parametrize("soft", [False, True], ids=["labels", "soft-targets"])
def test_accumulated_pieces_give_the_whole_batchs_step(soft):
    """optim.accumulate: the batch in pieces (10 images in 3: 4, 3, 3) gives the step of the
    whole batch, loss and logits included, in float64 and without BatchNorm."""
    def one_step(accumulate):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                              nn.Linear(4 * 16, 5)).double()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
        scaler = torch.amp.GradScaler("cpu", enabled=False)
        criterion = SoftTargetCrossEntropy() if soft else nn.CrossEntropyLoss()
        step = TrainStep(model, criterion, optimizer, scaler, scheduler, None,
                         clip_grad_norm=0.05, accumulate=accumulate)
        g = torch.Generator().manual_seed(1)
        x = torch.randn(10, 3, 4, 4, generator=g, dtype=torch.float64)
        y = (torch.softmax(torch.randn(10, 5, generator=g, dtype=torch.float64), 1) if soft
             else torch.arange(10) % 5)
        loss, logits = step(x, y)
        return loss, logits, torch.cat([p.detach().flatten() for p in model.parameters()])

    whole, pieces = one_step(1), one_step(3)
    for a, b in zip(whole, pieces, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
