"""A checkpoint as one deployable file: ONNX (default), an OpenVINO IR (.xml + .bin),
torch.export's pt2, or safetensors.

The exported network takes what a camera or an image decoder gives: RGB floats in [0, 1],
NCHW, any batch size; the checkpoint's normalisation (and its mirror-image averaging when
the run scored that way) is part of the graph, and the output is the logits. Every file is
checked before it appears under its name: it is written to a temporary file in the output
folder, loaded back, and its logits on a batch of images (real ones with `data`, else a
seeded random batch) must match eager PyTorch's within PARITY_ATOL + PARITY_RTOL * max|logit|
with the same top-1 class on every image; then it is renamed into place. A failed check
leaves nothing behind.

OpenVINO runs `.onnx` files and IRs (the IR is converted from the checked ONNX graph, with
the same metadata). Where openvino is installed, an ONNX file is also checked in OpenVINO, in
the precision OpenVINO will run it in on this CPU (openvino.checked_precision: its default,
bfloat16 on CPUs with AMX, when that passes, else float32), which the metadata records; bf16
and f16 are held to LOW_PRECISION_ATOL + LOW_PRECISION_RTOL * max|logit|, and the same top-1.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

import cifarlab
from cifarlab import checkpoint
from cifarlab.deploy import openvino, runtime
from cifarlab.errors import UserError
from cifarlab.evaluate import logits_of

FORMATS = ("onnx", "openvino", "pt2", "safetensors")
SUFFIXES = {"onnx": ".onnx", "openvino": ".xml", "pt2": ".pt2", "safetensors": ".safetensors"}
EXPORTERS = ("dynamo", "torchscript")
OPSET = 18  # pinned: the graph does not change with the torch version's default
PARITY_IMAGES = 64
PARITY_SEED = 0
# float32 logits of two runtimes differ by rounding (different kernels, fused BatchNorm):
# about 1e-6 of the logits' scale is typical; a broken graph is off by O(1).
PARITY_ATOL = 1e-4
PARITY_RTOL = 1e-3
# bfloat16 keeps 8 bits of mantissa (about 0.4 % per rounding): logits drift by about 1 % of
# their scale through a network; a broken graph is still off by far more.
LOW_PRECISION_ATOL = 1e-2
LOW_PRECISION_RTOL = 3e-2
INPUT_NAME, OUTPUT_NAME = "image", "logits"
INPUT_DESCRIPTION = "float32 RGB in [0, 1], NCHW (batch, 3, 32, 32); normalisation is in the graph"
MAX_BATCH = 1 << 16


class ParityError(UserError):
    """An exported file whose outputs differ from PyTorch's."""


