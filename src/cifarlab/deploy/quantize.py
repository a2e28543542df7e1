"""int8 post-training static quantization with ONNX Runtime.

The checkpoint is exported to ONNX (checked as `export` checks it), prepared with
onnxruntime's `quant_pre_process` (shape inference, graph optimisation), calibrated on
images of the TRAINING split of the checkpoint's own seeded split (never validation or test
images), and quantized to QDQ or QOperator models with per-channel int8 weights.

Which int8 format is fastest depends on the CPU: with VNNI (avx512_vnni, avx_vnni) uint8 x
int8 dot products take one instruction; without it onnxruntime's u8s8 kernels use
`vpmaddubsw`, whose 16-bit sums can saturate, so weights are quantized to 7 bits
(`reduce_range`), and its s8s8 path is slower than float32 there. So every candidate is
calibrated, scored on the validation split and timed, and the fastest one whose accuracy is
within `max_drop` points of float32's is written. The calibration method is chosen the same
way ("auto"): minmax first; only when no format is within `max_drop` with it, percentile, then
entropy (slower to calibrate, and less hurt by outliers). None within it: nothing is written.

Where openvino and nncf are installed, NNCF's int8 OpenVINO model (nncf_quantize) is one more
candidate, calibrated on the same images, scored and timed in OpenVINO; when it wins, the
output is an OpenVINO IR (.int8.xml + .bin) instead of an .int8.onnx file. `-o` ending .xml
tries only it, ending .onnx only onnxruntime's formats.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab import config as cfg
from cifarlab.data.sources.images import ImageSet
from cifarlab.deploy import bench, export, nncf_quantize, openvino, runtime
from cifarlab.errors import UserError

log = logging.getLogger("cifarlab")

CALIBRATIONS = ("auto", "minmax", "percentile", "entropy")  # auto: the others in turn
CALIBRATION_METHODS = {"minmax": "MinMax", "percentile": "Percentile", "entropy": "Entropy"}
CALIBRATION_SEED = 0
CALIBRATION_BATCH = 32


@dataclass(frozen=True)
class Candidate:
    key: str  # what --int8-format names it
    name: str  # e.g. "QDQ U8S8 reduce_range"
    quant_format: str  # "QDQ" or "QOperator"
    activations: str  # "uint8" or "int8"
    reduce_range: bool  # 7-bit weights


def candidates(cpu: runtime.CpuInfo) -> list[Candidate]:
    """The int8 formats worth trying on this CPU (weights always int8, per channel)."""
    reduce = not cpu.vnni  # u8s8 without VNNI: 7-bit weights keep vpmaddubsw from saturating
    suffix = " reduce_range" if reduce else ""
    return [Candidate("qdq-u8s8", f"QDQ U8S8{suffix}", "QDQ", "uint8", reduce),
            # onnxruntime's documented default activation and weight types
            Candidate("qdq-s8s8", "QDQ S8S8", "QDQ", "int8", False),
            Candidate("qoperator-u8s8", f"QOperator U8S8{suffix}", "QOperator", "uint8", reduce)]


ONNX_FORMATS = ("qdq-u8s8", "qdq-s8s8", "qoperator-u8s8")  # onnxruntime's, as candidates()
INT8_FORMATS = ("auto", *ONNX_FORMATS, nncf_quantize.KEY)
NNCF = Candidate(nncf_quantize.KEY, nncf_quantize.NAME, "OpenVINO IR", "int8", False)


class CalibrationImages:
    """onnxruntime CalibrationDataReader over uint8 NHWC images, CALIBRATION_BATCH a time."""

    def __init__(self, images: np.ndarray) -> None:
        self.images = images
        self.start = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.start >= len(self.images):
            return None
        batch = self.images[self.start : self.start + CALIBRATION_BATCH]
        self.start += CALIBRATION_BATCH
        return {export.INPUT_NAME: runtime.to_input(batch)}

    def rewind(self) -> None:
        self.start = 0


def split_of(loaded: export.Loaded, data: str, data_root: str | Path) -> tuple[ImageSet, ImageSet]:
    """The checkpoint's own seeded train / validation split, drawn from `data`."""
    from cifarlab.data.splits import prepare_splits

    saved = loaded.ckpt.get("config")
    if not saved:
        raise UserError(f"checkpoint {loaded.path}: holds no config, so its train/validation "
                        "split is unknown; quantize a checkpoint written by cifarlab train")
    data_config = dataclasses.replace(cfg.from_dict(saved).data, source=data,
                                      test_source="none", root=str(data_root))
    splits = prepare_splits(data_config)
    if splits.classes != list(loaded.ckpt["classes"]):
        raise UserError(f"--data {data}: classes {splits.classes} are not the checkpoint's "
                        f"{list(loaded.ckpt['classes'])}; calibrate with the data the model was "
                        "trained on")
    return splits.train, splits.val


def test_set(loaded: export.Loaded, spec: str, data_root: str | Path) -> ImageSet:
    data_config = loaded.ckpt.get("config", {}).get("data", {})
    return bench.test_images(spec, data_root, data_config.get("label_set", "fine"),
                             list(loaded.ckpt["classes"]), "the checkpoint's")


