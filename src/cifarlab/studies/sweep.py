"""Run a study on Optuna: each trial one point of the space with one seed, one run folder.

The study folder holds study.yaml (the study as first run), journal.log (Optuna's journal
storage: every trial, its parameters, state and value) and one ordinary run folder per
trial, named after the trial's settings and seed. With the journal, one sweep command at a
time drives a study folder (with --workers K it runs K worker processes); with --storage the
trials live in a PostgreSQL/MySQL database and any number of commands join (storage.py,
workers.py).

Started again, a sweep continues the study: finished trials are kept, and a trial cut short
(still RUNNING in the journal, stopped by a signal, or without a heartbeat in the database)
is tried again under the same name, resuming its run folder from last.pt; a run folder that
already holds result.json is read, not trained again. The budget (`trials`) counts the runs
of trials with an outcome (completed, pruned, or failed in training), so none counts twice.
Every worker (this process, or each of the K of --workers K) runs the same loop, `work`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

from cifarlab import config as cfg
from cifarlab.errors import TrainingFailed, TrainingInterrupted, UserError
from cifarlab.locks import worker_id
from cifarlab.runs import METRICS_FILE, RESULT_FILE, read_run
from cifarlab.settings_rules import _show
from cifarlab.studies.spec import VARIANT, Range, Study, load_study, parse_study
from cifarlab.studies.storage import JOURNAL_FILE  # noqa: F401 (summary imports it here)
from cifarlab.studies.workers import (
    WAIT,
    Dropped,
    RunLock,
    claim,
    finished_runs,
    folder_lock,
    retry_cut_short,
    run_workers,
)

log = logging.getLogger("cifarlab")

STUDY_FILE = "study.yaml"
STUDY_NAME = "study"
MAX_NAME = 200  # bytes of a run folder name, a hash suffix beyond


def run_name(params: dict[str, Any], seed: int) -> str:
    """`optim.label_smoothing=0.1,optim.lr=0.0631,seed=2`, made one safe folder name; a
    variant's name comes first: `augment,optim.lr=0.0631,seed=2`."""
    variant = [str(params[VARIANT])] if VARIANT in params else []
    parts = variant + [f"{k}={_short(v)}" for k, v in sorted(params.items()) if k != VARIANT]
    parts += [f"seed={seed}"]
    name = re.sub(r"[^A-Za-z0-9._=,+-]", "_", ",".join(parts))
    if len(name) > MAX_NAME:
        digest = hashlib.sha1(name.encode()).hexdigest()[:10]
        name = f"{name[:MAX_NAME - 11]}-{digest}"
    return name


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return _show(value)


def open_study(folder: Path, study: Study, *, create: bool, storage: str | None = None) -> Any:
    """The Optuna study stored in `folder`'s journal, or in the database at `storage` (a
    PostgreSQL or MySQL URL) under the folder's name; created when `create`."""
    import optuna

    from cifarlab.studies.storage import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    backend = open_storage(folder, storage)
    name = study_name(folder, storage)
    if not create:
        try:
            return optuna.load_study(study_name=name, storage=backend)
        except KeyError:
            raise UserError(f"{folder}: no study '{name}' in {mask(storage)}; give the --storage "
                            "that cifarlab sweep used") from None
    n_before = 0
    with contextlib.suppress(KeyError):  # KeyError: no study stored yet
        n_before = len(optuna.load_study(study_name=name, storage=backend).trials)
    opened = optuna.create_study(study_name=name, storage=backend, direction="maximize",
                                 load_if_exists=True, sampler=make_sampler(study, n_before),
                                 pruner=make_pruner(study))
    if storage is not None:
        check_stored_design(opened, study, folder, storage)
    return opened


def study_name(folder: Path, storage: str | None) -> str:
    """The journal holds one study; a database holds many, each named after its folder."""
    return STUDY_NAME if storage is None else f"cifarlab:{Path(folder).resolve().name}"


