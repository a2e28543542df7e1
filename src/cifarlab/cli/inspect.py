"""The commands that inspect models, checkpoints and run folders: evaluate, summary, models,
plot, compare (of runs, or of variants of one model), report and predict. They print, draw
figures and write reports; none trains or writes a model.

    cifarlab evaluate  CHECKPOINT|RUN_DIR|MODEL.onnx|.xml|.pte --data SPEC [--runtime R]
    cifarlab summary   [CHECKPOINT|RUN_DIR | --model NAME --width W --classes N] [--json]
    cifarlab models    [--classes N] [--width W] [--json]
    cifarlab plot      RUN [RUN ...] [-o FILE]
    cifarlab compare   RUN_A RUN_B [RUN ...] [--markdown] [-o FILE]
    cifarlab compare   --variants MODEL MODEL [...] [--data SPEC] [--test-data SPEC] [--json]
                       [--report DIR]
    cifarlab report    RUN [--against RUN]
    cifarlab predict   CHECKPOINT|RUN_DIR|MODEL.onnx|.xml|.pte IMAGE [...] [--runtime R]

evaluate and predict on a deployed file use its runtime alone (onnxruntime, OpenVINO or
ExecuTorch; by default the fastest installed, named in the output): nothing here imports
torch on that path.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cifarlab import settings_rules
from cifarlab.cli.common import check_range, checkpoint_file
from cifarlab.errors import UserError

WIDTH_HELP = ("model.width: 64 is each model's published width, W scales its channels by "
              "W/64 (a ResNet-18's base width is W)")


def add_commands(commands: Any) -> None:
    evaluate = commands.add_parser("evaluate", help="accuracy of a checkpoint on some data")
    evaluate.add_argument("checkpoint", help="a checkpoint, a run folder (its best.pt), or a "
                          "deployed file from export or quantize (.onnx, .xml, .pte)")
    evaluate.add_argument("--data", metavar="SPEC",
                          help="images to score (a source's test split when it has one); "
                               "default: the run's own data when it is named by a keyword "
                               "(cifar10, cifar100, synthetic)")
    evaluate.add_argument("--data-root", default="data")
    evaluate.add_argument("--device", default="auto", choices=settings_rules.DEVICES)
    evaluate.add_argument("--batch-size", type=int, default=1024)
    add_runtime_flag(evaluate, "throughput at batch 64")
    evaluate.add_argument("--json", action="store_true", help="print JSON")

    summary = commands.add_parser("summary", help="layer table, parameters, MACs and FLOPs")
    summary.add_argument("checkpoint", nargs="?", help="profile this checkpoint's model (a "
                         "pruned one included) instead of --model/--width/--classes")
    summary.add_argument("--model", default="resnet18", help="a name cifarlab models lists")
    summary.add_argument("--width", type=int, default=64, help=WIDTH_HELP)
    summary.add_argument("--classes", type=int, default=10)
    summary.add_argument("--json", action="store_true", help="print JSON")

    models = commands.add_parser(
        "models", help="every model --model accepts, with parameters and MACs",
        description="Parameters and multiply-accumulates per 32x32 image of each model.")
    models.add_argument("--classes", type=int, default=10)
    models.add_argument("--width", type=int, default=64, help=WIDTH_HELP)
    models.add_argument("--json", action="store_true", help="print JSON")

    plot = commands.add_parser(
        "plot", help="the 2x2 figure: loss, accuracy, learning rate, validation accuracy",
        description="Loss and accuracy of the first RUN; learning rate and validation accuracy "
                    "of every RUN (with one RUN: the time per epoch).")
    plot.add_argument("runs", nargs="+", metavar="RUN", help="run folders")
    plot.add_argument("-o", "--output", metavar="FILE",
                      help="PNG, SVG or PDF, by the extension (default plot.png in the first "
                           "RUN)")

    compare = commands.add_parser(
        "compare", help="table and figure comparing runs",
        description="Results, each run's delta against the first, and the settings that "
                    "differ; the figure shows validation accuracy and learning rate.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the first is "
                         "the reference (with --variants: run folders, checkpoints, .onnx files)")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table")
    compare.add_argument("-o", "--output", metavar="FILE", help="the figure: PNG, SVG or PDF "
                         "(default comparison.png in the first RUN; with --variants "
                         "variants.png in --report DIR, or beside the first variant)")
    variants = compare.add_argument_group(
        "variants", "--variants: accuracy against MACs, parameters, file size and CPU latency "
        "of models (a baseline, pruned, distilled, exported, int8), Pareto fronts marked")
    variants.add_argument("--variants", action="store_true",
                          help="compare the given models as variants of one model")
    variants.add_argument("--data", metavar="SPEC", help="score .onnx files on the validation "
                          "split of their run, drawn from SPEC (default: what export or "
                          "quantize recorded)")
    variants.add_argument("--test-data", metavar="SPEC", help="measure every variant's test "
                          "accuracy on SPEC's test split (shown, never used to choose)")
    variants.add_argument("--data-root", default="data")
    variants.add_argument("--threads", type=int, help="threads for every runtime (default: all)")
    variants.add_argument("--runtime", default="onnxruntime",
                          choices=["onnxruntime", "openvino", "auto"],
                          help="what runs .onnx variants (default onnxruntime; auto: the "
                               "fastest installed, measured here)")
    variants.add_argument("--json", action="store_true", help="print JSON")
    variants.add_argument("--report", metavar="DIR",
                          help="also write DIR/variants.md and a self-contained variants.html")

    report = commands.add_parser(
        "report", help="write report.md and report.html into a run folder",
        description="Settings, data statistics, model profile, curves, epoch log, accuracy, "
                    "per-class accuracy and confusion matrix; train writes it at the end.")
    report.add_argument("run", metavar="RUN", help="run folder")
    report.add_argument("--against", metavar="RUN", help="compare with this run (deltas "
                        "against it)")

    predict = commands.add_parser(
        "predict", help="classes and probabilities for image files",
        description="Each image is converted to RGB, its shorter side resized to 32 pixels "
                    "(bicubic, antialiased) and its centre cropped to 32x32.")
    predict.add_argument("checkpoint", help="a checkpoint, a run folder (its best.pt), or a "
                         "deployed file from export or quantize (.onnx, .xml, .pte; then only "
                         "its runtime is used)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... files")
    predict.add_argument("--topk", type=int, default=3,
                         help="how many of the most probable classes to show (default 3; "
                              "more than there are shows them all)")
    predict.add_argument("--device", default="auto", choices=settings_rules.DEVICES)
    predict.add_argument("--json", action="store_true", help="print JSON")
    add_runtime_flag(predict, "batch-1 latency")


def add_runtime_flag(parser: argparse.ArgumentParser, metric: str) -> None:
    parser.add_argument("--runtime", default="auto", choices=["auto", "onnxruntime", "openvino"],
                        help="what runs a deployed file (default auto: the fastest installed "
                             f"one for it on this machine, by {metric}: from MODEL.bench.json "
                             "beside it, else measured now)")


def own_data(path: Path, data: dict) -> str:
    """The data a model's run trained on, where a keyword names it (its test source first):
    a path the file records is never read (the file may come from someone else)."""
    from cifarlab.data.sources import named_source

    for key in ("test_source", "source"):
        spec = data.get(key)
        if isinstance(spec, str) and named_source(spec) and spec not in ("auto", "none"):
            print(f"evaluating on the run's own data: --data {spec} (its data.{key})",
                  file=sys.stderr)
            return spec
    recorded = data.get("source")
    where = f" from a path ({recorded})" if isinstance(recorded, str) else ""
    raise UserError(f"{path}: its run trained on data{where}, and evaluate reads no path a "
                    "model file records; give the data with --data SPEC")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cifarlab.data.sources import load_source

    check_range("--batch-size", args.batch_size, 1, settings_rules.MAX_COUNT, 1024)
    from cifarlab.deploy import choice

    onnx = choice.is_deployed(args.checkpoint)
    path = Path(args.checkpoint) if onnx else checkpoint_file(args.checkpoint)
    label_set = "fine"
    if onnx:  # the runtime only: no torch import on this path
        from cifarlab.deploy.runtime import evaluate_onnx

        chosen = choice.choose(path, args.runtime, "throughput")
        print(chosen.describe(), file=sys.stderr)
        model = chosen.model
        classes = model.classes
        label_set = model.meta("split", {}).get("label_set", "fine")
    else:
        from cifarlab import checkpoint

        ckpt = checkpoint.load(path)
        model = checkpoint.build_model(ckpt, path)
        classes = ckpt["classes"]
        # CIFAR-100 is scored with the labels the model learned (fine or coarse).
        label_set = ((ckpt.get("config") or {}).get("data") or {}).get("label_set", "fine")
    spec = args.data or own_data(path, model.meta("split", {}) if onnx else (
        (ckpt.get("config") or {}).get("data") or {}))
    source = load_source(spec, args.data_root, label_set=label_set)
    data = source.test if source.test is not None else source.train
    if data.classes != classes:
        raise UserError(f"--data {spec}: classes {data.classes} do not match the "
                        f"model's {classes}; score data of the same classes")
    if onnx:
        result = evaluate_onnx(model, data.images, data.labels)
    else:
        from cifarlab.devices import resolve_device
        from cifarlab.evaluate import evaluate

        device = resolve_device(args.device)
        result = evaluate(model.to(device), data, ckpt["mean"], ckpt["std"], device,
                          batch_size=args.batch_size, flip=checkpoint.tta_flip(ckpt),
                          translate=checkpoint.tta_translate(ckpt))
    per_class = dict(zip(data.classes, result.per_class_acc, strict=True))
    ran = {"runtime": model.label} if onnx else {}
    if args.json:
        print(json.dumps({"images": int(len(data.labels)), "acc": result.acc,
                          "per_class_acc": per_class, "loss": result.loss, **ran}, indent=2))
        return 0
    print(f"{path}: {result.acc:.2f}% of {len(data.labels):,} images correct"
          + (f" ({model.label})" if onnx else ""))
    for name, acc in per_class.items():
        print(f"  {name:<16} {acc:6.2f}%")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cifarlab.profile import profile_model

    check_range("--width", args.width, 1, settings_rules.MAX_WIDTH, 64)
    check_range("--classes", args.classes, 2, settings_rules.MAX_CLASSES, 10)
    if args.checkpoint is not None:
        from cifarlab import checkpoint

        ckpt = checkpoint.load(checkpoint_file(args.checkpoint))
        arch = ckpt["model_args"]
        width = ((ckpt.get("config") or {}).get("model") or {}).get("width", args.width)
        profile = profile_model(arch["name"], arch["num_classes"], width, args=arch,
                                table=not args.json)
    else:
        profile = profile_model(args.model, classes=args.classes, width=args.width,
                                table=not args.json)
    if args.json:
        fields: dict[str, Any] = asdict(profile)
        fields.pop("table")
        print(json.dumps(fields, indent=2))
        return 0
    print(profile.table)
    print(f"parameters:                  {profile.params:,} "
          f"({profile.trainable_params:,} trainable)")
    print(f"weights:                     {profile.weights_mb:.1f} MB (float32)")
    print(f"MACs per image, forward:     {profile.macs / 1e9:.3f} G (multiply-accumulates)")
    print(f"FLOPs per image, forward:    {profile.flops_forward / 1e9:.2f} G")
    print(f"FLOPs per image, train step: {profile.flops_train_step / 1e9:.2f} G "
          "(forward + backward)")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from cifarlab.profile import model_sizes

    sizes = model_sizes(classes=args.classes, width=args.width)
    if args.json:
        print(json.dumps([asdict(s) for s in sizes], indent=2))
        return 0
    print(f"{'model':<16} {'parameters':>12} {'MACs (M)':>10}   "
          f"({args.classes} classes, width {args.width}, 32x32 images)")
    for s in sizes:
        print(f"{s.model:<16} {s.params:>12,} {s.macs / 1e6:>10.1f}")
    from cifarlab.models import MODELS

    left_out = [name for name in MODELS if name not in {s.model for s in sizes}]
    if left_out:
        print(f"not at width {args.width}: {', '.join(left_out)} (too narrow; see --width)")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from cifarlab.plots import curves_figure, save_figure
    from cifarlab.runs import read_runs

    output = figure_path(args.output, args.runs, "plot.png")
    print(f"wrote {save_figure(curves_figure(read_runs(args.runs)), output)}")
    return 0


def figure_path(given: str | None, items: list[str], name: str) -> Path:
    """A figure's file: `given` (-o), else `name` in the run folder named first (or beside the
    file named first), where the command's subject is, not the current folder. Never one of
    a run's own files."""
    from cifarlab.plots import check_figure_path

    first = Path(items[0])
    path = Path(given) if given else (first if first.is_dir() else first.parent) / name
    check_figure_path(path)
    return path


