"""OpenVINO's int8 for `cifarlab quantize`: NNCF's post-training quantization of the float32
model, a candidate beside onnxruntime's formats.

`nncf.quantize` runs on the OpenVINO model read from the checked float32 ONNX file, calibrated
on the same training images as onnxruntime's candidates (one image per item of the
nncf.Dataset, as NNCF's statistics expect), with NNCF's default (performance) preset:
symmetric int8 weights per channel and activations per tensor. The result is an OpenVINO IR
whose FakeQuantize operations the CPU plugin runs with int8 kernels. It is scored and timed in
OpenVINO, in the CPU's default inference precision for its float parts (the precision the file
then records, so it runs as it was scored), and kept when it is the fastest candidate within
--max-drop.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.deploy import export, openvino, runtime
from cifarlab.errors import UserError, import_package

KEY = "openvino-nncf"  # what --int8-format names it
NAME = "OpenVINO NNCF int8"


def available() -> bool:
    """Whether openvino and nncf are installed (auto tries the candidate only then)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("openvino", "nncf"))


def require() -> tuple[Any, Any]:
    """The openvino and nncf packages; UserError naming the missing one and its install."""
    needed_by = "cifarlab quantize --int8-format openvino-nncf"
    return (openvino.import_openvino(needed_by),
            import_package("nncf", "nncf", needed_by, "pip install nncf (or 'cifarlab[deploy]')"))


def quantize_ir(fp32_onnx: Path, calibration: np.ndarray, out: Path) -> Any:
    """The int8 ov.Model, also saved as `out` (.xml + .bin) to be scored."""
    ov, nncf = require()
    model = openvino.read_model(fp32_onnx)
    items = [runtime.to_input(calibration[i : i + 1]) for i in range(len(calibration))]
    with export.quiet():
        quantized = nncf.quantize(model, nncf.Dataset(items), subset_size=len(items))
    ov.save_model(quantized, str(out), compress_to_fp16=False)
    return quantized


def score_precision() -> str:
    """The precision NNCF's model is scored and then run in: the CPU's default."""
    return openvino.default_precision()


def write(model: Any, metadata: dict[str, str], scored: Path, target: Path,
          images: np.ndarray) -> None:
    """The scored IR with the export metadata, checked to give the scored file's logits."""
    precision = json.loads(metadata[openvino.PRECISION_KEY])
    expected = openvino.OpenVinoClassifier(scored, threads=1, precision=precision
                                           ).logits(images)

    def check(tmp: Path) -> None:
        got = openvino.OpenVinoClassifier(tmp, threads=1, name=str(target)).logits(images)
        if not np.allclose(got, expected, rtol=0, atol=1e-5):
            raise export.ParityError(f"{target}: the written model's logits differ from the "
                                     "scored one's")

    openvino.write_ir(model, metadata, target, check)


def check_target(target: Path) -> None:
    if target.suffix != ".xml":
        raise UserError(f"-o {target}: NNCF's int8 model is an OpenVINO IR; choose a name "
                        "ending .xml")
