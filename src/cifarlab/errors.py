"""The one exception type for bad input from the user."""


class UserError(Exception):
    """Bad input (a setting, a path, a file's contents).

    The message is one line that names the problem and the fix; the CLI prints it
    without a traceback and exits with code 2.
    """
