"""Several trials at a time: workers that share one study's storage.

`cifarlab sweep --workers K` starts K worker processes on this machine (each re-runs the
sweep with a hidden --worker flag), each with one GPU where there are K or more, otherwise
its share of the CPU's threads. Every worker runs the same loop (`sweep.work`): take a
queued trial, or start a new one, until the study has its budget of finished runs; while
the last trials run elsewhere it waits, so that it can take over one whose worker dies.
With --storage the same command on many machines joins the same study.

Three rules keep the count exact with workers that start and finish at once:
- `claim`: a trial gives its place up (FAIL, user attribute `dropped`) when a running trial
  before it has the same run name (the grid sampler can hand one point to two workers at
  once), or when the runs finished and running before it already make the budget;
- `RunLock`: one process trains a run folder at a time. A retried trial (its worker lost its
  heartbeat) waits until the lost worker has left the run: the lock's holder is known dead
  (same host, no such process) or has not touched the lock for the grace period;
- the budget counts run names (`finished_runs`), so a run reached by two trials counts once.

With the journal (no --storage) one sweep command at a time drives a study folder; the
workers are its children. A worker that crashes is reported, its trial queued again for
the others (`retry_cut_short`), and the command exits 1 at the end; Ctrl-C or SIGTERM is
passed on to every worker, which saves its run's last.pt and stops, starting no other trial
(`sweep.work`).
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cifarlab.errors import TrainingFailed, TrainingInterrupted
from cifarlab.interrupt import STOP_SIGNALS
from cifarlab.locks import hold, worker_id
from cifarlab.studies.spec import Study

log = logging.getLogger("cifarlab")

LOCK_FILE = ".sweep.lock"
WAIT = 1.0  # seconds between looks at the study while the last trials run elsewhere
CLAIM_WAIT = 30.0  # at most, for the trials before one to record their run names


class Dropped(Exception):
    """A trial that gave its place up to another one (the same run, or the budget is taken)."""


# --------------------------------------------------------- a trial's place in the budget

def finished_runs(trials: list[Any]) -> set[str]:
    """Run names of the trials with an outcome: completed, pruned, or failed in training (a
    NaN loss). A run two trials reached (a retry of a trial its worker lost) counts once."""
    from optuna.trial import TrialState

    return {t.user_attrs.get("run", f"#{t.number}") for t in trials
            if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
            or t.state == TrialState.FAIL and "failed" in t.user_attrs}


def claim(trial: Any, name: str, budget: int) -> None:
    """Keep the trial's place, or give it up (raise Dropped). Each trial records its run name
    before it looks and waits until the running trials numbered before it have recorded
    theirs; of two with one name, the lower number (or the one already past this) keeps it."""
    from optuna.trial import TrialState

    deadline = time.monotonic() + CLAIM_WAIT
    while True:
        trials = trial.study.get_trials(deepcopy=False)
        others = [t for t in trials
                  if t.number != trial.number and "dropped" not in t.user_attrs]
        running = [t for t in others if t.state == TrialState.RUNNING]
        unnamed = [t for t in running if "run" not in t.user_attrs and t.number < trial.number]
        if not unnamed or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    holders = [t for t in running if t.number < trial.number or "claimed" in t.user_attrs]
    same = [t.number for t in holders if t.user_attrs.get("run") == name]
    done = finished_runs(others)
    why = None
    if same:
        why = f"trial {same[0]} runs {name}"
    elif name in done:
        why = f"{name} has finished"
    elif len(done | {t.user_attrs.get("run", f"#{t.number}") for t in holders}) >= budget:
        why = f"the budget of {budget} runs is taken"
    if why is not None:
        trial.set_user_attr("dropped", why)
        log.info(f"trial {trial.number}: given up ({why})")
        raise Dropped(why)
    trial.set_user_attr("claimed", True)


def retry_cut_short(optuna_study: Any, study: Study, *, running: bool = True,
                    only: Any = None) -> None:
    """Queue again each trial cut short: RUNNING in the journal when `running` (no worker
    of this folder is alive now), or FAIL without a training failure of its own (stopped by
    a signal). `only`: a test of the trials to look at (those of one dead worker)."""
    from optuna.trial import TrialState

    storage = optuna_study._storage
    trials = [t for t in optuna_study.get_trials(deepcopy=False) if only is None or only(t)]
    for t in trials:
        if running and t.state == TrialState.RUNNING:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = optuna_study.get_trials(deepcopy=False)
    settled = {t.user_attrs.get("run") for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING,
                              TrialState.RUNNING)}
    for t in trials:
        run = t.user_attrs.get("run")
        if (t.state == TrialState.FAIL and run is not None and run not in settled
                and "failed" not in t.user_attrs and "dropped" not in t.user_attrs):
            params = dict(t.params)
            optuna_study.enqueue_trial(params, user_attrs={"seed": t.user_attrs["seed"]})
            settled.add(run)
            log.info(f"trial {run} was cut short; it runs again, from its last.pt if any")


# ------------------------------------------------------------------------------ run lock

def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """`.NAME.lock` in the study folder while a process trains run NAME: host:pid, touched
    every few seconds. Taken over when its holder is gone (same host) or silent for the
    grace period (another host); waited for otherwise."""

    def __init__(self, folder: Path, name: str) -> None:
        from cifarlab.studies.storage import heartbeat

        self.path = Path(folder) / f".{name}.lock"
        self.name = name
        self.interval, self.grace = heartbeat()
        self.me = worker_id()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def abandoned(self) -> bool:
        try:
            holder = self.path.read_text().strip()
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return True
        host, _, pid = holder.rpartition(":")
        if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
            return True
        return age > self.grace  # a live holder touches it every `interval` seconds

    def __enter__(self) -> RunLock:
        told = False
        while True:
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                if self.abandoned():
                    with contextlib.suppress(FileNotFoundError):
                        self.path.unlink()
                    continue
                if not told:
                    log.info(f"{self.name}: waiting for the worker that held it to stop "
                             f"({self.path.read_text().strip() if self.path.exists() else ''})")
                    told = True
                time.sleep(WAIT)
                continue
            with os.fdopen(fd, "w") as f:
                f.write(self.me + "\n")
            break
        self._thread = threading.Thread(target=self._touch, name="cifarlab-run-lock",
                                        daemon=True)
        self._thread.start()
        return self

    def _touch(self) -> None:
        while not self._stop.wait(self.interval):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        with contextlib.suppress(OSError):
            if self.path.read_text().strip() == self.me:
                self.path.unlink()


# ------------------------------------------------------------------- K workers, one machine

@contextlib.contextmanager
def folder_lock(folder: Path, storage: str | None) -> Iterator[None]:
    """With the journal, one sweep command at a time drives a study folder (its trials still
    RUNNING are then known to be cut short). A database study takes many commands."""
    if storage is not None:
        yield
        return
    folder.mkdir(parents=True, exist_ok=True)
    with hold(folder / LOCK_FILE, lambda holder: (
            f"--out {folder}: another cifarlab sweep ({holder}) runs this study; wait for it, "
            "give it more --workers, or use --storage with a database for several commands")):
        yield


def placement(workers: int) -> list[dict[str, str]]:
    """Each worker's environment: one GPU each where there are enough (shared round-robin
    where there are fewer), and an even share of the CPU's threads."""
    import torch

    threads = str(max(1, (os.cpu_count() or 1) // workers))
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]
    if 0 < gpus < workers:
        log.warning(f"{workers} workers share {gpus} GPU(s)")
    envs = []
    for i in range(workers):
        env = {"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        if gpus:
            env["CUDA_VISIBLE_DEVICES"] = ids[i % gpus]
        envs.append(env)
    return envs


def stop_with_parent() -> None:
    """Linux: a worker gets SIGTERM when the sweep that started it dies (even by SIGKILL), so
    that it saves its run's last.pt and stops instead of training on unseen."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# The settings sweep's flags set for every trial, and the flags; a worker gets them again.
SWEEP_FLAGS = {"data.source": "--data", "data.limit": "--limit",
               "data.test_source": "--test-data"}


def worker_command(study_file: Any, folder: Path, index: int, overrides: dict[str, Any],
                   storage: str | None) -> list[str]:
    cmd = [sys.executable, "-m", "cifarlab", "sweep", str(study_file), "--out", str(folder),
           "--worker", str(index)]
    for key, value in overrides.items():
        cmd += [SWEEP_FLAGS[key], str(value)]
    if storage is not None:
        cmd += ["--storage", storage]
    return cmd


def run_workers(optuna_study: Any, study: Any, folder: Path, workers: int, study_file: Any,
                overrides: dict[str, Any], storage: str | None) -> None:
    """Start `workers` worker processes and wait for them; pass a signal on to each."""
    import subprocess

    procs: list[subprocess.Popen[bytes]] = []
    stopped: list[int] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signum)
        for p in procs:
            if p.poll() is None:
                p.send_signal(signum)

    previous = {s: signal.signal(s, forward) for s in STOP_SIGNALS}
    failed: list[str] = []
    try:
        for i, env in enumerate(placement(workers)):
            # Its own session: Ctrl-C reaches the workers once, through this process.
            procs.append(subprocess.Popen(
                worker_command(study_file, folder, i, overrides, storage),
                env={**os.environ, **env}, start_new_session=True,
                preexec_fn=stop_with_parent))
        log.info(f"study {folder}: {workers} workers, pids "
                 f"{', '.join(str(p.pid) for p in procs)}")
        live = set(range(len(procs)))
        while live:
            for i in sorted(live):
                rc = procs[i].poll()
                if rc is None:
                    continue
                live.discard(i)
                if rc != 0 and not stopped:
                    who = f"{socket.gethostname()}:{procs[i].pid}"
                    failed.append(f"worker {i} (pid {procs[i].pid}) exited with code {rc}")
                    log.warning(f"study {folder}: {failed[-1]}; its trial is queued again")
                    if storage is None:  # a database study retries it by its heartbeat
                        retry_cut_short(optuna_study, study,
                                        only=lambda t, w=who: t.user_attrs.get("worker") == w)
            time.sleep(0.2)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if stopped:
        raise TrainingInterrupted(f"{signal.Signals(stopped[0]).name}: the workers stopped; "
                                  "run the same command to continue the study", stopped[0])
    if failed:
        raise TrainingFailed(f"{'; '.join(failed)}; the others went on; run the same command "
                             "to continue the study")
