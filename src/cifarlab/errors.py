"""Exceptions that end a command with a one-line message instead of a traceback."""


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
