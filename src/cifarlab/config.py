"""Typed configuration: dataclasses, YAML load/save and `key=value` overrides.

Every setting has one home here; presets (presets.py) only change defaults, and what each
setting accepts is in settings_rules.py. The library takes a `Config`; only the cli package turns
command-line flags into one.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from cifarlab.errors import UserError
from cifarlab.settings_rules import PRESET_NAMES, validate


@dataclass
class AugmentConfig:
    """The seed's training augmentation chain; an op whose strength is 0 is left out."""

    hflip: float = 0.5  # probability
    rotate_degrees: float = 15.0  # uniform in [-d, +d]
    brightness: float = 0.3
    contrast: float = 0.3
    saturation: float = 0.3
    hue: float = 0.1
    # "alternate": each image mirrored in every other epoch (needs the resident loader)
    flip_mode: str = "random"
    crop_padding: int = 4  # padding (pixels) before a random 32x32 crop
    crop_padding_mode: str = "constant"  # the padding: zeros, or "reflect" (mirrored border)
    translate: float = 0.1  # fraction of width and height
    erase_p: float = 0.3  # random erasing probability (after normalisation)
    erase_scale: tuple[float, float] = (0.02, 0.33)  # fraction of the image area
    erase_ratio: tuple[float, float] = (0.3, 3.3)  # aspect ratio
    # After crop and translation, before normalisation: one of POLICIES (settings_rules.py),
    # drawn per image.
    policy: str = "none"
    randaugment_n: int = 2  # ops in a row per image (randaugment)
    randaugment_m: int = 9  # magnitude bin of 0..30 (randaugment)
    cutout: int = 0  # side of a zeroed square (pixels) after normalisation; 0: off

    @classmethod
    def off(cls) -> AugmentConfig:
        return cls(
            hflip=0.0, rotate_degrees=0.0, brightness=0.0, contrast=0.0, saturation=0.0,
            hue=0.0, crop_padding=0, translate=0.0, erase_p=0.0,
        )


@dataclass
class DataConfig:
    source: str = "cifar10"  # see data/sources/__init__.py for the accepted forms
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
    # CIFAR-100 only: "fine" (100 classes) or "coarse" (its 20 superclasses).
    label_set: str = "fine"
    augment: AugmentConfig = field(default_factory=AugmentConfig)


@dataclass
class ModelConfig:
    name: str = "resnet18"  # a registered model (`cifarlab models` lists them)
    width: int = 64  # ResNet-18's base channels; other models scale by width / 64 (models/)


@dataclass
class OptimConfig:
    name: str = "sgd"  # "sgd" (momentum, optionally Nesterov) or "adamw" (betas 0.9, 0.999)
    lr: float = 0.1  # at batch_size 256; not rescaled automatically
    momentum: float = 0.9  # SGD only
    weight_decay: float = 5e-4  # SGD: L2 added to the gradient; AdamW: decoupled
    nesterov: bool = False  # SGD only
    label_smoothing: float = 0.1
    # After warm-up: "cosine" to zero, "onecycle" (linear to zero), "multistep" (times
    # `gamma` at each milestone) or "constant"; see schedule.py.
    schedule: str = "cosine"
    warmup_epochs: float = 5.0  # linear warm-up from lr/steps to lr
    # multistep: fractions of the run's steps (e.g. 0.5 of 200 epochs: epoch 100)
    milestones: tuple[float, ...] = (0.5, 0.75)
    gamma: float = 0.1  # multistep: factor at each milestone
    # Parameter groups (training/optim.py): biases (BatchNorm shifts, conv biases) train at
    # lr * bias_lr_scale with weight_decay / bias_lr_scale; the classifier at
    # lr * head_lr_scale.
    bias_lr_scale: float = 1.0
    head_lr_scale: float = 1.0
    # Models with a whitening layer (airbench): epochs its bias trains; then it is frozen.
    whiten_bias_epochs: float = 3.0
    # Largest L2 norm of all gradients together, clipped to it before each step (0: off).
    clip_grad_norm: float = 0.0
    # Micro-batches per batch: each batch of batch_size images goes through forward and backward
    # in this many pieces and the gradients add up to one step (training/step.py). The
    # schedule, learning rate and results per batch are unchanged; BatchNorm sees the pieces.
    accumulate: int = 1
    # Lookahead (training/lookahead.py): every `lookahead_steps` steps the weights are pulled
    # to a slow copy with a decay growing as lookahead_decay * (t / T)^3, and go on from it;
    # the run ends on the slow weights. 0: off.
    lookahead_steps: int = 0
    lookahead_decay: float = 0.95**5


@dataclass
class MixConfig:
    """mixup and CutMix (training/mixing.py); off while both alphas are 0."""

    mixup_alpha: float = 0.0  # Beta(alpha, alpha) for mixup's lambda; 0: no mixup
    cutmix_alpha: float = 0.0  # Beta(alpha, alpha) for CutMix's lambda; 0: no CutMix
    prob: float = 1.0  # probability that a batch is mixed at all
    switch_prob: float = 0.5  # with both on: probability of CutMix instead of mixup


@dataclass
class EmaConfig:
    """Exponential moving average of the weights (training/ema.py)."""

    enabled: bool = False
    decay: float = 0.999  # per step, reached after a warm-up: min(decay, (1 + n) / (10 + n))
    select: str = "model"  # the best checkpoint is chosen on (and holds) "model" or "ema"


