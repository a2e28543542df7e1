"""Inference with an exported `.onnx` file: onnxruntime, NumPy and Pillow only.

Nothing here imports torch, so `cifarlab predict` and `cifarlab evaluate` on an `.onnx`
file run where only onnxruntime is installed (a device). The file carries what inference
needs in its metadata (`export.py` writes it): class names, the input layout, and the
normalisation, which is baked into the graph; its input is RGB float in [0, 1], NCHW.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.errors import UserError

BATCH = 256  # images per onnxruntime call when scoring a data set
# The ISA flags that decide int8 speed on x86 (VNNI: 8-bit dot products in one instruction).
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni", "amx_int8")
INT8_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul",
            "ConvInteger", "MatMulInteger"}


@dataclass
class CpuInfo:
    model: str
    flags: list[str]  # the ISA_FLAGS this CPU has
    cores: int  # logical CPUs this process may use

    @property
    def vnni(self) -> bool:
        return "avx512_vnni" in self.flags or "avx_vnni" in self.flags

    def describe(self) -> str:
        flags = ", ".join(self.flags) or "none of " + ", ".join(ISA_FLAGS)
        return f"{self.model} ({self.cores} logical CPUs; {flags})"


def cpu_info() -> CpuInfo:
    """The CPU's model name and int8-relevant flags, from /proc/cpuinfo (Linux)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            model = value.strip()
        elif key.strip() == "flags":
            flags = set(value.split())
            break  # every core reports the same
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return CpuInfo(model, [f for f in ISA_FLAGS if f in flags], cores or 1)


def session_options(threads: int | None) -> Any:
    """onnxruntime options with `threads` intra-op threads (None: onnxruntime's default),
    operators run one after another (the graph of a CNN is a chain)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return options


class OnnxClassifier:
    """An exported classifier: `logits(images)` for uint8 NHWC RGB images."""

    runtime_name = "onnxruntime"

    def __init__(self, model: str | Path | bytes, threads: int | None = None,
                 name: str | None = None) -> None:
        import onnxruntime as ort

        self.name = name or (str(model) if not isinstance(model, bytes) else "model")
        if not isinstance(model, bytes):
            path = Path(model)
            if not path.is_file():
                raise UserError(f"{path}: " + ("not a regular file (a folder, a FIFO or a "
                                "device); give the .onnx file itself" if path.exists()
                                else "no such file"))
            model = str(path)
        try:
            self.session = ort.InferenceSession(model, session_options(threads),
                                                providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"{self.name}: not a readable ONNX model ({_first_line(e)}); give a "
                            "file written by cifarlab export or cifarlab quantize") from None
        check_no_control_flow(self.name, model)
        self.metadata: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        self.values = check_metadata(self.name, self.metadata)
        self.classes: list[str] = self.values["classes"]
        self.input_name = check_graph(self.name, self.session, len(self.classes))

    def meta(self, key: str, default: Any = None) -> Any:
        """A metadata value, JSON-decoded and of its type (check_metadata)."""
        return self.values.get(key, default)

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits for a float32 NCHW batch in [0, 1]; UserError when the graph fails or gives
        something other than one finite score per class and image."""
        try:
            out = self.session.run(None, {self.input_name: x})[0]
        except Exception as e:  # onnxruntime raises its own exception types
            raise UserError(f"{self.name}: onnxruntime could not run it ({_first_line(e)}); "
                            "give a file written by cifarlab export or cifarlab quantize"
                            ) from None
        return check_output(self.name, out, len(x), len(self.classes))

    def logits(self, images: np.ndarray, batch: int = BATCH) -> np.ndarray:
        """Logits for uint8 (N, 32, 32, 3) RGB images, `batch` images per call."""
        return batched_logits(self.run, images, len(self.classes), batch)


def check_output(name: str, out: Any, images: int, classes: int) -> np.ndarray:
    """`out` when it is one finite score per class and image; UserError otherwise."""
    if not isinstance(out, np.ndarray) or out.shape != (images, classes):
        shape = getattr(out, "shape", type(out).__name__)
        raise UserError(f"{name}: gave outputs of shape {shape} for {images} images and "
                        f"{classes} classes; give a classifier written by cifarlab export")
    if not np.isfinite(out).all():
        raise UserError(f"{name}: gave NaN or infinite scores; the file is damaged or not a "
                        "trained classifier")
    return out


def batched_logits(run: Any, images: np.ndarray, classes: int, batch: int = BATCH
                   ) -> np.ndarray:
    """`run` (float32 NCHW in, logits out) on uint8 NHWC images, `batch` images per call."""
    out = [run(to_input(images[i : i + batch])) for i in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, classes), np.float32)


# The metadata cifarlab reads from a file, each key's JSON type; others are left alone.
METADATA_TYPES: dict[str, tuple[type, ...]] = {
    "classes": (list,), "mean": (list,), "std": (list,), "architecture": (dict,),
    "split": (dict,), "quantization": (dict,), "tta_flip": (bool,), "tta_translate": (bool,),
    "source_val_acc": (int, float, type(None)),
}


