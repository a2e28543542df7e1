"""`cifarlab ablate`: the seed's comparison of its recipe with its baseline, made honest.
From the `baseline` preset, each of the seed's enhancements is added alone, then all of them
together, and every variant is trained with N seeds; the summary gives each variant's mean,
standard deviation and 95 % confidence interval, and its difference to the baseline with
Welch's test and Holm's correction (studies/summary.py).

The variants are what the `seed` preset has and `baseline` lacks (presets.py, read from the
two presets, so they cannot drift apart):

    baseline         the `baseline` preset: no augmentation, plain cross-entropy, constant lr
    augment          + the seed's augmentation chain (flip, rotation, colour jitter,
                       pad-and-crop, translation, random erasing)
    label-smoothing  + label smoothing 0.1
    warmup-cosine    + 5 epochs of linear warm-up, then cosine annealing
    all              all three: the seed recipe, with the baseline's budget

Normalisation and the batch size are not variants: the seed's baseline is "normalisation
only", so both presets normalise by the mean and standard deviation measured on the
training split, and both train at batch 256 with lr 0.1 (the seed recipe gives one learning
rate for its one batch size, and no rule to scale it); there is nothing to add. A batch
size, or any other setting, is studied with `cifarlab sweep` and a study file of its own.

An ablation is an ordinary study (study.yaml with `variants:`, run by the sweep machinery):
started again with the same arguments it continues where it stopped.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import yaml

from cifarlab import checkpoint
from cifarlab import config as cfg
from cifarlab.errors import UserError
from cifarlab.presets import baseline, seed
from cifarlab.studies.spec import STUDY_OWNED, Study, parse_study
from cifarlab.studies.summary import BASELINE, summarize_study
from cifarlab.studies.sweep import STUDY_FILE, check_folder, sweep

log = logging.getLogger("cifarlab")

ALL = "all"
# Each enhancement by name: the setting keys (or key prefixes) of the seed's that make it.
ENHANCEMENTS = {
    "augment": ("data.augment.",),
    "label-smoothing": ("optim.label_smoothing",),
    "warmup-cosine": ("optim.schedule", "optim.warmup_epochs"),
}
VARIANTS = (BASELINE, *ENHANCEMENTS, ALL)
DEFAULT_OUT = "runs/ablation"


def enhancements() -> dict[str, dict[str, Any]]:
    """Each enhancement's settings: the seed preset's values where it differs from the
    baseline preset; every difference belongs to exactly one enhancement."""
    base, full = cfg.flat_settings(baseline()), cfg.flat_settings(seed())
    differ = {k: full[k] for k in full if full[k] != base[k] and k != "preset"}
    groups = {name: {k: v for k, v in differ.items() if k.startswith(prefixes)}
              for name, prefixes in ENHANCEMENTS.items()}
    grouped = {k for group in groups.values() for k in group}
    if set(differ) != grouped or any(not group for group in groups.values()):
        raise AssertionError(f"presets seed and baseline differ in {sorted(differ)}; "
                             f"ENHANCEMENTS groups {sorted(grouped)}")
    return groups


def variants(names: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """The ablation's variants (all of VARIANTS, or the named ones; baseline always first)."""
    groups = enhancements()
    every = {BASELINE: {}, **groups, ALL: {k: v for g in groups.values() for k, v in g.items()}}
    if names is None:
        return every
    unknown = [n for n in names if n not in every]
    if unknown:
        raise UserError(f"--variants: unknown variant '{unknown[0]}'; choose from "
                        f"{', '.join(VARIANTS)}")
    return {n: v for n, v in every.items() if n == BASELINE or n in names}


def split_overrides(overrides: dict[str, Any], chosen: dict[str, dict[str, Any]]
                    ) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Settings for every variant, and the variants. A setting that an enhancement changes
    sets the value the variants with that enhancement use (e.g. optim.warmup_epochs=1 for a
    short run); the baseline keeps its own."""
    settings: dict[str, Any] = {}
    chosen = {name: dict(v) for name, v in chosen.items()}
    enhanced = {k for group in enhancements().values() for k in group}
    for key, value in overrides.items():
        if key in STUDY_OWNED:
            raise UserError(f"--set {key}: {_OWNED.get(key, STUDY_OWNED[key])}")
        if key in enhanced:
            for v in chosen.values():
                if key in v:
                    v[key] = value
        else:
            settings[key] = value
    return settings, chosen


_OWNED = {"seed": "each variant runs seeds 0 to N-1; give their number with --seeds N",
          "out": "the study folder is chosen with --out",
          "preset": "an ablation starts from the baseline preset"}


def ablation_study(seeds: int, settings: dict[str, Any],
                   names: list[str] | None = None) -> Study:
    """The ablation as a study: the baseline preset, `settings` (dotted keys, e.g. from
    --epochs and --set), one variant per enhancement and `all`, a grid over `seeds` seeds."""
    fixed, chosen = split_overrides(settings, variants(names))
    raw = {"preset": BASELINE, "settings": fixed, "variants": chosen, "seeds": seeds,
           "sampler": "grid", "pruner": "none"}
    return parse_study(raw, "ablate")


def ablate(seeds: int = 3, settings: dict[str, Any] | None = None, out: str | Path | None = None,
           names: list[str] | None = None, *, workers: int = 1, storage: str | None = None
           ) -> tuple[Path, str, list[str]]:
    """Write the ablation's study.yaml into `out`, run (or continue) it with `workers` trials
    at a time (in the database at `storage`, if given), and summarise it; return the study
    folder, the summary's Markdown and notes on the files written."""
    from cifarlab.studies.storage import require_optuna

    require_optuna("cifarlab ablate")
    study = ablation_study(seeds, dict(settings or {}), names)
    folder = Path(out if out is not None else DEFAULT_OUT)
    check_folder(folder, study, "ablate")
    stored = folder / STUDY_FILE
    if not stored.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(study.to_dict(), sort_keys=False).encode()
        checkpoint.write_atomic(stored, lambda f: f.write(text))
    log.info(f"ablation {folder}: {', '.join(study.variants)}; {seeds} seed(s) each")
    sweep(stored, out=folder, workers=workers, storage=storage)
    text, notes = summarize_study(folder, storage)
    return folder, text, notes


def parse_sets(texts: list[str]) -> dict[str, Any]:
    """`--set KEY=VALUE` texts as {dotted key: value}, the value read as YAML."""
    flat: dict[str, Any] = {}
    for text in texts:
        nested = cfg.parse_override(text)
        key = text.partition("=")[0].strip()
        value: Any = nested
        for part in key.split("."):
            value = value[part]
        flat[key] = value
    return flat
