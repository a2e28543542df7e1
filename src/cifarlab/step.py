"""One optimisation step, and the per-step flags the loop reads without waiting on the device.

Nothing here makes the host wait for the device: the step's loss and logits stay there
(train.py adds them to running sums on the device), and a step's flags (loss not finite,
stop requested) reach the host through `StepFlags`, read a fixed number of steps later.
tests/test_step.py checks that a step issues none of the operations that synchronise with a
GPU.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from cifarlab import distributed
from cifarlab.errors import UserError
from cifarlab.training.ema import ModelEma

# oneDNN's largest vector block, in float32 channels: 8 with AVX2, 16 with AVX-512.
ONEDNN_MAX_BLOCK = 16


def channels_last_is_safe(model: nn.Module) -> bool:
    """Whether `model` can train in channels-last memory on a CPU.

    oneDNN's weight gradient of a 1x1 convolution with a stride above 1 (a ResNet shortcut)
    with channels-last input and fewer input channels than its vector block hangs, aborts or
    is silently wrong (uxlfoundation/oneDNN#6035; measured with AVX2 kernels on an AMD EPYC:
    9 % to 99 % relative error at 2, 4, 6 and 7 input channels, a hang or an abort at 3 and
    5; correct from 8 on, and on AVX-512 kernels). Narrow and pruned networks reach such
    channel counts; contiguous NCHW input takes other kernels, which are correct.
    """
    return not any(
        isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and max(m.stride) > 1
        and m.in_channels // m.groups < ONEDNN_MAX_BLOCK
        for m in model.modules())


def memory_format(device: torch.device | str, model: nn.Module | None = None
                  ) -> torch.memory_format:
    """The layout of image batches and of `model` on `device`.

    CUDA: channels-last, which cuDNN's fastest kernels want. CPU: channels-last too where
    `channels_last_is_safe(model)` (measured 14-42 % faster than NCHW on 2 cores,
    BENCHMARKS.md), contiguous NCHW otherwise and where no model is given.
    """
    if torch.device(device).type == "cuda":
        return torch.channels_last
    safe = model is not None and channels_last_is_safe(model)
    return torch.channels_last if safe else torch.contiguous_format


def compiled(fn: Callable[..., Any], mode: str, device: torch.device | str) -> Callable[..., Any]:
    """A module or function under torch.compile in `mode` (settings_rules.COMPILE_MODES) for
    `device`, or itself for "off".

    "reduce-overhead" replays the compiled code as CUDA graphs, which removes the launch
    overhead that bounds a GPU on 32x32 images. Shapes are static: the last, smaller batch
    of an epoch compiles once more instead of making every graph shape-generic.
    A compiled module shares its parameters with the original, which stays the one that is
    evaluated and saved (its state_dict keys carry no compile prefix).

    On the CPU, inductor's layout optimisation would turn every convolution channels-last,
    straight into the oneDNN fault that `memory_format` avoids; it is switched off there,
    so that the compiled step keeps the layouts it is given (the options of `mode` plus that
    one: torch.compile takes a mode or options, not both).
    """
    if mode == "off":
        return fn
    if torch.device(device).type == "cpu":
        from torch._inductor import list_mode_options

        options = {**list_mode_options(mode), "layout_optimization": False}
        return torch.compile(fn, options=options, dynamic=False)
    return torch.compile(fn, mode=None if mode == "default" else mode, dynamic=False)


def check_compile(mode: str, device: torch.device) -> None:
    """Refuse a compile mode that cannot work here, before any work is done: torch.compile
    generates Triton kernels for CUDA and C++ for the CPU."""
    if mode == "off":
        return
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise UserError(f"--compile {mode}: torch.compile needs Triton on CUDA GPUs and it "
                            "is not installed; pip install triton, or use --compile off")
        return
    try:  # a private helper of inductor: without it, a missing compiler shows at compile time
        from torch._inductor.cpp_builder import get_cpp_compiler
    except ImportError:
        return
    try:
        get_cpp_compiler()
    except RuntimeError:
        raise UserError(f"--compile {mode}: torch.compile on the CPU needs a C++ compiler and "
                        "none was found; install g++ (or set CXX), or use --compile off"
                        ) from None


@dataclass
class TrainStep:
    """Forward, loss, backward, optimizer step and (with `ema`) the moving average's update
    on one batch; returns the detached loss and logits, still on the device. The targets are
    labels, or target distributions with a soft-target criterion (training/mixing.py).
    With a `teacher` (frozen, training/distill.py) it sees the very batch the model sees,
    under the same autocast but without gradients, and the criterion is called with
    (logits, teacher's logits, targets)."""

    model: nn.Module  # the module that steps (DDP-wrapped and/or compiled)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # disabled unless fp16
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per batch
    amp_dtype: torch.dtype | None  # autocast dtype; None: float32
    ema: ModelEma | None = None  # updated after every optimizer step
    teacher: nn.Module | None = None  # never steps; not wrapped in DDP, not compiled

    def __post_init__(self) -> None:
        self.cpu_layout = memory_format("cpu", self.model)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Every backward pass goes through here: whatever the caller's layout, the one for
        # this model and device (memory_format; a no-op when the batch has it already).
        x = x.contiguous(memory_format=torch.channels_last if x.is_cuda else self.cpu_layout)
        amp = self.amp_dtype is not None
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=amp):
            logits = self.model(x)
            if self.teacher is None:
                loss = self.criterion(logits, y)
            else:
                with torch.no_grad():
                    teacher_logits = self.teacher(x)
                loss = self.criterion(logits, teacher_logits, y)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        # With a fused optimizer (CUDA) the scaler skips an overflowing step on the device.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.ema is not None:
            self.ema.update()
        return loss.detach(), logits.detach()