class Deployable(nn.Module):
    """The checkpoint's model behind its normalisation: [0, 1] RGB NCHW in, logits out."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 flip: bool = False, translate: bool = False) -> None:
        super().__init__()
        self.model = model.eval()
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1))
        self.flip, self.translate = flip, translate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The test-time augmentation of the run (config.tta_flip, tta_translate).
        return logits_of(self.model, (x - self.mean) / self.std, self.flip, self.translate)


@dataclass
class Loaded:
    """A checkpoint ready to export: its file, contents and deployable module."""

    path: Path
    ckpt: dict[str, Any]
    module: Deployable

    def metadata(self) -> dict[str, str]:
        """What a device needs to use the file, as strings (ONNX metadata_props)."""
        data = self.ckpt.get("config", {}).get("data", {})
        split = {k: data[k] for k in ("source", "val_fraction", "split_seed", "limit",
                                      "label_set", "resize") if k in data}
        return {
            "classes": json.dumps(list(self.ckpt["classes"])),
            "mean": json.dumps([float(v) for v in self.ckpt["mean"]]),
            "std": json.dumps([float(v) for v in self.ckpt["std"]]),
            "input": json.dumps(INPUT_DESCRIPTION),
            "input_layout": json.dumps("NCHW"),
            "architecture": json.dumps(self.ckpt["model_args"]),
            "tta_flip": json.dumps(self.module.flip),
            "tta_translate": json.dumps(self.module.translate),
            "split": json.dumps(split),
            "source_checkpoint": json.dumps(str(self.path)),
            # percent, on the validation split of `split` (None: the checkpoint records none)
            "source_val_acc": json.dumps(self.ckpt.get("val_acc")),
            "cifarlab_version": json.dumps(cifarlab.__version__),
        }


def load(given: str | Path) -> Loaded:
    """A checkpoint file or a run folder (its best.pt) -> Loaded."""
    path = checkpoint.in_run_folder(given)
    ckpt = checkpoint.load(path)
    model = checkpoint.build_model(ckpt, path)
    return Loaded(path, ckpt, Deployable(model, ckpt["mean"], ckpt["std"],
                                         checkpoint.tta_flip(ckpt),
                                         checkpoint.tta_translate(ckpt)))


def parity_images(data: str | None, root: str | Path = "data", n: int = PARITY_IMAGES
                  ) -> np.ndarray:
    """uint8 NHWC images to compare runtimes on: `n` drawn (seeded) from `data`'s test split
    (its training images when it has none), else seeded random pixels."""
    rng = np.random.default_rng(PARITY_SEED)
    if data is None:
        return rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    from cifarlab.data.sources import load_source

    source = load_source(data, root)
    images = (source.test if source.test is not None else source.train).images
    return images[np.sort(rng.choice(len(images), size=min(n, len(images)), replace=False))]


def check_parity(reference: np.ndarray, got: np.ndarray, what: str, atol: float = PARITY_ATOL,
                 rtol: float = PARITY_RTOL, top1: bool = True) -> float:
    """Largest absolute difference; ParityError when over tolerance or (`top1`) a top-1
    differs."""
    if got.shape != reference.shape:
        raise ParityError(f"{what}: output shape {tuple(got.shape)} differs from PyTorch's "
                          f"{tuple(reference.shape)}")
    diff = float(np.abs(got.astype(np.float64) - reference).max()) if got.size else 0.0
    tolerance = atol + rtol * float(np.abs(reference).max(initial=0.0))
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(f"{what}: logits differ from PyTorch's by up to {diff:.3g} (tolerance "
                          f"{tolerance:.3g}) on {len(reference)} images")
    flipped = int((got.argmax(1) != reference.argmax(1)).sum())
    if flipped and top1:
        raise ParityError(f"{what}: top-1 class differs from PyTorch's on {flipped} of "
                          f"{len(reference)} images")
    return diff


def torch_logits(module: nn.Module, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return module(torch.from_numpy(runtime.to_input(images))).double().numpy()


def onnx_logits(path: Path, images: np.ndarray) -> np.ndarray:
    """The file's logits with onnxruntime, in two batches: the batch size is dynamic."""
    return two_batches(runtime.OnnxClassifier(path, threads=1, name=str(path)), images)


def two_batches(model: Any, images: np.ndarray) -> np.ndarray:
    """A deployed classifier's logits (its `run`), in two batches."""
    half = max(1, len(images) // 2)
    return np.concatenate([model.run(runtime.to_input(images[:half])),
                           model.run(runtime.to_input(images[half:]))])


def batch_dim() -> torch.export.Dim:
    return torch.export.Dim("batch", min=1, max=MAX_BATCH)


def onnx_proto(module: nn.Module, exporter: str) -> Any:
    """The module as an ONNX ModelProto (opset OPSET, dynamic batch, one file)."""
    example = (torch.rand(2, 3, 32, 32),)
    with quiet():
        if exporter == "dynamo":
            program = torch.onnx.export(
                module, example, dynamo=True, opset_version=OPSET, input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME], dynamic_shapes=({0: batch_dim()},),
                external_data=False, verbose=False, report=False)
            return program.model_proto
        import onnx

        buffer = io.BytesIO()
        torch.onnx.export(module, example, buffer, dynamo=False, opset_version=OPSET,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
        return onnx.load_from_string(buffer.getvalue())


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' and onnxruntime.quantization's progress lines (logged at INFO,
    or printed) and torchscript's deprecation warning: the command says what happened."""
    logging.disable(logging.INFO)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(logging.NOTSET)


def set_metadata(proto: Any, metadata: dict[str, str]) -> None:
    import onnx

    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = "cifarlab classifier; input: " + INPUT_DESCRIPTION


def write_checked(out: Path, write: Callable[[Any], None], check: Callable[[Path], None]
                  ) -> None:
    """checkpoint.write_atomic with OSError as a one-line UserError."""
    try:
        checkpoint.write_atomic(out, write, check)
    except OSError as e:
        raise UserError(f"could not write {out} ({e.strerror or e}); choose another -o") from None


def output_path(given: str | Path | None, default: Path) -> Path:
    """The output file: `given` or `default`; UserError when it cannot be written there."""
    out = Path(given) if given is not None else default
    folder = out.parent
    if out.is_dir():
        raise UserError(f"-o {out}: a folder; give a file name")
    checkpoint.check_not_a_run_file(out)
    if out.exists() and out.suffix != default.suffix:
        raise UserError(f"-o {out}: exists and is not a {default.suffix} file, which this would "
                        f"replace with one; choose a name ending {default.suffix}")
    if not folder.is_dir():
        raise UserError(f"-o {out}: no folder {folder}; create it or choose another -o")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"-o {out}: folder {folder} is not writable; choose another -o")
    return out


