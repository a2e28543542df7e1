"""A study's figures: the ablation's bar chart, and Optuna's optimisation history,
parameter importances and parallel coordinates, redrawn so that they can be read (Optuna's
own layout cuts labels and fades lines to white). summary.py puts them in the study's
report."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

from cifarlab.studies import stats
from cifarlab.studies.spec import Study


def ablation_figure(found: Sequence[Any], baseline: str) -> Any:
    """Bars of mean validation (and test) accuracy per variant (`found`: summary.Point), 95 %
    CI error bars, the mean of the variant named `baseline` as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    measures = [("validation", lambda p: p.val, "#4c72b0")]
    if any(p.test for p in found):
        measures.append(("test", lambda p: p.test, "#dd8452"))
    figure = Figure(figsize=(max(5.0, 1.1 * len(found) + 2), 4.0), layout="constrained")
    ax = figure.add_subplot()
    width, top = 0.8 / len(measures), 0.0
    for j, (name, measure, colour) in enumerate(measures):
        xs, means, errors = [], [], [[], []]
        for i, p in enumerate(found):
            values = measure(p)
            if not values:
                continue
            s = stats.summarize(values, bounds=stats.PERCENT)
            xs.append(i + (j - (len(measures) - 1) / 2) * width)
            means.append(s.mean)
            errors[0].append(0.0 if s.ci_low is None else s.mean - s.ci_low)
            errors[1].append(0.0 if s.ci_high is None else s.ci_high - s.mean)
        ax.bar(xs, means, width, yerr=errors, capsize=4, color=colour, label=name)
        top = max([top, *(m + e for m, e in zip(means, errors[1], strict=True))])
    base = next(p for p in found if p.variant == baseline)
    ax.axhline(stats.mean(base.val), color="#333333", linestyle="--", linewidth=1,
               label="baseline's mean validation accuracy")
    ax.set_xticks(range(len(found)), [str(p.variant) for p in found], rotation=20,
                  ha="right", rotation_mode="anchor")
    ax.set_ylabel("accuracy (%)")
    top = top or 1.0  # every interval clear of the frame, a cut one at 0 too
    ax.set_ylim(-0.03 * top, 1.08 * top)
    ax.set_title("Ablation: mean over seeds, 95 % confidence intervals")
    figure.legend(loc="outside upper center", ncol=3, frameon=False)  # above, off the bars
    return figure


# ------------------------------------------------------------------------------ figures

def optuna_figures(study: Study, optuna_study: Any) -> tuple[dict[str, bytes], list[str]]:
    """Optuna's optimisation history, parameter importances and parallel coordinates as
    PNG bytes by file name; a note on each that could not be drawn."""
    import matplotlib.pyplot as plt

    from cifarlab.plots import figure_bytes

    try:
        drawn, notes = draw_optuna_figures(study, optuna_study)
        return {name: figure_bytes(figure) for name, figure in drawn.items()}, notes
    finally:
        plt.close("all")


def draw_optuna_figures(study: Study, optuna_study: Any) -> tuple[dict[str, Any], list[str]]:
    """optuna_figures' figures as matplotlib Figures (pyplot's: close them), made legible."""
    import matplotlib

    matplotlib.use("Agg")
    from optuna.visualization import matplotlib as ovm

    notes = []
    params = list(study.axes())
    wanted = [("optimization_history.png", lambda: ovm.plot_optimization_history(optuna_study))]
    if len(params) >= 2:
        wanted.append(("param_importances.png",
                       lambda: ovm.plot_param_importances(optuna_study, params=params)))
    else:
        notes.append("param_importances.png: skipped (needs two or more parameters)")
    if params:
        wanted.append(("parallel_coordinate.png",
                       lambda: ovm.plot_parallel_coordinate(optuna_study, params=params)))
    else:
        notes.append("parallel_coordinate.png: skipped (the study varies no parameter)")
    figures: dict[str, Any] = {}
    for name, draw in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
                figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
                _make_legible(name, figure)
                figures[name] = figure
        except Exception as e:  # optuna refuses too few trials, or constant values
            first = (str(e).splitlines() or [type(e).__name__])[0]
            notes.append(f"{name}: skipped ({first})")
    return figures, notes


def _make_legible(name: str, figure: Any) -> None:
    """Optuna's figures as drawn are cut and hard to read (its style: grey panels, the
    parallel lines' colour map fading to white, names cut at the edges, the colour bar
    over the last axis's ticks). Here: white panels, a colour map without white, and room
    for every label."""
    from matplotlib.collections import LineCollection

    figure.set_size_inches(11.0, 5.5)
    for ax in figure.axes:
        ax.set_facecolor("white")
        for coll in ax.collections:
            if isinstance(coll, LineCollection):
                coll.set_cmap("viridis")
    if name == "parallel_coordinate.png":
        # optuna stacks one twin axes per parameter on the first one, and puts the colour
        # bar just right of them; the last axis's ticks need room too.
        for ax in figure.axes:
            if ax.get_label() == "<colorbar>":
                ax.set_position([0.88, 0.22, 0.018, 0.66])
            else:
                ax.set_position([0.1, 0.22, 0.66, 0.66])
        panels = [ax for ax in figure.axes if ax.get_label() != "<colorbar>"]
        for ax in panels:
            ax.grid(False)  # white grid lines cut the trials' lines
            for label in ax.get_xticklabels():
                label.set_rotation(0)
                label.set_horizontalalignment("center")
    else:
        figure.tight_layout()


FIGURE_CAPTIONS = {
    "optimization_history.png": ("Optimisation history",
                                 "Optuna's optimisation history: each trial's best validation "
                                 "accuracy, and the best so far."),
    "param_importances.png": ("Parameter importances",
                              "Optuna's parameter importances (fANOVA) for the best "
                              "validation accuracy."),
    "parallel_coordinate.png": ("Parallel coordinates",
                                "Optuna's parallel coordinates: each trial's parameters and "
                                "best validation accuracy."),
}