def cmd_compare(args: argparse.Namespace) -> int:
    from cifarlab.comparison import comparison_tables
    from cifarlab.document import markdown_table, text_table
    from cifarlab.plots import comparison_figure, save_figure
    from cifarlab.runs import read_runs

    if args.variants:
        return compare_variants(args)
    given = [f for f in ("data", "test_data", "threads", "json", "report") if getattr(args, f)]
    given += ["runtime"] * (args.runtime != "onnxruntime")
    if given:
        flag = given[0].replace("_", "-")
        raise UserError(f"--{flag} is for --variants only; add --variants or drop it")
    if len(args.runs) < 2:
        raise UserError("compare needs at least two run folders; to look at one, use "
                        "cifarlab plot or cifarlab report")
    output = figure_path(args.output, args.runs, "comparison.png")
    runs = read_runs(args.runs)
    render = markdown_table if args.markdown else text_table
    for table in comparison_tables(runs):
        print(render(table), end="\n\n")
    print(f"Deltas against {runs[0].label}: accuracy in percentage points, time in seconds.")
    print(f"wrote {save_figure(comparison_figure(runs), output)}")
    return 0


def compare_variants(args: argparse.Namespace) -> int:
    from cifarlab.deploy import variants, variants_report
    from cifarlab.plots import save_figure

    check_range("--threads", args.threads, 1, settings_rules.MAX_THREADS, 2)
    # With --report the figure is in the report's folder; else beside the first variant.
    output = (None if args.report and not args.output
              else figure_path(args.output, args.runs, variants.VARIANTS_PNG))
    variants_report.check_report_folder(args.report)
    result = variants.compare_variants(args.runs, args.threads, args.data, args.data_root,
                                       args.test_data, args.runtime)
    print(result.to_json() if args.json else variants.text(result, markdown=args.markdown))
    said = sys.stderr if args.json else sys.stdout
    if output is not None:
        print(f"wrote {save_figure(variants_report.figure(result), output)}", file=said)
    if args.report:
        html = variants_report.write_report(result, args.report)
        print(f"wrote {html.with_suffix('.md')} and {html}", file=said)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cifarlab.report import write_report

    path = write_report(args.run, against=args.against)
    print(f"wrote {path.with_suffix('.md')} and {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cifarlab.deploy import choice
    from cifarlab.predict import predict_deployed, predict_files

    check_range("--topk", args.topk, 1, settings_rules.MAX_COUNT, 3)
    if choice.is_deployed(args.checkpoint):  # the runtime only: no torch import
        chosen = choice.choose(args.checkpoint, args.runtime, "latency")
        print(chosen.describe(), file=sys.stderr)
        results = predict_deployed(chosen.model, args.images, args.topk)
    else:
        from cifarlab.devices import resolve_device

        results = predict_files(checkpoint_file(args.checkpoint), args.images, topk=args.topk,
                                device=resolve_device(args.device))
    if args.json:
        print(json.dumps([{"image": r.image, "predictions": [
            {"class": name, "probability": p} for name, p in r.predictions]}
            for r in results], indent=2))
        return 0
    for r in results:
        print(r.image)
        for name, p in r.predictions:
            print(f"  {name:<20} {100 * p:6.2f} %")
    return 0

