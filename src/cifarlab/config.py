"""Typed configuration: dataclasses, YAML load/save and `key=value` overrides.

Every setting has one home here; presets (presets.py) only change defaults. The library
takes a `Config`; only cli.py turns command-line flags into one.
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

AMP_MODES = ("auto", "fp16", "bf16", "off")
DEVICES = ("auto", "cpu", "cuda")
# Learning-rate schedules after the warm-up (schedule.py): each a pure function of the step.
SCHEDULES = ("cosine", "onecycle", "multistep", "constant")
OPTIMIZERS = ("sgd", "adamw")
# Which weights the best checkpoint is chosen on (and best.pt holds): the model's or the EMA's.
EMA_SELECT = ("model", "ema")
LOADERS = ("auto", "torchvision", "resident")
# torch.compile modes for the training step; "off": eager.
COMPILE_MODES = ("off", "default", "reduce-overhead", "max-autotune")
# Automatic augmentation per image (data/policies.py); "none": the chain above alone.
POLICIES = ("none", "trivialaugment", "randaugment", "autoaugment")
LABEL_SETS = ("fine", "coarse")  # CIFAR-100's 100 classes or its 20 superclasses
# Horizontal flip: "random" (each image with probability hflip, every epoch) or "alternate"
# (each image mirrored in every other epoch, from a per-image random start).
FLIP_MODES = ("random", "alternate")
# What the crop's padding holds: zeros (RandomCrop's "constant") or the mirrored border.
PADDING_MODES = ("constant", "reflect")


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
    # After crop and translation, before normalisation: one of POLICIES, drawn per image.
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
        """Raise UserError on values no run could use (see RULES); return self."""
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
    close = difflib.get_close_matches(name, _presets(), n=1, cutoff=0.4)
    return close[0] if close else "seed"


class _DuplicateKey(yaml.YAMLError):
    pass


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a mapping holding one key twice (plain YAML keeps the
    last one without a word)."""

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
                raise _DuplicateKey(f"key '{key}' appears twice (lines {first} and {line}); "
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
    try:
        data = _read_yaml(path.read_text())
    except FileNotFoundError:
        raise UserError(f"{where}: no such file") from None
    except IsADirectoryError:
        raise UserError(f"{where}: is a folder; give a YAML file of settings") from None
    except _DuplicateKey as e:
        raise UserError(f"{where}: {e}") from None
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


# --------------------------------------------------------------------------------- the rules
#
# What each setting accepts, in one table: `validate` checks a resolved Config against it
# (types are checked earlier, by `_coerce`, as the settings are read). Every float must be
# finite, whatever its rule says.

SEED_MAX = 2**32 - 1  # numpy's and Python's generators take seeds in [0, 2**32 - 1]
MAX_WIDTH = 1_000_000  # far beyond any machine; the memory check (memory.py) says more
MAX_COUNT = 1_000_000  # epochs, patience, batch size: larger is always a typo


def _show(value: Any) -> str:
    """A value as it is typed after --set (YAML): 2.0 -> 2, (0.1, 0.2) -> [0.1,0.2]."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    return str(value)


def _finite(value: Any) -> bool:
    return not isinstance(value, float) or value == value and abs(value) != float("inf")


@dataclass(frozen=True)
class Rule:
    """What one setting accepts. `describe` completes "must be ..."; `nearest(value,
    default)` is a valid value close to a refused one, for the message."""

    describe: str | typing.Callable[[], str]
    ok: typing.Callable[[Any], bool]
    nearest: typing.Callable[[Any, Any], Any]

    def text(self) -> str:
        return self.describe() if callable(self.describe) else self.describe


def number(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False,
           hi_open: bool = False, what: str | None = None, integer: bool = False) -> Rule:
    """A number in an interval (closed unless `lo_open` / `hi_open`); finite."""
    show = _show

    kind = what or ("an integer" if integer else "a number")
    if lo is not None and hi is not None:
        text = (f"{kind} in {'(' if lo_open else '['}{show(lo)}, {show(hi)}"
                f"{')' if hi_open else ']'}")
    elif lo is not None:
        text = f"{kind} {'>' if lo_open else '>='} {show(lo)}"
    else:
        text = kind

    def ok(v: float) -> bool:
        return _finite(v) and not (
            lo is not None and (v <= lo if lo_open else v < lo)
            or hi is not None and (v >= hi if hi_open else v > hi))

    def nearest(v: float, default: Any) -> Any:
        if not _finite(v):  # NaN or infinite: no nearest value worth naming; the default
            return default
        if lo is not None and v <= lo:
            return lo if not lo_open else default
        if hi is not None and v >= hi:
            return hi if not hi_open else default
        return default

    return Rule(text, ok, nearest)


def integer(lo: int, hi: int, what: str | None = None) -> Rule:
    return number(lo, hi, integer=True, what=what)


def choice(values: typing.Callable[[], typing.Sequence[str]] | typing.Sequence[str]) -> Rule:
    """One of some words (a callable is asked when checking: registries fill up late)."""
    def allowed() -> list[str]:
        return list(values() if callable(values) else values)

    def nearest(v: Any, default: Any) -> Any:
        close = difflib.get_close_matches(str(v), allowed(), n=1, cutoff=0.4)
        return close[0] if close else default

    return Rule(lambda: f"one of {', '.join(allowed())}", lambda v: v in allowed(), nearest)


def ordered_pair(lo: float, hi: float | None, *, lo_open: bool = False, what: str) -> Rule:
    """Two numbers, the lower first, each in the interval."""
    one = number(lo, hi, lo_open=lo_open)

    def ok(v: tuple) -> bool:
        return all(one.ok(x) for x in v) and v[0] <= v[1]

    def nearest(v: tuple, default: Any) -> Any:
        fixed = [x if one.ok(x) else one.nearest(x, d) for x, d in zip(v, default, strict=True)]
        return tuple(sorted(fixed))

    return Rule(f"{what}, the lower first, each {one.text().removeprefix('a number ')}",
                ok, nearest)


def increasing_fractions(what: str) -> Rule:
    """One or more numbers in (0, 1), each larger than the one before."""
    def ok(v: tuple) -> bool:
        return (len(v) > 0 and all(_finite(x) and 0 < x < 1 for x in v)
                and all(a < b for a, b in zip(v, v[1:], strict=False)))

    def nearest(v: tuple, default: Any) -> Any:
        kept = sorted({x for x in v if _finite(x) and 0 < x < 1})
        return tuple(kept) or default

    return Rule(f"{what}: one or more numbers in (0, 1), each larger than the one before",
                ok, nearest)


TEXT = Rule("a non-empty text", lambda v: bool(str(v).strip()), lambda v, d: d)
ANY = Rule("", lambda v: True, lambda v, d: d)  # bools: the type check is all there is


def _folder_name(v: str) -> bool:
    return (v is None or v.strip() == v and v not in ("", ".", "..")
            and not any(c in v for c in "/\\\0") and len(v.encode()) <= 255)


RUN_NAME = Rule(
    "one folder name (no '/', not '.' or '..', not empty; the run folder is <out>/<name>)",
    _folder_name,
    lambda v, d: ("-".join(p for p in str(v).replace("\\", "/").split("/")
                           if p.strip(". ")) or "my-run").strip(),
)


def _presets() -> list[str]:
    from cifarlab.presets import PRESETS

    return list(PRESETS)


def _models() -> list[str]:
    from cifarlab.models import MODELS

    return list(MODELS)


PROBABILITY = number(0, 1, what="a probability")
JITTER = number(0, 1, what="a jitter strength")
SEED = integer(0, SEED_MAX, what="a seed")

RULES: dict[str, Rule] = {
    "preset": choice(_presets),
    "data.source": TEXT,
    "data.test_source": TEXT,
    "data.root": TEXT,
    "data.val_fraction": number(0, 1, lo_open=True, hi_open=True, what="a fraction"),
    "data.split_seed": SEED,
    "data.limit": integer(20, 10**9, what="a number of images"),
    "data.resize": ANY,
    "data.loader": choice(LOADERS),
    "data.workers": integer(-1, 256, what="a number of worker processes (-1: automatic)"),
    "data.label_set": choice(LABEL_SETS),
    "data.augment.hflip": PROBABILITY,
    "data.augment.rotate_degrees": number(0, 180, what="an angle in degrees"),
    "data.augment.brightness": JITTER,
    "data.augment.contrast": JITTER,
    "data.augment.saturation": JITTER,
    "data.augment.hue": number(0, 0.5, what="a hue shift"),
    "data.augment.flip_mode": choice(FLIP_MODES),
    "data.augment.crop_padding": integer(0, 32, what="a padding in pixels"),
    "data.augment.crop_padding_mode": choice(PADDING_MODES),
    "data.augment.translate": number(0, 1, what="a fraction of the image size"),
    "data.augment.erase_p": PROBABILITY,
    "data.augment.erase_scale": ordered_pair(0, 1, what="two fractions of the image area"),
    "data.augment.erase_ratio": ordered_pair(0, None, lo_open=True,
                                             what="two aspect ratios"),
    "data.augment.policy": choice(POLICIES),
    "data.augment.randaugment_n": integer(0, 10, what="a number of ops per image"),
    "data.augment.randaugment_m": integer(0, 30, what="a magnitude bin"),
    "data.augment.cutout": integer(0, 32, what="a square side in pixels (0: off)"),
    "model.name": choice(_models),
    "model.width": integer(1, MAX_WIDTH, what="a number of channels"),
    "optim.name": choice(OPTIMIZERS),
    "optim.lr": number(0, lo_open=True, what="a learning rate"),
    "optim.momentum": number(0, 1, hi_open=True),
    "optim.weight_decay": number(0, 1),
    "optim.nesterov": ANY,
    "optim.label_smoothing": number(0, 1, hi_open=True),
    "optim.schedule": choice(SCHEDULES),
    "optim.warmup_epochs": number(0, MAX_COUNT, what="a number of epochs"),
    "optim.milestones": increasing_fractions("fractions of the run"),
    "optim.gamma": number(0, 1, lo_open=True, what="a factor"),
    "optim.bias_lr_scale": number(0, 10_000, lo_open=True, what="a learning-rate factor"),
    "optim.head_lr_scale": number(0, 10_000, lo_open=True, what="a learning-rate factor"),
    "optim.whiten_bias_epochs": number(0, MAX_COUNT, what="a number of epochs"),
    "mix.mixup_alpha": number(0, 100, what="a Beta distribution parameter (0: off)"),
    "mix.cutmix_alpha": number(0, 100, what="a Beta distribution parameter (0: off)"),
    "mix.prob": PROBABILITY,
    "mix.switch_prob": PROBABILITY,
    "ema.enabled": ANY,
    "ema.decay": number(0, 1, hi_open=True, what="a decay per step"),
    "ema.select": choice(EMA_SELECT),
    "distill.teacher": Rule("a checkpoint or run folder (empty: no distillation), without "
                            "surrounding spaces", lambda v: v.strip() == v, lambda v, d: v.strip()),
    "distill.temperature": number(0, 100, lo_open=True, what="a temperature"),
    "distill.alpha": number(0, 1, what="a weight"),
    "epochs": integer(1, MAX_COUNT),
    "batch_size": integer(1, MAX_COUNT),
    "tta_flip": ANY,
    "tta_translate": ANY,
    "patience": integer(0, MAX_COUNT, what="a number of epochs (0: no early stopping)"),
    "amp": choice(AMP_MODES),
    "device": choice(DEVICES),
    "threads": integer(0, 1024, what="a number of threads (0: one per core)"),
    "compile": choice(COMPILE_MODES),
    "seed": SEED,
    "deterministic": ANY,
    "stop_grace": number(0, MAX_COUNT, lo_open=True, what="a number of seconds"),
    "sync_batchnorm": ANY,
    "tensorboard": ANY,
    "out": TEXT,
    "name": RUN_NAME,
}


def _limit_leaves_validation(c: Config) -> str | None:
    if c.data.limit is None:
        return None
    n_val = round(c.data.limit * c.data.val_fraction)
    if 1 <= n_val < c.data.limit:
        return None
    return (f"data.val_fraction={_show(c.data.val_fraction)} of data.limit={c.data.limit} "
            f"images leaves {'no validation' if n_val < 1 else 'no training'} images; "
            "e.g. --set data.val_fraction=0.1, or a larger --limit")


# Rules that tie settings together: each returns the message, or None when the config is fine.
CROSS_RULES: list[typing.Callable[[Config], str | None]] = [
    lambda c: None if not c.optim.nesterov or c.optim.momentum > 0 else (
        "optim.nesterov=true needs optim.momentum > 0, got 0; e.g. --set optim.momentum=0.9, "
        "or --set optim.nesterov=false"),
    lambda c: None if not c.optim.nesterov or c.optim.name == "sgd" else (
        f"optim.nesterov=true is for SGD, and optim.name is {c.optim.name}; e.g. --set "
        "optim.nesterov=false, or --set optim.name=sgd"),
    lambda c: None if c.ema.select == "model" or c.ema.enabled else (
        "ema.select=ema needs ema.enabled=true; e.g. --set ema.enabled=true, or --set "
        "ema.select=model"),
    lambda c: None if not (c.sync_batchnorm and c.device == "cpu") else (
        "sync_batchnorm=true needs CUDA GPUs (PyTorch's SyncBatchNorm has no CPU version); "
        "e.g. --set sync_batchnorm=false"),
    _limit_leaves_validation,
    lambda c: None if c.data.augment.flip_mode == "random" or c.data.loader != "torchvision"
    else ("data.augment.flip_mode=alternate needs the resident loader (it follows each image "
          "across epochs); e.g. --loader resident, or --set data.augment.flip_mode=random"),
    lambda c: None if c.data.augment.flip_mode == "random" or c.data.augment.hflip == 0.5
    else (f"data.augment.flip_mode=alternate mirrors every image in every other epoch, so "
          f"data.augment.hflip must be 0.5, got {_show(c.data.augment.hflip)}; e.g. --set "
          "data.augment.hflip=0.5"),
    lambda c: None if c.data.label_set == "fine" or not _is_keyword(c.data.source) else (
        f"data.label_set=coarse needs CIFAR-100 (--data cifar100), not {c.data.source}; "
        "e.g. --set data.label_set=fine"),
]


def _is_keyword(source: str) -> bool:
    """A source named by a keyword that is not CIFAR-100 (paths are checked when read)."""
    word = source.strip().lower()
    return word == "cifar10" or word == "synthetic" or word.startswith("synthetic:")


def get(config: Config, key: str) -> Any:
    """The value of a dotted key, e.g. get(config, "optim.lr")."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(config: Config) -> None:
    """Raise UserError naming the first setting that no run could use, what it must be
    and a valid value close to it."""
    default = Config()
    for key in settings():
        value = get(config, key)
        rule = RULES.get(key, ANY)
        if value is None:  # the type allows None (checked when read): default behaviour
            continue
        values = value if isinstance(value, tuple) else (value,)
        if rule.ok(value) and all(_finite(v) for v in values):
            continue
        fix = rule.nearest(value, get(default, key))
        what = rule.text() or "finite"
        got = repr(value) if isinstance(value, str) else _show(value)
        raise UserError(f"setting '{key}' must be {what}, got {got}; "
                        f"e.g. --set {key}={_show(fix)}")
    for cross in CROSS_RULES:
        message = cross(config)
        if message:
            raise UserError(message)
