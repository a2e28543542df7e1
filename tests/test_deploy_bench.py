"""cifarlab bench, and .onnx files in predict / evaluate with onnxruntime alone (no torch)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifarlab.cli import main
from cifarlab.data.sources import load_source
from cifarlab.deploy import bench, export
from cifarlab.predict import predict_files

SRC = Path(__file__).resolve().parents[1] / "src"
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def onnx_file(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export.export(trained_run, out, exporter="torchscript")
    return out


@pytest.fixture(scope="module")
def image_files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, pixels in enumerate(load_source("synthetic:300").test.images[:4]):
        paths.append(folder / f"{i}.png")
        Image.fromarray(pixels).save(paths[-1])
    big = np.kron(load_source("synthetic:300").test.images[5], np.ones((3, 2, 1), np.uint8))
    paths.append(folder / "big.jpg")  # 96x64: resized and cropped as for a checkpoint
    Image.fromarray(big).save(paths[-1], quality=95)
    return paths


def test_bench_json_has_every_field(trained_run, onnx_file, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "LATENCY_RUNS", 10)
    monkeypatch.setattr(bench, "THROUGHPUT_RUNS", 2)
    figure = tmp_path / "bench.png"
    code = main(["bench", str(trained_run), str(onnx_file), "--threads", "1", "--json",
                 "--data", "synthetic:300", "-o", str(figure)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    head = result["header"]
    assert head["threads"] == 1 and head["cpu"] and isinstance(head["flags"], list)
    assert head["torch"] and head["onnxruntime"] and len(head["load_average"]) == 3
    import torch

    assert torch.get_num_threads() == 1  # the same thread count for every runtime
    rows = result["rows"]
    assert [r["runtime"] for r in rows] == ["torch eager fp32", "onnxruntime fp32"]
    for r in rows:
        assert 0 < r["latency_ms"] <= r["latency_p90_ms"]
        assert r["throughput"] > 0 and r["file_mb"] > 0
        assert r["params"] == rows[0]["params"] > 0 and r["macs"] == rows[0]["macs"] > 0
        assert r["acc_split"] == "test" and r["acc_images"] == 100
        assert 0 <= r["acc"] <= 100
    assert abs(rows[0]["acc"] - rows[1]["acc"]) <= 1.0  # same model and images: one tie at most
    assert figure.stat().st_size > 0


def test_bench_table_names_the_cpu_and_threads(onnx_file, capsys, monkeypatch):
    monkeypatch.setattr(bench, "LATENCY_RUNS", 5)
    monkeypatch.setattr(bench, "THROUGHPUT_RUNS", 1)
    assert main(["bench", str(onnx_file), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("CPU: ") and "threads: 1 (every runtime)" in out
    assert "onnxruntime fp32" in out and "load average" in out


def run_without_torch(code: str, cwd: Path) -> subprocess.CompletedProcess:
    """`code` in a fresh interpreter that fails if anything imports torch."""
    guard = ("import sys\n"
             "class _NoTorch:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name == 'torch' or name.startswith('torch.'):\n"
             "            raise ImportError('torch imported on the onnxruntime-only path')\n"
             "sys.meta_path.insert(0, _NoTorch())\n")
    check = "\nassert not any(m == 'torch' or m.startswith('torch.') for m in sys.modules)\n"
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", guard + code + check], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_predict_and_evaluate_an_onnx_file_without_torch(trained_run, onnx_file, image_files,
                                                         tmp_path):
    code = (f"from cifarlab.cli import main\n"
            f"assert main(['predict', {str(onnx_file)!r}, "
            f"*{[str(p) for p in image_files]!r}, '--topk', '2', '--json']) == 0\n"
            f"assert main(['evaluate', {str(onnx_file)!r}, '--data', 'synthetic:300', "
            f"'--json']) == 0\n")
    done = run_without_torch(code, tmp_path)
    assert done.returncode == 0, done.stderr
    decoder = json.JSONDecoder()
    predictions, end = decoder.raw_decode(done.stdout)
    scores = json.loads(done.stdout[end:])
    # The same answers as the checkpoint gives in PyTorch.
    expected = predict_files(trained_run / "best.pt", image_files, topk=2)
    for got, want in zip(predictions, expected, strict=True):
        assert [p["class"] for p in got["predictions"]][0] == want.predictions[0][0]
        assert got["predictions"][0]["probability"] == pytest.approx(want.predictions[0][1],
                                                                     abs=1e-4)
    assert main(["evaluate", str(trained_run), "--data", "synthetic:300", "--json"]) == 0
    assert scores["images"] == 100


def test_the_readme_device_program_classifies_with_the_file_alone(onnx_file, image_files,
                                                                  tmp_path):
    text = README.read_text()
    program = re.search(r"<!-- device program -->\n```python\n(.*?)```", text, re.S).group(1)
    assert len(program.strip().splitlines()) <= 14
    (tmp_path / "classify.py").write_text(program)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("PYTHONPATH", None)  # the program needs no cifarlab either
    done = subprocess.run([sys.executable, "classify.py", str(onnx_file), str(image_files[0])],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    (expected,) = predict_files(onnx_file, image_files[:1], topk=1)
    assert done.stdout.split()[0] == expected.predictions[0][0]
