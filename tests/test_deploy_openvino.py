"""OpenVINO beside onnxruntime: the IR export and its check, .onnx files and IRs run in
OpenVINO, the precision check, `--runtime auto` choosing the faster runtime, NNCF's int8 in
quantize, and bad files refused in one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main
from cifarlab.data.sources import load_source
from cifarlab.deploy import choice, export, openvino, runtime
from cifarlab.errors import UserError

pytest.importorskip("openvino")
pytest.importorskip("onnxruntime")

from test_deploy_bench import README, run_without_torch  # noqa: E402


@pytest.fixture(scope="module")
def files(trained_run, tmp_path_factory):
    """The tiny run as .onnx and as an OpenVINO IR, and 4 of its test images as PNG files."""
    folder = tmp_path_factory.mktemp("openvino")
    with pytest.MonkeyPatch.context() as patch:
        # Recorded as f32 on every CPU, so that what the tests read does not depend on
        # whether this CPU's OpenVINO default is bf16 (AVX512_BF16, AMX) and passes the check
        # on this barely trained model; the bf16 choice has tests of its own below.
        patch.setattr(openvino, "default_precision", lambda: "f32")
        export.export(trained_run, folder / "m.onnx", exporter="torchscript")
        ir = export.export(trained_run, folder / "m.xml", fmt="openvino",
                           exporter="torchscript")
    images = []
    for i, pixels in enumerate(load_source("synthetic:300").test.images[:4]):
        images.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(images[-1])
    return {"onnx": folder / "m.onnx", "xml": folder / "m.xml", "images": images, "ir": ir}


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_ir_has_the_onnx_metadata_and_pytorchs_top1(trained_run, files):
    xml = files["xml"]
    assert xml.with_suffix(".bin").is_file()
    assert sorted(p.name for p in xml.parent.iterdir() if p.name.startswith(".")) == []
    result = files["ir"]
    assert result.format == "openvino" and result.precision == "f32"
    model = openvino.OpenVinoClassifier(xml)
    onnx_model = runtime.OnnxClassifier(files["onnx"])
    assert model.metadata == onnx_model.metadata  # the same keys and values
    assert json.loads(model.metadata[openvino.PRECISION_KEY]) == result.precision
    assert model.label == "openvino fp32" and model.precision == "f32"
    images = load_source("synthetic:300").test.images[:20]
    module = export.load(trained_run).module
    reference = export.torch_logits(module, images)
    for got in (model.logits(images), openvino.OpenVinoClassifier(files["onnx"]).logits(images)):
        assert (got.argmax(1) == reference.argmax(1)).all()
        assert np.abs(got - reference).max() <= export.PARITY_ATOL + export.PARITY_RTOL * np.abs(
            reference).max()


def test_the_cpus_bf16_default_is_kept_only_when_it_passes(files, monkeypatch):
    monkeypatch.setattr(openvino, "default_precision", lambda: "bf16")
    seen = []

    def passes(model, precision):
        seen.append(precision)

    assert openvino.checked_precision(files["onnx"], passes) == ("bf16", [])

    def bf16_fails(model, precision):
        seen.append(precision)
        if precision == "bf16":
            raise export.ParityError("top-1 class differs from PyTorch's on 3 of 64 images")

    precision, notes = openvino.checked_precision(files["onnx"], bf16_fails)
    assert precision == "f32" and seen == ["bf16", "bf16", "f32"]
    assert "default bf16 failed the check" in notes[0] and "f32 is used" in notes[0]


def test_an_ir_whose_low_precision_default_fails_its_check_is_written_in_f32(
        trained_run, tmp_path, monkeypatch):
    # The ONNX graph passed in the CPU's bf16 default, the IR converted from it does not.
    monkeypatch.setattr(openvino, "checked_precision", lambda path, check: ("bf16", []))
    real, checks = export.check_parity, []

    def ir_fails_once(reference, got, what, *args, **kwargs):
        checks.append(what)
        if what.startswith("OpenVINO") and sum(c.startswith("OpenVINO") for c in checks) == 1:
            raise export.ParityError(f"{what}: top-1 class differs from PyTorch's on 1 of 64 "
                                     "images")
        return real(reference, got, what, *args, **kwargs)

    monkeypatch.setattr(export, "check_parity", ir_fails_once)
    result = export.export(trained_run, tmp_path / "m.xml", fmt="openvino",
                           exporter="torchscript")
    assert result.precision == "f32"
    assert any("default bf16 failed the check of the IR" in n for n in result.notes)
    model = openvino.OpenVinoClassifier(tmp_path / "m.xml")
    assert json.loads(model.metadata[openvino.PRECISION_KEY]) == "f32"
    assert model.precision == "f32"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.bin", "m.xml"]


def test_predict_and_evaluate_name_the_runtime(files, capsys):
    assert main(["predict", str(files["xml"]), str(files["images"][0]), "--json"]) == 0
    captured = capsys.readouterr()
    assert "runtime: openvino fp32 (the one installed)" in captured.err
    assert main(["evaluate", str(files["onnx"]), "--data", "synthetic:300", "--runtime",
                 "openvino", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["runtime"] == "openvino fp32"
    assert "runtime: openvino fp32 (as asked)" in captured.err


@pytest.mark.parametrize("faster", ["onnxruntime", "openvino"])
def test_auto_takes_the_faster_runtime(files, faster, monkeypatch, capsys):
    times = {"onnxruntime": 2e-3, "openvino": 1e-3} if faster == "openvino" else {
        "onnxruntime": 1e-3, "openvino": 3e-3}
    monkeypatch.setattr(choice, "quick_time", lambda model, metric: times[model.runtime_name])
    chosen = choice.choose(files["onnx"], "auto", "latency")
    assert chosen.runtime == faster == chosen.model.runtime_name
    assert chosen.how.startswith("fastest here, measured now") and "ms at batch 1" in chosen.how
    assert main(["predict", str(files["onnx"]), str(files["images"][0])]) == 0
    assert f"runtime: {faster} fp32 (fastest here" in capsys.readouterr().err


def test_auto_reads_a_bench_result_beside_the_file(files, tmp_path, monkeypatch):
    onnx_file = shutil.copy(files["onnx"], tmp_path / "m.onnx")
    rows = [{"model": "runs/x/m.onnx", "runtime": "onnxruntime fp32", "latency_ms": 0.5,
             "throughput": 900.0}, {"model": "m.onnx", "runtime": "openvino fp32",
                                    "latency_ms": 0.9, "throughput": 1500.0}]
    (tmp_path / "m.bench.json").write_text(json.dumps(
        {"header": {"cpu": runtime.cpu_info().model}, "rows": rows}))
    monkeypatch.setattr(choice, "quick_time", lambda *a: pytest.fail("measured again"))
    assert choice.choose(onnx_file, "auto", "latency").runtime == "onnxruntime"
    chosen = choice.choose(onnx_file, "auto", "throughput")
    assert chosen.runtime == "openvino" and "m.bench.json" in chosen.how


def test_bench_runs_an_onnx_file_in_every_installed_runtime(files, capsys):
    assert main(["bench", str(files["onnx"]), str(files["xml"]), "--runtime", "all",
                 "--threads", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["runtime"] for r in result["rows"]] == ["onnxruntime fp32", "openvino fp32",
                                                      "openvino fp32"]
    assert result["header"]["openvino"]
    assert result["rows"][2]["file_mb"] > result["rows"][2]["params"] * 4 / 1e6 * 0.9  # + .bin


def test_bad_ir_files_and_missing_runtimes_are_one_line_exit_2(trained_run, files, tmp_path,
                                                               capsys, monkeypatch):
    lone = tmp_path / "lone.xml"
    shutil.copy(files["xml"], lone)  # without its .bin
    image = str(files["images"][0])
    assert main(["predict", str(lone), image]) == 2
    err = one_line(capsys.readouterr().err)
    assert "lone.bin are not beside it" in err and "keep the .xml and its .bin together" in err
    (tmp_path / "junk.xml").write_text("<net></net>")
    (tmp_path / "junk.bin").write_bytes(b"")
    assert main(["evaluate", str(tmp_path / "junk.xml"), "--data", "synthetic:300"]) == 2
    assert "not a readable OpenVINO IR" in one_line(capsys.readouterr().err)
    # IRs of other models: one without cifarlab's metadata, one of 3 classes that claims 10
    for name, metadata, message in [
            ("f.xml", {}, "no class names in its metadata"),
            ("g.xml", {"classes": json.dumps([str(i) for i in range(10)])}, "not float (N, 10)")]:
        openvino.write_ir(foreign_model(), metadata, tmp_path / name, lambda tmp: None)
        assert main(["predict", str(tmp_path / name), image]) == 2
        assert message in one_line(capsys.readouterr().err)
    assert main(["predict", str(files["xml"]), image, "--runtime", "onnxruntime"]) == 2
    assert "only openvino runs" in one_line(capsys.readouterr().err)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if not installed
    assert main(["predict", str(files["onnx"]), image, "--runtime", "openvino"]) == 2
    assert "needs the openvino package; install it with: pip install openvino" in one_line(
        capsys.readouterr().err)
    assert main(["predict", str(files["onnx"]), image]) == 0  # auto: onnxruntime, installed
    assert "runtime: onnxruntime fp32 (the one installed)" in capsys.readouterr().err
    out = tmp_path / "o.xml"
    assert main(["export", str(trained_run), "-o", str(out), "--format", "openvino"]) == 2
    assert "export --format openvino needs the openvino package" in one_line(
        capsys.readouterr().err)
    assert not out.exists()


def foreign_model():
    """An ov.Model of 3 classes built with OpenVINO's own operations: mean over the pixels."""
    ov = openvino.import_openvino()
    ops = ov.opset13
    x = ops.parameter([-1, 3, 32, 32], np.float32, name="x")
    pooled = ops.reduce_mean(x, ops.constant(np.array([2, 3])), keep_dims=False)
    return ov.Model([ops.result(pooled)], [x], "foreign")


