"""`cifarlab study STUDY_DIR`: the finished trials of a study grouped by point (its settings,
and its variant where the study has variants), with the mean, standard deviation and 95 %
confidence interval over their seeds, the best point by mean validation accuracy and Welch's
t-test of each point against it, and the runs grouped by each listed axis alone; Optuna's
figures (optimisation history, parameter importances, parallel coordinates). Written as
study.md with the figures beside it and one self-contained study.html, by the run report's
renderer (document.py).

An ablation study (variants, one of them named `baseline`, and no space; `cifarlab ablate`
writes one) is shown as its own table instead: each variant against the baseline, the
difference of the means with Welch's p and Holm's adjusted p over the family of
variant-vs-baseline comparisons, for validation and for test accuracy, and a bar chart with
the 95 % confidence intervals. Selection is on validation accuracy only; test accuracy is
reported beside it and never chosen on.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cifarlab import __version__
from cifarlab import config as cfg
from cifarlab.document import (
    Block,
    Document,
    Image,
    Section,
    Table,
    Text,
    to_html,
    to_markdown,
    write_files,
)
from cifarlab.errors import UserError
from cifarlab.runs import RESULT_FILE, read_run
from cifarlab.settings_rules import _show
from cifarlab.studies import stats
from cifarlab.studies.figures import FIGURE_CAPTIONS, ablation_figure, optuna_figures
from cifarlab.studies.spec import VARIANT, Study, parse_study
from cifarlab.studies.sweep import JOURNAL_FILE, STUDY_FILE, open_study

SUMMARY_FILE = "study.md"
SUMMARY_HTML = "study.html"
ABLATION_PNG = "ablation.png"
BASELINE = "baseline"  # the variant an ablation compares every other one with
NONE = "-"


@dataclass
class Point:
    params: dict[str, Any]
    runs: list[str]
    val: list[float]
    test: list[float]

    @property
    def variant(self) -> str | None:
        return self.params.get(VARIANT)

    @property
    def label(self) -> str:
        parts = [str(self.variant)] if self.variant is not None else []
        parts += [f"{k}={_fmt(v)}" for k, v in self.params.items() if k != VARIANT]
        return ", ".join(parts) or "(settings)"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _show(value)


def load(folder: Path, storage: str | None = None) -> tuple[Study, Any]:
    """The study spec and its Optuna study (in the journal, or the database at `storage`),
    or a one-line error."""
    stored = folder / STUDY_FILE
    if not stored.is_file() or storage is None and not (folder / JOURNAL_FILE).is_file():
        raise UserError(f"{folder}: not a study folder (no {STUDY_FILE} and {JOURNAL_FILE}); "
                        "give the folder cifarlab sweep wrote")
    study = parse_study(cfg.load_yaml(stored, where=str(stored)), str(stored))
    return study, open_study(folder, study, create=False, storage=storage)


def is_ablation(study: Study) -> bool:
    return BASELINE in study.variants and not study.space


def points(folder: Path, study: Study, optuna_study: Any) -> tuple[list[Point], dict[str, int]]:
    """Finished trials grouped by point (in the order first seen); counts of trials by state.
    Test accuracies are those of the runs that have one (none without a test split)."""
    grouped: dict[str, Point] = {}
    seen_runs: set[str] = set()
    states: dict[str, int] = {}
    axes = study.axes()
    for t in optuna_study.get_trials(deepcopy=False):
        states[t.state.name.lower()] = states.get(t.state.name.lower(), 0) + 1
        run = t.user_attrs.get("run")
        if t.state.name != "COMPLETE" or run is None or run in seen_runs:
            continue
        seen_runs.add(run)
        params = {k: t.params[k] for k in axes if k in t.params}
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
        return NONE
    return f"[{summary.ci_low:.2f}, {summary.ci_high:.2f}]"


def _sd(summary: stats.Summary) -> str:
    return NONE if summary.sd is None else f"{summary.sd:.2f}"


def _p(value: float | None) -> str:
    return NONE if value is None else f"{value:.3g}"


def _described(values: list[float]) -> list[str]:
    """n, mean, sd and 95 % CI of some accuracies (dashes for none)."""
    if not values:
        return ["0", NONE, NONE, NONE]
    s = stats.summarize(values, bounds=stats.PERCENT)
    return [str(s.n), f"{s.mean:.2f}", _sd(s), _ci(s)]


# ------------------------------------------------------------------------------ any study

def points_blocks(found: list[Point]) -> list[Block]:
    """Every point ranked by mean validation accuracy, with Welch's p against the best."""
    ranked = sorted(found, key=lambda p: -stats.mean(p.val))
    best = ranked[0]
    any_test = any(p.test for p in found)
    header = ["point", "n", "val mean", "val sd", "val 95% CI", "p vs best"]
    if any_test:
        header += ["test n", "test mean", "test sd", "test 95% CI"]
    rows = []
    for p in ranked:
        pv = None if p is best else stats.welch_p(p.val, best.val)
        row = [p.label, *_described(p.val), _p(pv)]
        if any_test:
            row += _described(p.test)
        rows.append(row)
    b = stats.summarize(best.val, bounds=stats.PERCENT)
    text = ("Accuracy in percent: the best validation accuracy of each run, and the test "
            "accuracy of its best checkpoint. p: Welch's t-test of the point's validation "
            "accuracy against the best point's. Points are ranked, and the best one chosen, "
            "by mean validation accuracy only.")
    if not any_test:
        text += " No run has a test accuracy (no test split, data.test_source)."
    return [Text(text), Table(header, rows, "lrrrrr" + "rrrr"),
            Text(f"Best point by mean validation accuracy: {best.label} "
                 f"({b.mean:.2f} % over {b.n} seed(s)); its runs: {', '.join(best.runs)}.")]


