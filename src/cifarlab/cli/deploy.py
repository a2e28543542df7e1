"""The commands that turn a checkpoint into files for devices and measure them: export,
quantize and bench.

    cifarlab export    CHECKPOINT|RUN_DIR [-o FILE] [--format FORMAT] [--data SPEC] [--int8]
    cifarlab quantize  CHECKPOINT|RUN_DIR --data SPEC [-o FILE] [--calibration METHOD] [...]
    cifarlab bench     MODEL [MODEL ...] [--data SPEC] [--threads N] [--json] [-o FIGURE]
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from cifarlab import settings_rules
from cifarlab.cli.common import check_range
from cifarlab.errors import UserError


def add_commands(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a checkpoint as one checked file: ONNX, OpenVINO IR, ExecuTorch, pt2 "
                       "or safetensors",
        description="Input: RGB float in [0, 1], NCHW, any batch (normalisation in the graph); "
                    "output: logits. The file is checked against PyTorch before it is written.")
    export.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.pt)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="default: beside the checkpoint, e.g. runs/x/best.onnx")
    export.add_argument("--format", default="onnx",
                        choices=["onnx", "openvino", "executorch", "pt2", "safetensors"],
                        help="onnx (default); openvino: an IR, MODEL.xml with its MODEL.bin; "
                             "executorch: a .pte lowered to XNNPACK")
    export.add_argument("--exporter", choices=["dynamo", "torchscript"],
                        help="ONNX exporter (default: dynamo, torchscript when dynamo's file "
                             "fails the check)")
    export.add_argument("--data", metavar="SPEC", help="real images for the parity check "
                        "(default: a seeded random batch)")
    export.add_argument("--data-root", default="data")
    export.add_argument("--int8", action="store_true",
                        help="--format executorch: int8 through PyTorch's quantization flow "
                             "for XNNPACK, calibrated on training images of --data")

    quantize = commands.add_parser(
        "quantize", help="int8 model (onnxruntime static quantization or OpenVINO's NNCF), "
                         "accuracy-checked",
        description="Calibrates on training images of the checkpoint's own split, tries the "
                    "int8 formats that suit this CPU and writes the fastest within --max-drop "
                    "points of float32's validation accuracy.")
    quantize.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.pt)")
    quantize.add_argument("--data", required=True, metavar="SPEC",
                          help="the data the checkpoint was trained on (its split is redrawn)")
    quantize.add_argument("-o", "--output", metavar="FILE",
                          help="default: beside the checkpoint, runs/x/best.int8.onnx (or "
                               ".int8.xml when OpenVINO's wins); .xml: NNCF's only, .onnx: "
                               "onnxruntime's only")
    quantize.add_argument("--calibration", default="auto",
                          choices=["auto", "minmax", "percentile", "entropy"],
                          help="auto (default): minmax, and percentile then entropy only when "
                               "no int8 format is within --max-drop with it")
    quantize.add_argument("--images", type=int, default=512,
                          help="calibration images from the training split (default 512)")
    quantize.add_argument("--max-drop", type=float, default=1.0, metavar="POINTS",
                          help="largest validation accuracy loss accepted (default 1.0)")
    quantize.add_argument("--test-data", metavar="SPEC", help="also report test accuracy "
                          "(never used for choices)")
    quantize.add_argument("--int8-format", default="auto",
                          choices=["auto", "qdq-u8s8", "qdq-s8s8", "qoperator-u8s8",
                                   "openvino-nncf"],
                          help="auto: the fastest that passes, measured here (onnxruntime's "
                               "formats, and NNCF's OpenVINO int8 where openvino and nncf are "
                               "installed); a named one: only that one")
    quantize.add_argument("--threads", type=int, help="threads for timing (default: all)")
    quantize.add_argument("--data-root", default="data")

    bench = commands.add_parser(
        "bench", help="CPU latency, throughput and accuracy of checkpoints and deployed files",
        description="Batch-1 latency (median, p90) and batch-64 throughput, every runtime "
                    "pinned to the same thread count.")
    bench.add_argument("models", nargs="+", metavar="MODEL",
                       help="checkpoints, run folders (torch eager) and deployed files "
                            "(.onnx, OpenVINO .xml, ExecuTorch .pte)")
    bench.add_argument("--data", metavar="SPEC", help="score accuracy: the source's test "
                       "split, or the models' own validation split when it has none")
    bench.add_argument("--data-root", default="data")
    bench.add_argument("--threads", type=int, help="threads for every runtime (default: all)")
    bench.add_argument("--runtime", default="onnxruntime",
                       choices=["onnxruntime", "openvino", "auto", "all"],
                       help="what runs .onnx files (default onnxruntime; auto: the fastest "
                            "installed, measured here; all: each installed one, a row each)")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.add_argument("-o", "--output", metavar="FIGURE",
                       help="also draw accuracy against latency (PNG, SVG or PDF)")


def cmd_export(args: argparse.Namespace) -> int:
    from cifarlab.deploy import export as ex

    if args.int8 and args.format != "executorch":
        raise UserError("--int8 is for --format executorch; int8 ONNX and OpenVINO models come "
                        "from cifarlab quantize")
    if args.format == "executorch":
        if args.exporter:
            raise UserError("--exporter is for ONNX; drop it with --format executorch")
        from cifarlab.deploy.executorch_export import export_pte

        result = export_pte(args.checkpoint, args.output, args.data, args.data_root, args.int8)
    else:
        result = ex.export(args.checkpoint, args.output, args.format, args.data,
                           args.data_root, args.exporter)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    how = f" ({result.exporter} exporter)" if result.exporter else ""
    if result.precision is not None:
        how += f", runs in OpenVINO {result.precision}"
    atol, rtol = result.tolerance
    same = "same top-1" if result.top1 else "top-1 as noted"
    print(f"wrote {result.path}{how}: logits within {result.max_abs_diff:.2g} of PyTorch's "
          f"(tolerance {atol:g} + {rtol:g} x max |logit|), {same} on "
          f"{result.images} {'images' if args.data else 'random images'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from cifarlab.deploy.quantize import quantize

    check_range("--threads", args.threads, 1, settings_rules.MAX_THREADS, 2)
    result = quantize(args.checkpoint, args.data, args.output, calibration=args.calibration,
                      images=args.images, max_drop=args.max_drop, test_data=args.test_data,
                      data_root=args.data_root, threads=args.threads,
                      int8_format=args.int8_format)
    chosen = next(s for s in result.int8 if s.name == result.chosen)
    print(f"wrote {result.path}: {result.chosen}, the fastest int8 format within "
          f"{result.max_drop:g} points of float32 ({chosen.val_acc:.2f}% against "
          f"{result.fp32.val_acc:.2f}% validation accuracy)")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cifarlab.deploy.bench import bench, figure

    check_range("--threads", args.threads, 1, settings_rules.MAX_THREADS, 2)
    if args.output:  # refused before minutes of measuring, not after
        from cifarlab.plots import check_figure_path

        check_figure_path(args.output)
    result = bench(args.models, args.threads, args.data, args.data_root, args.runtime)
    print(result.to_json() if args.json else result.table())
    if args.output:
        from cifarlab.plots import save_figure

        print(f"wrote {save_figure(figure(result), args.output)}",
              file=sys.stderr if args.json else sys.stdout)
    return 0