@dataclass
class ExportResult:
    path: Path
    format: str
    exporter: str | None  # ONNX only
    max_abs_diff: float  # against eager PyTorch
    images: int  # compared
    notes: list[str]  # what was tried and failed before (ONNX exporter fallback)
    precision: str | None = None  # OpenVINO IR: the inference precision checked and recorded
    tolerance: tuple[float, float] = (PARITY_ATOL, PARITY_RTOL)  # (atol, rtol) of the check
    top1: bool = True  # the check required the same top-1 on every image


def openvino_check(reference: np.ndarray, images: np.ndarray, what: str
                   ) -> Callable[[openvino.OpenVinoClassifier, str], None]:
    """A check of an OpenVINO model's logits against PyTorch's, in the tolerance of the
    precision it runs in (openvino.checked_precision calls it)."""
    def check(model: openvino.OpenVinoClassifier, precision: str) -> None:
        atol, rtol = ((PARITY_ATOL, PARITY_RTOL) if precision == "f32"
                      else (LOW_PRECISION_ATOL, LOW_PRECISION_RTOL))
        check_parity(reference, two_batches(model, images),
                     f"{what} in OpenVINO {precision}", atol, rtol)
    return check


def openvino_precision(proto: Any, reference: np.ndarray, images: np.ndarray,
                       notes: list[str]) -> str | None:
    """The precision OpenVINO runs `proto` in on this CPU, checked; None when openvino is
    not installed or the graph fails in OpenVINO even in f32 (said in `notes`)."""
    try:
        import openvino as _  # noqa: F401
    except ImportError:
        return None
    with tempfile.TemporaryDirectory(prefix="cifarlab-export-") as tmp:
        path = Path(tmp) / "model.onnx"
        path.write_bytes(proto.SerializeToString())
        try:
            precision, found = openvino.checked_precision(path, openvino_check(
                reference, images, "ONNX export"))
        except UserError as e:
            notes.append(f"{e}; run this file with --runtime onnxruntime")
            return None
    notes.extend(found)
    return precision


def write_onnx(loaded: Loaded, out: Path, images: np.ndarray, exporter: str | None,
               check_openvino: bool = True) -> ExportResult:
    """The ONNX file, checked; `exporter` None tries dynamo, then torchscript;
    `check_openvino` also checks it in OpenVINO where installed (module docstring)."""
    reference = torch_logits(loaded.module, images)
    notes: list[str] = []
    for name in [exporter] if exporter else list(EXPORTERS):
        try:
            proto = onnx_proto(loaded.module, name)
        except Exception as e:  # exporters raise many types; the reason is in the message
            notes.append(f"{name} exporter failed: {_first_line(e)}")
            continue
        metadata = {**loaded.metadata(), "exporter": json.dumps(name), "opset": json.dumps(OPSET)}
        set_metadata(proto, metadata)
        precision = (openvino_precision(proto, reference, images, notes)
                     if check_openvino else None)
        if precision is not None:
            set_metadata(proto, {**metadata, openvino.PRECISION_KEY: json.dumps(precision)})
        diff: list[float] = []

        def check(tmp: Path, exporter_name: str = name, found: list[float] = diff) -> None:
            found.append(check_parity(reference, onnx_logits(tmp, images),
                                      f"{exporter_name} export"))

        try:
            write_checked(out, lambda f, p=proto: f.write(p.SerializeToString()), check)
        except ParityError as e:
            notes.append(str(e))
            continue
        return ExportResult(out, "onnx", name, diff[0], len(images), notes)
    raise UserError(f"cannot export {loaded.path} to ONNX: {'; '.join(notes)}; nothing written")


def write_openvino(loaded: Loaded, out: Path, images: np.ndarray, exporter: str | None
                   ) -> ExportResult:
    """An OpenVINO IR converted from the checked ONNX graph, with its metadata (and the
    precision checked there), checked again as written."""
    import onnx

    ov = openvino.import_openvino("cifarlab export --format openvino")
    reference = torch_logits(loaded.module, images)
    with tempfile.TemporaryDirectory(prefix="cifarlab-export-") as tmp:
        onnx_path = Path(tmp) / "model.onnx"
        result = write_onnx(loaded, onnx_path, images, exporter)
        proto = onnx.load(str(onnx_path))
        metadata = {p.key: p.value for p in proto.metadata_props}
        model = ov.convert_model(str(onnx_path))
    diff: list[float] = []
    precision: list[str] = []

    def check(tmp_xml: Path) -> None:
        model = openvino.OpenVinoClassifier(tmp_xml, threads=1, name=str(out))
        atol, rtol = ((PARITY_ATOL, PARITY_RTOL) if model.precision == "f32"
                      else (LOW_PRECISION_ATOL, LOW_PRECISION_RTOL))
        diff.append(check_parity(reference, two_batches(model, images),
                                 f"OpenVINO {model.precision} export", atol, rtol))
        precision.append(model.precision)

    try:
        openvino.write_ir(model, metadata, out, check)
    except UserError as e:
        # The CPU's low-precision default passed on the ONNX graph but not on the IR
        # converted from it (its own graph transformations), or the IR did not compile in
        # it: f32 then, as for the ONNX file.
        recorded = openvino.recorded_precision(metadata)
        if recorded == "f32":
            raise
        result.notes.append(f"OpenVINO's default {recorded} failed the check of the IR ({e}); "
                            "f32 is used")
        metadata[openvino.PRECISION_KEY] = json.dumps("f32")
        diff.clear()
        precision.clear()
        openvino.write_ir(model, metadata, out, check)
    tolerance = ((PARITY_ATOL, PARITY_RTOL) if precision[0] == "f32"
                 else (LOW_PRECISION_ATOL, LOW_PRECISION_RTOL))
    return ExportResult(out, "openvino", result.exporter, diff[0], len(images), result.notes,
                        precision[0], tolerance)


