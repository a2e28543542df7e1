"""Graceful stop on SIGINT / SIGTERM / SIGHUP, and a way out of a step that never returns.

The first signal asks the training loop to stop after the current step (it saves `last.pt`
and exits 130 / 143 / 129; SIGHUP is a dropped terminal or ssh connection, a stop like
SIGTERM). A second signal exits at once, with the same code. If no batch
finishes for `grace` seconds after the first signal (a step stuck in native code, such as a
hung oneDNN kernel), the process exits on its own, with that code and the stacks of its
threads on stderr. Checkpoints are written atomically, so exiting at any instant leaves the
ones from before intact.

A loop of several trainings (a sweep's worker) watches the signals in `signals_seen`: one
that came during a training stops the loop even when that training ended another way (it
had just finished, or its caller's callback raised first).

Python runs a signal handler only in the main thread between bytecodes, so a main thread
stuck inside one native call never runs it. CPython's C-level handler also writes each
signal's number to a "wakeup fd" (signal.set_wakeup_fd); a watcher thread reads it there
and acts without the main thread (PyTorch releases the GIL inside its kernels).
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import select
import signal
import threading
import time
from collections.abc import Iterator
from types import FrameType

# What stops a run: Ctrl-C, a job scheduler's or `timeout`'s SIGTERM, a dropped terminal.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

_last_progress = time.monotonic()
_DONE = 0  # written to the wakeup pipe by __exit__ (no signal has the number 0)
_seen: list[list[int]] = []  # the lists of the open `signals_seen` blocks


def heartbeat() -> None:
    """Called after each finished batch (training and evaluation): the process is moving."""
    global _last_progress
    _last_progress = time.monotonic()


@contextlib.contextmanager
def signals_seen() -> Iterator[list[int]]:
    """The first signal that each StopRequest entered within the block records, in the order
    they came. Between StopRequests the signals keep their defaults: SIGTERM ends the process
    at once, SIGINT raises KeyboardInterrupt."""
    seen: list[int] = []
    _seen.append(seen)
    try:
        yield seen
    finally:
        _seen[:] = [s for s in _seen if s is not seen]


class StopRequest:
    """While active, records the first of STOP_SIGNALS in `signum` instead of dying; a second
    one, or `grace` seconds without a heartbeat after the first, ends the process at once.
    `note` is added to the line printed then (e.g. how to resume)."""

    SIGNALS = STOP_SIGNALS

    def __init__(self, grace: float = 60.0, note: str = "") -> None:
        self.grace, self.note = grace, note
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._previous_wakeup = -1
        self._pipe: tuple[int, int] | None = None
        self._watcher: threading.Thread | None = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Runs in the main thread when it can; the watcher counts signals and exits.
        self._record(signum)

    def _record(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum
            for seen in _seen:
                seen.append(signum)

    def _watch(self, read_fd: int) -> None:
        received: list[int] = []
        while True:
            timeout = None
            if received:
                timeout = max(0.0, max(_last_progress, self._first_at) + self.grace
                              - time.monotonic())
            ready, _, _ = select.select([read_fd], [], [], timeout)
            if not ready:
                if received:  # grace is over and nothing moved
                    self._exit(received[0], f"no progress for {self.grace:g} s after "
                               f"{signal.Signals(received[0]).name} (a step stuck in native "
                               "code?)", stacks=True)
                continue
            data = os.read(read_fd, 64)
            if not data or data[-1] == _DONE:  # the request is over
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                if not received:
                    self._first_at = time.monotonic()
                    self._record(signum)
                received.append(signum)
                if len(received) >= 2:
                    self._exit(signum, f"second signal ({signal.Signals(signum).name})")

    def _exit(self, signum: int, why: str, stacks: bool = False) -> None:
        parts = [f"cifarlab: {why}: exiting now", self.note,
                 "the stacks of its threads follow" if stacks else ""]
        os.write(2, ("; ".join(p for p in parts if p) + "\n").encode())
        if stacks:
            faulthandler.dump_traceback(all_threads=True)
        os._exit(128 + signum)

    def __enter__(self) -> StopRequest:
        # Signal handlers and the wakeup fd can only be set from the main thread; elsewhere
        # signals keep their default behaviour.
        if threading.current_thread() is not threading.main_thread():
            return self
        self._first_at = time.monotonic()
        self._pipe = os.pipe()
        os.set_blocking(self._pipe[0], False)
        os.set_blocking(self._pipe[1], False)
        self._previous_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        self._watcher = threading.Thread(target=self._watch, args=(self._pipe[0],),
                                         name="cifarlab-stop-watcher", daemon=True)
        self._watcher.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pipe is None:
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        signal.set_wakeup_fd(self._previous_wakeup)
        # A byte, not closing the pipe: forked DataLoader workers may hold its write end.
        os.write(self._pipe[1], bytes([_DONE]))
        if self._watcher is not None:
            self._watcher.join()
        os.close(self._pipe[0])
        os.close(self._pipe[1])
        self._pipe = self._watcher = None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""


def worker_signals(worker_id: int) -> None:
    """DataLoader worker init. A signal to the whole process group (Ctrl-C, `timeout`,
    Slurm's scancel, `kill -- -PGID`, a dropped terminal) reaches the workers too, but only
    the main process decides when to stop: it saves last.pt and shuts the loader down, and a
    worker killed by the signal would break the loader first (`DataLoader worker ... is
    killed by signal`). So the workers ignore the stop signals, but for one: the SIGTERM
    their own parent sends, which is how the loader ends a worker stuck at shutdown
    (`terminate`). A forked worker also inherits the main process's handlers and wakeup fd,
    which must not see the worker's signals."""
    inherited = signal.set_wakeup_fd(-1)
    if inherited != -1:
        os.close(inherited)
    if not hasattr(signal, "sigwaitinfo"):  # macOS: no sender to tell apart; ignore them all
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        return
    # Blocked here, before any other thread of the worker starts (threads inherit the mask),
    # and taken by one thread that sees who sent each. Only the main thread may set a
    # disposition: SIGTERM's default (death) is set now, for when that thread lets one in.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    threading.Thread(target=_worker_signal_loop, args=(os.getppid(),), daemon=True,
                     name="cifarlab-worker-signals").start()


def _worker_signal_loop(parent: int) -> None:
    while True:
        info = signal.sigwaitinfo(STOP_SIGNALS)
        if info.si_signo == signal.SIGTERM and info.si_pid == parent:
            # Die by the signal itself, as the loader expects of `terminate`: this thread
            # alone lets it in.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGTERM])
            os.kill(os.getpid(), signal.SIGTERM)
