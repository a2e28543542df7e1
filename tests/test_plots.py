"""Figures: valid files of the expected size, the right things drawn, and the run reader."""

from __future__ import annotations

import numpy as np
import pytest
from fake_runs import CLASSES, write_run
from matplotlib.backends.backend_agg import FigureCanvasAgg
from PIL import Image

from cifarlab import plots
from cifarlab.cli import main
from cifarlab.errors import UserError
from cifarlab.rundir import METRICS
from cifarlab.runs import COLUMNS, read_run, read_runs


def png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()  # decodes every pixel: a truncated file fails here
        return im.size


def expected_pixels(size_inches):
    return round(size_inches[0] * plots.DPI), round(size_inches[1] * plots.DPI)


def test_reader_columns_are_the_metrics_train_writes():
    assert COLUMNS == METRICS


def test_curves_of_one_run(tmp_path):
    run = read_run(write_run(tmp_path / "seed", 12, best_epoch=9))
    fig = plots.curves_figure([run])
    loss_ax, acc_ax, lr_ax, time_ax = fig.axes
    # The best epoch is marked on the accuracy panel, the test accuracy is in its title.
    assert any(list(line.get_xdata()) == [9, 9] for line in acc_ax.lines)
    assert "80.00 %" in acc_ax.get_title()
    assert "label smoothing 0.1" in loss_ax.get_ylabel()
    assert "%" in acc_ax.get_ylabel() and "seconds" in time_ax.get_ylabel()
    assert lr_ax.get_xlabel() == "epoch" and lr_ax.get_xlim() == (0.5, 12.5)
    path = plots.save_figure(fig, tmp_path / "curves.png")
    assert png_size(path) == expected_pixels(plots.CURVES_SIZE)


def test_a_run_that_stopped_after_one_epoch(tmp_path):
    run = read_run(write_run(tmp_path / "short", 1, max_epochs=50))
    fig = plots.curves_figure([run])
    assert all(line.get_marker() == "o" for line in fig.axes[0].lines)  # a point, not nothing
    assert [int(t) for t in fig.axes[0].get_xticks() if 0.5 <= t <= 1.5] == [1]
    assert png_size(plots.save_figure(fig, tmp_path / "c.png")) == expected_pixels(
        plots.CURVES_SIZE)


def test_runs_of_different_lengths_and_an_unfinished_one(tmp_path):
    runs = read_runs([write_run(tmp_path / "a", 3), write_run(tmp_path / "b", 40, shift=5),
                      write_run(tmp_path / "c", 7, finished=False)])
    fig = plots.curves_figure(runs)
    val_ax = fig.axes[3]
    assert val_ax.get_xlim() == (1 - 1.6, 40 + 1.6)  # room for the best epoch's star
    labels = [t.get_text() for t in val_ax.get_legend().get_texts()]
    assert labels[0].startswith("a: best 90.00 % (epoch 3), test 80.00 %")
    assert labels[2] == "c: best 90.00 % (epoch 7)"  # unfinished: no test accuracy
    assert "run unfinished" not in fig.axes[1].get_title()  # the panels of run `a`
    unfinished = plots.curves_figure(runs[2:])
    assert "run unfinished" in unfinished.axes[1].get_title()
    assert png_size(plots.save_figure(plots.comparison_figure(runs), tmp_path / "cmp.png")) == \
        expected_pixels(plots.COMPARISON_SIZE)


def test_legends_sit_below_their_panels(tmp_path):
    runs = read_runs([write_run(tmp_path / "a", 30), write_run(tmp_path / "b", 20)])
    fig = plots.curves_figure(runs)
    canvas = FigureCanvasAgg(fig)  # what savefig draws PNG files with
    canvas.draw()
    renderer = canvas.get_renderer()
    legends = 0
    for ax in fig.axes:
        legend = ax.get_legend()
        if legend is not None:
            legends += 1
            # Below the axis label, which is below the tick labels and the plotting area.
            assert legend.get_window_extent(renderer).y1 < \
                ax.xaxis.label.get_window_extent(renderer).y0
    assert legends == 4