@dataclass
class Flags:
    step: int  # the step (1-based within its epoch) whose flags these are
    loss_not_finite: bool
    stop_requested: bool


class StepFlags:
    """Each step's [loss not finite, stop requested], maxed over the DDP ranks, read `lag`
    steps after they were recorded.

    Reading a device tensor directly (`.tolist()`) would wait for everything queued so far,
    the step just launched included, so the GPU would drain once per step. Instead each
    step's flags are copied (non-blocking) into a pinned host buffer and an event marks when
    the copy has landed; `ready()` waits only for the event of the step `lag` steps back,
    which the device has normally finished long before. The lag is a fixed count, so every
    DDP rank takes the same decision at the same step.
    """

    def __init__(self, device: torch.device, lag: int = 2) -> None:
        self.lag, self.cuda = lag, device.type == "cuda"
        self.pending: deque[tuple[int, torch.Tensor, torch.cuda.Event | None]] = deque()
        # Host buffers and events already read, reused (pinned memory is slow to allocate).
        self.free: list[tuple[torch.Tensor, torch.cuda.Event | None]] = []

    def record(self, step: int, loss: torch.Tensor, stop_requested: bool) -> None:
        # torch.full, not torch.tensor: a copy from the host would wait for the device.
        stop = torch.full((), float(stop_requested), device=loss.device)
        flags = torch.stack([(~torch.isfinite(loss)).float(), stop])
        distributed.all_reduce(flags, "max")
        host, event = self.free.pop() if self.free else (
            torch.zeros(2, pin_memory=self.cuda), torch.cuda.Event() if self.cuda else None)
        host.copy_(flags, non_blocking=True)
        if event is not None:
            event.record()
        self.pending.append((step, host, event))

    def _pop(self) -> Flags:
        step, host, event = self.pending.popleft()
        if event is not None:
            event.synchronize()
        loss_not_finite, stop_requested = host.tolist()
        self.free.append((host, event))
        return Flags(step, bool(loss_not_finite), bool(stop_requested))

    def ready(self) -> list[Flags]:
        """The flags of the steps recorded more than `lag` steps ago, oldest first."""
        return [self._pop() for _ in range(len(self.pending) - self.lag)]

    def drain(self) -> list[Flags]:
        """All flags recorded and not yet read (waits for the device), oldest first."""
        return [self._pop() for _ in range(len(self.pending))]
