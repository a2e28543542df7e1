"""One process at a time in a folder: an exclusive lock on a file in it.

`hold` takes a `flock` on the lock file for as long as its block runs, and writes the
holder (host:pid) into it for the message another process gets. The kernel releases the
lock when the process ends, however it ends (SIGKILL included), so a crashed holder leaves
no stale lock to clean up; the file itself stays, empty (removing it would let a process
that opened it before the removal hold a lock that no later process sees).

`cifarlab sweep` holds its study folder this way, `train` (`fit`) its run folder.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

from cifarlab.errors import UserError


def worker_id() -> str:
    """This process, as a lock's holder is named: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


@contextlib.contextmanager
def hold(path: str | Path, busy: Callable[[str], str]) -> Iterator[None]:
    """Hold the lock file `path` (created if need be) while the block runs. Held by another
    process: UserError(busy(its holder)) at once, nothing else written."""
    import fcntl  # POSIX only; imported where a lock is taken

    path = Path(path)
    try:  # O_NOFOLLOW: a symbolic link put in the lock's place is refused, not followed
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError as e:
        raise UserError(f"cannot take the lock {path} ({e.strerror or e}); make it a regular "
                        "file in a writable folder") from None
    with os.fdopen(fd, "r+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UserError(busy(f.read().strip() or "another process")) from None
        f.truncate(0)
        f.write(worker_id())
        f.flush()
        try:
            yield
        finally:
            f.seek(0)
            f.truncate(0)
            # Unlocked, not only closed: a process forked meanwhile (a DataLoader worker)
            # shares the open file, and closing ours alone would leave it locked.
            fcntl.flock(f, fcntl.LOCK_UN)