def by_setting_blocks(study: Study, found: list[Point]) -> list[Block]:
    """For a study of two axes or more: the runs grouped by each listed axis's value alone
    (every other axis pooled), ranked by mean validation accuracy."""
    axes = study.axes()
    if len(axes) < 2:
        return []
    any_test = any(p.test for p in found)
    blocks: list[Block] = [Text("Each listed axis alone: the runs grouped by its value, all "
                                "other axes pooled (a range is left out).")]
    for key, axis in axes.items():
        if not isinstance(axis, list):
            continue
        groups: dict[str, tuple[list[float], list[float]]] = {}
        for p in found:
            val, test = groups.setdefault(_fmt(p.params[key]), ([], []))
            val.extend(p.val)
            test.extend(p.test)
        ranked = sorted(groups.items(), key=lambda g: -stats.mean(g[1][0]))
        header = [key, "n", "val mean", "val sd", "val 95% CI"]
        header += ["test n", "test mean", "test sd", "test 95% CI"] if any_test else []
        rows = [[value, *_described(val), *(_described(test) if any_test else [])]
                for value, (val, test) in ranked]
        blocks.append(Table(header, rows, "lrrrr" + "rrrr"))
    return blocks


# ------------------------------------------------------------------------------ ablation

@dataclass
class Comparison:
    """One variant against the baseline on one measure: the difference of the means in
    points (None when either has no value), Welch's p and Holm's adjusted p."""

    diff: float | None
    p: float | None
    holm: float | None


def compare(found: list[Point], measure: Callable[[Point], list[float]]) -> list[Comparison]:
    """Each point against the baseline (the baseline against itself: no test), Holm over
    the family of the variants' comparisons."""
    base = next(p for p in found if p.variant == BASELINE)
    diffs, ps = [], []
    for p in found:
        a, b = measure(p), measure(base)
        diffs.append(stats.mean(a) - stats.mean(b) if p is not base and a and b else None)
        ps.append(None if p is base else stats.welch_p(a, b))
    return [Comparison(d, p, h) for d, p, h in zip(diffs, ps, stats.holm(ps), strict=True)]


def ablation_table(found: list[Point], measure: Callable[[Point], list[float]]) -> Table:
    rows = []
    for p, c in zip(found, compare(found, measure), strict=True):
        diff = NONE if c.diff is None else f"{c.diff:+.2f}"
        rows.append([str(p.variant), *_described(measure(p)), diff, _p(c.p), _p(c.holm)])
    return Table(["variant", "n", "mean", "sd", "95% CI", "vs baseline", "Welch p", "Holm p"],
                 rows, "lrrrrrrr")


def ablation_blocks(study: Study, found: list[Point]) -> tuple[list[Block], bytes | None]:
    """The ablation's tables and text, and its bar chart (None without a baseline run)."""
    order = {name: i for i, name in enumerate(study.variants)}
    found = sorted(found, key=lambda p: order.get(str(p.variant), len(order)))
    missing = [name for name in study.variants if name not in {p.variant for p in found}]
    if all(p.variant != BASELINE for p in found):
        return [Text("No finished run of the baseline yet: nothing to compare with.")], None
    best = max(found, key=lambda p: stats.mean(p.val))
    b = stats.summarize(best.val, bounds=stats.PERCENT)
    blocks: list[Block] = [
        Text("Accuracy in percent over the seeds of each variant: mean, sample standard "
             "deviation and the 95 % confidence interval of the mean (Student's t, cut to "
             "0-100 %). vs baseline: the variant's mean minus the baseline's, in points; "
             "Welch p: Welch's t-test of the two; Holm p: that p adjusted by Holm's method "
             "over the family of all variants' comparisons with the baseline (a difference "
             "is significant at 5 % when Holm p < 0.05; a comparison without spread in "
             "either variant has no p and is left out of the family)."),
        Text("Best validation accuracy of each run (selection):"),
        ablation_table(found, lambda p: p.val),
        Text(f"Best variant by mean validation accuracy: {best.variant} ({b.mean:.2f} % over "
             f"{b.n} seed(s)). Variants are chosen on validation accuracy only."),
    ]
    if any(p.test for p in found):
        blocks += [Text("Test accuracy of each run's best checkpoint (reported, never chosen "
                        "on):"), ablation_table(found, lambda p: p.test)]
    else:
        blocks.append(Text("No test accuracy: the runs had no test split (data.test_source); "
                           "validation accuracy alone is reported."))
    if missing:
        blocks.append(Text(f"No finished run yet of: {', '.join(missing)}."))
    from cifarlab.plots import figure_bytes

    png = figure_bytes(ablation_figure(found, BASELINE))
    blocks.append(Image(ABLATION_PNG, "Accuracy by variant",
                        "Mean accuracy of each variant over its seeds; the error bars span the "
                        "95 % confidence interval of the mean (none for a single seed); the "
                        "dashed line is the baseline's mean validation accuracy."))
    return blocks, png


