"""One optimisation step, and the per-step flags the loop reads without waiting on the device.

Nothing here makes the host wait for the device: the step's loss and logits stay there
(train.py adds them to running sums on the device), and a step's flags (loss not finite,
stop requested) reach the host through `StepFlags`, read a fixed number of steps later.
tests/test_step.py checks that a step issues none of the operations that synchronise with a
GPU.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from cifarlab import distributed
from cifarlab.config import Config
from cifarlab.devices import memory_format
from cifarlab.errors import TrainingFailed
from cifarlab.training.ema import ModelEma
from cifarlab.training.lookahead import Lookahead

# Steps between a step and the host reading its flags (step.StepFlags); the device runs
# that far ahead of the checks. A NaN loss therefore stops training FLAG_LAG steps late at
# most, before any checkpoint is written from the poisoned weights.
FLAG_LAG = 2
MIN_LOSS_SCALE = 1.0  # fp16: a GradScaler scale under this means steps keep being skipped


@dataclass
class TrainStep:
    """Forward, loss, backward, optimizer step, (with `lookahead`) the pull to the slow
    weights and (with `ema`) the moving average's update on one batch; returns the detached
    loss and logits, still on the device. The targets are labels, or target distributions
    with a soft-target criterion (training/mixing.py). With a `teacher` (frozen,
    training/distill.py) it sees the very batch the model sees, under the same autocast but
    without gradients, and the criterion is called with (logits, teacher's logits, targets)."""

    model: nn.Module  # the module that steps (DDP-wrapped and/or compiled)
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # disabled unless fp16
    scheduler: torch.optim.lr_scheduler.LRScheduler  # stepped once per batch
    amp_dtype: torch.dtype | None  # autocast dtype; None: float32
    ema: ModelEma | None = None  # updated after every optimizer step
    teacher: nn.Module | None = None  # never steps; not wrapped in DDP, not compiled
    clip_grad_norm: float = 0.0  # the gradients' largest L2 norm, all together; 0: off
    accumulate: int = 1  # forward and backward passes per step, each on a piece of the batch
    lookahead: Lookahead | None = None  # pulled after the step by the run's step count

    def __post_init__(self) -> None:
        self.cpu_layout = memory_format("cpu", self.model)

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Every backward pass goes through here: whatever the caller's layout, the one for
        # this model and device (memory_format; a no-op when the batch has it already).
        x = x.contiguous(memory_format=torch.channels_last if x.is_cuda else self.cpu_layout)
        self.optimizer.zero_grad(set_to_none=True)
        # Gradient accumulation: the batch in `accumulate` pieces, each piece's mean loss
        # weighted by its share of the batch, so the gradients add up to the whole batch's
        # (exactly so without BatchNorm, which normalises each piece by its own statistics).
        pieces = [(px, py) for px, py in zip(x.tensor_split(self.accumulate),
                                             y.tensor_split(self.accumulate), strict=True)
                  if len(px)]
        losses, logits = [], []
        for i, (px, py) in enumerate(pieces):
            # DDP all-reduces the gradients once, at the last piece.
            last = i == len(pieces) - 1
            no_sync = getattr(self.model, "no_sync", None)
            with contextlib.nullcontext() if last or no_sync is None else no_sync():
                loss, out = self._forward(px, py)
                if len(pieces) > 1:
                    loss = loss * (len(px) / len(x))
                self.scaler.scale(loss).backward()
            losses.append(loss.detach())
            logits.append(out.detach())
        if self.clip_grad_norm:
            # The norm of the true gradients: fp16's scaled ones are divided back first (the
            # scaler then knows not to do it again). The norm stays on the device: no wait.
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(
                [p for g in self.optimizer.param_groups for p in g["params"]],
                self.clip_grad_norm, foreach=True)
        # With a fused optimizer (CUDA) the scaler skips an overflowing step on the device.
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        if self.lookahead is not None:  # before the EMA, which then averages its result
            self.lookahead.update(self.scheduler.last_epoch)  # the run's steps so far
        if self.ema is not None:
            self.ema.update()
        if len(pieces) == 1:
            return losses[0], logits[0]
        return torch.stack(losses).sum(), torch.cat(logits)

    def _forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The loss and logits of one (micro-)batch, under the step's autocast."""
        amp = self.amp_dtype is not None
        with torch.autocast(x.device.type, dtype=self.amp_dtype, enabled=amp):
            logits = self.model(x)
            if self.teacher is None:
                return self.criterion(logits, y), logits
            with torch.no_grad():
                teacher_logits = self.teacher(x)
            return self.criterion(logits, teacher_logits, y), logits


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


def check_flags(flags: list[Flags], epoch: int, config: Config) -> bool:
    """Raise when a step's loss was NaN or infinite; return whether a stop was requested."""
    for f in flags:
        if f.loss_not_finite:
            raise TrainingFailed(
                f"the training loss became NaN or infinite at epoch {epoch}, step {f.step}; "
                f"the checkpoints from before are kept; lower the learning rate (--lr, now "
                f"{config.optim.lr:g}) or train in float32 (--amp off)"
            )
    return any(f.stop_requested for f in flags)


def check_loss_scale(scaler: torch.amp.GradScaler, epoch: int) -> None:
    """fp16: the GradScaler halves its scale at each skipped (overflowing) step; a scale
    under MIN_LOSS_SCALE means steps kept being skipped, so the weights stopped learning."""
    if scaler.is_enabled() and scaler.get_scale() < MIN_LOSS_SCALE:
        raise TrainingFailed(
            f"fp16 gradients overflowed step after step (loss scale {scaler.get_scale():g}) "
            f"in epoch {epoch}; the checkpoints from before are kept; use --amp bf16 or "
            "lower --lr"
        )
