"""The command line: the only module that parses arguments.

    cifarlab train     [--preset NAME] [--config FILE] [--set KEY=VALUE ...] [flags]
    cifarlab train     --resume RUN_DIR [--allow-changes] [changed settings]
    cifarlab train     --teacher CHECKPOINT|RUN_DIR [...]   (knowledge distillation)
    cifarlab evaluate  CHECKPOINT|RUN_DIR|MODEL.onnx --data SPEC [--json]
    cifarlab summary   [CHECKPOINT|RUN_DIR | --model NAME --width W --classes N] [--json]
    cifarlab models    [--classes N] [--width W] [--json]
    cifarlab plot      RUN [RUN ...] [-o FILE]
    cifarlab compare   RUN_A RUN_B [RUN ...] [--markdown] [-o FILE]
    cifarlab compare   --variants MODEL MODEL [...] [--data SPEC] [--json] [--report DIR]
    cifarlab report    RUN [--against RUN]
    cifarlab predict   CHECKPOINT|RUN_DIR|MODEL.onnx IMAGE [IMAGE ...] [--topk K] [--json]
    cifarlab export    CHECKPOINT|RUN_DIR [-o FILE] [--format onnx|pt2|safetensors] [--data SPEC]
    cifarlab quantize  CHECKPOINT|RUN_DIR --data SPEC [-o FILE] [--calibration METHOD] [...]
    cifarlab bench     MODEL [MODEL ...] [--data SPEC] [--threads N] [--json] [-o FIGURE]
    cifarlab prune     CHECKPOINT|RUN_DIR (--target-macs F | --target-params F | --ratio R)
                       [--importance magnitude|taylor|bn-scale] [--steps K] [--round-to N]
                       [train's flags: --data, --epochs, --set KEY=VALUE, ...]
    cifarlab sweep     STUDY.yaml [--out DIR] [--data SPEC] [--workers K] [--storage URL]
    cifarlab study     STUDY_DIR [--storage URL]
    cifarlab ablate    [--seeds N] [--variants A,B] [--out DIR] [--data SPEC] [--epochs N]
                       [--limit N] [--device D] [--set KEY=VALUE ...] [--workers K] [--storage URL]

Settings resolve in this order, later ones winning: the preset, the --config YAML file,
the dedicated flags (--epochs, --lr, ...), then each --set KEY=VALUE.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, NoReturn

from cifarlab import config as cfg
from cifarlab import settings_rules
from cifarlab.errors import TrainingFailed, TrainingInterrupted, UserError
from cifarlab.presets import PRESETS, get_preset

# Dedicated flags and the setting each one sets.
TRAIN_FLAGS: dict[str, tuple[str, type, str]] = {
    "data": ("data.source", str, "training images: cifar10, cifar100, synthetic[:N], or a path"),
    "test_data": ("data.test_source", str, "test images (default: the source's own test split)"),
    "data_root": ("data.root", str, "where downloads and the decode cache go (default ./data)"),
    "limit": ("data.limit", int, "train on a class-balanced random subset of N images"),
    "loader": ("data.loader", str, "auto, torchvision (per image, CPU workers) or resident "
               "(data set on the device, augmented per batch there)"),
    "workers": ("data.workers", int, "DataLoader worker processes (-1: automatic)"),
    "model": ("model.name", str, "architecture (default resnet18); cifarlab models lists them"),
    "teacher": ("distill.teacher", str, "distil from this checkpoint or run folder (its "
                "best.pt): same classes and data as the student"),
    "epochs": ("epochs", int, "maximum number of epochs"),
    "batch_size": ("batch_size", int, "images per optimizer step"),
    "lr": ("optim.lr", float, "peak learning rate"),
    "seed": ("seed", int, "seed for weights, shuffling and augmentation"),
    "device": ("device", str, "auto, cpu or cuda"),
    "threads": ("threads", int, "CPU threads for the training steps (0: PyTorch's default, "
                "one per core)"),
    "amp": ("amp", str, "mixed precision: auto, fp16, bf16 or off"),
    "compile": ("compile", str, "torch.compile the training step: off, default, "
                "reduce-overhead (CUDA graphs) or max-autotune"),
    "out": ("out", str, "folder of run folders (default runs)"),
    "name": ("name", str, "run folder name (default <preset>-<timestamp>)"),
}


WIDTH_HELP = ("model.width: 64 is each model's published width, W scales its channels by "
              "W/64 (a ResNet-18's base width is W)")


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cifarlab: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cifarlab", description="Train and inspect CIFAR-10-style image classifiers."
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)

    train = commands.add_parser("train", help="train a model; writes a run folder")
    add_recipe_flags(train, "starting recipe (default seed)")
    train.add_argument("--gpus", type=int, metavar="N",
                       help="train on N GPUs through torchrun (with --device cpu: N processes)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run from its last.pt, exactly where it stopped")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: accept settings that differ from the run's")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as YAML and exit")

    evaluate = commands.add_parser("evaluate", help="accuracy of a checkpoint on some data")
    evaluate.add_argument("checkpoint", help="a checkpoint, a run folder (its best.pt), or an "
                          ".onnx file from export or quantize")
    evaluate.add_argument("--data", required=True, metavar="SPEC",
                          help="images to score (a source's test split when it has one)")
    evaluate.add_argument("--data-root", default="data")
    evaluate.add_argument("--device", default="auto", choices=settings_rules.DEVICES)
    evaluate.add_argument("--batch-size", type=int, default=1024)
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
    plot.add_argument("-o", "--output", default="curves.png", metavar="FILE",
                      help="PNG, SVG or PDF, by the extension (default curves.png)")

    compare = commands.add_parser(
        "compare", help="table and figure comparing runs",
        description="Results, each run's delta against the first, and the settings that "
                    "differ; the figure shows validation accuracy and learning rate.")
    compare.add_argument("runs", nargs="+", metavar="RUN", help="run folders; the first is "
                         "the reference (with --variants: run folders, checkpoints, .onnx files)")
    compare.add_argument("--markdown", action="store_true", help="print a Markdown table")
    compare.add_argument("-o", "--output", metavar="FILE", help="the figure: PNG, SVG or PDF "
                         "(default comparison.png; with --variants variants.png)")
    variants = compare.add_argument_group(
        "variants", "--variants: accuracy against MACs, parameters, file size and CPU latency "
        "of models (a baseline, pruned, distilled, exported, int8), Pareto fronts marked")
    variants.add_argument("--variants", action="store_true",
                          help="compare the given models as variants of one model")
    variants.add_argument("--data", metavar="SPEC", help="score .onnx files on the validation "
                          "split of their run, drawn from SPEC (default: what export or "
                          "quantize recorded)")
    variants.add_argument("--data-root", default="data")
    variants.add_argument("--threads", type=int, help="threads for every runtime (default: all)")
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
    predict.add_argument("checkpoint", help="a checkpoint, a run folder (its best.pt), or an "
                         ".onnx file from export or quantize (then only onnxruntime is used)")
    predict.add_argument("images", nargs="+", metavar="IMAGE", help="PNG, JPEG, ... files")
    predict.add_argument("--topk", type=int, default=3,
                         help="how many of the most probable classes to show (default 3; "
                              "more than there are shows them all)")
    predict.add_argument("--device", default="auto", choices=settings_rules.DEVICES)
    predict.add_argument("--json", action="store_true", help="print JSON")
    add_deploy_commands(commands)
    add_prune_command(commands)
    add_study_commands(commands)
    return parser


def add_recipe_flags(parser: argparse.ArgumentParser, preset_help: str) -> None:
    """The flags that set a training run's settings (resolve_config reads them)."""
    parser.add_argument("--preset", choices=sorted(PRESETS), help=preset_help)
    parser.add_argument("--config", metavar="FILE", help="YAML file of settings")
    parser.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any setting, e.g. --set model.width=16")
    for flag, (key, kind, text) in TRAIN_FLAGS.items():
        parser.add_argument("--" + flag.replace("_", "-"), type=kind, help=f"{text} [{key}]")
    parser.add_argument("--deterministic", action="store_true", default=None,
                        help="deterministic CUDA kernels, repeatable runs (slower) "
                             "[deterministic]")
    parser.add_argument("--tensorboard", action="store_true", default=None,
                        help="write TensorBoard scalars and hyperparameters under "
                             "<run>/tensorboard [tensorboard]")


