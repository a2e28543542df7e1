"""The commands of studies of settings on Optuna: sweep runs (or continues) one, study
summarises one, ablate writes, runs and summarises the study of the seed's enhancements.

    cifarlab sweep     STUDY.yaml [--out DIR] [--data SPEC] [--limit N] [--test-data SPEC]
                       [--workers K] [--storage URL]
    cifarlab study     STUDY_DIR [--storage URL]
    cifarlab ablate    [--seeds N] [--variants A,B] [--out DIR] [--data SPEC] [--epochs N]
                       [--limit N] [--device D] [--set KEY=VALUE ...] [--workers K] [--storage URL]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from cifarlab.cli.common import TRAIN_FLAGS, check_range

# The flags of TRAIN_FLAGS that ablate takes too; they set every variant.
ABLATE_FLAGS = ("data", "epochs", "limit", "device")


def add_commands(commands: Any) -> None:
    sweep = commands.add_parser(
        "sweep", help="run (or continue) a study of settings on Optuna",
        description="Each trial trains one point of the study's space with one seed into a "
                    "run folder of the study folder; started again, the study continues.")
    sweep.add_argument("study", metavar="STUDY.yaml", help="the study file")
    sweep.add_argument("--out", metavar="DIR",
                       help="the study folder (default runs/<study file name>)")
    sweep.add_argument("--data", metavar="SPEC", help="training images for every trial "
                       "[data.source]")
    sweep.add_argument("--limit", type=int, metavar="N", help="use only N training images "
                       "in every trial [data.limit]")
    sweep.add_argument("--test-data", metavar="SPEC", help="test images for every trial "
                       "[data.test_source]")
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
    for flag in ABLATE_FLAGS:
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


def cmd_sweep(args: argparse.Namespace) -> int:
    from cifarlab.studies.sweep import sweep
    from cifarlab.studies.workers import SWEEP_FLAGS

    check_range("--workers", args.workers, 1, 1024, 4)
    given = {key: getattr(args, flag.lstrip("-").replace("-", "_"))
             for key, flag in SWEEP_FLAGS.items()}
    sweep(args.study, out=args.out, overrides={k: v for k, v in given.items() if v is not None},
          workers=args.workers or 1, storage=args.storage, worker=args.worker)
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
    settings = {TRAIN_FLAGS[flag][0]: getattr(args, flag) for flag in ABLATE_FLAGS
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