def test_export_openvino_refuses_a_name_that_is_not_xml(trained_run, tmp_path, capsys):
    assert main(["export", str(trained_run), "--format", "openvino", "-o",
                 str(tmp_path / "m.onnx")]) == 2
    assert "choose a name ending .xml" in one_line(capsys.readouterr().err)
    assert list(tmp_path.iterdir()) == []


def test_predict_and_evaluate_in_openvino_without_torch(files, tmp_path):
    code = (f"from cifarlab.cli import main\n"
            f"assert main(['predict', {str(files['xml'])!r}, {str(files['images'][0])!r}, "
            f"'--json']) == 0\n"
            f"assert main(['evaluate', {str(files['onnx'])!r}, '--data', 'synthetic:300', "
            f"'--runtime', 'openvino', '--json']) == 0\n")
    done = run_without_torch(code, tmp_path)
    assert done.returncode == 0, done.stderr
    assert "runtime: openvino fp32" in done.stderr


def test_the_readme_openvino_device_program_classifies_with_the_ir_alone(files, tmp_path):
    text = README.read_text()
    program = re.search(r"<!-- openvino device program -->\n```python\n(.*?)```", text,
                        re.S).group(1)
    assert len(program.strip().splitlines()) <= 14
    (tmp_path / "classify.py").write_text(program)
    done = subprocess.run([sys.executable, "classify.py", str(files["xml"]),
                           str(files["images"][0])], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin",
                                                       "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    model = openvino.OpenVinoClassifier(files["xml"])
    pixels = np.asarray(Image.open(files["images"][0]).convert("RGB"))[None]
    assert done.stdout.split()[0] == model.classes[int(model.logits(pixels).argmax())]


def test_quantize_keeps_nncfs_int8_ir_when_asked_for(trained_run, tmp_path, capsys, monkeypatch):
    pytest.importorskip("nncf")
    monkeypatch.setattr(export, "EXPORTERS", ("torchscript",))
    out = tmp_path / "m.int8.xml"
    assert main(["quantize", str(trained_run), "--data", "synthetic:300", "--images", "16",
                 "--threads", "1", "--max-drop", "100", "-o", str(out)]) == 0
    assert "OpenVINO NNCF int8" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.int8.bin", "m.int8.xml"]
    model = openvino.OpenVinoClassifier(out)
    assert model.int8 and model.label.startswith("openvino int8")
    info = model.meta("quantization")
    assert info["format"] == "OpenVINO IR" and info["calibration_images"] == 16
    assert model.logits(load_source("synthetic:300").test.images[:3]).shape == (3, 10)
    assert main(["quantize", str(trained_run), "--data", "synthetic:300", "-o",
                 str(tmp_path / "x.xml"), "--int8-format", "qdq-u8s8"]) == 2
    assert "choose a name ending .onnx" in one_line(capsys.readouterr().err)


def test_a_runtime_that_cannot_run_a_file_kind_is_refused():
    with pytest.raises(UserError, match="only executorch runs"):
        choice.open_in("m.pte", "openvino")


def test_compare_variants_runs_onnx_files_in_openvino(files, capsys):
    assert main(["compare", "--variants", str(files["onnx"]), str(files["xml"]), "--runtime",
                 "openvino", "--threads", "1", "--json"]) == 0
    variants = json.loads(capsys.readouterr().out)["variants"]
    assert [v["runtime"] for v in variants] == ["openvino fp32", "openvino fp32"]
    assert variants[1]["file_bytes"] > variants[0]["file_bytes"] * 0.5  # the .xml and its .bin


def test_auto_falls_back_when_one_runtime_cannot_read_the_file(files, monkeypatch):
    real = choice.open_in

    def no_openvino(path, name, threads=None):
        if name == "openvino":
            raise UserError(f"{path}: OpenVINO cannot read this ONNX model (QLinearConv)")
        return real(path, name, threads)

    monkeypatch.setattr(choice, "open_in", no_openvino)
    chosen = choice.choose(files["onnx"], "auto", "throughput")
    assert chosen.runtime == "onnxruntime" and "openvino cannot run it" in chosen.how
    monkeypatch.setattr(choice, "quick_time", lambda *a: pytest.fail("nothing to compare"))
    from cifarlab.deploy import bench

    rows = bench.open_models(files["onnx"], 1, "all")
    assert [m.runtime for m in rows] == ["onnxruntime fp32"]
