"""A study file: where every trial starts, what stays fixed, what varies and how it is searched.

    preset: seed                                # where every trial starts
    settings: {epochs: 30, model.width: 32}     # fixed for every trial (any setting key)
    space:                                      # what varies: a list is a grid axis,
      optim.label_smoothing: [0.0, 0.1, 0.2]    # a {low, high, log} mapping a range
      optim.lr: {low: 0.02, high: 0.4, log: true}
    seeds: 3                                    # repeats of every point
    sampler: tpe                                # grid | random | tpe
    trials: 40                                  # budget for random and tpe
    pruner: none                                # none | median | hyperband

A study may also name variants: whole sets of settings applied on top of `settings`, which
the sweep treats as one more grid axis, `variant` (its run folders start with the name):

    variants:                                   # name -> settings of that variant
      baseline: {}
      smoothing: {optim.label_smoothing: 0.1}

`cifarlab ablate` writes such a study (studies/ablate.py).

Everything is checked when the file is read, each value of the space and each variant
against the settings' own rules, so that a study never stops half-way on a setting no run
could use.
"""

from __future__ import annotations

import difflib
import itertools
import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cifarlab import config as cfg
from cifarlab.errors import UserError
from cifarlab.presets import PRESETS, get_preset
from cifarlab.settings_rules import _show, get

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "hyperband")
KEYS = ("preset", "settings", "variants", "space", "seeds", "sampler", "trials", "pruner")
VARIANT = "variant"  # the name of the variants' axis among a trial's parameters
# A variant's name starts its trials' run folder names: letters, digits, '.', '_', '+', '-'.
VARIANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
# Settings a study owns: the seed of each trial, and where its run folder goes.
STUDY_OWNED = {"seed": "give the number of repeats with `seeds: N`",
               "out": "the study folder is chosen with --out",
               "name": "each trial's run folder is named after its settings and seed",
               "preset": "give it as `preset:` at the top of the study file"}
MAX_SEEDS = 1000
MAX_TRIALS = 1_000_000
# Points of a grid (the product of its axes' lengths): Optuna's grid sampler lists them all
# in memory, and a study of training runs never needs more.
MAX_GRID_POINTS = 100_000


@dataclass(frozen=True)
class Range:
    """A continuous (or, for an integer setting, integer) axis from low to high."""

    low: float
    high: float
    log: bool = False
    integer: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"low": self.low, "high": self.high, "log": self.log}


Axis = list[Any] | Range


@dataclass(frozen=True)
class Study:
    preset: str
    settings: dict[str, Any]  # dotted key -> value, fixed for every trial
    space: dict[str, Axis]  # dotted key -> list of values (grid axis) or Range
    seeds: int
    sampler: str
    trials: int | None  # None: the whole grid
    pruner: str
    # variant name -> dotted key -> value, applied on top of `settings`; {}: no variants
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def axes(self) -> dict[str, list[Any] | Range]:
        """The space, and the variants' names as one more list axis (`variant`)."""
        if not self.variants:
            return dict(self.space)
        return {VARIANT: list(self.variants), **self.space}

    def base_config(self) -> cfg.Config:
        config = get_preset(self.preset)
        for key, value in self.settings.items():
            config = cfg.apply_dict(config, cfg.nest(key, value))
        return config

    def config_for(self, params: dict[str, Any], seed: int) -> cfg.Config:
        """The settings of one trial: the base, its variant's settings, the point's values
        and the seed."""
        config = self.base_config()
        params = dict(params)
        for key, value in self.variants.get(params.pop(VARIANT, None), {}).items():
            config = cfg.apply_dict(config, cfg.nest(key, value))
        for key, value in params.items():
            config = cfg.apply_dict(config, cfg.nest(key, value))
        return cfg.apply_dict(config, {"seed": seed})

    def grid(self) -> list[dict[str, Any]]:
        """Every point of a grid study (one empty point for an empty space)."""
        axes = self.axes()
        keys = list(axes)
        values = [axes[k] for k in keys]
        return [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*values)]

    def budget(self) -> int:
        """Trials to finish in all (each one point with one seed)."""
        if self.trials is not None:
            return self.trials
        return len(self.grid()) * self.seeds

    def to_dict(self) -> dict[str, Any]:
        """The study as stored in its folder (study.yaml)."""
        variants = {"variants": {k: dict(v) for k, v in self.variants.items()}}
        return {
            "preset": self.preset,
            "settings": dict(self.settings),
            **(variants if self.variants else {}),
            "space": {k: (v.to_dict() if isinstance(v, Range) else list(v))
                      for k, v in self.space.items()},
            "seeds": self.seeds,
            "sampler": self.sampler,
            "trials": self.trials,
            "pruner": self.pruner,
        }

    def design(self) -> dict[str, Any]:
        """What must not change between runs of one study folder (the budget may)."""
        return {k: v for k, v in self.to_dict().items() if k != "trials"}


