"""Exceptions that end a command with a one-line message instead of a traceback."""

from __future__ import annotations

import importlib
from types import ModuleType


class UserError(Exception):
    """Bad input (a setting, a path, a file's contents): exit code 2.

    The message is one line that names the problem and the fix; it is raised before
    anything is written.
    """


class TrainingFailed(Exception):
    """Training cannot go on (non-finite loss, a checkpoint that cannot be written):
    exit code 1. The last good checkpoints are kept; the message says what to change."""


class TrainingInterrupted(Exception):
    """A SIGINT, SIGTERM or SIGHUP stopped training after saving `last.pt`: exit code 128 +
    signal."""

    def __init__(self, message: str, signum: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signum


def import_package(module: str, package: str, needed_by: str, install: str) -> ModuleType:
    """`import module`, for a package that only some commands need; missing, a UserError that
    names the package and the command that installs it (before the command writes anything,
    where it is called first)."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        missing = getattr(e, "name", None) or module
        why = ("" if missing.split(".")[0] == module.split(".")[0]
               else f" (its dependency {missing} is missing)")
        raise UserError(f"{needed_by} needs the {package} package{why}; install it with: "
                        f"{install}") from None
