"""cifarlab train: its flags, the settings of a resumed run, and the launch of the same
command under torchrun (--gpus).

    cifarlab train     [--preset NAME] [--config FILE] [--set KEY=VALUE ...] [flags]
    cifarlab train     --resume RUN_DIR [--allow-changes] [changed settings]
    cifarlab train     --teacher CHECKPOINT|RUN_DIR [...]   (knowledge distillation)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, NoReturn

from cifarlab import config as cfg
from cifarlab.cli.common import add_recipe_flags, check_range, checkpoint_file, resolve_config, sets
from cifarlab.errors import UserError


def add_commands(commands: Any) -> None:
    train = commands.add_parser("train", help="train a model; writes a run folder")
    add_recipe_flags(train, "starting recipe (default seed)")
    train.add_argument("--gpus", type=int, metavar="N",
                       help="train on N GPUs through torchrun (with --device cpu: N processes)")
    train.add_argument("--resume", metavar="RUN_DIR",
                       help="continue a run from its last.pt, exactly where it stopped")
    train.add_argument("--init-from", metavar="CHECKPOINT",
                       help="a new run that starts from a trained checkpoint's weights (or a "
                            "run folder's best.pt), with its own schedule: fine-tuning; data "
                            "of another number of classes gets a new classifier")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: accept settings that differ from the run's")
    train.add_argument("--print-config", action="store_true",
                       help="print the resolved settings as YAML and exit")


# Settings that may differ on --resume without --allow-changes: they change nothing the
# run computes (the loader's output does not depend on the number of workers).
RESUME_FREE = ("data.workers", "out", "name", "stop_grace", "tensorboard")


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
    try:  # a damaged file is named as such, not taken for a setting given on the command line
        saved.validate()
    except UserError as e:
        raise UserError(f"{saved_path}: {e}; the run's saved settings are damaged, so it "
                        "cannot be resumed; start a new run") from None
    last = Path(args.resume) / "last.pt"
    if not args.allow_changes and last.is_file():
        # config.yaml and last.pt are written from one config: a file cut short (its missing
        # settings would take their defaults) or edited by hand differs from last.pt's.
        from cifarlab import checkpoint

        held = checkpoint.load(last).get("config")
        drift = cfg.differences(cfg.from_dict(held), saved) if isinstance(held, dict) else []
        if drift:
            raise UserError(f"{saved_path}: its settings differ from those {last} was saved "
                            f"with ({'; '.join(drift[:3])}{'; ...' if len(drift) > 3 else ''})"
                            "; the file is damaged or was edited: restore it, or add "
                            "--allow-changes to resume with the file's settings")
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
    initial = None
    if args.init_from:
        config, initial = init_from(args, config)
    if args.print_config:
        print(config.to_yaml(), end="")
        return 0
    if args.resume and config.distill.teacher and not args.allow_changes:
        from cifarlab.training.distill import check_same_teacher

        check_same_teacher(args.resume, config.distill.teacher)
    if args.gpus is not None:
        launch_torchrun(args, config, args.argv)
    fit(config, resume=args.resume, initial=initial)
    return 0


def init_from(args: argparse.Namespace, config: cfg.Config) -> tuple[cfg.Config, dict]:
    """The settings and starting weights of `train --init-from`: the checkpoint's
    architecture (a pruned one's too), its model named in the settings."""
    from cifarlab import checkpoint

    if args.resume:
        raise UserError("--init-from starts a new run and --resume continues one; give one")
    path = checkpoint_file(args.init_from)
    ckpt = checkpoint.load(path)
    checkpoint.build_model(ckpt, path)  # its architecture arguments checked, as any model's
    name = ckpt["model_args"]["name"]
    if sets(args, "model.name") and config.model.name != name:
        raise UserError(f"--init-from {args.init_from}: its model is {name}, not "
                        f"{config.model.name}; drop --model, or start from a "
                        f"{config.model.name} checkpoint")
    width = ckpt["model_args"].get("width", config.model.width)
    print(f"starting from the weights of {path} ({name} width {width}, "
          f"{len(ckpt['classes'])} classes)", file=sys.stderr)
    config = cfg.apply_dict(config, {"model": {"name": name, "width": width}})
    return config, {"model_args": ckpt["model_args"], "model": ckpt["model"]}

