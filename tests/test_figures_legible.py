"""Every figure the project draws, drawn from crowded or awkward data and checked from its own
artists (tests/legibility.py): no text cut at the edge, no two texts over each other, no
legend over data, no data point on the frame."""

from __future__ import annotations

import random

import pytest
from fake_runs import write_run
from legibility import problems
from matplotlib.figure import Figure

from cifarlab import plots
from cifarlab.deploy import bench, variants, variants_report
from cifarlab.runs import read_run, read_runs
from cifarlab.studies import figures, stats, summary
from cifarlab.studies.spec import Study
from cifarlab.studies.summary import Point

HEADER = bench.Header("AMD EPYC 7B13 64-Core Processor", ["avx2"], 2, "2.x", "1.x", "0.1",
                      "3.11", [0.1, 0.2, 0.3], [0.2, 0.2, 0.3], "2026-01-01 00:00 UTC")


def test_the_checker_finds_each_kind_of_problem():
    fig = Figure(figsize=(4, 3))
    ax = fig.add_subplot()
    ax.plot([0, 1, 2], [0, 1, 2], marker="o", label="data")
    ax.set_xlim(0, 2.2)  # (0, 0) sits in the corner, on the frame
    ax.set_ylim(0, 2.2)
    ax.legend(loc="upper left", borderaxespad=0)  # over nothing: the line rises to the right
    ax.annotate("a label that runs far past the edge", (1.5, 1.8))
    ax.text(1, 1, "one")
    ax.text(1, 1, "two")  # on top of "one"
    found = problems(fig)
    assert any("cut at the figure's edge" in p for p in found)
    assert any("'one' overlaps text 'two'" in p for p in found)
    assert any("runs past its axes" in p for p in found)
    assert any("on or outside its frame" in p for p in found)
    assert not any("legend covers" in p for p in found)
    ax.legend(loc="center")  # now over the middle point
    assert any("a legend covers 1 of its data points" in p for p in problems(fig))


@pytest.mark.parametrize("case", ["seed", "constant-lr", "distilled", "many", "slow-epoch"])
def test_run_curves_are_legible(tmp_path, case):
    if case == "many":
        runs = read_runs([write_run(tmp_path / "a", 3), write_run(tmp_path / "b", 40, shift=5),
                          write_run(tmp_path / "c", 7, finished=False)])
    elif case == "constant-lr":  # the baseline: the learning rate never moves
        runs = [read_run(write_run(tmp_path / "base", 12, preset="baseline", lr=0.1))]
    elif case == "distilled":
        runs = [read_run(write_run(tmp_path / "kd", 12, settings={
            "distill": {"teacher": "runs/teacher"}}))]
    elif case == "slow-epoch":  # the first epoch's compile time: the highest point
        runs = [read_run(write_run(tmp_path / "c", 12, seconds=[170.0] + [9.0] * 11))]
    else:
        runs = [read_run(write_run(tmp_path / "seed", 12, best_epoch=9))]
    fig = plots.curves_figure(runs)
    assert problems(fig) == []
    if case == "distilled":  # the training loss is named for what it is
        labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        assert labels == ["training: distillation loss (T 4, alpha 0.9)",
                          "validation: cross-entropy"]
        assert fig.axes[0].get_ylabel() == "loss"


def test_comparison_and_confusion_are_legible(tmp_path):
    runs = read_runs([write_run(tmp_path / "baseline", 30, preset="baseline", lr=0.1),
                      write_run(tmp_path / "enhanced", 30, shift=8)])
    assert problems(plots.comparison_figure(runs)) == []
    run = runs[0]
    assert problems(plots.confusion_figure(run.result["test_confusion"],
                                           run.result["classes"], "test")) == []


def test_a_run_keeps_its_colour_in_every_figure(tmp_path):
    a, b, c, d = (read_run(write_run(tmp_path / n, 3))
                  for n in ("first-try", "baseline", "pruned", "big"))
    alone = plots.run_colors([a])
    assert plots.run_colors([b, a])[1] == plots.run_colors([c, a])[1] == alone[0]
    assert plots.run_colors([a, b, c]) == [*alone, *plots.run_colors([b]),
                                           *plots.run_colors([c])]
    # "big" hashes like "first-try": in one figure the later one takes another colour.
    assert plots.run_colors([d]) == alone
    assert len(set(plots.run_colors([a, d]))) == 2


def crowded_variants() -> variants.VariantsResult:
    """The case that was unreadable: a run, its ONNX file at (nearly) the same costs and
    accuracy, its int8 file, and a pruned model with its int8 file."""
    def v(label, runtime, acc, params, macs, size, ms):
        return variants.Variant(label, label, label, runtime,
                                {"name": "resnet18", "num_classes": 10, "width": 32}, acc,
                                "checkpoint", None, params, macs, size, ms, ms * 1.2, 1000 / ms)

    rows = [v("baseline", "torch eager fp32", 64.8, 2_800_000, 140_000_000, 11_200_000, 3.1),
            v("baseline/best.onnx", "onnxruntime fp32", 64.8, 2_800_000, 140_000_000,
              11_150_000, 1.2),
            v("baseline/best.int8.onnx", "onnxruntime int8", 64.4, 2_800_000, 140_000_000,
              2_900_000, 0.6),
            v("pruned", "torch eager fp32", 64.1, 1_300_000, 67_000_000, 5_300_000, 2.4),
            v("pruned/best.int8.onnx", "onnxruntime int8", 63.5, 1_300_000, 67_000_000,
              1_400_000, 0.4),
            v("no-accuracy.onnx", "onnxruntime fp32", None, 1_300_000, 67_000_000,
              5_200_000, 1.0)]
    result = variants.VariantsResult(HEADER, rows, None)
    variants.mark_fronts(result.variants)
    return result


