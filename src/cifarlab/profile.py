"""Model profile: parameters, multiply-accumulates and FLOPs, and the layer table.

MACs are counted as torchinfo counts its "mult-adds" (`count_macs`); FLOPs come from
`torch.utils.flop_counter`, which counts 2 FLOPs per multiply-accumulate of convolutions
and matrix products (so FLOPs = 2 x MACs up to the few operations each one leaves out, such
as BatchNorm and pooling). torchinfo itself is imported only to draw the layer table, so
that every other command works without it.

The model is built on the meta device: shapes only, no weights and no arithmetic, so a
profile costs the same small time for any width (a run's report computes one at its end).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from cifarlab.errors import UserError
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
    table: str  # torchinfo's layer table; "" when not asked for


def _flops(model: torch.nn.Module, x: torch.Tensor, backward: bool) -> int:
    with FlopCounterMode(display=False) as counter:
        out = model(x)
        if backward:
            out.sum().backward()
    return counter.get_total_flops()


def count_macs(model: nn.Module) -> int:
    """Multiply-accumulates of one forward pass of a 32x32 image, counted as torchinfo counts
    its "Total mult-adds": each leaf layer's weight and bias elements, times the positions
    of its output for a convolution (pixels), once otherwise. `model` is on the meta
    device. (The same numbers as torchinfo's for every registered model, tested.)"""
    total = 0

    def count(module: nn.Module, inputs: Any, output: torch.Tensor) -> None:
        nonlocal total
        weights = sum(p.numel() for name, p in module.named_parameters(recurse=False)
                      if name in ("weight", "bias"))
        positions = output.shape[0] * (math.prod(output.shape[2:])
                                       if "Conv" in type(module).__name__ else 1)
        total += weights * positions

    hooks = [m.register_forward_hook(count) for m in model.modules()
             if not any(m.children()) and any(True for _ in m.parameters(recurse=False))]
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.empty(1, 3, 32, 32, device="meta"))
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return total


def layer_table(model: nn.Module) -> str:
    """torchinfo's layer table of `model` (on the meta device), its units readable: on
    Python >= 3.11 torchinfo formats its unit enum as e.g. "Units.MEGABYTES" for millions of
    mult-adds; the value ("M") was meant. UserError when torchinfo is not installed."""
    try:
        import torchinfo
        from torchinfo.enums import Units
    except ImportError:
        raise UserError("the layer table needs the torchinfo package; install it with: pip "
                        "install torchinfo (or leave the table out: --json)") from None
    table = str(torchinfo.summary(model, input_size=(1, 3, 32, 32), verbose=0, device="meta",
                                  mode="eval"))
    for unit in Units:
        if unit.value:
            table = table.replace(f"({unit})", f"({unit.value})")
    return table


def has_layer_tables() -> bool:
    """Whether torchinfo, which draws the layer table, is installed."""
    import importlib.util

    return importlib.util.find_spec("torchinfo") is not None


def profile_model(
    name: str = "resnet18", classes: int = 10, width: int = BASE_WIDTH,
    args: dict[str, Any] | None = None, table: bool = True,
) -> ModelProfile:
    """`width`: the config's model.width (64: the model's published width). `args`: the
    model's own arguments instead (a checkpoint's model_args, a pruned model's included).
    `table`: draw torchinfo's layer table too (UserError without torchinfo)."""
    with torch.device("meta"):
        model = create_model(**(args or model_args(name, classes, width)))
        # Batch of 2: BatchNorm needs more than one value per channel in training mode.
        x = torch.randn(2, 3, 32, 32)
    drawn = layer_table(model) if table else ""
    macs = count_macs(model)
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
        params=sum(p.numel() for p in model.parameters()),
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        macs=macs,
        flops_forward=flops_forward,
        flops_train_step=flops_train,
        weights_mb=(params + buffers) / 1e6,
        table=drawn,
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
    return ModelSize(args["name"], sum(p.numel() for p in model.parameters()),
                     count_macs(model))


def model_sizes(classes: int = 10, width: int = BASE_WIDTH) -> list[ModelSize]:
    """Parameters and MACs of every registered model that can be built at `width`, in
    registration order (meta device); airbench needs 24 or more."""
    sizes = []
    for name in MODELS:
        try:
            sizes.append(model_size(model_args(name, classes, width)))
        except UserError:  # narrower than the architecture allows
            continue
    return sizes
