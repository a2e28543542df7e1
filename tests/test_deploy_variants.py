"""cifarlab compare --variants: accuracy against MACs, parameters, file size and CPU latency of
a checkpoint, its float32 export and its int8 model; Pareto fronts; the JSON, figure and
report; bad input refused before anything is measured."""

from __future__ import annotations

import functools
import math

import pytest
import torch

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.data.splits import prepare_splits
from cifarlab.deploy import bench, export, runtime, variants, variants_report
from cifarlab.profile import model_size
from cifarlab.runs import read_run


@pytest.fixture(autouse=True)
def quick_timing(monkeypatch):
    """bench's short measurement: the tests check what is measured, not how fast."""
    monkeypatch.setattr(bench, "measure", functools.partial(bench.measure, **bench.QUICK))


@pytest.fixture(scope="module")
def wider(tmp_path_factory):
    """Another architecture of the same task: width 8, one epoch."""
    out = tmp_path_factory.mktemp("wider")
    assert main(["train", "--data", "synthetic:300", "--epochs", "1", "--workers", "0",
                 "--set", "model.width=8", "--batch-size", "64", "--out", str(out),
                 "--name", "wide"]) == 0
    return out / "wide"


@pytest.fixture(scope="module")
def models(trained_run, tmp_path_factory):
    """The trained run, its float32 ONNX export and its int8 model."""
    folder = tmp_path_factory.mktemp("variants")
    fp32, int8 = folder / "tiny.onnx", folder / "tiny.int8.onnx"
    export.export(trained_run, fp32, exporter="torchscript")
    assert main(["quantize", str(trained_run), "--data", "synthetic:300", "--images", "32",
                 "--threads", "1", "--max-drop", "100", "--int8-format", "qdq-u8s8",
                 "-o", str(int8)]) == 0
    return trained_run, fp32, int8


def test_pareto_front_on_hand_made_numbers():
    # (90, 10) is best; (85, 5) twice: a tie, both on it; (80, 5) is beaten by (85, 5);
    # no accuracy: never on it and beats nothing, however cheap; (70, 20) is beaten by all.
    assert variants.pareto_front([90, 80, 85, 85, None, 70], [10, 5, 5, 5, 1, 20]) == [
        True, False, True, True, False, False]
    assert variants.pareto_front([50, 50], [3, 3]) == [True, True]
    assert variants.pareto_front([50, 50], [2, 3]) == [True, False]  # same accuracy, cheaper
    assert variants.pareto_front([60, 50], [3, 3]) == [True, False]  # same cost, better
    assert variants.pareto_front([50, 60], [1, 9]) == [True, True]  # a trade-off
    assert variants.pareto_front([None, None], [1, 2]) == [False, False]


def hand_made(accs: list[float | None]) -> variants.VariantsResult:
    header = bench.Header("Test CPU", ["avx2"], 2, "2.x", "1.x", "0.1", "3.11", [0.1, 0.2, 0.3],
                          [0.2, 0.2, 0.3], "2026-01-01 00:00 UTC")
    rows = []
    for i, acc in enumerate(accs):
        rows.append(variants.Variant(
            f"v{i}", f"runs/v{i}", f"runs/v{i}/best.pt", "torch eager fp32",
            {"name": "resnet18", "num_classes": 10, "width": 8}, acc,
            None if acc is None else "checkpoint", None, 1000 * (i + 1), 10**6 * (3 - i),
            2000 * (i + 1), 1.0 + i, 1.5 + i, 100.0 / (i + 1)))
    result = variants.VariantsResult(header, rows, None)
    variants.mark_fronts(result.variants)
    return result


def test_table_marks_each_cost_front_and_json_round_trips():
    # v0: most accurate, fewest params / smallest / fastest, most MACs; v1: fewer MACs, less
    # accurate; v2: no accuracy.
    result = hand_made([80.0, 70.0, None])
    assert [v.pareto for v in result.variants] == [
        {"macs": True, "params": True, "size": True, "latency": True},
        {"macs": True, "params": False, "size": False, "latency": False},
        {"macs": False, "params": False, "size": False, "latency": False}]
    table = variants.table(result)
    fronts = [row[-1] for row in table.rows]
    assert fronts == ["MACs, params, size, latency", "MACs", variants.NONE]
    assert table.rows[2][2] == variants.NONE  # no accuracy shown as such
    text = variants.text(result, markdown=True)
    assert "| v1 | torch eager fp32 | 70.00 |" in text and "No accuracy for v2" in text
    assert variants.VariantsResult.from_json(result.to_json()) == result