def test_svg_and_pdf_by_extension_and_bad_names(tmp_path):
    run = read_run(write_run(tmp_path / "r", 5))
    fig = plots.curves_figure([run])
    svg = plots.save_figure(fig, tmp_path / "c.svg").read_bytes()
    assert svg.lstrip().startswith(b"<?xml") and b"<svg" in svg[:2000]
    assert plots.save_figure(fig, tmp_path / "c.PDF").read_bytes().startswith(b"%PDF-")
    with pytest.raises(UserError, match="unknown figure format '.jpg'"):
        plots.save_figure(fig, tmp_path / "c.jpg")
    with pytest.raises(UserError, match="does not exist"):
        plots.save_figure(fig, tmp_path / "no" / "c.png")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.PDF", "c.svg", "r"]


def test_confusion_figure(tmp_path):
    confusion = np.diag([5] * 10) + np.eye(10, k=1, dtype=int)
    fig = plots.confusion_figure(confusion.tolist(), CLASSES, "test set")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted class" and ax.get_ylabel().startswith("true class")
    assert {t.get_text() for t in ax.texts} == {"5", "1"}
    assert png_size(plots.save_figure(fig, tmp_path / "c.png")) == expected_pixels(
        fig.get_size_inches())
    many = plots.confusion_figure(np.eye(40, dtype=int).tolist(),
                                  [f"c{i}" for i in range(40)], "40 classes")
    assert not many.axes[0].texts  # counts left out where they cannot fit


def test_plot_command(tmp_path, capsys):
    a, b = write_run(tmp_path / "a", 4), write_run(tmp_path / "b", 9)
    out = tmp_path / "both.png"
    assert main(["plot", str(a), str(b), "-o", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert png_size(out) == expected_pixels(plots.CURVES_SIZE)


def test_plot_and_compare_write_into_the_first_run_by_default(tmp_path, capsys, monkeypatch):
    a, b = write_run(tmp_path / "a", 4), write_run(tmp_path / "b", 9)
    monkeypatch.chdir(tmp_path)
    assert main(["plot", str(a), str(b)]) == 0
    assert main(["compare", str(a), str(b)]) == 0
    out = capsys.readouterr().out
    assert f"wrote {a / 'plot.png'}" in out and f"wrote {a / 'comparison.png'}" in out
    assert png_size(a / "plot.png") == expected_pixels(plots.CURVES_SIZE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # nothing in the cwd


@pytest.mark.parametrize("name", ["best.pt", "metrics.csv", "curves.png", "report.html"])
def test_a_figure_never_replaces_a_runs_own_file(tmp_path, capsys, name):
    a = write_run(tmp_path / "a", 4)
    (a / "run_id").write_text("0123\n")
    (a / name).write_bytes(b"the run's own")
    for argv in (["plot", str(a)], ["compare", str(a), str(a)]):
        assert main([*argv, "-o", str(a / name)]) == 2
        err = capsys.readouterr().err
        assert f"that is the run's own {name}, which this would replace" in err
        assert err.count("\n") == 1 and (a / name).read_bytes() == b"the run's own"


@pytest.mark.parametrize("setup, message", [
    (lambda d: None, "no such folder"),
    (lambda d: d.mkdir(), "no config.yaml there"),
    (lambda d: (write_run(d, 2), (d / "metrics.csv").unlink()), "no metrics.csv yet"),
    (lambda d: (write_run(d, 2), (d / "metrics.csv").write_text(",".join(COLUMNS) + "\n")),
     "no epoch recorded yet"),
    (lambda d: (write_run(d, 2), (d / "metrics.csv").write_text(
        ",".join(COLUMNS) + "\n1,x,2,3,4,5,6\n")), "line 2 is not a row of numbers"),
    (lambda d: (write_run(d, 2), (d / "result.json").write_text("{")), "not readable JSON"),
    (lambda d: (write_run(d, 2), (d / "config.yaml").write_text("epochz: 3\n")),
     "unknown setting 'epochz'"),
])
def test_what_is_not_a_run_folder_is_one_line_exit_2(tmp_path, capsys, setup, message):
    folder = tmp_path / "run"
    setup(folder)
    assert main(["plot", str(folder), "-o", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_runs_with_the_same_folder_name_are_told_apart(tmp_path):
    runs = read_runs([write_run(tmp_path / "a" / "seed", 2), write_run(tmp_path / "b" / "seed", 2)])
    assert [r.label for r in runs] == [str(tmp_path / "a" / "seed"), str(tmp_path / "b" / "seed")]
