"""A checkpoint as an ExecuTorch program for phones and boards (`cifarlab export --format
executorch`): torch.export's program of the deployable module (normalisation in the graph,
any batch up to executorch.MAX_BATCH), lowered to XNNPACK with
`to_edge_transform_and_lower(..., partitioner=[XnnpackPartitioner()])`, the export's
metadata in a constant method.

float32 by default. `int8`: PyTorch's post-training quantization flow for XNNPACK (pt2e:
prepare_pt2e with XNNPACKQuantizer's symmetric per-channel int8 config, calibration on
CALIBRATION_IMAGES training images of the checkpoint's own split, as cifarlab quantize
draws them, convert_pt2e), then the same lowering.

The written program is checked with ExecuTorch's Python runtime as export checks its files:
its logits on the parity images must match PyTorch's within PARITY_ATOL + PARITY_RTOL *
max|logit|, with the same top-1. For int8 PyTorch's is the quantized model that was lowered
(convert_pt2e's, which simulates the int8 steps), within export's LOW_PRECISION tolerance:
XNNPACK's int8 kernels round at other points, a step of the output's int8 scale or two, which
can swap near-tied classes, so the top-1 agreement with it and with float32 is reported, not
required (cifarlab bench --data and evaluate measure the accuracy). A failed check leaves
nothing behind.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cifarlab.deploy import executorch, export, quantize, runtime
from cifarlab.errors import UserError, import_package

CALIBRATION_IMAGES = 512
CALIBRATION_BATCH = 32


def batch_dims() -> tuple[dict[int, torch.export.Dim]]:
    return ({0: torch.export.Dim("batch", min=1, max=executorch.MAX_BATCH)},)


def example() -> tuple[torch.Tensor]:
    """The example batch of the exports: a large one, as ExecuTorch's memory plan is held
    to the batch bound only when the example is not a small size torch.export specialises."""
    return (torch.rand(64, 3, 32, 32),)


def quantized_module(module: torch.nn.Module, calibration: np.ndarray) -> torch.nn.Module:
    """The module after pt2e's prepare, calibration and convert for XNNPACK (int8)."""
    from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (
        XNNPACKQuantizer,
        get_symmetric_quantization_config,
    )
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    graph = torch.export.export(module, example(),
                                dynamic_shapes=batch_dims()).module()
    quantizer = XNNPACKQuantizer().set_global(
        get_symmetric_quantization_config(is_per_channel=True))
    prepared = prepare_pt2e(graph, quantizer)
    with torch.no_grad():
        for i in range(0, len(calibration), CALIBRATION_BATCH):
            prepared(torch.from_numpy(runtime.to_input(calibration[i : i + CALIBRATION_BATCH])))
    return convert_pt2e(prepared)


def program_bytes(module: torch.nn.Module, metadata: dict[str, str]) -> bytes:
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import ExecutorchBackendConfig, to_edge_transform_and_lower
    from executorch.exir.passes.sym_shape_eval_pass import ConstraintBasedSymShapeEvalPass

    program = torch.export.export(module, example(),
                                  dynamic_shapes=batch_dims())
    packed = torch.tensor(list(json.dumps(metadata).encode()), dtype=torch.uint8)
    edge = to_edge_transform_and_lower(program, partitioner=[XnnpackPartitioner()],
                                       constant_methods={executorch.METADATA_METHOD: packed})
    # memory planned for the batch bound (MAX_BATCH), not the example's size
    config = ExecutorchBackendConfig(sym_shape_eval_pass=ConstraintBasedSymShapeEvalPass())
    return edge.to_executorch(config).buffer


def export_pte(given: str | Path, out: str | Path | None = None, data: str | None = None,
               data_root: str | Path = "data", int8: bool = False) -> export.ExportResult:
    """Write the checked `.pte` (see the module docstring); `data` gives the parity images
    (its test split) and, with `int8`, the calibration images (its training split)."""
    import_package("executorch", "executorch", "cifarlab export --format executorch",
                   executorch.INSTALL)
    if int8 and data is None:
        raise UserError("--int8 calibrates on training images of the checkpoint's split; "
                        "give --data SPEC (the data it was trained on)")
    loaded = export.load(given)
    target = export.output_path(out, loaded.path.with_suffix(".int8.pte" if int8 else ".pte"))
    images = export.parity_images(data, data_root)
    executorch.load_runtime()  # refused now, not after minutes of lowering
    module: torch.nn.Module = loaded.module
    metadata = loaded.metadata()
    notes: list[str] = []
    float_logits: list[np.ndarray] = []
    if int8:
        train, _ = quantize.split_of(loaded, data, data_root)
        calibration = quantize.calibration_images(train, CALIBRATION_IMAGES)
        float_logits[:] = [export.torch_logits(module, images)]
        module = quantized_module(module, calibration)
        metadata["quantization"] = json.dumps({
            "format": "pt2e XNNPACKQuantizer", "activations": "int8", "weights":
            "int8 symmetric per channel", "calibration": "minmax (pt2e observers)",
            "calibration_images": len(calibration)})
    reference = export.torch_logits(module, images)
    try:
        with export.quiet(), executorch.quiet_native_log():
            buffer = program_bytes(module, metadata)
    except Exception as e:  # torch.export and the lowering raise many types
        raise UserError(f"cannot lower {loaded.path} to ExecuTorch (XNNPACK): "
                        f"{export._first_line(e)}; nothing written") from None
    diff: list[float] = []
    tolerance = ((export.LOW_PRECISION_ATOL, export.LOW_PRECISION_RTOL) if int8
                 else (export.PARITY_ATOL, export.PARITY_RTOL))

    def check(tmp: Path) -> None:
        model = executorch.ExecuTorchClassifier(tmp, threads=1, name=str(target))
        got = export.two_batches(model, images)
        diff.append(export.check_parity(reference, got, f"ExecuTorch {'int8' if int8 else 'fp32'} "
                                        "export", *tolerance, top1=not int8))
        if int8:
            notes.append(f"int8 program: same top-1 as PyTorch's quantized model on "
                         f"{_agree(got, reference)}, as float32's on {_agree(got, float_logits[0])}"
                         f" of {len(images)} images")

    export.write_checked(target, lambda f: f.write(buffer), check)
    return export.ExportResult(target, "executorch", None, diff[0], len(images), notes,
                               tolerance=tolerance, top1=not int8)


def _agree(a: np.ndarray, b: np.ndarray) -> str:
    return f"{100 * float((a.argmax(1) == b.argmax(1)).mean()):.1f}%"
