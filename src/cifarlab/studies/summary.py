"""`cifarlab study STUDY_DIR`: the finished trials of a study grouped by point, with the
mean, standard deviation and 95 % confidence interval over their seeds, the best point by
mean validation accuracy and Welch's t-test of each point against it; study.md, and
Optuna's figures beside it."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab import config as cfg
from cifarlab.errors import UserError
from cifarlab.runs import RESULT_FILE, read_run
from cifarlab.studies import stats
from cifarlab.studies.spec import parse_study
from cifarlab.studies.sweep import JOURNAL_FILE, STUDY_FILE, open_study

SUMMARY_FILE = "study.md"


@dataclass
class Point:
    params: dict[str, Any]
    runs: list[str]
    val: list[float]
    test: list[float]

    @property
    def label(self) -> str:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in self.params.items()) or "(settings)"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else cfg._show(value)


def load(folder: Path, storage: str | None = None) -> tuple[Any, Any]:
    """The study spec and its Optuna study (in the journal, or the database at `storage`),
    or a one-line error."""
    stored = folder / STUDY_FILE
    if not stored.is_file() or storage is None and not (folder / JOURNAL_FILE).is_file():
        raise UserError(f"{folder}: not a study folder (no {STUDY_FILE} and {JOURNAL_FILE}); "
                        "give the folder cifarlab sweep wrote")
    study = parse_study(cfg.load_yaml(stored, where=str(stored)), str(stored))
    return study, open_study(folder, study, create=False, storage=storage)


def points(folder: Path, study: Any, optuna_study: Any) -> tuple[list[Point], dict[str, int]]:
    """Finished trials grouped by point (in the order first seen); counts of trials by state."""
    grouped: dict[str, Point] = {}
    seen_runs: set[str] = set()
    states: dict[str, int] = {}
    for t in optuna_study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        run = t.user_attrs.get("run")
        if t.state.name != "COMPLETE" or run is None or run in seen_runs:
            continue
        seen_runs.add(run)
        params = {k: t.params[k] for k in study.space if k in t.params}
        key = repr(sorted(params.items()))
        point = grouped.setdefault(key, Point(params, [], [], []))
        point.runs.append(run)
        point.val.append(float(t.value))
        if (folder / run / RESULT_FILE).is_file():
            test_acc = read_run(folder / run).result["test_acc"]
            if test_acc is not None:
                point.test.append(float(test_acc))
    return list(grouped.values()), states


def _ci(summary: stats.Summary) -> str:
    if summary.ci_low is None:
        return "-"
    return f"[{summary.ci_low:.2f}, {summary.ci_high:.2f}]"


def _sd(summary: stats.Summary) -> str:
    return "-" if summary.sd is None else f"{summary.sd:.2f}"


def markdown(folder: Path, study: Any, found: list[Point], states: dict[str, int]) -> str:
    lines = [f"# Study {folder.name}", "",
             f"Sampler {study.sampler}, pruner {study.pruner}, {study.seeds} seed(s) per point, "
             f"budget {study.budget()} trials; trials by state: "
             + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none") + ".", ""]
    if not found:
        return "\n".join([*lines, "No finished trials yet.", ""])
    ranked = sorted(found, key=lambda p: -stats.mean(p.val))
    best = ranked[0]
    any_test = any(p.test for p in found)
    header = ["point", "n", "val mean", "val sd", "val 95% CI", "p vs best"]
    if any_test:
        header += ["test mean", "test sd", "test 95% CI"]
    lines += ["Accuracy in percent: the best validation accuracy of each run, and the test "
              "accuracy of its best checkpoint. p: Welch's t-test of the point's validation "
              "accuracy against the best point's.", "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for p in ranked:
        v = stats.summarize(p.val)
        pv = None if p is best else stats.welch_p(p.val, best.val)
        row = [p.label, str(v.n), f"{v.mean:.2f}", _sd(v), _ci(v),
               "-" if pv is None else f"{pv:.3g}"]
        if any_test:
            if p.test:
                t = stats.summarize(p.test)
                row += [f"{t.mean:.2f}", _sd(t), _ci(t)]
            else:
                row += ["-", "-", "-"]
        lines.append("| " + " | ".join(row) + " |")
    b = stats.summarize(best.val)
    lines += ["", f"Best point by mean validation accuracy: {best.label} "
              f"({b.mean:.2f} % over {b.n} seed(s)).", ""]
    return "\n".join(lines)


def figures(folder: Path, study: Any, optuna_study: Any) -> list[str]:
    """Optuna's optimisation history and parameter importances as PNGs; notes on those
    that could not be drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    notes = []
    params = list(study.space)
    wanted = [("optimization_history.png", lambda: ovm.plot_optimization_history(optuna_study))]
    if len(params) >= 2:
        wanted.append(("param_importances.png",
                       lambda: ovm.plot_param_importances(optuna_study, params=params)))
    else:
        notes.append("param_importances.png: skipped (needs two or more parameters)")
    for name, draw in wanted:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = draw()
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.savefig(folder / name, dpi=100, bbox_inches="tight")
            plt.close(figure)
            notes.append(f"wrote {folder / name}")
        except Exception as e:  # optuna refuses too few trials, or constant values
            plt.close("all")
            first = (str(e).splitlines() or [type(e).__name__])[0]
            notes.append(f"{name}: skipped ({first})")
    return notes


def summarize_study(folder: str | Path, storage: str | None = None) -> tuple[str, list[str]]:
    """Write STUDY_DIR/study.md and the figures; return the Markdown and the notes."""
    folder = Path(folder)
    study, optuna_study = load(folder, storage)
    found, states = points(folder, study, optuna_study)
    text = markdown(folder, study, found, states)
    (folder / SUMMARY_FILE).write_text(text)
    notes = figures(folder, study, optuna_study) if found else []
    return text, notes
