"""Typed configuration: dataclasses, YAML load/save and `key=value` overrides.

Every setting has one home here; presets (presets.py) only change defaults. The library
takes a `Config`; only cli.py turns command-line flags into one.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifarlab.errors import UserError

AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
SCHEDULES = ("cosine", "constant")
LOADERS = ("auto", "torchvision", "resident")
# torch.compile modes for the training step; "off": eager.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")


@dataclass
class AugmentConfig:
    """The seed's training augmentation chain; an op whose strength is 0 is left out."""

    hflip: float = 0.5  # probability
    rotate_degrees: float = 15.0  # uniform in [-d, +d]
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.1
    crop_padding: int = 4  # zero padding (pixels) before a random 32x32 crop
    translate: float = 0.1  # fraction of width and height
    erase_p: float = 0.3  # random erasing probability (after normalisation)
    erase_scale: tuple[float, float] = (0.02, 0.33)  # fraction of the image area
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # aspect ratio

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(
            hflip=0.0, rotate_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
            hue=0.0, crop_padding=0, translate=0.0, erase_p=0.0,
        )


@dataclass
class DataConfig:
    source: str = "cifar10"  # see data/sources.py for the accepted forms
    test_source: str = "auto"  # "auto": the source's own test split if it has one; "none"
    root: str = "data"  # downloads and the decode cache
    val_fraction: float = 0.1  # 5,000 of CIFAR-10's 50,000 training images
    split_seed: int = 43  # the seed report's split seed
    limit: int | None = None  # class-balanced random subset of the training images
    resize: bool = False  # resize images that are not 32x32 instead of refusing them
    # "torchvision": transforms per image in DataLoader workers (the seed's way, the
    # reference); "resident": the data set on the device, augmented there per batch;
    # "auto": resident on CUDA, torchvision on the CPU.
    loader: str = "auto"
    workers: int = -1  # DataLoader worker processes; -1: one per CPU core, at most 16
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a registered model (`cifarlab models` lists them)
    width: int = 64  # ResNet-18's base channels; other models scale by width / 64 (models/)


@dataclass
class OptimConfig:
    lr: float = 0.1  # at batch_size 256; not rescaled automatically
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    label_smoothing: float = 0.1
    schedule: str = "cosine"  # after warm-up: "cosine" to zero, or "constant"
    warmup_epochs: float = 5.0  # linear warm-up from lr/steps to lr