def load_study(path: str | Path, overrides: dict[str, Any] | None = None) -> Study:
    """Read and check a study file; `overrides` (sweep's --data, --limit, --test-data) set
    those settings for every trial."""
    where = str(path)
    raw = cfg.load_yaml(path, where=where)
    study = parse_study(raw, where)
    if overrides:
        study = replace(study, settings={**study.settings, **overrides})
        check_study(study, where)
    return study


def _one_of(value: Any, allowed: tuple[str, ...], key: str, where: str) -> str:
    if value in allowed:
        return value
    close = difflib.get_close_matches(str(value), allowed, n=1, cutoff=0.4)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    raise UserError(f"{where}: {key} must be one of {', '.join(allowed)}, got {value!r}{hint}")


def _count(value: Any, key: str, where: str, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
        raise UserError(f"{where}: {key} must be an integer in [1, {high}], got {value!r}")
    return value


def _flat(settings: Any, where: str) -> dict[str, Any]:
    if settings is None:
        return {}
    if not isinstance(settings, dict):
        raise UserError(f"{where}: settings must be a mapping of setting keys to values, "
                        f"e.g. settings: {{epochs: 30}}")
    return {str(k): v for k, v in settings.items()}


def _number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _axis(key: str, value: Any, base: cfg.Config, where: str) -> Axis:
    if isinstance(value, list):
        if not value:
            raise UserError(f"{where}: space {key} is an empty list; give one value or more")
        if len({repr(v) for v in value}) != len(value):
            raise UserError(f"{where}: space {key} lists a value twice: {value}")
        return list(value)
    if isinstance(value, dict):
        unknown = set(value) - {"low", "high", "log"}
        if unknown or not {"low", "high"} <= set(value):
            raise UserError(f"{where}: space {key}: a range is {{low: L, high: H, log: "
                            f"true|false}}, got {value}")
        low, high, log = value["low"], value["high"], value.get("log", False)
        if not (_number(low) and _number(high)):
            raise UserError(f"{where}: space {key}: low and high must be numbers, got "
                            f"{low!r} and {high!r}")
        if not isinstance(log, bool):
            raise UserError(f"{where}: space {key}: log must be true or false, got {log!r}")
        if low >= high:
            raise UserError(f"{where}: space {key}: low must be below high, got low {low} and "
                            f"high {high}")
        if log and low <= 0:
            raise UserError(f"{where}: space {key}: a log range needs low > 0, got {low}")
        current = get(base, key)
        integer = isinstance(current, int) and not isinstance(current, bool)
        if integer and not (isinstance(low, int) and isinstance(high, int)):
            raise UserError(f"{where}: space {key} is an integer setting; give integer low "
                            f"and high, got {low} and {high}")
        if not integer and not isinstance(current, float):
            raise UserError(f"{where}: space {key} is not a number setting; list its values "
                            f"instead, e.g. {key}: [{_show(current)}]")
        return Range(low, high, log, integer)
    raise UserError(f"{where}: space {key} must be a list of values or a range {{low: L, "
                    f"high: H, log: true|false}}, got {value!r}")


def _variants(raw: Any, base: cfg.Config, where: str) -> dict[str, dict[str, Any]]:
    """Each variant's settings, every key and value checked against the settings' rules."""
    if raw is None:
        return {}
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"{where}: variants must be a mapping of names to settings with one "
                        "variant or more, e.g. variants: {baseline: {}, smoothing: "
                        "{optim.label_smoothing: 0.1}}")
    variants: dict[str, dict[str, Any]] = {}
    for name, settings in raw.items():
        if not isinstance(name, str) or not VARIANT_NAME.fullmatch(name):
            raise UserError(f"{where}: variant name {name!r} must start with a letter or "
                            "digit and hold only letters, digits, '.', '_', '+', '-' (64 at "
                            "most): it starts its run folders' names, e.g. label-smoothing")
        if settings is not None and not isinstance(settings, dict):
            raise UserError(f"{where}: variant {name} must be a mapping of setting keys to "
                            f"values (or {{}}), got {settings!r}")
        flat = {str(k): v for k, v in (settings or {}).items()}
        config = base
        for key, value in flat.items():
            if key in STUDY_OWNED:
                raise UserError(f"{where}: variant {name}: '{key}' is set by the study itself; "
                                f"{STUDY_OWNED[key]}")
            try:
                config = cfg.apply_dict(config, cfg.nest(key, value))
            except UserError as e:
                raise UserError(f"{where}: variant {name}: {e}") from None
        variants[name] = flat
    return variants