def calibration_images(train: ImageSet, n: int) -> np.ndarray:
    """`n` training images drawn with a fixed seed (all of them when there are fewer)."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    chosen = rng.choice(len(train.labels), size=min(n, len(train.labels)), replace=False)
    return train.images[np.sort(chosen)]


@dataclass
class Scored:
    name: str
    val_acc: float  # percent
    test_acc: float | None
    latency_ms: float  # batch 1, median
    throughput: float  # images per second at batch 64
    passed: bool | None = None  # within max_drop of float32 (None for float32 itself)


@dataclass
class QuantizeResult:
    path: Path
    chosen: str
    cpu: runtime.CpuInfo
    calibration: str
    calibration_images: int
    fp32: Scored
    int8: list[Scored]  # every candidate, in the order tried
    max_drop: float


def score(path: Path, name: str, val: ImageSet, test: ImageSet | None, threads: int,
          precision: str | None = None) -> Scored:
    """Accuracy and speed of an .onnx file in onnxruntime, or with `precision` of an
    OpenVINO IR in OpenVINO."""
    model: Any = (runtime.OnnxClassifier(path, threads=threads, name=name) if precision is None
                  else openvino.OpenVinoClassifier(path, threads, precision, name))
    val_acc = runtime.evaluate_onnx(model, val.images, val.labels).acc
    test_acc = (runtime.evaluate_onnx(model, test.images, test.labels).acc
                if test is not None else None)
    timing = bench.time_onnx(model, val.images, quick=True)
    return Scored(name, val_acc, test_acc, timing.latency_ms, timing.throughput)


def quantize(given: str | Path, data: str, out: str | Path | None = None, *,
             calibration: str = "auto", images: int = 512, max_drop: float = 1.0,
             test_data: str | None = None, data_root: str | Path = "data",
             threads: int | None = None, int8_format: str = "auto") -> QuantizeResult:
    """Quantize a checkpoint (or a run folder's best.pt); see the module docstring.
    `int8_format` other than "auto" tries that candidate only (still accuracy-checked)."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    if calibration not in CALIBRATIONS:
        raise UserError(f"--calibration {calibration}: must be one of {', '.join(CALIBRATIONS)}")
    if int8_format not in INT8_FORMATS:
        raise UserError(f"--int8-format {int8_format}: must be one of {', '.join(INT8_FORMATS)}")
    if images < 1:
        raise UserError(f"--images {images}: must be at least 1; e.g. --images 512")
    if not 0 <= max_drop < math.inf:  # inf would take any int8 model, however broken
        raise UserError(f"--max-drop {max_drop}: must be a finite number of points >= 0; "
                        "e.g. 1.0")
    loaded = export.load(given)
    targets, int8_format = output_paths(loaded, out, int8_format)
    train, val = split_of(loaded, data, data_root)
    test = test_set(loaded, test_data, data_root) if test_data else None
    calib = calibration_images(train, images)
    cpu = runtime.cpu_info()
    threads = threads or cpu.cores
    log.info(f"CPU: {cpu.describe()}")
    log.info("VNNI: yes, int8 weights use the full 8 bits" if cpu.vnni else
             "VNNI: no, so uint8 x int8 kernels can saturate: weights are quantized to 7 bits "
             "(reduce_range)")
    methods = CALIBRATIONS[1:] if calibration == "auto" else (calibration,)
    log.info(f"calibration: {' or '.join(methods)} on {len(calib)} training images; scoring "
             f"on {len(val.labels)} validation images")
    types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
    with tempfile.TemporaryDirectory(prefix="cifarlab-quantize-") as tmp_dir:
        tmp = Path(tmp_dir)
        fp32_path = tmp / "fp32.onnx"
        export.write_onnx(loaded, fp32_path, export.parity_images(None), None)
        prepared = tmp / "prepared.onnx"
        with export.quiet():
            quant_pre_process(str(fp32_path), str(prepared))
        fp32 = score(fp32_path, "fp32", val, test, threads)
        log.info(_line(fp32, fp32))
        tried: list[tuple[Scored, Path, Candidate, str]] = []
        nncf_model = None
        if "xml" in targets:
            nncf_path = tmp / "nncf.xml"
            nncf_model = nncf_quantize.quantize_ir(fp32_path, calib, nncf_path)
            scored = score(nncf_path, NNCF.name, val, test, threads,
                           nncf_quantize.score_precision())
            scored.passed = fp32.val_acc - scored.val_acc <= max_drop
            log.info(_line(scored, fp32))
            tried.append((scored, nncf_path, NNCF, "nncf"))
        tried_formats = [c for c in candidates(cpu) if int8_format in ("auto", c.key)]
        for method in methods:
            cache = tmp / f"calibration-{method}.json"  # one calibration serves every format
            for i, candidate in enumerate(tried_formats):
                path = tmp / f"int8-{method}-{i}.onnx"
                with export.quiet():
                    quantize_static(
                        str(prepared), str(path), CalibrationImages(calib),
                        quant_format=getattr(QuantFormat, candidate.quant_format),
                        per_channel=True, reduce_range=candidate.reduce_range,
                        activation_type=types[candidate.activations],
                        weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, CALIBRATION_METHODS[method]),
                        calibration_cache_path=str(cache))
                name = candidate.name if len(methods) == 1 else f"{candidate.name}, {method}"
                scored = score(path, name, val, test, threads)
                scored.passed = fp32.val_acc - scored.val_acc <= max_drop
                log.info(_line(scored, fp32))
                tried.append((scored, path, candidate, method))
            if any(t[0].passed for t in tried):
                break  # a later method is tried only when this one lost too much
        passing = [t for t in tried if t[0].passed]
        if not passing:
            drops = ", ".join(f"{s.name} {fp32.val_acc - s.val_acc:.2f}" for s, *_ in tried)
            hint = ("more --images" if calibration == "auto"
                    else "--calibration auto (tries each method) or more --images")
            raise UserError(
                f"no int8 model is within --max-drop {max_drop} points of float32's "
                f"{fp32.val_acc:.2f}% validation accuracy (drops: {drops}); nothing written; "
                f"try {hint}, or allow a larger --max-drop")
        best, best_path, candidate, calibration = max(passing, key=lambda t: t[0].throughput)
        quantization = {
            "format": candidate.quant_format, "activations": candidate.activations,
            "weights": "int8 per channel", "reduce_range": candidate.reduce_range,
            "calibration": calibration, "calibration_images": len(calib),
            "val_acc_fp32": fp32.val_acc, "val_acc_int8": best.val_acc,
            "chosen_on": cpu.describe()}
        if candidate is NNCF:
            target = targets["xml"]
            nncf_quantize.write(nncf_model, {
                **loaded.metadata(), "opset": json.dumps(export.OPSET),
                "quantization": json.dumps({**quantization, "weights": "int8 symmetric per "
                                            "channel", "calibration": "NNCF default preset"}),
                openvino.PRECISION_KEY: json.dumps(nncf_quantize.score_precision())},
                best_path, target, val.images[: export.PARITY_IMAGES])
        else:
            target = targets["onnx"]
            write_int8(loaded, best_path, target, quantization,
                       val.images[: export.PARITY_IMAGES])
    return QuantizeResult(target, best.name, cpu, calibration, len(calib), fp32,
                          [t[0] for t in tried], max_drop)


