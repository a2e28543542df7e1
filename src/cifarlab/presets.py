"""Named starting points: each returns a full Config; flags and YAML override it."""

from __future__ import annotations

from collections.abc import Callable

from cifarlab.config import AugmentConfig, Config, OptimConfig
from cifarlab.errors import UserError


def seed() -> Config:
    """The seed lab report's recipe (see SEED_RECIPE.md); the Config defaults are exactly it."""
    return Config(preset="seed")


def baseline() -> Config:
    """The seed's starting point: normalisation only, plain cross-entropy, constant lr.

    Same model, split, optimizer and epoch budget as `seed`, so the two compare fairly.
    """
    config = Config(preset="baseline")
    config.data.augment = AugmentConfig.off()
    config.optim = OptimConfig(label_smoothing=0.0, schedule="constant", warmup_epochs=0.0)
    return config


PRESETS: dict[str, Callable[[], Config]] = {"seed": seed, "baseline": baseline}


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset '{name}': choose one of {', '.join(PRESETS)}")
    return PRESETS[name]()
