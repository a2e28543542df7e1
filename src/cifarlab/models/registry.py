"""The model registry: every architecture registers a factory under its name.

`create_model(name, num_classes=..., **arch_args)` builds one from its constructor
arguments (what a checkpoint stores as `model_args`); `model_args(name, num_classes, width)`
turns the config's `model.width` into those arguments. `model.width` is a width on the
ResNet-18 scale: 64 builds every model at its published width, and W scales each family's
channel counts by W / 64 (ResNet-18's base width is then exactly W).
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from cifarlab.errors import UserError

BASE_WIDTH = 64  # model.width that builds each model at its published width


@dataclass(frozen=True)
class ModelEntry:
    build: Callable[..., nn.Module]  # factory(num_classes=..., **arch_args)
    width_args: Callable[[int], dict[str, Any]]  # model.width -> arch_args (plain types)


MODELS: dict[str, ModelEntry] = {}


def register(width_args: Callable[[int], dict[str, Any]]) -> Callable:
    """Decorator: register a factory under its function name."""
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[factory.__name__] = ModelEntry(factory, width_args)
        return factory
    return add


def scaled(channels: Sequence[int], width: int) -> list[int]:
    """Channel counts scaled by width / 64, rounded, at least 1."""
    return [max(1, round(c * width / BASE_WIDTH)) for c in channels]


def check_name(name: str) -> None:
    """UserError naming the nearest registered model if `name` is not one."""
    if name in MODELS:
        return
    close = difflib.get_close_matches(name, MODELS, n=1)
    hint = f"did you mean '{close[0]}'?" if close else "choose one"
    raise UserError(f"unknown model '{name}': {hint} (`cifarlab models` lists them all)")


def model_args(name: str, num_classes: int, width: int = BASE_WIDTH) -> dict[str, Any]:
    """The constructor arguments of model `name` at config width `width`, as plain types:
    {"name", "num_classes", **arch_args}; `create_model(**model_args(...))` builds it."""
    check_name(name)
    return {"name": name, "num_classes": num_classes, **MODELS[name].width_args(width)}


def create_model(name: str, num_classes: int = 10, **arch_args: Any) -> nn.Module:
    check_name(name)
    return MODELS[name].build(num_classes=num_classes, **arch_args)


def kaiming_init(model: nn.Module) -> None:
    """Kaiming (fan_out, ReLU) for convolutions as torchvision's ResNet, zero conv biases;
    BatchNorm starts as the identity. Linear layers keep PyTorch's default."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
