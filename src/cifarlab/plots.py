"""Figures of runs: training curves, the comparison of runs, the confusion matrix.

Built with matplotlib's object API (`Figure`; `savefig` renders with the Agg, SVG or PDF
canvas the file's format needs), never pyplot: no global state, no display. The functions
take data (runs read by cifarlab.runs, a confusion matrix) and return a Figure;
`save_figure` writes one.
"""

from __future__ import annotations

import io
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
# Runs get colours that the single-run panels do not use for training and validation; a
# run's colour follows from its name (run_colors), so it is the same in every figure.
RUN_COLORS = ("tab:purple", "tab:green", "tab:red", "tab:brown", "tab:pink", "tab:olive",
              "tab:cyan", "tab:gray")
Y_ROOM = 0.08  # of a value axis's span, left free above and below the data (markers fit)


def curves_figure(runs: Sequence[Run]) -> Figure:
    """The 2x2 figure: loss and accuracy of `runs[0]`; the learning rate of every run; the
    validation accuracy of every run (with one run: the time per epoch instead)."""
    run = runs[0]
    fig = Figure(figsize=CURVES_SIZE, layout="constrained")
    (loss_ax, acc_ax), (lr_ax, last_ax) = fig.subplots(2, 2)
    colors = run_colors(runs)
    _loss_panel(loss_ax, run)
    _accuracy_panel(acc_ax, run)
    _lr_panel(lr_ax, runs, colors)
    if len(runs) > 1:
        _val_acc_panel(last_ax, runs, colors)
    else:
        _time_panel(last_ax, run, colors[0])
    model = run.config.model
    fig.suptitle(f"{run.label}: {model.name} (width {model.width}), preset "
                 f"{run.config.preset}, {run.config.data.source}", fontsize=14)
    return fig


def comparison_figure(runs: Sequence[Run]) -> Figure:
    """Validation accuracy and learning rate of every run, side by side."""
    fig = Figure(figsize=COMPARISON_SIZE, layout="constrained")
    val_ax, lr_ax = fig.subplots(1, 2)
    colors = run_colors(runs)
    _val_acc_panel(val_ax, runs, colors)
    _lr_panel(lr_ax, runs, colors)
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


def run_colors(runs: Sequence[Run]) -> list[str]:
    """A colour per run, from a hash of its name: a run keeps its colour across figures
    (its report, `compare`, `plot`) whatever the other runs are, unless two runs of one
    figure hash alike; the later one then takes the next free colour."""
    taken: list[str] = []
    for run in runs:
        start = zlib.crc32(run.label.encode())
        free = [RUN_COLORS[(start + k) % len(RUN_COLORS)] for k in range(len(RUN_COLORS))]
        free = [c for c in free if c not in taken] or free  # more runs than colours: reuse
        taken.append(free[0])
    return taken


def _room(ax: Axes, values: Sequence[float], floor: float | None = None) -> None:
    """Value-axis limits with Y_ROOM of the span free on both sides, so that no point or
    marker sits on the frame (a constant value is drawn in the middle); with `floor` (e.g.
    0 for a learning rate) the span is measured from it, so the axis shows the floor."""
    finite = [v for v in values if np.isfinite(v)]
    if not finite:
        return
    lo, hi = min(finite), max(finite)
    if floor is not None:
        lo = min(lo, floor)
    span = hi - lo or abs(hi) or 1.0
    ax.set_ylim(lo - Y_ROOM * span, hi + Y_ROOM * span)


def _line_style(run: Run) -> dict:
    short = len(run.history) <= MARKERS_UP_TO
    return {"marker": "o" if short else None, "markersize": 3.5, "linewidth": 1.6}


def _epoch_axis(ax: Axes, runs: Sequence[Run]) -> None:
    last = max(r.epochs_run for r in runs)
    ax.set_xlabel("epoch")
    room = max(0.5, 0.04 * last)  # half an epoch, or room for the best epoch's star
    ax.set_xlim(1 - room, last + room)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.grid(alpha=0.3)


def _loss_panel(ax: Axes, run: Run) -> None:
    style = _line_style(run)
    smoothing = run.config.optim.label_smoothing
    kind = f"cross-entropy, label smoothing {smoothing:g}" if smoothing else "cross-entropy"
    kd = run.config.distill
    if kd.teacher:  # the training loss is the distillation loss, not the validation's kind
        train_label = (f"training: distillation loss (T {kd.temperature:g}, alpha "
                       f"{kd.alpha:g})")
        val_label, ylabel = "validation: cross-entropy", "loss"
    else:
        train_label, val_label, ylabel = "training", "validation", f"loss ({kind})"
    train = [e.train_loss for e in run.history]
    val = [e.val_loss for e in run.history]
    ax.plot(_epochs(run), train, label=train_label, **TRAIN_STYLE, **style)
    ax.plot(_epochs(run), val, label=val_label, **VAL_STYLE, **style)
    _room(ax, train + val)
    ax.set_ylabel(ylabel)
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
    _room(ax, [e.train_acc for e in run.history] + [e.val_acc for e in run.history])
    if run.test_acc is not None:
        ax.set_title(f"Accuracy per epoch\ntest accuracy of the best checkpoint: "
                     f"{run.test_acc:.2f} %")
    else:
        reason = "no test data" if run.finished else "run unfinished"
        ax.set_title(f"Accuracy per epoch\n{reason}: no test accuracy")
    _epoch_axis(ax, [run])
    ax.legend(ncol=2, **BELOW)


