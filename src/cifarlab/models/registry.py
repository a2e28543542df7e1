"""The model registry: every architecture registers a factory under its name.

`create_model(name, num_classes=..., **arch_args)` builds one from its constructor
arguments (what a checkpoint stores as `model_args`); `model_args(name, num_classes, width)`
turns the config's `model.width` into those arguments. `model.width` is a width on the
ResNet-18 scale: 64 builds every model at its published width, and W scales each family's
channel counts by W / 64 (ResNet-18's base width is then exactly W).

A pruned model is data too: `model_args[LAYERS]` maps the name of each layer whose shape
differs from the base model's to its shape (Conv2d: [in, out, groups], Linear: [in, out],
BatchNorm2d: [features]). `create_model` builds the base model, then puts layers of those
shapes in place, so a checkpoint of a pruned model loads like any other (`weights_only`).
"""

from __future__ import annotations

import difflib
import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
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


LAYERS = "layers"  # the model_args entry holding a pruned model's layer shapes
MAX_CHANNELS = 1 << 16  # of a declared layer: far over any 32x32 classifier's
MAX_LAYER_UNITS = 1 << 24  # a declared layer's out x in channels (a 4096 x 4096 convolution)


def create_model(name: str, num_classes: int = 10, **arch_args: Any) -> nn.Module:
    check_name(name)
    layers = arch_args.pop(LAYERS, None) or {}
    model = MODELS[name].build(num_classes=num_classes, **arch_args)
    if not isinstance(layers, dict):
        raise UserError(f"{name}: the declared layer shapes are a {type(layers).__name__}, "
                        "not a mapping of layer names to shapes; the file is damaged or not "
                        "from cifarlab")
    for layer_name, shape in layers.items():
        if not (isinstance(shape, (list, tuple)) and 1 <= len(shape) <= 4 and all(
                isinstance(n, int) and not isinstance(n, bool) and 1 <= n <= MAX_CHANNELS
                for n in shape)):
            raise UserError(f"{name}: layer '{layer_name}' is declared of shape {shape!r:.60}, "
                            f"not 1 to 4 whole numbers from 1 to {MAX_CHANNELS:,}; the file is "
                            "damaged or not from cifarlab")
        if math.prod(shape[:2]) > MAX_LAYER_UNITS:  # refused before it is allocated
            raise UserError(f"{name}: layer '{layer_name}' is declared of shape {shape}, "
                            f"over {MAX_LAYER_UNITS:,} input-output channel pairs; the file is "
                            "damaged or not from cifarlab")
        _reshape(model, str(layer_name), list(shape))
    return model


def initialise_from_data(model: nn.Module, images: np.ndarray, mean: Sequence[float],
                         std: Sequence[float]) -> None:
    """Let a model whose layers are set from data (`init_from_data`, as airbench's whitening
    layer) see the training images (uint8 NHWC) and their normalisation; others are left as
    they are."""
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(images, mean, std)


def layer_shapes(model: nn.Module) -> dict[str, list[int]]:
    """The shape of every Conv2d, Linear and BatchNorm2d in `model`, by module name."""
    shapes = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            shapes[name] = [m.in_channels, m.out_channels, m.groups]
        elif isinstance(m, nn.Linear):
            shapes[name] = [m.in_features, m.out_features]
        elif isinstance(m, (nn.BatchNorm2d, nn.SyncBatchNorm)):
            shapes[name] = [m.num_features]
    return shapes


def architecture(model: nn.Module, base_args: dict[str, Any]) -> dict[str, Any]:
    """`base_args` ({"name", "num_classes", **arch_args}, without LAYERS) plus the layers
    of `model` whose shapes differ from the base model's: the model_args that rebuild it."""
    with torch.device("meta"):
        base = layer_shapes(create_model(**base_args))
    changed = {k: v for k, v in layer_shapes(model).items() if base.get(k) != v}
    return {**base_args, LAYERS: changed} if changed else dict(base_args)


def _reshape(model: nn.Module, name: str, shape: list[int]) -> None:
    """Replace layer `name` by one of the same kind and settings with shape `shape`."""
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
    except AttributeError:
        raise UserError(f"no layer '{name}' in the model; the file is damaged or not from "
                        "cifarlab") from None
    if isinstance(old, nn.Conv2d) and len(shape) == 3:
        new = nn.Conv2d(shape[0], shape[1], old.kernel_size, old.stride, old.padding,
                        old.dilation, shape[2], old.bias is not None, old.padding_mode)
    elif isinstance(old, nn.Linear) and len(shape) == 2:
        new = nn.Linear(shape[0], shape[1], old.bias is not None)
    elif isinstance(old, nn.BatchNorm2d) and len(shape) == 1:
        # Its own class: a subclass (airbench's frozen-scale BatchNorm) keeps what it is.
        new = type(old)(shape[0], old.eps, old.momentum, old.affine, old.track_running_stats)
    else:
        raise UserError(f"layer '{name}' is a {type(old).__name__}, not of shape {shape}; the "
                        "file is damaged or not from cifarlab")
    device = next(itertools.chain(old.parameters(), old.buffers())).device
    setattr(parent, child, new.to(device))


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
