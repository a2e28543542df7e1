"""Speeds measured once per machine and kept, so that a decision taken from a timing (the
CPU precision of `amp auto`, devices.choose) is the same in every run of the same command on
the same machine: two runs of one seed then train alike, whatever the timing noise.

The file is `$XDG_CACHE_HOME/cifarlab/speeds.json` (`~/.cache/cifarlab/speeds.json` without
XDG_CACHE_HOME); each entry is keyed by what the speed depends on (the CPU, torch, threads,
model, batch, layout) and holds the measured ratio. Deleting the file measures again.
Processes that measure the same key at once take turns (an flock): the first measures, the
others read its value. A file that cannot be read or parsed, or that is not a regular file,
is measured anew and replaced; a folder that cannot be written leaves the speed unkept.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from cifarlab.errors import UserError


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "cifarlab"


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), or the platform's word for it."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[bool]:
    """Hold an exclusive flock on `path` (waiting for it); yields False where the lock file
    cannot be made (then nothing is kept)."""
    import fcntl

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o666)
    except OSError:
        yield False
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield True
    finally:
        os.close(fd)  # releases the lock


def _read(path: Path) -> dict[str, float]:
    # Imported here (and checkpoint in kept): devices.py imports this module, and these
    # import the data and model packages, which import devices.
    from cifarlab.data.sources.images import read_regular_file

    if not path.exists():
        return {}
    try:
        entries = json.loads(read_regular_file(path, "speed cache"))
    except (UserError, ValueError):
        return {}
    if not isinstance(entries, dict):
        return {}
    return {k: v for k, v in entries.items() if isinstance(v, (int, float))
            and not isinstance(v, bool) and v > 0}


def kept(key: str, measure: Callable[[], float]) -> tuple[float, bool]:
    """The speed kept under `key`, or `measure()`'s, kept from now on; and whether it was
    kept from before."""
    from cifarlab import checkpoint

    folder = cache_dir()
    path = folder / "speeds.json"
    with _locked(folder / "speeds.json.lock") as locked:
        entries = _read(path) if locked else {}
        if key in entries:
            return float(entries[key]), True
        value = measure()
        if locked:
            entries[key] = value
            text = json.dumps(entries, indent=1, sort_keys=True) + "\n"
            with contextlib.suppress(OSError):
                checkpoint.write_atomic(path, lambda f: f.write(text.encode()))
        return value, False