def add_prune_command(commands: Any) -> None:
    prune = commands.add_parser(
        "prune", help="remove channels from a trained model, then fine-tune it; writes a run "
        "folder")
    prune.add_argument("checkpoint", help="a checkpoint or a run folder (its best.pt)")
    target = prune.add_mutually_exclusive_group(required=True)
    target.add_argument("--target-macs", type=float, metavar="F",
                        help="keep this fraction of the model's MACs (e.g. 0.5)")
    target.add_argument("--target-params", type=float, metavar="F",
                        help="keep this fraction of the model's parameters")
    target.add_argument("--ratio", type=float, metavar="R",
                        help="remove this fraction of each layer's channels")
    prune.add_argument("--importance", default="magnitude",
                       choices=["magnitude", "taylor", "bn-scale"],
                       help="how channels are ranked (default magnitude)")
    prune.add_argument("--steps", type=int, default=1, metavar="K",
                       help="prune in K rounds, ranking the channels again after each")
    prune.add_argument("--round-to", type=int, default=8, metavar="N",
                       help="keep multiples of N channels in each layer (default 8)")
    add_recipe_flags(prune, "fine-tune with this recipe instead of the checkpoint's own "
                     "(the model stays the checkpoint's)")


def add_study_commands(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep", help="run (or continue) a study of settings on Optuna",
        description="Each trial trains one point of the study's space with one seed into a "
                    "run folder of the study folder; started again, the study continues.")
    sweep.add_argument("study", metavar="STUDY.yaml", help="the study file")
    sweep.add_argument("--out", metavar="DIR",
                       help="the study folder (default runs/<study file name>)")
    sweep.add_argument("--data", metavar="SPEC", help="training images for every trial "
                       "[data.source]")
    sweep.add_argument("--workers", type=int, metavar="K", help="trials at a time on this "
                       "machine (one GPU each where there are K, else a share of the CPU)")
    sweep.add_argument("--storage", metavar="URL", help="a PostgreSQL or MySQL database "
                       "every machine reaches: the same command on each joins the study "
                       "(default: the journal file in the study folder)")
    sweep.add_argument("--worker", type=int, help=argparse.SUPPRESS)  # one of --workers

    study = commands.add_parser(
        "study", help="a study's results by point: mean, sd and 95%% CI over seeds",
        description="Writes STUDY_DIR/study.md (also printed) and Optuna's figures beside it.")
    study.add_argument("folder", metavar="STUDY_DIR", help="the folder cifarlab sweep wrote")
    study.add_argument("--storage", metavar="URL", help="the database the sweep used, if any")
    ablate = commands.add_parser(
        "ablate", help="the seed's enhancements added to the baseline one at a time and all "
                       "together, N seeds each; a study with error bars",
        description="Writes a study (study.yaml with variants) into --out, runs it like "
                    "cifarlab sweep (started again, it continues), then summarises it like "
                    "cifarlab study.")
    ablate.add_argument("--seeds", type=int, default=3, help="seeds per variant (default 3)")
    ablate.add_argument("--variants", metavar="A,B",
                        help="only these variants besides the baseline (default all: augment, "
                             "label-smoothing, warmup-cosine, all)")
    ablate.add_argument("--out", metavar="DIR", help="the study folder (default runs/ablation)")
    for flag in ("data", "epochs", "limit", "device"):
        key, kind, text = TRAIN_FLAGS[flag]
        ablate.add_argument("--" + flag, type=kind, help=f"{text} [{key}]")
    ablate.add_argument("--workers", type=int, metavar="K",
                        help="trials at a time, as cifarlab sweep --workers")
    ablate.add_argument("--storage", metavar="URL", help="a database shared by many machines, "
                        "as cifarlab sweep --storage")
    ablate.add_argument("--set", dest="overrides", action="append", default=[],
                        metavar="KEY=VALUE", help="any setting for every variant, e.g. --set "
                        "model.width=16; one an enhancement changes sets the enhanced "
                        "variants' value, e.g. --set optim.warmup_epochs=1")