def parse_study(raw: dict[str, Any], where: str) -> Study:
    unknown = [k for k in raw if k not in KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), KEYS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"a study file has {', '.join(KEYS)}"
        raise UserError(f"{where}: unknown key '{unknown[0]}': {hint}")
    preset = _one_of(raw.get("preset", "seed"), tuple(PRESETS), "preset", where)
    sampler = _one_of(raw.get("sampler", "tpe"), SAMPLERS, "sampler", where)
    pruner = _one_of(raw.get("pruner", "none"), PRUNERS, "pruner", where)
    seeds = _count(raw.get("seeds", 1), "seeds", where, MAX_SEEDS)
    settings = _flat(raw.get("settings"), where)
    space_raw = raw.get("space") or {}
    if not isinstance(space_raw, dict):
        raise UserError(f"{where}: space must be a mapping of setting keys to a list of values "
                        f"or a range, e.g. space: {{optim.lr: [0.05, 0.1]}}")
    for key in [*settings, *space_raw]:
        if str(key) in STUDY_OWNED:
            raise UserError(f"{where}: '{key}' is set by the study itself; "
                            f"{STUDY_OWNED[str(key)]}")
    base = get_preset(preset)
    for key, value in settings.items():  # unknown keys and wrong types, one line each
        try:
            base = cfg.apply_dict(base, cfg.nest(key, value))
        except UserError as e:
            raise UserError(f"{where}: settings: {e}") from None
    variants = _variants(raw.get("variants"), base, where)
    space: dict[str, Axis] = {}
    for key, value in space_raw.items():
        key = str(key)
        if key in settings:
            raise UserError(f"{where}: '{key}' is both fixed in settings and varied in space; "
                            "keep one")
        setting_variants = [n for n, v in variants.items() if key in v]
        if setting_variants:
            raise UserError(f"{where}: '{key}' is both set by variant {setting_variants[0]} and "
                            "varied in space; keep one")
        if key not in cfg.settings():
            try:
                cfg.apply_dict(base, cfg.nest(key, 0))
            except UserError as e:
                raise UserError(f"{where}: space: {e}") from None
        space[key] = _axis(key, value, base, where)
    if not space and not variants and sampler != "grid":
        raise UserError(f"{where}: sampler {sampler} needs a space to search; add one, or use "
                        "sampler: grid to repeat the settings alone")
    trials = raw.get("trials")
    if trials is not None:
        trials = _count(trials, "trials", where, MAX_TRIALS)
    elif sampler != "grid":
        raise UserError(f"{where}: sampler {sampler} needs a budget: add trials: N")
    if sampler == "grid":
        ranges = [k for k, v in space.items() if isinstance(v, Range)]
        if ranges:
            raise UserError(f"{where}: sampler grid needs a list of values for every axis; "
                            f"{ranges[0]} is a range (list its values, or use sampler tpe)")
        sizes = [len(v) for v in ([*space.values()] + ([list(variants)] if variants else []))]
        points = math.prod(sizes)
        if points > MAX_GRID_POINTS:
            raise UserError(f"{where}: the grid has {points:,} points ("
                            f"{' x '.join(map(str, sizes))}), over the {MAX_GRID_POINTS:,} "
                            "a study can list; give fewer values, or use sampler tpe with "
                            "trials: N")
    study = Study(preset, settings, space, seeds, sampler, trials, pruner, variants)
    check_study(study, where)
    return study


def _corners(study: Study) -> list[dict[str, Any]]:
    """Every listed value of each axis (each variant among them), and both ends of each
    range, one axis at a time."""
    points: list[dict[str, Any]] = [{}]
    for key, axis in study.axes().items():
        values = [axis.low, axis.high] if isinstance(axis, Range) else axis
        points += [{key: v} for v in values]
    return points


def check_study(study: Study, where: str) -> None:
    """Every value the study can give a trial must make a valid config."""
    for point in _corners(study):
        try:
            study.config_for(point, study.seeds - 1).validate()
        except UserError as e:
            what = ", ".join(f"{k}={_show(v)}" for k, v in point.items()) or "settings"
            raise UserError(f"{where}: {what}: {e}") from None