@dataclass
class Config:
    preset: str = "seed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    epochs: int = 100
    batch_size: int = 256
    # Validation and test (and `evaluate`, `predict` of its checkpoints) score each image by
    # the mean logits of the image and its mirror image.
    tta_flip: bool = False
    patience: int = 30  # early stopping on validation accuracy; 0 disables it
    amp: str = "auto"  # "auto": fp16 with a GradScaler on CUDA, off on the CPU
    device: str = "auto"  # "auto": CUDA when present
    # torch.compile the model for training and the resident loader's augmentation:
    # "reduce-overhead" also replays them as CUDA graphs; "max-autotune" searches kernels
    # longer. Compiling takes a while at the start of a run.
    compile: str = "off"
    seed: int = 0  # weights, shuffling and augmentation (the split has its own seed)
    deterministic: bool = False  # deterministic CUDA kernels (slower); CPU runs always are
    sync_batchnorm: bool = False  # under DDP: BatchNorm statistics over the global batch
    out: str = "runs"
    name: str | None = None  # run folder name; default <preset>-<timestamp>

    def validate(self) -> Config:
        """Raise UserError on values no run could use; return self."""
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.patience >= 0, "patience must be >= 0 (0 disables early stopping)"),
            (self.amp in AMP_MODES, f"amp must be one of {', '.join(AMP_MODES)}"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
            (self.compile in COMPILE_MODES,
             f"compile must be one of {', '.join(COMPILE_MODES)}"),
            (self.optim.schedule in SCHEDULES,
             f"optim.schedule must be one of {', '.join(SCHEDULES)}"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (self.optim.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0"),
            (0 <= self.optim.label_smoothing < 1, "optim.label_smoothing must be in [0, 1)"),
            (0 < self.data.val_fraction < 1, "data.val_fraction must be in (0, 1)"),
            (self.data.loader in LOADERS, f"data.loader must be one of {', '.join(LOADERS)}"),
            (self.data.limit is None or self.data.limit >= 20, "data.limit must be >= 20"),
            (self.model.width >= 1, "model.width must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(f"invalid setting: {message}")
        return self

    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_yaml())


def flat_settings(config: Config) -> dict[str, Any]:
    """Every setting by its dotted key, e.g. {"optim.lr": 0.1, ...}, in declaration order."""
    def flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out

    return flat(config.to_dict())


def differences(old: Config, new: Config, ignore: tuple[str, ...] = ()) -> list[str]:
    """`key: old -> new` for every setting that differs, e.g. `epochs: 100 -> 150`."""
    a, b = flat_settings(old), flat_settings(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in a if a[k] != b[k] and k not in ignore]


def _plain(value: Any) -> Any:
    """Tuples become lists so that YAML and checkpoints hold only plain types."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def settings(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key a config accepts, e.g. `optim.lr`."""
    keys = []
    for f in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[f.name]
        if dataclasses.is_dataclass(hint):
            keys += settings(hint, f"{prefix}{f.name}.")
        else:
            keys.append(prefix + f.name)
    return keys


def _unknown(key: str) -> UserError:
    close = difflib.get_close_matches(key, settings(), n=1)
    hint = (f"did you mean '{close[0]}'?" if close
            else "`cifarlab train --print-config` lists every setting")
    return UserError(f"unknown setting '{key}': {hint}")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    """Check `value` against the field's type hint; ints are accepted for floats."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is tuple:
        args = typing.get_args(hint)
        if isinstance(value, (list, tuple)) and len(value) == len(args):
            return tuple(_coerce(v, a, key) for v, a in zip(value, args, strict=True))
        raise UserError(f"setting '{key}' needs a list of {len(args)} numbers, got {value!r}")
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-3" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if isinstance(value, hint) and not (hint is int and isinstance(value, bool)):
        return value
    kind = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}[hint]
    raise UserError(f"setting '{key}' needs {kind}, got {value!r}")


def _merge(obj: Any, updates: dict[str, Any], prefix: str = "") -> None:
    hints = typing.get_type_hints(type(obj))
    for name, value in updates.items():
        key = prefix + str(name)
        if name not in hints:
            raise _unknown(key)
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise UserError(f"setting '{key}' is a section; give it a mapping of its keys")
            _merge(getattr(obj, name), value, key + ".")
        else:
            setattr(obj, name, _coerce(value, hint, key))


def apply_dict(config: Config, updates: dict[str, Any]) -> Config:
    """Return a copy of `config` with nested `updates` applied (type-checked)."""
    config = dataclasses.replace(config)
    config.data = dataclasses.replace(config.data, augment=dataclasses.replace(config.data.augment))
    config.model = dataclasses.replace(config.model)
    config.optim = dataclasses.replace(config.optim)
    _merge(config, updates)
    return config


def nest(key: str, value: Any) -> dict[str, Any]:
    """`("optim.lr", 0.05)` -> {"optim": {"lr": 0.05}}."""
    *parents, leaf = key.split(".")
    nested: dict[str, Any] = {leaf: value}
    for part in reversed(parents):
        nested = {part: nested}
    return nested


def parse_override(text: str) -> dict[str, Any]:
    """`optim.lr=0.05` -> {"optim": {"lr": 0.05}}; the value is read as YAML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected key=value, e.g. --set optim.lr=0.05")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return nest(key.strip(), value)


def load_yaml(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """A YAML mapping of settings; errors name the file as `where` (default `--config PATH`)."""
    path = Path(path)
    where = where or f"--config {path}"
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"{where}: not a readable YAML file ({reason})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings at the top level")
    return data


def from_dict(data: dict[str, Any]) -> Config:
    """A config saved by `Config.save` (or a checkpoint) back into a Config."""
    return apply_dict(Config(), data)
