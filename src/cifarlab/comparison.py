"""The table that compares runs: their results, each with its delta against the first run,
and the settings that differ between them (`cifarlab compare`, and a run's report
`--against` another run)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cifarlab.config import flat_settings
from cifarlab.document import NONE, Table
from cifarlab.runs import Run

# Settings that name a run rather than change what it computes.
IDENTITY = ("name", "out")


def comparison_tables(runs: Sequence[Run]) -> list[Table]:
    """Results with each run's delta against the first (accuracy in percentage points, time
    in seconds), then the settings that differ between the runs (when any do)."""
    ref = runs[0]
    header = [r.label for r in runs]

    def delta(value: float | None, base: float | None, i: int, fmt: str) -> str:
        if value is None:
            return NONE
        if i == 0 or base is None:
            return format(value, fmt)
        return f"{value:{fmt}} ({value - base:+{fmt}})"

    results = Table(["", *header], [
        ["best validation accuracy (%)",
         *(delta(r.best.val_acc, ref.best.val_acc, i, ".2f") for i, r in enumerate(runs))],
        ["test accuracy (%)",
         *(delta(r.test_acc, ref.test_acc, i, ".2f") for i, r in enumerate(runs))],
        ["best epoch", *(str(r.best.epoch) for r in runs)],
        ["epochs run", *(f"{r.epochs_run} of {r.config.epochs}" for r in runs)],
        ["status", *(r.status for r in runs)],
        ["training time (s)",
         *(delta(r.train_seconds, ref.train_seconds, i, ",.0f") for i, r in enumerate(runs))],
        ["device", *(r.result["device"] if r.result else NONE for r in runs)],
    ], "l" + "r" * len(runs))
    settings = [flat_settings(r.config) for r in runs]
    differing = [key for key in settings[0] if key not in IDENTITY
                 and any(s[key] != settings[0][key] for s in settings[1:])]
    if not differing:
        return [results]
    rows = [[key, *(_setting(s[key]) for s in settings)] for key in differing]
    return [results, Table(["setting that differs", *header], rows, "l" + "r" * len(runs))]


def _setting(value: Any) -> str:
    """A setting as config.yaml writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting(v) for v in value) + "]"
    return str(value)
