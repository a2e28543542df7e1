"""Model profile: parameters, multiply-accumulates and FLOPs, and the layer table.

MACs come from torchinfo; FLOPs from `torch.utils.flop_counter`, which counts 2 FLOPs per
multiply-accumulate of convolutions and matrix products (so FLOPs = 2 x MACs up to the
few operations each tool leaves out, such as BatchNorm and pooling).

The model is built on the meta device: shapes only, no weights and no arithmetic, so a
profile costs the same small time for any width (a run's report computes one at its end).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torchinfo
from torch.utils.flop_counter import FlopCounterMode
from torchinfo.enums import Units

from cifarlab.models import BASE_WIDTH, MODELS, create_model, model_args


@dataclass
class ModelProfile:
    model: str
    width: int
    classes: int
    params: int
    trainable_params: int
    macs: int  # multiply-accumulates per image, forward
    flops_forward: int  # floating-point operations per image, forward
    flops_train_step: int  # per image, forward + backward
    weights_mb: float  # float32 parameters and buffers, 1 MB = 10^6 bytes
    table: str


def _flops(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def _table(stats: torchinfo.ModelStatistics) -> str:
    """torchinfo's table, its units readable: on Python >= 3.11 torchinfo formats its unit
    enum as e.g. "Units.MEGABYTES" for millions of mult-adds; the value ("M") was meant."""
    table = str(stats)
    for unit in Units:
        if unit.value:
            table = table.replace(f"({unit})", f"({unit.value})")
    return table


def profile_model(
    name: str = "resnet18", classes: int = 10, width: int = BASE_WIDTH,
    args: dict[str, Any] | None = None,
) -> ModelProfile:
    """`width`: the config's model.width (64: the model's published width). `args`: the
    model's own arguments instead (a checkpoint's model_args, a pruned model's included)."""
    with torch.device("meta"):
        model = create_model(**(args or model_args(name, classes, width)))
        # Batch of 2: BatchNorm needs more than one value per channel in training mode.
        x = torch.randn(2, 3, 32, 32)
    stats = torchinfo.summary(
        model, input_size=(1, 3, 32, 32), verbose=0, device="meta", mode="eval"
    )
    model.eval()
    flops_forward = _flops(model, x, backward=False) // 2
    model.train()
    flops_train = _flops(model, x, backward=True) // 2
    buffers = sum(b.numel() * b.element_size() for b in model.buffers())
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    return ModelProfile(
        model=name,
        width=width,
        classes=classes,
        params=stats.total_params,
        trainable_params=stats.trainable_params,
        macs=stats.total_mult_adds,
        flops_forward=flops_forward,
        flops_train_step=flops_train,
        weights_mb=(params + buffers) / 1e6,
        table=_table(stats),
    )


@dataclass
class ModelSize:
    model: str
    params: int
    macs: int  # multiply-accumulates per 32x32 image, forward


def model_size(args: dict) -> ModelSize:
    """Parameters and MACs of the model that `create_model(**args)` builds (meta device)."""
    with torch.device("meta"):
        model = create_model(**args)
    stats = torchinfo.summary(
        model, input_size=(1, 3, 32, 32), verbose=0, device="meta", mode="eval"
    )
    return ModelSize(args["name"], stats.total_params, stats.total_mult_adds)


def model_sizes(classes: int = 10, width: int = BASE_WIDTH) -> list[ModelSize]:
    """Parameters and MACs of every registered model, in registration order (meta device)."""
    return [model_size(model_args(name, classes, width)) for name in MODELS]
