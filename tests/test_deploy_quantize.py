"""cifarlab quantize: an int8 ONNX model calibrated on training images, written only when it
keeps its accuracy."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main
from cifarlab.deploy import export, quantize, runtime

FAST = ["--data", "synthetic:300", "--images", "32", "--threads", "1"]


@pytest.fixture(autouse=True)
def quick_exporter(monkeypatch):
    """The float32 graph from the torchscript exporter, the faster one (export's own tests
    cover both)."""
    monkeypatch.setattr(export, "EXPORTERS", ("torchscript",))


@pytest.fixture
def one_candidate(monkeypatch):
    """Only the first candidate format: the tests check the procedure, not the CPU."""
    every = quantize.candidates
    monkeypatch.setattr(quantize, "candidates", lambda cpu: every(cpu)[:1])


def test_writes_an_int8_model_calibrated_on_training_images(trained_run, tmp_path, capsys,
                                                           monkeypatch):
    calibrated = []
    real_reader = quantize.CalibrationImages

    def spy(images):
        calibrated.append(images)
        return real_reader(images)

    monkeypatch.setattr(quantize, "CalibrationImages", spy)
    out = tmp_path / "m.int8.onnx"
    code = main(["quantize", str(trained_run), *FAST, "--max-drop", "100", "-o", str(out),
                 "--test-data", "synthetic:300"])
    stdout = capsys.readouterr().out
    assert code == 0 and f"wrote {out}" in stdout
    assert "VNNI: " in stdout and "CPU: " in stdout
    for name in [c.name for c in quantize.candidates(runtime.cpu_info())]:
        assert name in stdout  # every candidate is reported
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.onnx"]
    assert runtime.is_int8(out)
    model = runtime.OnnxClassifier(out)
    info = model.meta("quantization")
    assert info["calibration"] == "minmax" and info["calibration_images"] == 32
    if info["activations"] == "uint8":  # 7-bit weights exactly where there is no VNNI
        assert info["reduce_range"] == (not runtime.cpu_info().vnni)
    assert model.classes == json.loads(model.metadata["classes"])
    # The calibration images are training images of the checkpoint's split, not validation.
    from cifarlab.data.splits import prepare_splits
    from cifarlab.runs import read_run

    splits = prepare_splits(read_run(trained_run).config.data)
    train = {im.tobytes() for im in splits.train.images}
    val = {im.tobytes() for im in splits.val.images}
    images = np.concatenate(calibrated)
    assert len({im.tobytes() for im in images}) == 32
    assert all(im.tobytes() in train and im.tobytes() not in val for im in images)
    assert model.logits(splits.val.images[:5]).shape == (5, 10)


def test_refuses_a_model_that_loses_accuracy(trained_run, tmp_path, capsys, monkeypatch,
                                             one_candidate):
    real_score = quantize.score
    fp32 = {}

    def worse(path, name, val, test, threads):  # as if every int8 model lost 5 points
        scored = real_score(path, name, val, test, threads)
        if name == "fp32":
            fp32["acc"] = scored.val_acc
        else:
            scored.val_acc = fp32["acc"] - 5.0
        return scored

    monkeypatch.setattr(quantize, "score", worse)
    out = tmp_path / "m.int8.onnx"
    code = main(["quantize", str(trained_run), *FAST, "--max-drop", "1", "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "no int8 model is within --max-drop 1" in err and "nothing written" in err
    assert list(tmp_path.iterdir()) == []


def test_auto_calibration_tries_percentile_only_when_minmax_loses_too_much(
        trained_run, tmp_path, capsys, monkeypatch, one_candidate):
    real_score = quantize.score
    scored_names, fp32 = [], {}

    def minmax_worse(path, name, val, test, threads):
        # As if minmax lost 5 points and the other methods nothing (the real drops of a
        # tiny model depend on the CPU's kernels).
        scored = real_score(path, name, val, test, threads)
        scored_names.append(name)
        if name == "fp32":
            fp32["acc"] = scored.val_acc
        else:
            scored.val_acc = fp32["acc"] - (5.0 if name.endswith(", minmax") else 0.0)
        return scored

    monkeypatch.setattr(quantize, "score", minmax_worse)
    out = tmp_path / "m.int8.onnx"
    assert main(["quantize", str(trained_run), *FAST, "--max-drop", "1", "-o", str(out)]) == 0
    assert runtime.OnnxClassifier(out).meta("quantization")["calibration"] == "percentile"
    assert [n.rsplit(", ", 1)[-1] for n in scored_names[1:]] == ["minmax", "percentile"]


def test_calibration_data_of_other_classes_is_refused(trained_run, tmp_path, capsys):
    folder = tmp_path / "other"
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (folder / name).mkdir(parents=True)
        for i in range(10):
            pixels = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(folder / name / f"{i}.png")
    out = tmp_path / "m.int8.onnx"
    code = main(["quantize", str(trained_run), "--data", str(folder), "--data-root",
                 str(tmp_path / "cache"), "-o", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "are not the checkpoint's" in err
    assert not out.exists()


@pytest.mark.parametrize("flags, message", [
    (["--images", "0"], "--images 0"),
    (["--max-drop", "-1"], "--max-drop -1"),
    (["--max-drop", "inf"], "--max-drop inf: must be a finite number"),
    (["-o", "no/such/folder/m.onnx"], "no folder"),
])
def test_bad_flags_are_one_line(trained_run, capsys, flags, message):
    code = main(["quantize", str(trained_run), "--data", "synthetic:300", *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_candidates_follow_the_cpu():
    without = quantize.candidates(runtime.CpuInfo("old", ["avx2"], 2))
    with_vnni = quantize.candidates(runtime.CpuInfo("new", ["avx2", "avx512_vnni"], 2))
    assert not runtime.CpuInfo("old", ["avx2"], 2).vnni
    # uint8 x int8 without VNNI: 7-bit weights (vpmaddubsw's 16-bit sums can saturate).
    assert [c.reduce_range for c in without if c.activations == "uint8"] == [True, True]
    assert all("reduce_range" in c.name for c in without if c.activations == "uint8")
    assert not any(c.reduce_range for c in with_vnni)
    # int8 x int8 (onnxruntime's default types) never needs it.
    assert [c.reduce_range for c in without if c.activations == "int8"] == [False]
    assert [c.key for c in with_vnni] == list(quantize.ONNX_FORMATS)
    assert list(quantize.INT8_FORMATS) == ["auto", *quantize.ONNX_FORMATS, "openvino-nncf"]


def test_a_cpu_without_vnni_gets_7_bit_weights_and_is_told(trained_run, tmp_path, capsys,
                                                           monkeypatch, one_candidate):
    monkeypatch.setattr(runtime, "cpu_info", lambda: runtime.CpuInfo("AVX2 only", ["avx2"], 2))
    out = tmp_path / "m.int8.onnx"
    assert main(["quantize", str(trained_run), *FAST, "--max-drop", "100", "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "CPU: AVX2 only" in stdout and "VNNI: no" in stdout and "reduce_range" in stdout
    info = runtime.OnnxClassifier(out).meta("quantization")
    assert info["activations"] == "uint8" and info["reduce_range"] is True
    import onnx
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer
               if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 4]
    assert weights and all(w.min() >= -64 and w.max() <= 64 for w in weights)  # 7 bits, symmetric