def mask(storage: str | None) -> str:
    from cifarlab.studies.storage import masked

    return "the journal" if storage is None else masked(storage)


def check_stored_design(opened: Any, study: Study, folder: Path, storage: str) -> None:
    """A database study keeps its design as a user attribute; another design is refused."""
    stored = opened.user_attrs.get("design")
    new = json.loads(json.dumps(study.design()))
    if stored is None:
        opened.set_user_attr("design", new)
        return
    changed = [k for k in new if stored.get(k) != new[k]]
    if changed:
        raise UserError(f"--storage {mask(storage)}: its study '{opened.study_name}' differs "
                        f"from this file in {', '.join(changed)}; give another --out (the "
                        "study is named after its folder), or the same study")


def make_sampler(study: Study, n_before: int) -> Any:
    """The study's sampler. Random and TPE are seeded by the trials so far, so that a sweep
    started again does not propose the points it proposed the first time; the grid's seed
    (its order) stays fixed, as it numbers the grid's points in the journal."""
    import optuna

    if study.sampler == "grid":
        space: dict[str, list[Any]] = {k: list(v) for k, v in study.axes().items()}
        space["seed"] = list(range(study.seeds))
        return grid_sampler(space)
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=n_before)
    return optuna.samplers.TPESampler(seed=n_before)


def grid_sampler(space: dict[str, list[Any]]) -> Any:
    """Optuna's grid sampler, save that a trial queued again (a retry: Optuna gives it no grid
    id) ends without a KeyError when one point of the grid is left (optuna/optuna#6844). Its
    after_trial only stops the study's loop, which here runs one trial at a time."""
    import optuna

    class Grid(optuna.samplers.GridSampler):
        def after_trial(self, study: Any, trial: Any, state: Any, values: Any) -> None:
            if "grid_id" in study._storage.get_trial_system_attrs(trial._trial_id):
                super().after_trial(study, trial, state, values)

    return Grid(space, seed=0)


def make_pruner(study: Study) -> Any:
    import optuna

    if study.pruner == "median":
        return optuna.pruners.MedianPruner()
    if study.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1,
                                              max_resource=study.base_config().epochs)
    return optuna.pruners.NopPruner()


def check_folder(folder: Path, study: Study, where: str) -> None:
    """Refuse a study folder that holds a different study, or is not one."""
    stored = folder / STUDY_FILE
    if stored.is_file():
        saved = parse_study(cfg.load_yaml(stored, where=str(stored)), str(stored))
        old, new = saved.design(), study.design()
        changed = [k for k in old if old[k] != new[k]]
        if changed:
            raise UserError(f"{where}: the study in {folder} differs from this file in "
                            f"{', '.join(changed)}; give another --out, or the same study")
    elif folder.exists() and (not folder.is_dir() or any(p.name != ".sweep.lock"
                                                          for p in folder.iterdir())):
        raise UserError(f"--out {folder}: exists and is not a study folder (no {STUDY_FILE}); "
                        "give another --out")


