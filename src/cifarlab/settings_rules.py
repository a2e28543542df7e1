"""What each setting accepts: the words of the settings that take one of some words, the
table of rules (`RULES`, one per setting, and `CROSS_RULES`, which tie settings together)
and `validate`, which checks a resolved Config (config.py) against them.

It imports neither config.py nor presets.py: `Config.validate` calls `validate`, and both
take the presets' names (`PRESET_NAMES`) from here.
"""

from __future__ import annotations

import difflib
import typing
from dataclasses import dataclass
from typing import Any

from cifarlab.errors import UserError

# The presets (presets.py builds each one, in this order), named here so that config.py and
# presets.py can both read the names.
PRESET_NAMES = ("seed", "baseline", "fast", "best", "airbench")
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


# --------------------------------------------------------------------------------- the rules
#
# What each setting accepts, in one table: `validate` checks a resolved Config against it
# (types are checked earlier, by config.py's `_coerce`, as the settings are read). Every float
# must be finite, whatever its rule says.

SEED_MAX = 2**32 - 1  # numpy's and Python's generators take seeds in [0, 2**32 - 1]
MAX_WIDTH = 1_000_000  # far beyond any machine; the memory check (memory.py) says more
MAX_COUNT = 1_000_000  # epochs, patience, batch size: larger is always a typo
MAX_THREADS = 1024  # threads of one process (the `threads` setting, --threads)
MAX_CLASSES = 100_000  # summary --classes: a head far beyond any data set here


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


def _models() -> list[str]:
    from cifarlab.models import MODELS

    return list(MODELS)


PROBABILITY = number(0, 1, what="a probability")
JITTER = number(0, 1, what="a jitter strength")
SEED = integer(0, SEED_MAX, what="a seed")

RULES: dict[str, Rule] = {
    "preset": choice(PRESET_NAMES),
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
    "optim.clip_grad_norm": number(0, 1e6, what="a gradient norm (0: no clipping)"),
    "optim.accumulate": integer(1, 1024, what="a number of micro-batches per batch"),
    "optim.whiten_bias_epochs": number(0, MAX_COUNT, what="a number of epochs"),
    "optim.lookahead_steps": integer(0, MAX_COUNT, what="a number of steps (0: off)"),
    "optim.lookahead_decay": number(0, 1, hi_open=True, what="a decay per pull"),
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
    "threads": integer(0, MAX_THREADS, what="a number of threads (0: one per core)"),
    "compile": choice(COMPILE_MODES),
    "seed": SEED,
    "deterministic": ANY,
    "stop_grace": number(0, MAX_COUNT, lo_open=True, what="a number of seconds"),
    "sync_batchnorm": ANY,
    "tensorboard": ANY,
    "out": TEXT,
    "name": RUN_NAME,
}


def _limit_leaves_validation(c: Any) -> str | None:
    if c.data.limit is None:
        return None
    n_val = round(c.data.limit * c.data.val_fraction)
    if 1 <= n_val < c.data.limit:
        return None
    return (f"data.val_fraction={_show(c.data.val_fraction)} of data.limit={c.data.limit} "
            f"images leaves {'no validation' if n_val < 1 else 'no training'} images; "
            "e.g. --set data.val_fraction=0.1, or a larger --limit")


# Rules that tie settings together: each takes a Config and returns the message, or None when
# the config is fine.
CROSS_RULES: list[typing.Callable[[Any], str | None]] = [
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
    lambda c: None if c.optim.accumulate <= c.batch_size else (
        f"optim.accumulate={c.optim.accumulate} splits each batch into that many pieces, so it "
        f"must be at most batch_size ({c.batch_size}); e.g. --set "
        f"optim.accumulate={max(1, c.batch_size // 4)}"),
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


def get(config: Any, key: str) -> Any:
    """The value of a dotted key, e.g. get(config, "optim.lr")."""
    value: Any = config
    for part in key.split("."):
        value = getattr(value, part)
    return value


def validate(config: Any) -> None:
    """Raise UserError naming the first setting of `config` (a Config) that no run could use,
    what it must be and a valid value close to it."""
    default = type(config)()
    for key, rule in RULES.items():  # every setting, in the order Config declares them
        value = get(config, key)
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
