"""cifarlab export --format executorch: a .pte lowered to XNNPACK, checked with ExecuTorch's
Python runtime, timed by bench; bad .pte files refused in one line. Skipped where executorch
(the `executorch` extra) is not installed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cifarlab.cli import main
from cifarlab.data.sources import load_source
from cifarlab.deploy import executorch, export

pytest.importorskip("executorch.runtime")


@pytest.fixture(scope="module")
def pte(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("pte") / "m.pte"
    assert main(["export", str(trained_run), "--format", "executorch", "-o", str(out)]) == 0
    return out


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_the_pte_gives_pytorchs_logits_and_metadata_and_is_timed(trained_run, pte, capsys):
    """One test, one export: lowering takes a while on a small CPU."""
    assert sorted(p.name for p in pte.parent.iterdir()) == ["m.pte"]
    model = executorch.ExecuTorchClassifier(pte, threads=1)
    loaded = export.load(trained_run)
    assert model.metadata == loaded.metadata() and model.label == "executorch xnnpack fp32"
    images = load_source("synthetic:300").test.images[:7]  # any batch up to MAX_BATCH
    reference = export.torch_logits(loaded.module, images)
    got = model.logits(images)
    assert (got.argmax(1) == reference.argmax(1)).all()
    assert np.abs(got - reference).max() <= export.PARITY_ATOL + export.PARITY_RTOL * np.abs(
        reference).max()
    capsys.readouterr()
    assert main(["bench", str(pte), "--threads", "1", "--json"]) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["runtime"] == "executorch xnnpack fp32" and row["throughput"] > 0
    assert main(["evaluate", str(pte), "--data", "synthetic:300", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["runtime"] == "executorch xnnpack fp32"


def test_bad_pte_files_are_one_line_exit_2(trained_run, tmp_path, capsys):
    junk = tmp_path / "junk.pte"
    junk.write_bytes(b"not a program")
    assert main(["evaluate", str(junk), "--data", "synthetic:300"]) == 2
    assert "not a readable ExecuTorch program" in one_line(capsys.readouterr().err)
    import torch
    from executorch.exir import to_edge

    other = torch.export.export(torch.nn.Flatten().eval(), (torch.rand(1, 3, 32, 32),))
    (tmp_path / "other.pte").write_bytes(to_edge(other).to_executorch().buffer)
    assert main(["predict", str(tmp_path / "other.pte"), str(junk)]) == 2
    assert "without cifarlab's metadata" in one_line(capsys.readouterr().err)
    assert main(["evaluate", str(junk), "--data", "synthetic:300", "--runtime", "openvino"]) == 2
    assert "only executorch runs" in one_line(capsys.readouterr().err)
    assert main(["export", str(trained_run), "--format", "onnx", "--int8"]) == 2
    assert "--int8 is for --format executorch" in one_line(capsys.readouterr().err)