def add_deploy_commands(commands: Any) -> None:
    export = commands.add_parser(
        "export", help="a checkpoint as one checked file: ONNX, pt2 or safetensors",
        description="Input: RGB float in [0, 1], NCHW, any batch (normalisation in the graph); "
                    "output: logits. The file is checked against PyTorch before it is written.")
    export.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.pt)")
    export.add_argument("-o", "--output", metavar="FILE",
                        help="default: beside the checkpoint, e.g. runs/x/best.onnx")
    export.add_argument("--format", default="onnx", choices=["onnx", "pt2", "safetensors"])
    export.add_argument("--exporter", choices=["dynamo", "torchscript"],
                        help="ONNX exporter (default: dynamo, torchscript when dynamo's file "
                             "fails the check)")
    export.add_argument("--data", metavar="SPEC", help="real images for the parity check "
                        "(default: a seeded random batch)")
    export.add_argument("--data-root", default="data")

    quantize = commands.add_parser(
        "quantize", help="int8 ONNX model (onnxruntime static quantization), accuracy-checked",
        description="Calibrates on training images of the checkpoint's own split, tries the "
                    "int8 formats that suit this CPU and writes the fastest within --max-drop "
                    "points of float32's validation accuracy.")
    quantize.add_argument("checkpoint", help="a checkpoint, or a run folder (its best.pt)")
    quantize.add_argument("--data", required=True, metavar="SPEC",
                          help="the data the checkpoint was trained on (its split is redrawn)")
    quantize.add_argument("-o", "--output", metavar="FILE",
                          help="default: beside the checkpoint, e.g. runs/x/best.int8.onnx")
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
                          choices=["auto", "qdq-u8s8", "qdq-s8s8", "qoperator-u8s8"],
                          help="auto: the fastest that passes, measured here; a named one: only "
                               "that one")
    quantize.add_argument("--threads", type=int, help="threads for timing (default: all)")
    quantize.add_argument("--data-root", default="data")

    bench = commands.add_parser(
        "bench", help="CPU latency, throughput and accuracy of checkpoints and .onnx files",
        description="Batch-1 latency (median, p90) and batch-64 throughput, every runtime "
                    "pinned to the same thread count.")
    bench.add_argument("models", nargs="+", metavar="MODEL",
                       help="checkpoints, run folders (torch eager) and .onnx files")
    bench.add_argument("--data", metavar="SPEC", help="score accuracy: the source's test "
                       "split, or the models' own validation split when it has none")
    bench.add_argument("--data-root", default="data")
    bench.add_argument("--threads", type=int, help="threads for every runtime (default: all)")
    bench.add_argument("--json", action="store_true", help="print JSON")
    bench.add_argument("-o", "--output", metavar="FIGURE",
                       help="also draw accuracy against latency (PNG, SVG or PDF)")


