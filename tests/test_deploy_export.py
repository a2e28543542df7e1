"""cifarlab export: ONNX, pt2 and safetensors files that match PyTorch, checked before they
are written, and nothing left behind when a check or the exporter fails."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.data.sources import load_source
from cifarlab.deploy import export


@pytest.fixture(scope="module")
def best(trained_run):
    return trained_run / "best.pt"


@pytest.fixture(scope="module")
def eager(best):
    """The checkpoint's model with its normalisation, in PyTorch: [0, 1] NCHW in."""
    return export.load(best).module


@pytest.fixture(scope="module")
def images():
    return load_source("synthetic:300").test.images[:5]


def reference(module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        return module(x).numpy()


def run_cli(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_onnx_round_trip_metadata_dynamic_batch_and_top1(best, eager, images, tmp_path,
                                                         capsys):
    out = tmp_path / "model.onnx"
    code, stdout, _ = run_cli(["export", best, "-o", out, "--data", "synthetic:300"], capsys)
    assert code == 0 and f"wrote {out}" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]  # no temporary left
    proto = onnx.load(str(out))
    assert {o.domain: o.version for o in proto.opset_import}[""] >= export.OPSET >= 18
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    # onnxruntime alone reads everything a device needs.
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    meta = session.get_modelmeta().custom_metadata_map
    ckpt = checkpoint.load(best)
    assert json.loads(meta["classes"]) == ckpt["classes"]
    assert json.loads(meta["mean"]) == pytest.approx(list(ckpt["mean"]))
    assert json.loads(meta["std"]) == pytest.approx(list(ckpt["std"]))
    assert json.loads(meta["architecture"]) == ckpt["model_args"]
    assert json.loads(meta["input_layout"]) == "NCHW"
    assert json.loads(meta["source_checkpoint"]) == str(best)
    assert "cifarlab_version" in meta and json.loads(meta["exporter"]) in export.EXPORTERS
    (graph_input,) = session.get_inputs()
    assert graph_input.shape[1:] == [3, 32, 32] and isinstance(graph_input.shape[0], str)
    expected = reference(eager, images)
    for n in (1, 5):  # dynamic batch
        x = images[:n].transpose(0, 3, 1, 2).astype(np.float32) / 255
        (got,) = session.run(None, {graph_input.name: x})
        assert got.shape == (n, len(ckpt["classes"]))
        np.testing.assert_allclose(got, expected[:n], rtol=1e-3, atol=1e-4)
        assert (got.argmax(1) == expected[:n].argmax(1)).all()


def test_torchscript_exporter_is_offered(best, eager, images, tmp_path, capsys):
    out = tmp_path / "ts.onnx"
    code, stdout, _ = run_cli(["export", best, "-o", out, "--exporter", "torchscript"], capsys)
    assert code == 0 and "torchscript exporter" in stdout
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert json.loads(session.get_modelmeta().custom_metadata_map["exporter"]) == "torchscript"
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / 255
    np.testing.assert_allclose(session.run(None, {"image": x})[0], reference(eager, images),
                               rtol=1e-3, atol=1e-4)


def test_a_failed_parity_check_leaves_no_file(best, tmp_path, capsys, monkeypatch):
    checked = []

    def broken(path, images):  # as if the exported graph were wrong
        checked.append(path)
        logits = export.runtime.OnnxClassifier(path).run(export.runtime.to_input(images))
        logits[:, 0] += 10.0
        return logits

    monkeypatch.setattr(export, "onnx_logits", broken)
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", best, "-o", out], capsys)
    assert code == 2 and stdout == ""
    assert len(err.strip().splitlines()) == 1 and "differ from PyTorch's" in err
    assert "dynamo" in err and "torchscript" in err  # both exporters were tried
    # The check ran on a file that existed (in the output folder), and nothing is left.
    assert len(checked) == 2 and all(p.parent == tmp_path for p in checked)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_a_signal_during_export_leaves_no_file(best, tmp_path, capsys, monkeypatch, signum):
    """A job scheduler's SIGTERM (or a closed terminal's SIGHUP) while the file is being
    checked: the temporary file is removed, nothing else is written, 128 + the signal."""
    checked = []

    def interrupted(path, images):
        checked.append(path)
        assert path.exists()  # the temporary file, written and about to be checked
        os.kill(os.getpid(), signum)
        time.sleep(5)  # the handler raises here
        raise AssertionError("the signal was not handled")

    monkeypatch.setattr(export, "onnx_logits", interrupted)
    # As in a fresh process: the default action (which would kill it, files left behind).
    saved = {sig: signal.signal(sig, signal.SIG_DFL) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        code, stdout, err = run_cli(["export", best, "-o", tmp_path / "model.onnx"], capsys)
        assert signal.getsignal(signum) == signal.SIG_DFL  # as main found it
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    assert code == 128 + signum and stdout == ""
    assert err.strip() == (f"cifarlab: stopped by {signal.Signals(signum).name}; no file was "
                           "left half-written")
    assert len(checked) == 1 and list(tmp_path.iterdir()) == []


def test_a_wrong_dynamo_graph_falls_back_to_torchscript(best, tmp_path, capsys, monkeypatch):
    real = export.onnx_proto

    def wrong_dynamo(module, exporter):  # a graph that runs but computes something else
        proto = real(module, exporter)
        if exporter == "dynamo":
            bias = max(proto.graph.initializer, key=lambda t: "bias" in t.name and t.dims == [10])
            values = onnx.numpy_helper.to_array(bias) + 5.0 * np.arange(10)
            bias.CopyFrom(onnx.numpy_helper.from_array(values.astype(np.float32), bias.name))
        return proto

    monkeypatch.setattr(export, "onnx_proto", wrong_dynamo)
    out = tmp_path / "model.onnx"
    code, stdout, err = run_cli(["export", best, "-o", out], capsys)
    assert code == 0 and "(torchscript exporter)" in stdout
    assert "note: dynamo export: logits differ from PyTorch's" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_a_model_the_exporters_cannot_handle_is_one_line(best, tmp_path, capsys, monkeypatch):
    def cannot(module, exporter):
        raise RuntimeError(f"unsupported operator aten::weird ({exporter})\nlong trace")

    monkeypatch.setattr(export, "onnx_proto", cannot)
    code, _, err = run_cli(["export", best, "-o", tmp_path / "m.onnx"], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "cannot export" in err and "aten::weird" in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("target", ["missing-folder/m.onnx", "."])
def test_an_output_path_that_cannot_be_written_is_refused(best, tmp_path, capsys, target,
                                                          monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = run_cli(["export", best, "-o", target], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and err.startswith("cifarlab: error")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("command", ["export", "quantize"])
def test_an_output_never_replaces_the_runs_own_files_or_a_file_of_another_kind(
        trained_run, best, tmp_path, capsys, command):
    # export -o RUN/best.pt would have replaced the trained model with an ONNX file.
    before = {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()}
    extra = ["--data", "synthetic:300"] if command == "quantize" else []
    for name in ("best.pt", "config.yaml", "metrics.csv"):
        code, _, err = run_cli([command, best, *extra, "-o", trained_run / name], capsys)
        assert code == 2 and f"that is the run's own {name}, which this would replace" in err
    other = tmp_path / "notes.txt"
    other.write_text("mine\n")
    code, _, err = run_cli([command, best, *extra, "-o", other], capsys)
    assert code == 2 and "exists and is not a .onnx file" in err and err.count("\n") == 1
    assert other.read_text() == "mine\n"
    assert {p.name: p.read_bytes() for p in trained_run.iterdir() if p.is_file()} == before


def test_pt2_and_safetensors_load_back(best, eager, images, tmp_path, capsys):
    expected = reference(eager, images)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    pt2 = tmp_path / "m.pt2"
    assert run_cli(["export", best, "--format", "pt2", "-o", pt2], capsys)[0] == 0
    extra = {"cifarlab.json": ""}
    program = torch.export.load(pt2, extra_files=extra)
    with torch.no_grad():
        for n in (1, 5):
            np.testing.assert_allclose(program.module()(x[:n]).numpy(), expected[:n],
                                       rtol=1e-5, atol=1e-5)
    assert json.loads(json.loads(extra["cifarlab.json"])["classes"]) == \
        checkpoint.load(best)["classes"]

    st = tmp_path / "m.safetensors"
    assert run_cli(["export", best, "--format", "safetensors", "-o", st], capsys)[0] == 0
    from safetensors import safe_open

    with safe_open(str(st), framework="pt") as f:
        meta = f.metadata()
    assert json.loads(meta["architecture"]) == checkpoint.load(best)["model_args"]
    np.testing.assert_array_equal(reference(export.load_safetensors(st), images), expected)
