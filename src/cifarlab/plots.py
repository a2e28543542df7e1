"""Figures of runs: training curves, the comparison of runs, the confusion matrix.

Built with matplotlib's object API (`Figure`; `savefig` renders with the Agg, SVG or PDF
canvas the file's format needs), never pyplot: no global state, no display. The functions
take data (runs read by cifarlab.runs, a confusion matrix) and return a Figure;
`save_figure` writes one.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from cifarlab.checkpoint import check_not_a_run_file, write_atomic
from cifarlab.config import AugmentConfig
from cifarlab.errors import UserError
from cifarlab.runs import Run

DPI = 100  # pixels per inch of PNG files: a figure of 12 x 9 inches is 1200 x 900 pixels
FORMATS = {".png": "png", ".svg": "svg", ".pdf": "pdf"}
CURVES_SIZE = (12.0, 9.0)  # inches
COMPARISON_SIZE = (12.0, 5.0)
MARKERS_UP_TO = 30  # epochs: shorter runs get a marker per epoch (a 1-epoch run is a point)
# A legend below its axes, clear of the tick labels and the axis label (in font sizes).
BELOW = {"loc": "upper center", "bbox_to_anchor": (0.5, 0.0), "borderaxespad": 3.4,
         "frameon": False}
TRAIN_STYLE = {"color": "tab:blue"}
VAL_STYLE = {"color": "tab:orange"}
BEST_STYLE = {"color": "0.4", "linestyle": ":", "linewidth": 1.2}
# Runs get colours that the single-run panels do not use for training and validation.
RUN_COLORS = ("tab:purple", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive",
              "tab:cyan", "tab:gray")


def curves_figure(runs: Sequence[Run]) -> Figure:
    """The 2x2 figure: loss and accuracy of `runs[0]`; the learning rate of every run; the
    validation accuracy of every run (with one run: the time per epoch instead)."""
    run = runs[0]
    fig = Figure(figsize=CURVES_SIZE, layout="constrained")
    (loss_ax, acc_ax), (lr_ax, last_ax) = fig.subplots(2, 2)
    _loss_panel(loss_ax, run)
    _accuracy_panel(acc_ax, run)
    _lr_panel(lr_ax, runs)
    if len(runs) > 1:
        _val_acc_panel(last_ax, runs)
    else:
        _time_panel(last_ax, run)
    model = run.config.model
    fig.suptitle(f"{run.label}: {model.name} (width {model.width}), preset "
                 f"{run.config.preset}, {run.config.data.source}", fontsize=14)
    return fig


def comparison_figure(runs: Sequence[Run]) -> Figure:
    """Validation accuracy and learning rate of every run, side by side."""
    fig = Figure(figsize=COMPARISON_SIZE, layout="constrained")
    val_ax, lr_ax = fig.subplots(1, 2)
    _val_acc_panel(val_ax, runs)
    _lr_panel(lr_ax, runs)
    fig.suptitle(f"{runs[0].label} and " + ", ".join(r.label for r in runs[1:]), fontsize=14)
    return fig


def confusion_figure(confusion: Sequence[Sequence[int]], classes: Sequence[str],
                     title: str) -> Figure:
    """Rows: true class, columns: predicted class. The colour is the share of the true class's
    images (so rare classes read like common ones); the number in a cell is the count."""
    matrix = np.asarray(confusion, dtype=np.int64)
    n = len(classes)
    side = min(16.0, max(6.0, 0.55 * n + 3.0))  # inches: room for the names and the counts
    fig = Figure(figsize=(side + 1.5, side), layout="constrained")
    ax = fig.subplots()
    totals = matrix.sum(1, keepdims=True)
    share = 100.0 * matrix / np.maximum(totals, 1)
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    ax.set_xticks(range(n), labels=classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticks(range(n), labels=[f"{c} ({t:,})" for c, t in zip(classes, totals[:, 0],
                                                                     strict=True)])
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class (test images)")
    if n <= 20:  # beyond that the counts no longer fit in their cells
        for i in range(n):
            for j in range(n):
                if matrix[i, j]:
                    ax.text(j, i, f"{matrix[i, j]:,}", ha="center", va="center", fontsize=9,
                            color="white" if share[i, j] > 55 else "black")
    bar = fig.colorbar(image, ax=ax, shrink=0.8)
    bar.set_label("share of the true class's images (%)")
    ax.set_title(title)
    return fig


def figure_bytes(fig: Figure, fmt: str = "png") -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format=fmt, dpi=DPI)
    return buffer.getvalue()


def check_figure_path(path: str | Path) -> None:
    """Refuse a figure file that cannot be written (an unknown format, no such folder) or
    that is one of a run's own files, before minutes of measuring rather than after."""
    path = Path(path)
    check_not_a_run_file(path)
    if path.suffix.lower() not in FORMATS or not path.parent.is_dir():
        raise UserError(f"-o {path}: give a .png, .svg or .pdf file in an existing folder")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write `fig` as PNG, SVG or PDF, by the file's extension; atomically."""
    path = Path(path)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise UserError(f"{path}: unknown figure format '{path.suffix}'; name the file "
                        f"{', '.join('*' + e for e in FORMATS)}")
    if not path.parent.is_dir():
        raise UserError(f"{path}: the folder {path.parent} does not exist; create it first")
    data = figure_bytes(fig, fmt)
    try:
        write_atomic(path, lambda f: f.write(data))
    except OSError as e:
        raise UserError(f"cannot write {path} ({e.strerror or e}); choose another file or "
                        "free disk space") from None
    return path