# Settings that may differ on --resume without --allow-changes: they change nothing the
# run computes (the loader's output does not depend on the number of workers).
RESUME_FREE = ("data.workers", "out", "name", "stop_grace", "tensorboard")


def resolve_config(args: argparse.Namespace, base: cfg.Config | None = None) -> cfg.Config:
    file_settings = cfg.load_yaml(args.config) if args.config else {}
    config = base or get_preset(args.preset or file_settings.get("preset", "seed"))
    config = cfg.apply_dict(config, file_settings)
    for flag, (key, _, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            config = cfg.apply_dict(config, cfg.nest(key, value))
    if args.deterministic:
        config = cfg.apply_dict(config, {"deterministic": True})
    if args.tensorboard:
        config = cfg.apply_dict(config, {"tensorboard": True})
    for text in args.overrides:
        config = cfg.apply_dict(config, cfg.parse_override(text))
    return config.validate()


def sets(args: argparse.Namespace, key: str) -> bool:
    """Whether the command line sets `key`: by its dedicated flag or by --set."""
    flag = next((f for f, (k, _, _) in TRAIN_FLAGS.items() if k == key), None)
    return ((flag is not None and getattr(args, flag) is not None)
            or any(text.partition("=")[0].strip() == key for text in args.overrides))


def resume_config(args: argparse.Namespace) -> cfg.Config:
    """The run's own config, with the changes given on the command line if allowed."""
    if args.preset:
        raise UserError("--resume continues a run with its own settings; drop --preset")
    from cifarlab.checkpoint import check_run_files

    saved_path = Path(args.resume) / "config.yaml"
    check_run_files(args.resume)
    if not saved_path.is_file():
        raise UserError(f"--resume {args.resume}: no config.yaml there; give a run folder")
    saved = cfg.from_dict(cfg.load_yaml(saved_path, where=str(saved_path)))
    config = resolve_config(args, base=saved)
    changes = cfg.differences(saved, config, ignore=RESUME_FREE)
    if changes and not args.allow_changes:
        raise UserError(f"--resume {args.resume}: settings differ from the run's "
                        f"({'; '.join(changes)}); add --allow-changes to resume with them")
    return config


def without_option(argv: list[str], option: str) -> list[str]:
    """`argv` less `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == option:
            skip = True
        elif not token.startswith(option + "="):
            out.append(token)
    return out


def launch_torchrun(args: argparse.Namespace, config: cfg.Config, argv: list[str]) -> NoReturn:
    """Replace this process by torchrun running the same command once per GPU. The run
    folder name is fixed here so that every worker, and every restart, uses the same one."""
    import torch

    from cifarlab.rundir import run_dir_for

    check_range("--gpus", args.gpus, 1, None, 1)
    if config.device != "cpu" and torch.cuda.device_count() < args.gpus:
        raise UserError(f"--gpus {args.gpus}: only {torch.cuda.device_count()} CUDA GPUs are "
                        "visible; lower --gpus (or use --device cpu for CPU processes)")
    command = without_option(argv, "--gpus")
    if not args.resume and not args.name:
        command += ["--name", run_dir_for(config).name]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                f"--nproc-per-node={args.gpus}", "-m", "cifarlab", *command]
    sys.stdout.flush()
    os.execv(sys.executable, torchrun)


def cmd_train(args: argparse.Namespace) -> int:
    from cifarlab.train import fit  # torch-heavy imports only for the commands that need them

    config = resume_config(args) if args.resume else resolve_config(args)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.resume and config.distill.teacher and not args.allow_changes:
        from cifarlab.training.distill import check_same_teacher

        check_same_teacher(args.resume, config.distill.teacher)
    if args.gpus is not None:
        launch_torchrun(args, config, args.argv)
    fit(config, resume=args.resume)
    return 0


def check_range(flag: str, value: int | None, low: int, high: int | None, example: int
                ) -> None:
    """A command's numeric flag in [low, high] (None: not given): UserError naming it and a
    valid value."""
    if value is None:
        return
    if value < low or (high is not None and value > high):
        bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise UserError(f"{flag} {value}: must be {bounds}; e.g. {flag} {example}")


def checkpoint_file(given: str) -> Path:
    """The checkpoint a command reads: the file given, or a run folder's best.pt (said on
    stderr, so that the output stays the command's own)."""
    from cifarlab import checkpoint

    path = checkpoint.in_run_folder(given)
    if path != Path(given):
        print(f"using {path}", file=sys.stderr)
    return path


def cmd_evaluate(args: argparse.Namespace) -> int:
    from cifarlab.data.sources import load_source

    check_range("--batch-size", args.batch_size, 1, None, 1024)
    onnx = Path(args.checkpoint).suffix == ".onnx"
    path = Path(args.checkpoint) if onnx else checkpoint_file(args.checkpoint)
    label_set = "fine"
    if onnx:  # onnxruntime only: no torch import on this path
        from cifarlab.deploy.runtime import OnnxClassifier, evaluate_onnx

        model = OnnxClassifier(path)
        classes = model.classes
        label_set = model.meta("split", {}).get("label_set", "fine")
    else:
        from cifarlab import checkpoint

        ckpt = checkpoint.load(path)
        model = checkpoint.build_model(ckpt, path)
        classes = ckpt["classes"]
        # CIFAR-100 is scored with the labels the model learned (fine or coarse).
        label_set = ((ckpt.get("config") or {}).get("data") or {}).get("label_set", "fine")
    source = load_source(args.data, args.data_root, label_set=label_set)
    data = source.test if source.test is not None else source.train
    if data.classes != classes:
        raise UserError(f"--data {args.data}: classes {data.classes} do not match the "
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
    if args.json:
        print(json.dumps({"images": int(len(data.labels)), "acc": result.acc,
                          "per_class_acc": per_class, "loss": result.loss}, indent=2))
        return 0
    print(f"{path}: {result.acc:.2f}% of {len(data.labels):,} images correct")
    for name, acc in per_class.items():
        print(f"  {name:<16} {acc:6.2f}%")
    return 0


def cmd_summary(args: argparse.Namespace) -> int:
    from cifarlab.profile import profile_model

    check_range("--width", args.width, 1, settings_rules.MAX_WIDTH, 64)
    check_range("--classes", args.classes, 2, None, 10)
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

    print(f"wrote {save_figure(curves_figure(read_runs(args.runs)), args.output)}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from cifarlab.comparison import comparison_tables
    from cifarlab.document import markdown_table, text_table
    from cifarlab.plots import comparison_figure, save_figure
    from cifarlab.runs import read_runs

    if args.variants:
        return compare_variants(args)
    given = [f for f in ("data", "threads", "json", "report") if getattr(args, f)]
    if given:
        raise UserError(f"--{given[0]} is for --variants only; add --variants or drop it")
    if len(args.runs) < 2:
        raise UserError("compare needs at least two run folders; to look at one, use "
                        "cifarlab plot or cifarlab report")
    runs = read_runs(args.runs)
    render = markdown_table if args.markdown else text_table
    for table in comparison_tables(runs):
        print(render(table), end="\n\n")
    print(f"Deltas against {runs[0].label}: accuracy in percentage points, time in seconds.")
    print(f"wrote {save_figure(comparison_figure(runs), args.output or 'comparison.png')}")
    return 0


def compare_variants(args: argparse.Namespace) -> int:
    from cifarlab.deploy import variants
    from cifarlab.plots import save_figure

    check_range("--threads", args.threads, 1, None, 2)
    output = args.output or variants.VARIANTS_PNG
    variants.check_outputs(output, args.report)
    result = variants.compare_variants(args.runs, args.threads, args.data, args.data_root)
    print(result.to_json() if args.json else variants.text(result, markdown=args.markdown))
    said = sys.stderr if args.json else sys.stdout
    print(f"wrote {save_figure(variants.figure(result), output)}", file=said)
    if args.report:
        html = variants.write_report(result, args.report)
        print(f"wrote {html.with_suffix('.md')} and {html}", file=said)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cifarlab.report import write_report

    path = write_report(args.run, against=args.against)
    print(f"wrote {path.with_suffix('.md')} and {path}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cifarlab.predict import predict_files

    check_range("--topk", args.topk, 1, None, 3)
    if Path(args.checkpoint).suffix == ".onnx":  # onnxruntime only: no torch import
        results = predict_files(args.checkpoint, args.images, topk=args.topk)
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


def cmd_export(args: argparse.Namespace) -> int:
    from cifarlab.deploy.export import PARITY_ATOL, PARITY_RTOL, export

    result = export(args.checkpoint, args.output, args.format, args.data, args.data_root,
                    args.exporter)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    how = f" ({result.exporter} exporter)" if result.exporter else ""
    print(f"wrote {result.path}{how}: logits within {result.max_abs_diff:.2g} of PyTorch's "
          f"(tolerance {PARITY_ATOL:g} + {PARITY_RTOL:g} x max |logit|), same top-1 on "
          f"{result.images} {'images' if args.data else 'random images'}")
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from cifarlab.deploy.quantize import quantize

    check_range("--threads", args.threads, 1, None, 2)
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

    check_range("--threads", args.threads, 1, None, 2)
    if args.output:  # refused before minutes of measuring, not after
        from cifarlab.plots import FORMATS

        figure_path = Path(args.output)
        if figure_path.suffix.lower() not in FORMATS or not figure_path.parent.is_dir():
            raise UserError(f"-o {figure_path}: give a .png, .svg or .pdf file in an existing "
                            "folder")
    result = bench(args.models, args.threads, args.data, args.data_root)
    print(result.to_json() if args.json else result.table())
    if args.output:
        from cifarlab.plots import save_figure

        print(f"wrote {save_figure(figure(result), args.output)}",
              file=sys.stderr if args.json else sys.stdout)
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from cifarlab.studies.sweep import sweep

    check_range("--workers", args.workers, 1, 1024, 4)
    sweep(args.study, out=args.out, data_source=args.data, workers=args.workers or 1,
          storage=args.storage, worker=args.worker)
    return 0


def cmd_study(args: argparse.Namespace) -> int:
    from cifarlab.studies.summary import SUMMARY_FILE, summarize_study

    text, notes = summarize_study(args.folder, args.storage)
    print(text)
    for note in notes:
        print(note)
    print(f"wrote {Path(args.folder) / SUMMARY_FILE}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from cifarlab.studies.ablate import ablate, parse_sets
    from cifarlab.studies.spec import MAX_SEEDS

    check_range("--seeds", args.seeds, 1, MAX_SEEDS, 3)
    settings = {TRAIN_FLAGS[flag][0]: getattr(args, flag)
                for flag in ("data", "epochs", "limit", "device")
                if getattr(args, flag) is not None}
    settings.update(parse_sets(args.overrides))
    names = None
    if args.variants is not None:
        names = [n.strip() for n in args.variants.split(",") if n.strip()]
    check_range("--workers", args.workers, 1, 1024, 4)
    folder, text, notes = ablate(args.seeds, settings, args.out, names,
                                 workers=args.workers or 1, storage=args.storage)
    print(text)
    for note in notes:
        print(note)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from cifarlab import checkpoint
    from cifarlab.compress.prune import (
        check_architecture,
        check_target,
        prune_run,
        recorded_data_path,
        without_paths,
    )

    measure, fraction = next((m, v) for m, v in (("macs", args.target_macs),
                                                 ("params", args.target_params),
                                                 ("ratio", args.ratio)) if v is not None)
    check_target(measure, fraction)
    path = checkpoint_file(args.checkpoint)
    ckpt = checkpoint.load(path)
    check_architecture(ckpt["model_args"], path)
    # The fine-tuning recipe: the checkpoint's own settings less the paths it records
    # (a checkpoint may come from someone else), or the recipe given; the checkpoint's model
    # in either case, and a new run folder (not the parent's name).
    saved = cfg.from_dict(ckpt.get("config") or {})
    recipe = None if args.preset or args.config else without_paths(saved)
    recorded = recorded_data_path(saved)
    if recipe is not None and recorded is not None and not sets(args, "data.source"):
        raise UserError(f"checkpoint {path}: its run trained on data from a path "
                        f"({recorded}), and prune reads no path a checkpoint records; give "
                        "the data with --data PATH")
    config = resolve_config(args, base=recipe)
    name = None if recipe is not None and config.name == saved.name else config.name
    config = dataclasses.replace(config, name=name, model=dataclasses.replace(
        config.model, name=saved.model.name, width=saved.model.width))
    run_dir = prune_run(path, config, measure, fraction, args.importance, args.steps,
                        args.round_to)
    print(f"pruned and fine-tuned model: {run_dir} (prune.json, report.html)")
    return 0


COMMANDS = {"train": cmd_train, "evaluate": cmd_evaluate, "summary": cmd_summary,
            "models": cmd_models, "plot": cmd_plot, "compare": cmd_compare, "report": cmd_report,
            "predict": cmd_predict, "export": cmd_export, "quantize": cmd_quantize,
            "bench": cmd_bench, "prune": cmd_prune, "sweep": cmd_sweep, "study": cmd_study,
            "ablate": cmd_ablate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 tells the story; the others speak up for warnings.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    try:
        args.argv = argv  # the command line as given, for re-running it under torchrun
        return COMMANDS[args.command](args)
    except UserError as e:
        print(f"cifarlab: error: {e}", file=sys.stderr)
        return 2
    except TrainingFailed as e:
        print(f"cifarlab: training failed: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"cifarlab: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("cifarlab: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of our output went away (`cifarlab ... | head`)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except RuntimeError as e:
        if os.environ.get("RANK") is None or not is_collective_failure(e):
            raise
        first_line = str(e).strip().splitlines()[0][:200]
        print(f"cifarlab: rank {os.environ['RANK']}: another process of this job failed "
              f"({first_line}); its own log says why; the last checkpoint is kept and "
              "torchrun --max-restarts resumes from it", file=sys.stderr)
        return 1


def is_collective_failure(error: RuntimeError) -> bool:
    """A broken connection to a peer, as gloo and NCCL report it."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or "gloo" in text or "nccl" in text


if __name__ == "__main__":
    sys.exit(main())