def write_pt2(loaded: Loaded, out: Path, images: np.ndarray) -> ExportResult:
    reference = torch_logits(loaded.module, images)
    try:
        program = torch.export.export(loaded.module, (torch.rand(2, 3, 32, 32),),
                                      dynamic_shapes=({0: batch_dim()},))
    except Exception as e:
        raise UserError(f"cannot export {loaded.path} with torch.export: "
                        f"{_first_line(e)}; nothing written") from None
    extra = {"cifarlab.json": json.dumps(loaded.metadata())}
    diff: list[float] = []

    def check(tmp: Path) -> None:
        with open(tmp, "rb") as f:  # a .pt2 name is not needed when read as a buffer
            module = torch.export.load(io.BytesIO(f.read())).module()
        with torch.no_grad():
            got = module(torch.from_numpy(runtime.to_input(images))).double().numpy()
        diff.append(check_parity(reference, got, "pt2 export"))

    write_checked(out, lambda f: torch.export.save(program, f, extra_files=extra), check)
    return ExportResult(out, "pt2", None, diff[0], len(images), [])


def write_safetensors(loaded: Loaded, out: Path, images: np.ndarray) -> ExportResult:
    from safetensors.torch import save

    reference = torch_logits(loaded.module, images)
    weights = {k: v.contiguous() for k, v in loaded.module.model.state_dict().items()}
    metadata = {"format": "cifarlab-safetensors", **loaded.metadata()}
    diff: list[float] = []

    def check(tmp: Path) -> None:
        module = load_safetensors(tmp)
        diff.append(check_parity(reference, torch_logits(module, images), "safetensors export"))

    write_checked(out, lambda f: f.write(save(weights, metadata=metadata)), check)
    return ExportResult(out, "safetensors", None, diff[0], len(images), [])


def load_safetensors(path: str | Path) -> Deployable:
    """A safetensors file written by export -> the deployable module ([0, 1] input)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != "cifarlab-safetensors":
            raise UserError(f"{path}: not a cifarlab safetensors file")
        weights = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iter)
    ckpt = {"model": weights, "model_args": json.loads(meta["architecture"]),
            "classes": json.loads(meta["classes"])}
    model = checkpoint.build_model(ckpt, path)
    return Deployable(model, json.loads(meta["mean"]), json.loads(meta["std"]),
                      json.loads(meta["tta_flip"]),
                      json.loads(meta.get("tta_translate", "false")))


def export(given: str | Path, out: str | Path | None = None, fmt: str = "onnx",
           data: str | None = None, data_root: str | Path = "data",
           exporter: str | None = None) -> ExportResult:
    """Export a checkpoint (or a run folder's best.pt); see the module docstring."""
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: must be one of {', '.join(FORMATS)}")
    if exporter is not None and exporter not in EXPORTERS:
        raise UserError(f"--exporter {exporter}: must be one of {', '.join(EXPORTERS)}")
    loaded = load(given)
    target = output_path(out, loaded.path.with_suffix(SUFFIXES[fmt]))
    if fmt == "openvino" and target.suffix != ".xml":
        raise UserError(f"-o {target}: an OpenVINO IR is an .xml file (its weights go in the "
                        ".bin beside it); choose a name ending .xml")
    images = parity_images(data, data_root)
    if fmt == "onnx":
        return write_onnx(loaded, target, images, exporter)
    if fmt == "openvino":
        return write_openvino(loaded, target, images, exporter)
    if fmt == "pt2":
        return write_pt2(loaded, target, images)
    return write_safetensors(loaded, target, images)


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return (text.splitlines()[0][:200] if text else type(error).__name__)