def check_metadata(name: str, metadata: dict[str, str]) -> dict[str, Any]:
    """The metadata's values, JSON-decoded, all checked before any is used: each of
    METADATA_TYPES of its type, the class names a list of at least 2 texts, mean and std
    3 finite numbers each. UserError naming the file and the key otherwise."""
    def refuse(key: str, what: str) -> UserError:
        return UserError(f"{name}: its metadata '{key}' is {what}; give a file written by "
                         "cifarlab export or cifarlab quantize")

    if "classes" not in metadata:
        raise UserError(f"{name}: no class names in its metadata; give a file written "
                        "by cifarlab export or cifarlab quantize")
    values: dict[str, Any] = {}
    for key, types in METADATA_TYPES.items():
        if key not in metadata:
            continue
        try:
            value = json.loads(metadata[key])
        except (ValueError, RecursionError):
            raise refuse(key, "not JSON") from None
        if not isinstance(value, types) or (bool not in types and isinstance(value, bool)):
            raise refuse(key, f"a {type(value).__name__}, not a {types[0].__name__}")
        values[key] = value
    classes = values["classes"]
    if len(classes) < 2 or not all(isinstance(c, str) and c for c in classes):
        raise refuse("classes", "not a list of at least 2 class names")
    for key in ("mean", "std"):
        if key in values and (len(values[key]) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and np.isfinite(v)
                for v in values[key])):
            raise refuse(key, "not 3 finite numbers (one per channel)")
    return values


def check_graph(name: str, session: Any, classes: int) -> str:
    """The name of the graph's one input, checked to be float32 (N, 3, 32, 32) NCHW, and
    its first output float32 (N, classes); UserError naming what differs."""
    inputs, outputs = session.get_inputs(), session.get_outputs()
    fix = "give a classifier written by cifarlab export or cifarlab quantize"
    if len(inputs) != 1:
        raise UserError(f"{name}: the graph has {len(inputs)} inputs, not 1 image batch; {fix}")
    graph_in, graph_out = inputs[0], outputs[0]
    if graph_in.type != "tensor(float)" or len(graph_in.shape) != 4 or list(
            graph_in.shape[1:]) != [3, 32, 32]:
        raise UserError(f"{name}: the graph's input is {graph_in.type} {graph_in.shape}, not "
                        f"float (N, 3, 32, 32); {fix}")
    dims = graph_out.shape
    if graph_out.type != "tensor(float)" or len(dims) != 2 or (
            isinstance(dims[1], int) and dims[1] != classes):
        raise UserError(f"{name}: the graph's output is {graph_out.type} {dims}, not float "
                        f"(N, {classes}) for its {classes} class names; {fix}")
    return graph_in.name


# Operators that run a subgraph a data-dependent number of times: a Loop without a trip
# count runs for ever. No classifier cifarlab writes has any (its graphs are chains).
CONTROL_FLOW = {"Loop", "Scan", "If", "SequenceMap"}


def check_no_control_flow(name: str, model: str | bytes) -> None:
    """UserError when the graph (or a function it calls) holds a CONTROL_FLOW operator,
    before anything is run. Read with the onnx package; on a device with onnxruntime alone
    it is not installed, and the check is left out there."""
    try:
        import onnx
    except ImportError:
        return
    try:
        proto = (onnx.load_from_string(model) if isinstance(model, bytes)
                 else onnx.load(model, load_external_data=False))
    except Exception:  # onnxruntime read it; what onnx cannot parse has no such node
        return
    ops = {n.op_type for n in proto.graph.node}
    ops |= {n.op_type for f in proto.functions for n in f.node}
    found = sorted(ops & CONTROL_FLOW)
    if found:
        raise UserError(f"{name}: the graph holds control flow ({', '.join(found)}), which no "
                        "cifarlab classifier has and which can run without end; give a file "
                        "written by cifarlab export or cifarlab quantize")


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__


def to_input(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC RGB -> the graph's input: float32 NCHW in [0, 1]."""
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32) / 255


def is_int8(path: str | Path) -> bool:
    """Whether an ONNX file holds quantized (int8) operators."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return any(node.op_type in INT8_OPS for node in graph.node)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(1, keepdims=True)


@dataclass
class OnnxEvaluation:
    acc: float  # percent
    loss: float  # mean cross-entropy
    per_class_acc: list[float]  # percent; NaN for a class without images


def evaluate_onnx(model: OnnxClassifier, images: np.ndarray, labels: np.ndarray
                  ) -> OnnxEvaluation:
    """Accuracy, cross-entropy and per-class accuracy of `model` on uint8 NHWC images."""
    logits = model.logits(images).astype(np.float64)
    z = logits - logits.max(1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(1, keepdims=True))
    n = max(1, len(labels))
    correct = logits.argmax(1) == labels
    per_class = []
    for c in range(len(model.classes)):
        members = labels == c
        per_class.append(100.0 * float(correct[members].mean()) if members.any() else np.nan)
    loss = -float(log_probs[np.arange(len(labels)), labels].sum()) / n
    return OnnxEvaluation(100.0 * float(correct.sum()) / n, loss, per_class)


def predict_onnx(model: OnnxClassifier, pixels: np.ndarray, topk: int
                 ) -> list[list[tuple[str, float]]]:
    """The `topk` most probable (class, probability) of each uint8 NHWC image."""
    probs = softmax(model.logits(pixels).astype(np.float64))
    k = min(topk, len(model.classes))
    order = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return [[(model.classes[i], float(row[i])) for i in idx]
            for row, idx in zip(probs, order, strict=True)]

