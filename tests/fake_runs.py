"""Hand-written run folders, for the cases that training does not produce on demand."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from cifarlab.config import apply_dict
from cifarlab.presets import get_preset
from cifarlab.runs import COLUMNS

CLASSES = [f"class{i}" for i in range(10)]


def write_run(folder: Path, epochs: int, *, preset: str = "seed", finished: bool = True,
              test: bool = True, best_epoch: int | None = None, max_epochs: int | None = None,
              shift: float = 0.0, lr: float | None = None, settings: dict | None = None,
              seconds: list[float] | None = None) -> Path:
    """A run folder as train leaves it, with made-up numbers: val_acc rises to its best at
    `best_epoch` (default: the last epoch), then falls. Unfinished runs have no result.json.
    `lr`: a constant learning rate instead of a falling one; `settings`: more settings of
    the run's config.yaml; `seconds`: each epoch's time (default 3 s)."""
    best_epoch = best_epoch or epochs
    folder.mkdir(parents=True)
    config = apply_dict(get_preset(preset), {"epochs": max_epochs or epochs, "name": folder.name,
                                             "data": {"source": "synthetic"},
                                             **(settings or {})})
    (folder / "config.yaml").write_text(config.to_yaml())
    rows = []
    for e in range(1, epochs + 1):
        val = 40 + shift + 50 * min(e, best_epoch) / best_epoch - 2 * max(0, e - best_epoch)
        rows.append({"epoch": e, "lr": 0.1 * (1 - e / (epochs + 1)) if lr is None else lr,
                     "train_loss": 2.3 / e,
                     "train_acc": val - 5, "val_loss": 2.0 / e, "val_acc": val,
                     "seconds": seconds[e - 1] if seconds else 3.0})
    with (folder / "metrics.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    if finished:
        confusion = [[8 if i == j else (2 if j == (i + 1) % 10 else 0) for j in range(10)]
                     for i in range(10)]
        result = {
            "run_dir": str(folder), "best_val_acc": rows[best_epoch - 1]["val_acc"],
            "best_epoch": best_epoch, "test_acc": 80.0 + shift if test else None,
            "epochs_run": epochs, "stopped_early": epochs < (max_epochs or epochs),
            "train_seconds": 3.0 * epochs, "device": "cpu", "torch_version": "2.x",
            "classes": CLASSES, "test_per_class_acc": [80.0] * 10 if test else None,
            "test_confusion": confusion if test else None,
            "data": {"train_images": 900, "val_images": 100, "test_images": 100 if test else 0,
                     "mean": [0.49, 0.48, 0.45], "std": [0.25, 0.24, 0.26]},
        }
        (folder / "result.json").write_text(json.dumps(result))
    return folder