@dataclass
class DistillConfig:
    """Knowledge distillation from a trained teacher (training/distill.py); off while
    `teacher` is empty."""

    teacher: str = ""  # a checkpoint, or a run folder (its best.pt); "": no distillation
    temperature: float = 4.0  # softens both networks' outputs: softmax(logits / T)
    alpha: float = 0.9  # weight of the teacher's term; 1 - alpha: the run's own loss


@dataclass
class Config:
    preset: str = "seed"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mix: MixConfig = field(default_factory=MixConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    epochs: int = 100
    batch_size: int = 256
    # Validation and test (and `evaluate`, `predict` of its checkpoints) score each image by
    # the mean logits of the image and its mirror image.
    tta_flip: bool = False
    # ... and of copies shifted by one pixel up-left and down-right (reflected border): the
    # unshifted view weighs 1/2, each shifted one 1/4 (with their mirror images if tta_flip).
    tta_translate: bool = False
    patience: int = 30  # early stopping on validation accuracy; 0 disables it
    amp: str = "auto"  # "auto": fp16 with a GradScaler on CUDA, off on the CPU
    device: str = "auto"  # "auto": CUDA when present
    threads: int = 0  # torch's intra-op threads for the run; 0: PyTorch's default (the cores)
    # torch.compile the model for training and the resident loader's augmentation:
    # "reduce-overhead" also replays them as CUDA graphs; "max-autotune" searches kernels
    # longer. Compiling takes a while at the start of a run.
    compile: str = "off"
    seed: int = 0  # weights, shuffling and augmentation (the split has its own seed)
    deterministic: bool = False  # deterministic CUDA kernels (slower); CPU runs always are
    # After a first SIGINT/SIGTERM, seconds without a finished batch before the process
    # exits on its own (a step stuck in native code); a second signal exits at once.
    stop_grace: float = 60.0
    sync_batchnorm: bool = False  # under DDP: BatchNorm statistics over the global batch
    tensorboard: bool = False  # per-epoch scalars and hyperparameters under <run>/tensorboard
    out: str = "runs"
    name: str | None = None  # run folder name; default <preset>-<timestamp>

    def validate(self) -> Config:
        """Raise UserError on values no run could use (settings_rules.RULES); return self."""
        validate(self)
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
    if origin is tuple and typing.get_args(hint)[1:] == (Ellipsis,):  # a list of any length
        inner = typing.get_args(hint)[0]
        if isinstance(value, (list, tuple)):
            return tuple(_coerce(v, inner, key) for v in value)
        raise UserError(f"setting '{key}' needs a list of numbers, got {value!r}")
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
    config.mix = dataclasses.replace(config.mix)
    config.ema = dataclasses.replace(config.ema)
    config.distill = dataclasses.replace(config.distill)
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
    if key.strip() == "preset":
        raise UserError(f"--set {text}: the preset is chosen with --preset (it sets every "
                        f"default; as a setting it would only rename the recipe); e.g. "
                        f"--preset {_nearest_preset(raw.strip())}")
    try:
        value = _read_yaml(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return nest(key.strip(), value)


def _nearest_preset(name: str) -> str:
    close = difflib.get_close_matches(name, PRESET_NAMES, n=1, cutoff=0.4)
    return close[0] if close else "seed"


class _RefusedYaml(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding one key twice (plain YAML keeps the
    last one without a word), and aliases: settings never need them, and nested aliases
    (a "billion laughs" file) grow a few lines into more values than memory holds."""

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _RefusedYaml(f"line {event.start_mark.line + 1} repeats '&{event.anchor}' "
                                f"with the alias '*{event.anchor}'; write the values out "
                                "(settings files take no aliases)")
        return super().compose_node(parent, index)

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            try:
                first = seen.get(key)
                seen.setdefault(key, line)
            except TypeError:  # an unhashable key; SafeLoader says what is wrong with it
                continue
            if first is not None:
                raise _RefusedYaml(f"key '{key}' appears twice (lines {first} and {line}); "
                                    "keep one of them")
        return super().construct_mapping(node, deep=deep)


# Only true and false are booleans (as in YAML 1.2): YAML 1.1 also reads on, off, yes and no
# as booleans, which turned `--set amp=off` into False. config.yaml quotes such strings.
_BOOL = "tag:yaml.org,2002:bool"
_UniqueKeyLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_UniqueKeyLoader.add_implicit_resolver(
    _BOOL, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def _read_yaml(text: str) -> Any:
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)


def load_yaml(path: str | Path, where: str | None = None) -> dict[str, Any]:
    """A YAML mapping of settings; errors name the file as `where` (default `--config PATH`)."""
    path = Path(path)
    where = where or f"--config {path}"
    if path.exists() and not path.is_file() and not path.is_dir():  # reading would block
        raise UserError(f"{where}: not a regular file (a FIFO, a socket or a device); give "
                        "the YAML file itself")
    try:
        data = _read_yaml(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a folder; give a YAML file of settings") from None
    except _RefusedYaml as e:
        raise UserError(f"{where}: {e}") from None
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        reason = str(e).splitlines()[0]
        raise UserError(f"{where}: not a readable YAML file ({reason})") from None
    if data is None:  # an empty file (or only comments): surely not what was meant
        raise UserError(f"{where}: the file holds no settings; give a YAML mapping of "
                        "settings, e.g. epochs: 10")
    if not isinstance(data, dict):
        raise UserError(f"{where}: expected a mapping of settings at the top level")
    return data


def from_dict(data: dict[str, Any]) -> Config:
    """A config saved by `Config.save` (or a checkpoint) back into a Config."""
    return apply_dict(Config(), data)