def output_paths(loaded: export.Loaded, out: str | Path | None, int8_format: str
                 ) -> tuple[dict[str, Path], str]:
    """Where each kind of winner goes ("onnx", "xml": the candidates to try), and the
    --int8-format that `-o` leaves: an .xml name only NNCF's, an .onnx name onnxruntime's."""
    nncf = int8_format == nncf_quantize.KEY
    if out is not None and Path(out).suffix == ".xml":
        if int8_format not in ("auto", nncf_quantize.KEY):
            raise UserError(f"-o {out}: an OpenVINO IR, but --int8-format {int8_format} is an "
                            "ONNX format; choose a name ending .onnx")
        nncf, int8_format = True, nncf_quantize.KEY
    elif out is not None and nncf:
        nncf_quantize.check_target(Path(out))
    targets = {}
    if nncf:
        nncf_quantize.require()  # refused now, not after the float32 export
    if nncf or (int8_format == "auto" and out is None and nncf_quantize.available()):
        targets["xml"] = export.output_path(out, loaded.path.with_suffix(".int8.xml"))
    if not nncf:
        targets["onnx"] = export.output_path(out, loaded.path.with_suffix(".int8.onnx"))
    return targets, int8_format


def write_int8(loaded: export.Loaded, source: Path, target: Path, quantization: dict,
               images: np.ndarray) -> None:
    """The chosen candidate with the export metadata, checked to give the candidate's logits."""
    import onnx

    proto = onnx.load(str(source))
    export.set_metadata(proto, {**loaded.metadata(), "opset": json.dumps(export.OPSET),
                                "quantization": json.dumps(quantization)})
    expected = runtime.OnnxClassifier(source, threads=1).logits(images)

    def check(tmp: Path) -> None:
        got = runtime.OnnxClassifier(tmp, threads=1, name=str(target)).logits(images)
        if not np.array_equal(got, expected):
            raise export.ParityError(f"{target}: the written model's logits differ from the "
                                     "scored one's")

    export.write_checked(target, lambda f: f.write(proto.SerializeToString()), check)


def _line(s: Scored, fp32: Scored) -> str:
    test = f"  test {s.test_acc:6.2f}%" if s.test_acc is not None else ""
    drop = "" if s is fp32 else f"  ({s.val_acc - fp32.val_acc:+.2f} points)"
    verdict = {None: "", True: "  ok", False: "  too inaccurate"}[s.passed]
    return (f"{s.name:<26} val {s.val_acc:6.2f}%{drop}{test}  batch 1 {s.latency_ms:6.2f} ms  "
            f"batch 64 {s.throughput:7.1f} img/s{verdict}")
