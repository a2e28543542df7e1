"""Model registry: `create_model(name, num_classes=..., width=...)`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from cifarlab.errors import UserError
from cifarlab.models.resnet import resnet18

MODELS: dict[str, Callable[..., nn.Module]] = {"resnet18": resnet18}


def create_model(name: str, num_classes: int = 10, width: int = 64) -> nn.Module:
    if name not in MODELS:
        raise UserError(f"unknown model '{name}': choose one of {', '.join(MODELS)}")
    return MODELS[name](num_classes=num_classes, width=width)