def test_variants_figure_is_legible_and_numbers_its_points():
    fig = variants_report.figure(crowded_variants())
    assert problems(fig) == []
    entries = [t.get_text() for t in fig.legends[0].get_texts()]
    assert "2: baseline/best.onnx" in entries
    assert "6: no-accuracy.onnx (no accuracy: not drawn)" in entries
    # One spot, one label: the run and its ONNX file share the MACs panel's point.
    assert "1,2" in [t.get_text() for t in fig.axes[0].texts]


def test_bench_figure_is_legible_and_does_not_zoom_into_noise():
    def row(model, runtime, ms, acc):
        return bench.Row(model, runtime, {"name": "resnet18"}, 2_800_000, 140_000_000, 11.2,
                         ms, ms * 1.2, 1000 / ms, acc, "validation", 500)

    result = bench.BenchResult(HEADER, [row("runs/x/best.pt", "torch eager fp32", 3.1, 64.8),
                                        row("runs/x/best.onnx", "onnxruntime fp32", 1.2, 64.8),
                                        row("runs/x/best.int8.onnx", "onnxruntime int8", 0.6,
                                            64.2)])
    fig = bench.figure(result)
    assert problems(fig) == []
    low, high = fig.axes[0].get_ylim()
    assert high - low >= bench.MIN_ACC_SPAN  # 3 images of 500 stay 3 images
    assert min(t.get_fontsize() for t in fig.axes[0].texts) >= 9


def test_ablation_figure_is_legible_with_a_wide_interval():
    found = [Point({"variant": name}, [], val, test) for name, val, test in [
        ("baseline", [42.1, 43.9, 41.8], [41.0, 42.0, 40.5]),
        ("augment", [40.2, 41.9, 41.7], [40.0, 41.0, 40.0]),
        ("label-smoothing", [43.1, 44.2, 43.8], [42.0, 43.0, 42.5]),
        ("warmup-cosine", [47.3, 48.1, 48.6], [46.0, 47.0, 46.5]),
        ("all", [13.0, 40.0], [])]]  # two seeds far apart: the t interval is wide
    assert problems(figures.ablation_figure(found, "baseline")) == []
    wide = stats.summarize([13.0, 40.0], bounds=stats.PERCENT)
    assert (wide.ci_low, wide.ci_high) == (0.0, 100.0)  # cut to what an accuracy can be
    assert summary._ci(wide) == "[0.00, 100.00]"


def test_optuna_figures_are_legible():
    optuna = pytest.importorskip("optuna")
    from optuna.distributions import CategoricalDistribution, FloatDistribution

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    space = {"optim.label_smoothing": [0.0, 0.2], "optim.lr": [0.02, 0.4]}
    study = Study("seed", {}, space, 1, "tpe", 8, "none",
                  {"baseline": {}, "smoothing": {}, "augment": {}})
    dists = {"variant": CategoricalDistribution(["baseline", "smoothing", "augment"]),
             "optim.label_smoothing": FloatDistribution(0.0, 0.2),
             "optim.lr": FloatDistribution(0.02, 0.4, log=True)}
    stored = optuna.create_study(direction="maximize")
    draw = random.Random(0)
    for _ in range(8):
        stored.add_trial(optuna.trial.create_trial(params={
            "variant": draw.choice(["baseline", "smoothing", "augment"]),
            "optim.label_smoothing": draw.uniform(0, 0.2),
            "optim.lr": 0.02 * 20 ** draw.random()}, distributions=dists,
            value=30 + 30 * draw.random()))
    import matplotlib.pyplot as plt

    try:
        drawn, notes = figures.draw_optuna_figures(study, stored)
        assert sorted(drawn) == ["optimization_history.png", "parallel_coordinate.png",
                                   "param_importances.png"] and notes == []
        for name, fig in drawn.items():
            assert problems(fig) == [], name
    finally:
        plt.close("all")


def test_importances_from_few_trials_carry_a_caveat(tmp_path):
    study = Study("seed", {}, {"optim.lr": [0.05, 0.1], "optim.label_smoothing": [0.0, 0.1]},
                  1, "grid", None, "none")
    found = [Point({"optim.lr": 0.05, "optim.label_smoothing": 0.0}, ["r"], [50.0], [])]
    doc = summary.build_document(tmp_path, study, found, {"COMPLETE": 4},
                                 ["param_importances.png"], [])
    captions = [getattr(b, "caption", "") for s in doc.sections for b in s.blocks]
    assert any("From 4 finished trial(s), 1 seed(s) per point; with under 20 trials they are "
               "a rough hint, not a measurement." in c for c in captions)