# ----------------------------------------------------------------------------------- panels


def _epochs(run: Run) -> list[int]:
    return [e.epoch for e in run.history]


def _run_color(index: int) -> str:
    return RUN_COLORS[index % len(RUN_COLORS)]


def _line_style(run: Run) -> dict:
    short = len(run.history) <= MARKERS_UP_TO
    return {"marker": "o" if short else None, "markersize": 3.5, "linewidth": 1.6}


def _epoch_axis(ax: Axes, runs: Sequence[Run]) -> None:
    last = max(r.epochs_run for r in runs)
    ax.set_xlabel("epoch")
    ax.set_xlim(0.5, last + 0.5)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def _loss_panel(ax: Axes, run: Run) -> None:
    style = _line_style(run)
    ax.plot(_epochs(run), [e.train_loss for e in run.history], label="training", **TRAIN_STYLE,
            **style)
    ax.plot(_epochs(run), [e.val_loss for e in run.history], label="validation", **VAL_STYLE,
            **style)
    smoothing = run.config.optim.label_smoothing
    kind = f"cross-entropy, label smoothing {smoothing:g}" if smoothing else "cross-entropy"
    ax.set_ylabel(f"loss ({kind})")
    ax.set_title("Loss per epoch")
    _epoch_axis(ax, [run])
    ax.legend(ncol=2, **BELOW)


def _accuracy_panel(ax: Axes, run: Run) -> None:
    style = _line_style(run)
    augmented = run.config.data.augment != AugmentConfig.off()
    train_label = "training (augmented images)" if augmented else "training"
    ax.plot(_epochs(run), [e.train_acc for e in run.history], label=train_label,
            **TRAIN_STYLE, **style)
    ax.plot(_epochs(run), [e.val_acc for e in run.history], label="validation", **VAL_STYLE,
            **style)
    best = run.best
    ax.axvline(best.epoch, **BEST_STYLE)
    ax.plot([best.epoch], [best.val_acc], marker="*", markersize=14, linestyle="none",
            color=VAL_STYLE["color"], markeredgecolor="black",
            label=f"best validation: {best.val_acc:.2f} % at epoch {best.epoch}")
    ax.set_ylabel("accuracy (%)")
    if run.test_acc is not None:
        ax.set_title(f"Accuracy per epoch; test accuracy of the best checkpoint: "
                     f"{run.test_acc:.2f} %")
    else:
        reason = "no test data" if run.finished else "run unfinished"
        ax.set_title(f"Accuracy per epoch ({reason}: no test accuracy)")
    _epoch_axis(ax, [run])
    ax.legend(ncol=2, **BELOW)


def _lr_panel(ax: Axes, runs: Sequence[Run]) -> None:
    for i, run in enumerate(runs):
        ax.plot(_epochs(run), [e.lr for e in run.history], label=run.label,
                color=_run_color(i), **_line_style(run))
    ax.set_ylabel("learning rate (at the epoch's last step)")
    ax.set_ylim(bottom=0)
    ax.set_title("Learning rate")
    _epoch_axis(ax, runs)
    if len(runs) > 1:
        ax.legend(ncol=min(3, len(runs)), **BELOW)


def _val_acc_panel(ax: Axes, runs: Sequence[Run]) -> None:
    for i, run in enumerate(runs):
        best = run.best
        label = f"{run.label}: best {best.val_acc:.2f} % (epoch {best.epoch})"
        if run.test_acc is not None:
            label += f", test {run.test_acc:.2f} %"
        ax.plot(_epochs(run), [e.val_acc for e in run.history], label=label,
                color=_run_color(i), **_line_style(run))
        ax.plot([best.epoch], [best.val_acc], marker="*", markersize=14, linestyle="none",
                color=_run_color(i), markeredgecolor="black")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title("Validation accuracy of each run (\u2605 best epoch)")
    _epoch_axis(ax, runs)
    ax.legend(ncol=1, **BELOW)


def _time_panel(ax: Axes, run: Run) -> None:
    ax.plot(_epochs(run), [e.seconds for e in run.history], color=_run_color(0),
            **_line_style(run))
    device = run.result["device"] if run.result else "this machine"
    ax.set_ylabel("seconds per epoch (training + validation)")
    ax.set_ylim(bottom=0)
    ax.set_title(f"Time per epoch: {run.train_seconds:,.1f} s in all on {device}")
    _epoch_axis(ax, [run])
