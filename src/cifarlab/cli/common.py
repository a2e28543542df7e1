"""What the command groups share: the flags that set a training run's settings (train's,
prune's, some of ablate's) and the settings they resolve to, the range check of numeric flags,
and the checkpoint file a command reads.

Settings resolve in this order, later ones winning: the preset, the --config YAML file,
the dedicated flags (--epochs, --lr, ...), then each --set KEY=VALUE.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cifarlab import config as cfg
from cifarlab.errors import UserError
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


def resolve_config(args: argparse.Namespace, base: cfg.Config | None = None) -> cfg.Config:
    """The settings the recipe flags give, over `base` (default: the preset named by --preset
    or the --config file, else seed)."""
    file_settings = cfg.load_yaml(args.config) if args.config else {}
    config = base or get_preset(args.preset or file_settings.get("preset", "seed"))
    config = cfg.apply_dict(config, file_settings)
    named = file_settings.get("name")
    if named and not sets(args, "name") and (Path(config.out) / str(named)).exists():
        # A run's own config.yaml repeats the run: under a new name, not into its folder.
        config = cfg.apply_dict(config, {"name": None})
        print(f"note: --config {args.config} names the run '{named}', whose folder exists in "
              f"{config.out}; this run gets a new name (choose one with --name)",
              file=sys.stderr)
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