def sweep(study_file: str | Path, out: str | Path | None = None,
          overrides: dict[str, Any] | None = None, *, workers: int = 1,
          storage: str | None = None, worker: int | None = None) -> Path:
    """Run (or continue) the study in `study_file` with `workers` trials at a time; return
    the study folder. `overrides`: settings for every trial (workers.SWEEP_FLAGS);
    `storage`: a database URL (many machines) instead of the journal; `worker`: this
    process is worker number `worker` of a sweep with several."""
    from cifarlab.studies.storage import require_optuna

    require_optuna("cifarlab sweep")
    study = load_study(study_file, overrides)
    folder = Path(out) if out is not None else Path("runs") / Path(study_file).stem
    if worker is not None:
        if "OMP_NUM_THREADS" in os.environ:  # its share of the CPU's threads
            import torch

            torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        return work(open_study(folder, study, create=True, storage=storage), study, folder,
                    index=worker)
    check_folder(folder, study, str(study_file))
    with folder_lock(folder, storage):
        optuna_study = None
        if storage is not None:  # reach the database before writing anything
            optuna_study = open_study(folder, study, create=True, storage=storage)
        folder.mkdir(parents=True, exist_ok=True)
        if not (folder / STUDY_FILE).is_file():
            import yaml

            from cifarlab.checkpoint import write_atomic

            text = yaml.safe_dump(study.to_dict(), sort_keys=False).encode()
            write_atomic(folder / STUDY_FILE, lambda f: f.write(text))
        if optuna_study is None:
            optuna_study = open_study(folder, study, create=True)
        retry_cut_short(optuna_study, study, running=storage is None)
        finished = count_finished(optuna_study)
        log.info(f"study {folder}: {finished} of {study.budget()} trials finished")
        if finished < study.budget():
            if workers == 1:
                work(optuna_study, study, folder)
            else:
                run_workers(optuna_study, study, folder, workers, study_file, overrides or {},
                            storage)
    log.info(f"study {folder}: {count_finished(optuna_study)} of {study.budget()} trials "
             f"finished; summary: cifarlab study {folder}")
    return folder


def count_finished(optuna_study: Any) -> int:
    return len(finished_runs(optuna_study.get_trials(deepcopy=False)))


# ------------------------------------------------------------- the loop every worker runs

def work(optuna_study: Any, study: Any, folder: Path, index: int | None = None) -> Path:
    """Run trials until the study has `study.budget()` finished runs. A SIGINT/SIGTERM
    stops it: during a trial's training once its last.pt is saved, at once elsewhere; a
    signal that came during a trial which then ended another way (it finished, was pruned,
    or was taken over) stops it before the next."""
    from optuna.trial import TrialState

    from cifarlab.interrupt import signals_seen

    if index is not None:  # workers started together must not propose the same points
        optuna_study.sampler = make_sampler(study, len(optuna_study.trials) * 131 + index)
    objective = Objective(study, folder)
    budget = study.budget()
    with signals_seen() as stops:
        objective.stops = stops
        while True:
            if stops:
                raise stopped(stops[0], folder)
            fail_stale(optuna_study)
            trials = optuna_study.get_trials(deepcopy=False)
            done = finished_runs(trials)
            if len(done) >= budget:
                return folder
            waiting = any(t.state == TrialState.WAITING for t in trials)
            running = [t for t in trials if t.state == TrialState.RUNNING]
            busy = done | {t.user_attrs.get("run", f"#{t.number}") for t in running}
            if not waiting and len(busy) >= budget:
                if not running:
                    return folder
                time.sleep(WAIT)
                continue
            objective.lost = None
            try:
                optuna_study.optimize(objective, n_trials=1, catch=(TrainingFailed, Dropped))
            except TrainingInterrupted as e:  # continued by the sweep, not by train --resume
                raise stopped(e.exit_code - 128, folder) from None
            except ValueError:  # Optuna cannot tell a trial that another worker failed
                if stops:
                    raise stopped(stops[0], folder) from None
                if objective.lost is None:
                    raise
                log.warning(f"trial {objective.lost} was taken over by another worker (no "
                            "heartbeat from this one for the grace period); going on")


def stopped(signum: int, folder: Path) -> TrainingInterrupted:
    return TrainingInterrupted(f"stopped by {signal.Signals(signum).name}; the trials' runs "
                               f"are saved in {folder}; run the same command to continue the "
                               "study", signum)


