"""The command line: the only package that parses arguments. This module is its entry point
(`cifarlab` and `python -m cifarlab` run `main`): the parser, the table of commands, and how
an error ends a command (its message and exit code).

Each group of commands has a module with its parsers and bodies: train; inspect (evaluate,
summary, models, plot, compare, report, predict); deploy (export, quantize, bench); compress
(prune); studies (sweep, study, ablate). What they share is in common.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from types import FrameType
from typing import NoReturn

from cifarlab import __version__
from cifarlab.cli import compress, deploy, inspect, studies, train
from cifarlab.errors import TrainingFailed, TrainingInterrupted, UserError


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"cifarlab: error: {message}; see {self.prog} --help\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="cifarlab", description="Train and inspect CIFAR-10-style image classifiers."
    )
    parser.add_argument("--version", action="version", version=f"cifarlab {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND",
                                     parser_class=Parser)

    train.add_commands(commands)
    inspect.add_commands(commands)
    deploy.add_commands(commands)
    compress.add_commands(commands)
    studies.add_commands(commands)
    return parser


COMMANDS = {"train": train.cmd_train, "evaluate": inspect.cmd_evaluate,
            "summary": inspect.cmd_summary, "models": inspect.cmd_models,
            "plot": inspect.cmd_plot, "compare": inspect.cmd_compare,
            "report": inspect.cmd_report, "predict": inspect.cmd_predict,
            "export": deploy.cmd_export, "quantize": deploy.cmd_quantize,
            "bench": deploy.cmd_bench, "prune": compress.cmd_prune,
            "sweep": studies.cmd_sweep, "study": studies.cmd_study, "ablate": studies.cmd_ablate}


class Stopped(KeyboardInterrupt):
    """SIGTERM or SIGHUP (a job scheduler, `timeout`, a closed terminal) outside training,
    raised like Ctrl-C's KeyboardInterrupt, so that every `finally` runs: an export, a
    quantize or a report being written removes its temporary files and leaves the old file
    as it was. Training has its own handler (interrupt.StopRequest), which saves last.pt."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_stopped(signum: int, frame: FrameType | None) -> None:
    raise Stopped(signum)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    # Under torchrun only rank 0 tells the story; the others speak up for warnings.
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stdout, force=True)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGHUP):
            if signal.getsignal(sig) in (signal.SIG_DFL, None):  # not taken by a caller
                previous[sig] = signal.signal(sig, _raise_stopped)
    try:
        args.argv = argv  # the command line as given, for re-running it under torchrun
        return COMMANDS[args.command](args)
    except Stopped as e:
        print(f"cifarlab: stopped by {signal.Signals(e.signum).name}; no file was left "
              "half-written", file=sys.stderr)
        return 128 + e.signum
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
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def is_collective_failure(error: RuntimeError) -> bool:
    """A broken connection to a peer, as gloo and NCCL report it."""
    import torch.distributed as dist

    text = str(error).lower()
    return isinstance(error, dist.DistError) or "gloo" in text or "nccl" in text

