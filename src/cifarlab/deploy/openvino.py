"""Inference with OpenVINO: an exported `.onnx` file, or an OpenVINO IR (`.xml` with its
`.bin` beside it, from `cifarlab export --format openvino` or `cifarlab quantize`), with the
openvino package, NumPy and Pillow only: nothing here imports torch.

The metadata is the ONNX export's: in an `.onnx` file OpenVINO reads it from the file's
metadata_props (its rt_info "framework" section), in an IR it is the rt_info section
"cifarlab". The graph is checked as runtime.check_graph checks an ONNX graph.

Precision: OpenVINO's CPU plugin runs a float model in the CPU's default inference precision,
bfloat16 where the CPU has AMX or AVX-512 BF16, else float32. cifarlab export checks the model
against PyTorch in the precision it will run in: the default when its logits pass, else float32
(INFERENCE_PRECISION_HINT "f32"); the one that passed is recorded in the file's metadata
(PRECISION_KEY), and a file that records none (exported where openvino was not installed, or
not by cifarlab) runs in float32. The precision that ran is in `label` ("openvino fp32",
"openvino bf16", "openvino int8").
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.deploy import runtime
from cifarlab.errors import UserError, import_package

SECTION = "cifarlab"  # the IR's rt_info section of metadata
ONNX_SECTION = "framework"  # where OpenVINO puts an ONNX file's metadata_props
PRECISION_KEY = "openvino_precision"  # "f32", or the CPU default that passed ("bf16", "f16")
PRECISIONS = ("f32", "bf16", "f16")
INSTALL = "pip install openvino (or 'cifarlab[deploy]')"
FIX = "give a file written by cifarlab export or cifarlab quantize"


def import_openvino(needed_by: str = "--runtime openvino") -> Any:
    return import_package("openvino", "openvino", needed_by, INSTALL)


@functools.cache
def core() -> Any:
    return import_openvino().Core()


def default_precision() -> str:
    """The CPU plugin's default inference precision on this CPU: "bf16" (AMX), else "f32"."""
    return core().get_property("CPU", "INFERENCE_PRECISION_HINT").to_string()


# OpenVINO's operators that run a subgraph a data-dependent number of times.
CONTROL_FLOW = {"Loop", "TensorIterator", "If"}


def read_model(path: str | Path, name: str | None = None) -> Any:
    """An ov.Model from an `.onnx` file or an IR `.xml` (its `.bin` beside it); UserError
    naming the problem and the fix otherwise."""
    path = Path(path)
    name = name or str(path)
    if not path.is_file():
        raise UserError(f"{path}: " + ("not a regular file (a folder, a FIFO or a device); "
                        "give the model file itself" if path.exists() else "no such file"))
    if path.suffix == ".xml" and not path.with_suffix(".bin").is_file():
        raise UserError(f"{name}: its weights {path.with_suffix('.bin').name} are not beside "
                        "it; keep the .xml and its .bin together (cifarlab export --format "
                        "openvino writes both)")
    try:
        model = core().read_model(str(path))
    except Exception as e:  # openvino raises RuntimeError and its own types
        if path.suffix == ".xml":
            raise UserError(f"{name}: not a readable OpenVINO IR ({reason(e)}); {FIX}") from None
        raise UserError(f"{name}: OpenVINO cannot read this ONNX model ({reason(e)}); run it "
                        "with --runtime onnxruntime, or for OpenVINO's int8 quantize with -o "
                        "NAME.int8.xml") from None
    # As runtime.check_no_control_flow for onnxruntime: an endless Loop would never return.
    found = sorted({op.get_type_name() for op in model.get_ops()} & CONTROL_FLOW)
    if found:
        raise UserError(f"{name}: the graph holds control flow ({', '.join(found)}), which no "
                        f"cifarlab classifier has and which can run without end; {FIX}")
    return model


def recorded_precision(metadata: dict[str, str]) -> str:
    """The precision a file's metadata records as checked (PRECISION_KEY), else "f32"."""
    recorded = metadata.get(PRECISION_KEY, '"f32"')
    precision = json.loads(recorded) if recorded.startswith('"') else recorded
    return precision if precision in PRECISIONS else "f32"


def reason(error: BaseException) -> str:
    """What an OpenVINO error says, in one line: its summary of the operations it could not
    convert, else its first line that is not where it was raised."""
    text = str(error)
    lines = [line.strip(" -") for line in text.partition("Summary:")[2].splitlines()]
    if not any(lines):
        lines = [line for line in text.splitlines() if not line.startswith(
            ("Exception from", "Check '", "FrontEnd API failed"))]
    found = "; ".join(line for line in lines if line.strip())
    return found[:300] if found else runtime._first_line(error)


def metadata_of(model: Any) -> dict[str, str]:
    """The file's metadata as strings: the IR's "cifarlab" rt_info, else an ONNX file's."""
    info = model.get_rt_info()
    keys = list(info.keys())
    section = SECTION if SECTION in keys else ONNX_SECTION if ONNX_SECTION in keys else None
    if section is None:
        return {}
    values = info[section]
    if not isinstance(values, dict):
        return {}
    return {str(k): v.astype(str) if hasattr(v, "astype") else str(v)
            for k, v in values.items()}