# ------------------------------------------------------------------------------ the summary

def build_document(folder: Path, study: Study, found: list[Point], states: dict[str, int],
                   figures: list[str], notes: list[str],
                   ablation: list[Block] | None = None) -> Document:
    """The summary; `figures`: Optuna's figures drawn, `ablation`: the ablation's blocks
    (an ablation study), shown instead of the table of points."""
    seeds = f"{study.seeds} seed(s) per point"
    if study.variants:
        seeds += f", variants {', '.join(study.variants)}"
    intro: list[Block] = [Text(
        f"Sampler {study.sampler}, pruner {study.pruner}, {seeds}, budget {study.budget()} "
        "trials; trials by state: "
        + (", ".join(f"{n} {s}" for s, n in sorted(states.items())) or "none") + ".")]
    sections: list[Section] = []
    if not found:
        intro.append(Text("No finished trials yet."))
    elif ablation is not None:
        sections.append(Section("Ablation", ablation))
    else:
        sections.append(Section("Results by point", points_blocks(found)))
        grouped = by_setting_blocks(study, found)
        if grouped:
            sections.append(Section("Results by setting", grouped))
    if figures or notes:
        images: list[Block] = [Image(name, *FIGURE_CAPTIONS[name]) for name in figures]
        trials = states.get("COMPLETE", 0)
        for i, name in enumerate(figures):
            if name == "param_importances.png":  # fANOVA from few trials is noise
                title, caption = FIGURE_CAPTIONS[name]
                caption += (f" From {trials} finished trial(s), {study.seeds} seed(s) per "
                            "point" + ("; with under 20 trials they are a rough hint, not a "
                                       "measurement." if trials < 20 else "."))
                images[i] = Image(name, title, caption)
        skipped = [n for n in notes if ": skipped" in n]
        if skipped:
            images.append(Text("Not drawn: " + "; ".join(skipped) + "."))
        sections.append(Section("Figures", images))
    sections.append(Section("Study", [
        Text(f"The study file as stored in the study folder ({STUDY_FILE}); continue it with "
             f"`cifarlab sweep {folder / STUDY_FILE} --out {folder}`."),
        _study_code(study)]))
    footer = (f"Written by cifarlab {__version__} on {time.strftime('%Y-%m-%d %H:%M')} from "
              f"the study folder {folder}.")
    return Document(f"Study {folder.name}", intro, sections, footer)


def _study_code(study: Study) -> Block:
    import yaml

    from cifarlab.document import Code

    return Code(yaml.safe_dump(study.to_dict(), sort_keys=False).rstrip())


def summarize_study(folder: str | Path, storage: str | None = None) -> tuple[str, list[str]]:
    """Write STUDY_DIR/study.md, study.html and the figures; return the Markdown and notes."""
    from cifarlab.studies.storage import require_optuna

    require_optuna("cifarlab study")
    folder = Path(folder)
    study, optuna_study = load(folder, storage)
    found, states = points(folder, study, optuna_study)
    figures: dict[str, bytes] = {}
    notes: list[str] = []
    ablation, drawn = None, []
    if found:
        figures, notes = optuna_figures(study, optuna_study)
        drawn = list(figures)
        if is_ablation(study):
            ablation, png = ablation_blocks(study, found)
            if png is not None:
                figures[ABLATION_PNG] = png
    document = build_document(folder, study, found, states, drawn, notes,
                              ablation)
    text = to_markdown(document)
    outputs = {**figures, SUMMARY_FILE: text.encode(),
               SUMMARY_HTML: to_html(document, figures).encode()}
    written = write_files(folder, outputs, "free disk space or make the folder writable, "
                          f"then run: cifarlab study {folder}")
    notes += [f"wrote {path}" for path in written
              if path.name not in (SUMMARY_FILE, SUMMARY_HTML)]
    notes.append(f"wrote {folder / SUMMARY_HTML}")
    return text, notes
