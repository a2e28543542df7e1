"""cifarlab prune: structured channel pruning of a trained model (to a fraction of its MACs
or parameters, or by a ratio of each layer's channels), then fine-tuning with the checkpoint's
own recipe (less the paths it records) or the one given.

    cifarlab prune     CHECKPOINT|RUN_DIR (--target-macs F | --target-params F | --ratio R)
                       [--importance magnitude|taylor|bn-scale] [--steps K] [--round-to N]
                       [train's flags: --data, --epochs, --set KEY=VALUE, ...]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from cifarlab import config as cfg
from cifarlab.cli.common import add_recipe_flags, checkpoint_file, resolve_config, sets
from cifarlab.errors import UserError


def add_commands(commands: Any) -> None:
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