def check_model(name: str, model: Any, classes: int) -> None:
    """One float32 (N, 3, 32, 32) input and a float32 (N, classes) output; UserError naming
    what differs, as runtime.check_graph does for onnxruntime."""
    ov = import_openvino()
    inputs, outputs = model.inputs, model.outputs
    if len(inputs) != 1:
        raise UserError(f"{name}: the graph has {len(inputs)} inputs, not 1 image batch; {FIX}")
    shape = inputs[0].get_partial_shape()
    dims = [d.get_length() if d.is_static else None for d in shape] if shape.rank.is_static \
        else []
    if inputs[0].get_element_type() != ov.Type.f32 or len(dims) != 4 or dims[1:] != [3, 32, 32]:
        kind = inputs[0].get_element_type().to_string()
        raise UserError(f"{name}: the graph's input is {kind} {shape}, not float (N, 3, 32, "
                        f"32); {FIX}")
    out = outputs[0].get_partial_shape()
    width = (out[1].get_length() if out.rank.is_static and len(out) == 2 and out[1].is_static
             else None)
    if outputs[0].get_element_type() != ov.Type.f32 or not out.rank.is_static or len(out) != 2 \
            or width not in (None, classes):
        kind = outputs[0].get_element_type().to_string()
        raise UserError(f"{name}: the graph's output is {kind} {out}, not float (N, {classes}) "
                        f"for its {classes} class names; {FIX}")


def compile_model(model: Any, threads: int | None, precision: str | None) -> Any:
    """Compiled for the CPU: one stream of `threads` threads (as onnxruntime's session),
    `precision` the inference precision hint (None: the CPU's default)."""
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads is not None:
        config["INFERENCE_NUM_THREADS"] = threads
    if precision is not None:
        config["INFERENCE_PRECISION_HINT"] = precision
    return core().compile_model(model, "CPU", config)


class OpenVinoClassifier:
    """An exported classifier in OpenVINO: `logits(images)` for uint8 NHWC RGB images, the
    same interface as runtime.OnnxClassifier."""

    runtime_name = "openvino"

    def __init__(self, path: str | Path, threads: int | None = None,
                 precision: str | None = None, name: str | None = None) -> None:
        """`precision`: "f32", "bf16", "f16", "default" (the CPU's), or None: what the file
        records as checked, else "f32"."""
        self.name = name or str(path)
        self.path = Path(path)
        model = read_model(path, self.name)
        self.metadata = metadata_of(model)
        self.values = runtime.check_metadata(self.name, self.metadata)
        self.classes: list[str] = self.values["classes"]
        check_model(self.name, model, len(self.classes))
        if precision is None:
            precision = recorded_precision(self.metadata)
        try:
            self.compiled = compile_model(model, threads,
                                          None if precision == "default" else precision)
        except Exception as e:  # openvino raises RuntimeError and its own types
            raise UserError(f"{self.name}: OpenVINO could not compile it ({reason(e)}); "
                            f"{FIX}") from None
        self.request = self.compiled.create_infer_request()
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
        self.int8 = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops()) or \
            self.values.get("quantization") is not None

    @property
    def label(self) -> str:
        """The runtime and the precision that runs, e.g. "openvino fp32"."""
        if self.int8:
            return "openvino int8" + ("" if self.precision == "f32" else f"+{self.precision}")
        return "openvino " + {"f32": "fp32"}.get(self.precision, self.precision)

    def meta(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch in [0, 1], checked as OnnxClassifier.run checks."""
        try:
            out = self.request.infer([x])[0]
        except Exception as e:  # openvino raises RuntimeError and its own types
            raise UserError(f"{self.name}: OpenVINO could not run it ({reason(e)}); {FIX}"
                            ) from None
        return runtime.check_output(self.name, np.asarray(out, np.float32), len(x),
                                    len(self.classes))

    def logits(self, images: np.ndarray, batch: int = runtime.BATCH) -> np.ndarray:
        return runtime.batched_logits(self.run, images, len(self.classes), batch)


def checked_precision(path: Path, check: Callable[[OpenVinoClassifier, str], None]
                      ) -> tuple[str, list[str]]:
    """The precision `path` runs in here: the CPU's default when `check(model, precision)`
    passes, else "f32"; and notes on a default that failed. `check` raises (a ParityError)
    when a model is off; a failure in f32 is raised."""
    notes: list[str] = []
    default = default_precision()
    if default != "f32":
        try:
            check(OpenVinoClassifier(path, threads=1, precision="default"), default)
            return default, notes
        except UserError as e:
            notes.append(f"OpenVINO's default {default} failed the check ({e}); f32 is used")
    check(OpenVinoClassifier(path, threads=1, precision="f32"), "f32")
    return "f32", notes


def write_ir(model: Any, metadata: dict[str, str], out: Path,
             check: Callable[[Path], None]) -> None:
    """`model` (an ov.Model) as `out` (.xml) and its .bin, with `metadata` in its rt_info:
    written under temporary names beside `out`, `check(temporary .xml)`, then renamed, the
    .bin first. On any error both temporary files are removed; `out` is left as it was."""
    import os
    import uuid

    ov = import_openvino()
    for key, value in metadata.items():
        model.set_rt_info(value, [SECTION, key])
    tmp = out.parent / f".{out.stem}.{uuid.uuid4().hex[:12]}.xml"
    tmp_bin = tmp.with_suffix(".bin")
    try:
        ov.save_model(model, str(tmp), compress_to_fp16=False)
        check(tmp)
        os.replace(tmp_bin, out.with_suffix(".bin"))
        os.replace(tmp, out)
    except OSError as e:
        raise UserError(f"could not write {out} ({e.strerror or e}); choose another -o") from None
    finally:
        tmp.unlink(missing_ok=True)
        tmp_bin.unlink(missing_ok=True)