def fail_stale(optuna_study: Any) -> None:
    """A database study: fail the trials whose worker sent no heartbeat for the grace
    period; the storage's callback queues each once more (storage.open_database)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(optuna_study)


class Objective:
    """One trial: a point and a seed, trained into its run folder; best val. accuracy."""

    def __init__(self, study: Study, folder: Path) -> None:
        self.study = study
        self.folder = folder
        self.lost: int | None = None  # a trial another worker took over while this one ran
        self.stops: list[int] = []  # the signals seen by its trainings (work)

    def suggest(self, trial: Any) -> tuple[dict[str, Any], int, bool]:
        """The trial's point and seed, and whether the point is new (its other seeds are
        queued once the trial holds its place)."""
        params: dict[str, Any] = {}
        for key, axis in self.study.axes().items():
            if isinstance(axis, Range):
                if axis.integer:
                    params[key] = trial.suggest_int(key, int(axis.low), int(axis.high),
                                                    log=axis.log)
                else:
                    params[key] = trial.suggest_float(key, axis.low, axis.high, log=axis.log)
            else:
                params[key] = trial.suggest_categorical(key, axis)
        if self.study.sampler == "grid":
            seeds = list(range(self.study.seeds))
            return params, int(trial.suggest_categorical("seed", seeds)), False
        if "seed" in trial.user_attrs:  # a repeat of a point, queued with its seed
            return params, int(trial.user_attrs["seed"]), False
        return params, 0, True  # a new point: seed 0 here, the others trials of their own

    def __call__(self, trial: Any) -> float:
        params, seed, new_point = self.suggest(trial)
        name = run_name(params, seed)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("run", name)
        trial.set_user_attr("worker", worker_id())
        claim(trial, name, self.study.budget())  # raises Dropped if another trial has it
        if new_point:
            for other in range(1, self.study.seeds):
                trial.study.enqueue_trial(params, user_attrs={"seed": other})
        import optuna

        with RunLock(self.folder, name):
            try:
                value = self.train(trial, params, seed, name)
            except optuna.exceptions.UpdateFinishedTrialError:
                value = None
            if value is None or trial.study._storage.get_trial(trial._trial_id).state.is_finished():
                # Another worker failed it (no heartbeat for the grace period) and retries it;
                # or the sweep started again (this worker's was killed) failed it while a
                # signal stopped this worker: its last.pt is saved, it stops (work).
                if self.stops:
                    raise TrainingInterrupted(f"trial {trial.number}: {name} stopped by "
                                              f"{signal.Signals(self.stops[0]).name}",
                                              self.stops[0])
                self.lost = trial.number
                raise Dropped(f"trial {trial.number}: {name} was given to another worker")
            return value

    def train(self, trial: Any, params: dict[str, Any], seed: int, name: str) -> float:
        import optuna

        from cifarlab.train import fit

        config = self.study.config_for(params, seed)
        config = cfg.apply_dict(config, {"out": str(self.folder), "name": name})
        run_dir = self.folder / name
        if (run_dir / RESULT_FILE).is_file():  # trained before the trial was recorded
            log.info(f"trial {trial.number}: {name} finished before; reading its result")
            return float(read_run(run_dir).result["best_val_acc"])
        resume = None
        if (run_dir / "last.pt").is_file():
            resume = run_dir
            # The pruner sees the whole run (a run stopped in its first epoch has no metrics).
            history = read_run(run_dir).history if (run_dir / METRICS_FILE).is_file() else []
            for row in history:
                trial.report(row.val_acc, row.epoch)
        elif run_dir.exists():  # cut short before its first checkpoint
            shutil.rmtree(run_dir)
        log.info(f"trial {trial.number}: {name}" + (" (resuming)" if resume else ""))

        def on_epoch(epoch: int, row: dict[str, float]) -> None:
            trial.report(row["val_acc"], epoch)
            if self.study.pruner != "none" and trial.should_prune():
                log.info(f"trial {trial.number}: pruned at epoch {epoch}")
                raise optuna.TrialPruned(f"pruned at epoch {epoch}")

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)
                fitted = fit(config, resume=resume, on_epoch=on_epoch)
        except TrainingFailed as e:
            trial.set_user_attr("failed", str(e))
            log.warning(f"trial {trial.number}: {name} failed: {e}")
            raise
        return float(fitted.best_val_acc)