def test_report_of_variants_without_accuracy_is_self_contained(tmp_path):
    html = variants_report.write_report(hand_made([None, None]), tmp_path / "report")
    assert sorted(p.name for p in html.parent.iterdir()) == [
        variants.VARIANTS_HTML, variants.VARIANTS_MD, variants.VARIANTS_PNG]
    page = html.read_text()
    assert "data:image/png;base64," in page
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert "<link" not in page
    markdown = (tmp_path / "report" / variants.VARIANTS_MD).read_text()
    assert f"]({variants.VARIANTS_PNG})" in markdown and "Not drawn (no accuracy): v0, v1" \
        in markdown


def test_variants_table_json_figure_and_report(models, wider, tmp_path, capsys):
    run, fp32, int8 = models
    figure, report = tmp_path / "v.svg", tmp_path / "report"
    code = main(["compare", "--variants", str(run), str(fp32), str(int8), str(wider / "best.pt"),
                 "--threads", "1", "--json", "-o", str(figure), "--report", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    result = variants.VariantsResult.from_json(captured.out)
    assert result.to_json() == captured.out.rstrip("\n")  # the JSON round-trips
    assert result.header.threads == 1 and torch.get_num_threads() == 1
    assert result.header.torch == torch.__version__ and result.header.onnxruntime
    rows, wide = result.variants[:3], result.variants[3]
    assert [v.runtime for v in result.variants] == [
        "torch eager fp32", "onnxruntime fp32", "onnxruntime int8", "torch eager fp32"]
    assert [v.label for v in result.variants] == [
        "tiny", f"{fp32.parent.name}/tiny.onnx", f"{fp32.parent.name}/tiny.int8.onnx",
        "wide/best.pt"]
    ckpt = checkpoint.load(run / "best.pt")
    size = model_size(ckpt["model_args"])
    wide_ckpt = checkpoint.load(wider / "best.pt")
    wide_size = model_size(wide_ckpt["model_args"])
    assert (wide.params, wide.macs) == (wide_size.params, wide_size.macs)
    assert wide.macs > size.macs and wide.val_acc == wide_ckpt["val_acc"]
    assert wide.test_acc is None  # a checkpoint file, not a run folder
    for v in result.variants:
        assert math.isfinite(v.latency_ms) and 0 < v.latency_ms <= v.latency_p90_ms
        assert math.isfinite(v.throughput) and v.throughput > 0
        assert set(v.pareto) == {"macs", "params", "size", "latency"}
    for v in rows:
        assert (v.params, v.macs) == (size.params, size.macs) and v.params > 0
    # Sizes: the .onnx files on disk; the checkpoint's weights, more than their raw bytes
    # and less than best.pt with its config.
    assert rows[1].file_bytes == fp32.stat().st_size
    assert rows[2].file_bytes == int8.stat().st_size < rows[1].file_bytes
    raw = sum(t.numel() * t.element_size() for t in ckpt["model"].values())
    assert raw < rows[0].file_bytes < (run / "best.pt").stat().st_size
    # Accuracy as recorded: by training, by export (the source's), by quantize.
    assert (rows[0].val_acc, rows[0].acc_from) == (ckpt["val_acc"], "checkpoint")
    assert (rows[1].val_acc, rows[1].acc_from) == (ckpt["val_acc"], "export")
    recorded = runtime.OnnxClassifier(int8).meta("quantization")["val_acc_int8"]
    assert (rows[2].val_acc, rows[2].acc_from) == (recorded, "quantize")
    assert rows[0].test_acc == read_run(run).test_acc and rows[1].test_acc is None
    # The fronts are those of the table's own numbers.
    accs = [v.val_acc for v in result.variants]
    for cost in variants.COSTS:
        assert [v.pareto[cost.key] for v in result.variants] == variants.pareto_front(
            accs, [cost.of(v) for v in result.variants])
    # The export is as accurate as its checkpoint with a smaller file: the checkpoint is on
    # no size front.
    assert not rows[0].pareto["size"]
    assert figure.read_bytes().lstrip().startswith(b"<?xml")
    page = (report / variants.VARIANTS_HTML).read_text()
    assert "data:image/png;base64," in page and "https://" not in page
    assert "tiny.int8.onnx" in (report / variants.VARIANTS_MD).read_text()
    assert f"wrote {figure}" in captured.err


def test_data_scores_onnx_files_on_their_runs_validation_split(models, tmp_path, capsys,
                                                              monkeypatch):
    run, fp32, int8 = models
    monkeypatch.chdir(tmp_path)
    result = variants.compare_variants([str(run), str(fp32), str(int8)], threads=1,
                                       data="synthetic:300")
    val = prepare_splits(read_run(run).config.data).val
    for v, path in zip(result.variants[1:], (fp32, int8), strict=True):
        expected = runtime.evaluate_onnx(runtime.OnnxClassifier(path), val.images,
                                         val.labels).acc
        assert (v.val_acc, v.acc_from) == (pytest.approx(expected), "measured")
    assert result.variants[0].acc_from == "checkpoint"  # recorded, not measured again
    assert main(["compare", "--variants", str(run), str(fp32), "--threads", "1",
                 "--markdown"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "threads: 1 (every runtime)" in out
    # The figure goes beside the first variant (into its run folder), not the current folder.
    beside = run / variants.VARIANTS_PNG
    assert "| tiny | torch eager fp32 |" in out and f"wrote {beside}" in out
    assert beside.stat().st_size > 0 and not (tmp_path / variants.VARIANTS_PNG).exists()
    beside.unlink()  # the run folder is shared with other tests


@pytest.fixture(scope="module")
def other_classes(trained_run, tmp_path_factory):
    ckpt = checkpoint.load(trained_run / "best.pt")
    ckpt["classes"] = [f"other{i}" for i in range(len(ckpt["classes"]))]
    path = tmp_path_factory.mktemp("other") / "other.pt"
    torch.save(ckpt, path)
    return path


@pytest.mark.parametrize("case, message", [
    ("missing", "no such file or folder"),
    ("text file", "not a checkpoint (text file)"),
    ("one variant", "at least two variants"),
    ("other classes", "not comparable"),
    ("bad figure", "give a .png, .svg or .pdf file"),
    ("report is a file", "a file, not a folder"),
    ("json without --variants", "--json is for --variants only"),
    ("threads", "--threads 0: must be from 1 to 1024"),
])
def test_bad_input_is_one_line_before_measuring(models, other_classes, tmp_path, capsys,
                                                monkeypatch, case, message):
    run, fp32, _ = models
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    (inputs / "notes.txt").write_text("not a model\n")
    (inputs / "taken").write_text("a file\n")
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.chdir(out)

    def no_measuring(*args, **kwargs):
        raise AssertionError("measured before the input was checked")

    monkeypatch.setattr(bench, "measure", no_measuring)
    v = ["compare", "--variants"]
    argv = {
        "missing": [*v, str(run), str(inputs / "nothing.onnx")],
        "text file": [*v, str(run), str(inputs / "notes.txt")],
        "one variant": [*v, str(fp32)],
        "other classes": [*v, str(run), str(other_classes)],
        "bad figure": [*v, str(run), str(fp32), "-o", "figure.jpg"],
        "report is a file": [*v, str(run), str(fp32), "--report", str(inputs / "taken")],
        "json without --variants": ["compare", str(run), str(run), "--json"],
        "threads": [*v, str(run), str(fp32), "--threads", "0"],
    }[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifarlab: error: ") and message in err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert list(out.iterdir()) == []  # nothing written


def test_test_data_measures_every_variants_test_accuracy(models, tmp_path, capsys,
                                                         monkeypatch):
    run, fp32, int8 = models
    monkeypatch.chdir(tmp_path)
    result = variants.compare_variants([str(run), str(fp32), str(int8)], threads=1,
                                       test_data="synthetic:300")
    test = variants.test_set("synthetic:300", "data", bench.open_model(str(fp32), 1))
    assert result.test_images == len(test.labels) > 0
    for v, path in zip(result.variants[1:], (fp32, int8), strict=True):
        expected = runtime.evaluate_onnx(runtime.OnnxClassifier(path), test.images,
                                         test.labels).acc
        assert v.test_acc == pytest.approx(expected)
    # The run's own model, measured too, not its recorded test accuracy; its export agrees.
    assert abs(result.variants[0].test_acc - result.variants[1].test_acc) <= 100 / len(
        test.labels)
    assert any("measured here for every variant on synthetic:300" in line
               for line in variants.notes(result))
    assert variants.VariantsResult.from_json(result.to_json()) == result
    capsys.readouterr()
    assert main(["compare", str(run), str(run), "--test-data", "synthetic:300"]) == 2
    assert "--test-data is for --variants only" in capsys.readouterr().err
