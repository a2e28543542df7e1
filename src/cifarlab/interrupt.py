"""Graceful stop on SIGINT / SIGTERM: the first one asks the training loop to stop after
the current step (it saves `last.pt` and exits 130 / 143); a second one exits at once.
Checkpoints are written atomically, so exiting at any instant leaves no broken file."""

from __future__ import annotations

import os
import signal
import threading
from types import FrameType


class StopRequest:
    """While active, records the first SIGINT/SIGTERM in `signum` instead of dying."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None:  # the second signal: leave now
            os._exit(128 + signum)
        self.signum = signum

    def __enter__(self) -> StopRequest:
        # Signal handlers can only be set from the main thread; elsewhere signals keep
        # their default behaviour.
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def ignore_sigint_in_worker(worker_id: int) -> None:
    """DataLoader worker init: Ctrl-C reaches the whole process group, but only the main
    process decides when to stop; a worker killed by it would break the loader."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