def _lr_panel(ax: Axes, runs: Sequence[Run], colors: Sequence[str]) -> None:
    for run, color in zip(runs, colors, strict=True):
        ax.plot(_epochs(run), [e.lr for e in run.history], label=run.label,
                color=color, **_line_style(run))
    ax.set_ylabel("learning rate (at the epoch's last step)")
    _room(ax, [e.lr for r in runs for e in r.history], floor=0.0)
    ax.set_title("Learning rate")
    _epoch_axis(ax, runs)
    if len(runs) > 1:
        ax.legend(ncol=min(3, len(runs)), **BELOW)


def _val_acc_panel(ax: Axes, runs: Sequence[Run], colors: Sequence[str]) -> None:
    for run, color in zip(runs, colors, strict=True):
        best = run.best
        label = f"{run.label}: best {best.val_acc:.2f} % (epoch {best.epoch})"
        if run.test_acc is not None:
            label += f", test {run.test_acc:.2f} %"
        ax.plot(_epochs(run), [e.val_acc for e in run.history], label=label,
                color=color, **_line_style(run))
        ax.plot([best.epoch], [best.val_acc], marker="*", markersize=14, linestyle="none",
                color=color, markeredgecolor="black")
    ax.set_ylabel("validation accuracy (%)")
    _room(ax, [e.val_acc for r in runs for e in r.history])
    ax.set_title("Validation accuracy of each run (\u2605 best epoch)")
    _epoch_axis(ax, runs)
    ax.legend(ncol=1, **BELOW)


def _time_panel(ax: Axes, run: Run, color: str) -> None:
    ax.plot(_epochs(run), [e.seconds for e in run.history], color=color, **_line_style(run))
    device = run.result["device"] if run.result else "this machine"
    ax.set_ylabel("seconds per epoch (training + validation)")
    _room(ax, [e.seconds for e in run.history], floor=0.0)
    ax.set_title(f"Time per epoch: {run.train_seconds:,.1f} s in all on {device}")
    _epoch_axis(ax, [run])


# ------------------------------------------------------------------------- point labels

# Where a point's label may go, in points from the point, tried in this order: clear of a
# marker of up to 6 points' radius (the Pareto ring of compare --variants).
LABEL_OFFSETS = ((7, 7), (7, -7), (-7, 7), (-7, -7), (9, 0), (-9, 0), (0, 9), (0, -9),
                 (16, 14), (16, -14), (-16, 14), (-16, -14), (0, 20), (0, -20))


def label_points(ax: Axes, points: Sequence[tuple[float, float]], labels: Sequence[str],
                 fontsize: float = 9, marker_radius: float = 6.0) -> None:
    """Write labels[i] beside points[i] (data coordinates): each at the first of
    LABEL_OFFSETS where it stays inside the axes and overlaps neither a label written
    before nor any of the points' markers (`marker_radius` points); where no place is
    clear, at the least crowded one. Call it once the axes' limits are final.

    Written here because matplotlib has no label placement, and the packages that move
    labels iteratively (adjustText) do not promise a clear place either."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = ax.figure
    if not isinstance(fig.canvas, FigureCanvasAgg):
        FigureCanvasAgg(fig)
    fig.draw_without_rendering()  # the layout engine places the axes first
    renderer = fig.canvas.get_renderer()
    px = fig.dpi / 72.0 * marker_radius
    centres = ax.transData.transform(np.asarray(points, dtype=float).reshape(-1, 2))
    markers = [(x - px, y - px, x + px, y + px) for x, y in centres]
    box, placed = ax.bbox, []

    def crowding(extent: tuple[float, float, float, float]) -> float:
        x0, y0, x1, y1 = extent
        outside = max(0.0, box.x0 - x0) + max(0.0, x1 - box.x1) + max(0.0, box.y0 - y0) + max(
            0.0, y1 - box.y1)
        shared = sum(max(0.0, min(x1, b[2]) - max(x0, b[0])) * max(0.0, min(y1, b[3])
                     - max(y0, b[1])) for b in [*placed, *markers])
        return 1e6 * outside + shared

    for (x, y), label in zip(points, labels, strict=True):
        best: tuple[float, Any] | None = None
        for dx, dy in LABEL_OFFSETS:
            text = ax.annotate(label, (x, y), xytext=(dx, dy), textcoords="offset points",
                               fontsize=fontsize, ha="left" if dx > 0 else "right" if dx < 0
                               else "center", va="bottom" if dy > 0 else "top" if dy < 0
                               else "center")
            e = text.get_window_extent(renderer)
            score = crowding((e.x0, e.y0, e.x1, e.y1))
            if best is None or score < best[0]:
                if best is not None:
                    best[1].remove()
                best = (score, text)
            else:
                text.remove()
            if score == 0:
                break
        assert best is not None
        e = best[1].get_window_extent(renderer)
        placed.append((e.x0, e.y0, e.x1, e.y1))
