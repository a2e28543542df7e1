"""TensorBoard logging (`tensorboard: true`): per-epoch scalars and, when the run ends, its
hyperparameters with its final metrics, under <run>/tensorboard/. Rank 0 only.

Needs the `tensorboard` package (pip install 'cifarlab[tensorboard]'); it is imported only
when the setting is on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifarlab.errors import UserError

FOLDER = "tensorboard"
# metrics.csv column -> TensorBoard tag
TAGS = {
    "train_loss": "loss/train", "val_loss": "loss/val", "ema_val_loss": "loss/val_ema",
    "train_acc": "accuracy/train", "val_acc": "accuracy/val", "ema_val_acc": "accuracy/val_ema",
    "lr": "lr", "seconds": "seconds",
}
# result.json key -> the metric that add_hparams shows beside the hyperparameters
FINAL_METRICS = ("best_val_acc", "test_acc", "best_epoch", "epochs_run", "train_seconds")


def check_available() -> None:
    """Refuse `tensorboard: true` without the package, before anything is written."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise UserError("tensorboard=true needs the tensorboard package; pip install "
                        "tensorboard, or drop --tensorboard") from None


def hparam_value(value: Any) -> bool | int | float | str:
    """A setting as add_hparams takes it: numbers, booleans and text as they are, the rest
    (lists, None) as text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class Board:
    """Writes into <run_dir>/tensorboard; a resumed run appends to the same folder."""

    def __init__(self, run_dir: Path) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(run_dir / FOLDER))

    def epoch(self, row: dict[str, float]) -> None:
        """One row of metrics.csv, at step = its epoch."""
        for key, tag in TAGS.items():
            if key in row:
                self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.flush()

    def finish(self, settings: dict[str, Any], result: dict[str, Any]) -> None:
        """The run's settings (dotted keys) with its final metrics, in the HPARAMS tab (its
        events are in the subfolder `hparams`)."""
        metrics = {f"final/{k}": float(result[k]) for k in FINAL_METRICS
                   if result.get(k) is not None}
        self.writer.add_hparams({k: hparam_value(v) for k, v in settings.items()}, metrics,
                                run_name="hparams")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
