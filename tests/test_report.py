"""Reports and comparisons: what train writes, numbers equal to result.json, self-contained
HTML, Markdown whose images exist, and the compare command."""

from __future__ import annotations

import base64
import json
import re
import shutil

from fake_runs import write_run

from cifarlab.cli import main
from cifarlab.document import Table, markdown_table, text_table
from cifarlab.report import (
    CONFUSION_PNG,
    CURVES_PNG,
    REPORT_HTML,
    REPORT_MD,
    write_report,
)


def sections(markdown: str) -> dict[str, str]:
    """## title -> the text under it."""
    parts = re.split(r"^## (.+)$", markdown, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_train_writes_the_report_and_its_figures(trained_run):
    for name in (REPORT_MD, REPORT_HTML, CURVES_PNG, CONFUSION_PNG):
        assert (trained_run / name).stat().st_size > 0, name
    assert f"report: {trained_run / REPORT_HTML}" in (trained_run / "train.log").read_text()


def test_report_numbers_equal_result_json(trained_run):
    result = json.loads((trained_run / "result.json").read_text())
    md = (trained_run / REPORT_MD).read_text()
    parts = sections(md)
    best = f"{result['best_val_acc']:.2f} % at epoch {result['best_epoch']}"
    assert f"| best validation accuracy | {best} |" in parts["Results"]
    assert f"| test accuracy | {result['test_acc']:.2f} % of " in parts["Results"]
    assert f"| epochs run | {result['epochs_run']} of 2: finished |" in parts["Results"]
    for name, acc, row in zip(result["classes"], result["test_per_class_acc"],
                              result["test_confusion"], strict=True):
        assert (f"| {name} | {sum(row)} | {row[result['classes'].index(name)]} | "
                f"{acc:.2f} |") in parts["Test set"]
    data = result["data"]
    assert f"| training images | {data['train_images']:,} |" in parts["Data"]
    for channel, m, s in zip(("red", "green", "blue"), data["mean"], data["std"], strict=True):
        assert f"| {channel} | {m:.4f} | {s:.4f} |" in parts["Data"]
    assert "| parameters | 44,622 (44,622 trainable) |" in parts["Model"]  # width 4
    assert "label_smoothing: 0.1" in parts["Settings"]
    log_rows = [line for line in parts["Epoch log"].splitlines() if re.match(r"\| \d", line)]
    assert len(log_rows) == 2 and log_rows[result["best_epoch"] - 1].endswith("| best |")


def test_markdown_images_exist_and_html_is_self_contained(trained_run):
    md = (trained_run / REPORT_MD).read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md)
    assert images == [CURVES_PNG, CONFUSION_PNG]
    page = (trained_run / REPORT_HTML).read_text()
    assert page.startswith("<!DOCTYPE html>")
    # Nothing to fetch: no external address in any src/href/url(), no scripts, no links.
    assert not re.search(r"(src|href)\s*=\s*(?![\"']?data:)", page)
    assert not re.search(r"https?:|url\(|<script|<link", page)
    embedded = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert [base64.b64decode(e) for e in embedded] == [
        (trained_run / name).read_bytes() for name in images]
    # The same tables in both: results, per class, data, channels, model, epoch log.
    assert page.count("<table>") == len(re.findall(r"^\|---", md, flags=re.M)) == 6


def test_report_against_another_run(trained_run, tmp_path, capsys):
    run = tmp_path / "tiny"
    shutil.copytree(trained_run, run)
    other = write_run(tmp_path / "baseline", 2, preset="baseline", shift=-30)
    assert main(["report", str(run), "--against", str(other)]) == 0
    assert str(run / REPORT_HTML) in capsys.readouterr().out
    result = json.loads((run / "result.json").read_text())
    comparison = sections((run / REPORT_MD).read_text())["Comparison with baseline"]
    delta = result["best_val_acc"] - 60.0  # the made-up baseline's best
    assert f"| best validation accuracy (%) | 60.00 | {result['best_val_acc']:.2f} " \
           f"({delta:+.2f}) |" in comparison
    assert "| optim.label_smoothing | 0.0 | 0.1 |" in comparison
    assert "| name |" not in comparison  # names differ by design: not a setting that differs


def test_report_of_an_unfinished_run(trained_run, tmp_path):
    run = tmp_path / "tiny"
    shutil.copytree(trained_run, run)
    for name in ("result.json", CONFUSION_PNG, REPORT_MD):
        (run / name).unlink()
    write_report(run)
    md = (run / REPORT_MD).read_text()
    assert "The run is unfinished (interrupted or still training)" in md
    assert "## Test set\n\nThe run is unfinished" in md
    assert not (run / CONFUSION_PNG).exists()
    assert "| training images | \u2014 |" in md  # counts are only in result.json


def test_report_without_test_data(tmp_path):
    # The checkpoint is only read for an unfinished run; this one is finished.
    run = write_run(tmp_path / "r", 3, test=False)
    write_report(run)
    md = (run / REPORT_MD).read_text()
    assert "No test data" in md and "| test accuracy | \u2014 (no test data) |" in md
    assert not (run / CONFUSION_PNG).exists()


def test_report_says_when_images_were_scored_with_their_mirror_images(tmp_path):
    plain, flipped = write_run(tmp_path / "seed", 2), write_run(tmp_path / "fast", 2,
                                                                preset="fast")
    for run in (plain, flipped):
        write_report(run)
    assert "mirror image" not in sections((plain / REPORT_MD).read_text())["Results"]
    assert "| scoring | each validation and test image by the mean logits of it and its " \
           "mirror image (tta_flip) |" in sections((flipped / REPORT_MD).read_text())["Results"]


def test_compare_command(tmp_path, capsys):
    a = write_run(tmp_path / "baseline", 10, preset="baseline")
    b = write_run(tmp_path / "seed", 14, shift=3.5)
    c = write_run(tmp_path / "running", 4, finished=False)
    figure = tmp_path / "cmp.svg"
    assert main(["compare", str(a), str(b), str(c), "-o", str(figure)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["baseline", "seed", "running"]
    assert lines[2].split() == ["best", "validation", "accuracy", "(%)", "90.00", "93.50",
                                "(+3.50)", "90.00", "(+0.00)"]
    assert "test accuracy (%)" in out and "83.50 (+3.50)" in out and "\u2014" in out
    assert "training time (s)" in out and "42 (+12)" in out
    assert re.search(r"optim\.schedule\s+constant\s+cosine\s+cosine", out)
    assert figure.read_bytes().lstrip().startswith(b"<?xml")
    assert main(["compare", str(a), str(b), "--markdown", "-o", str(tmp_path / "c.png")]) == 0
    out = capsys.readouterr().out
    assert "|  | baseline | seed |\n|---|---:|---:|\n" in out
    assert "| epochs run | 10 of 10 | 14 of 14 |" in out


def test_compare_needs_two_runs(tmp_path, capsys):
    assert main(["compare", str(write_run(tmp_path / "a", 2))]) == 2
    err = capsys.readouterr().err
    assert "at least two run folders" in err and err.count("\n") == 1


def test_table_renderers():
    table = Table(["", "a|b"], [["x", "1.00"], ["longer", "10.00 (+9.00)"]], "lr")
    assert text_table(table).splitlines() == [
        "                  a|b",
        "------  -------------",
        "x                1.00",
        "longer  10.00 (+9.00)",
    ]
    assert markdown_table(table).splitlines()[0] == "|  | a\\|b |"
