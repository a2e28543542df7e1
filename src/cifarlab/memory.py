"""Will a model train in this machine's memory? Checked before anything is allocated.

The estimate needs no memory itself: the model is built on the meta device (shapes only) and
one training batch goes through it there, counting what autograd keeps for the backward pass.
Training needs the weights, their gradients and SGD's momentum (3 x the parameters), the
buffers, and that batch's saved activations; mixed precision and the framework's workspace
shift this by a modest factor either way, so only a model that clearly cannot fit is refused.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

from cifarlab.errors import UserError
from cifarlab.models import create_model, model_args


@dataclass
class TrainingMemory:
    state: int  # bytes: weights, gradients, momentum, buffers
    activations: int  # bytes kept by autograd for one batch

    @property
    def total(self) -> int:
        return self.state + self.activations


def estimate(name: str, num_classes: int, width: int, batch: int) -> TrainingMemory:
    """Memory to train `name` at `width` on batches of `batch` 32x32 images (float32)."""
    with torch.device("meta"):
        model = create_model(**model_args(name, num_classes, width)).train()
        x = torch.empty(batch, 3, 32, 32)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        if id(t) not in seen:  # one tensor saved by two operations is held once
            seen.add(id(t))
            saved += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    return TrainingMemory(3 * params + buffers, saved + out.numel() * out.element_size())


def available(device: torch.device) -> int | None:
    """Bytes free for training on `device`, or None where it cannot be told."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type == "cpu" and sys.platform.startswith("linux"):
        try:
            with open("/proc/meminfo") as f:
                for line in f:
                    if line.startswith("MemAvailable:"):
                        return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            return None
    return None


def _size(n: float) -> str:
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 1e3:.0f} kB"


def check_fits(name: str, num_classes: int, width: int, batch: int,
               device: torch.device) -> None:
    """UserError when training clearly cannot fit in `device`'s free memory; says how much
    it needs and what to lower. Nothing is checked where the free memory is unknown."""
    free = available(device)
    if free is None:
        return
    need = estimate(name, num_classes, width, batch)
    if need.total <= free:
        return
    smaller = 1 << (max(width, 2).bit_length() - 1)  # a power of two below the width
    while smaller > 1 and (smaller >= width
                           or estimate(name, num_classes, smaller, batch).total > free):
        smaller //= 2
    fits = estimate(name, num_classes, smaller, batch).total <= free
    hint = f"model.width (e.g. --set model.width={smaller}) or " if fits else ""
    raise UserError(
        f"{name} at model.width={width} needs about {_size(need.total)} of {device.type} memory "
        f"to train (weights, gradients and momentum {_size(need.state)}, one batch of {batch} "
        f"images {_size(need.activations)}), and {_size(free)} are free; lower {hint}"
        f"--batch-size")
