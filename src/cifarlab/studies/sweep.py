"""Run a study on Optuna: each trial one point of the space with one seed, one run folder.

The study folder holds study.yaml (the study as first run), journal.log (Optuna's journal
storage: every trial, its parameters, state and value) and one ordinary run folder per
trial, named after the trial's settings and seed. One sweep at a time per study folder.

Started again, a sweep continues the study: finished trials are kept, and a trial cut short
(still RUNNING in the journal, or stopped by a signal) is tried again under the same name,
resuming its run folder from last.pt; a run folder that already holds result.json is read,
not trained again. The budget (`trials`) counts trials with an outcome (completed, pruned, or
failed in training), so none is counted twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

from cifarlab import config as cfg
from cifarlab.errors import TrainingFailed, UserError
from cifarlab.runs import METRICS_FILE, RESULT_FILE, read_run
from cifarlab.studies.spec import VARIANT, Range, Study, load_study, parse_study

log = logging.getLogger("cifarlab")

STUDY_FILE = "study.yaml"
JOURNAL_FILE = "journal.log"
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
    return cfg._show(value)


def open_study(folder: Path, study: Study, *, create: bool) -> Any:
    """The Optuna study stored in `folder` (created when `create`)."""
    import optuna
    from optuna.storages import JournalStorage

    try:
        from optuna.storages.journal import JournalFileBackend
    except ImportError:  # optuna < 4.0
        from optuna.storages import JournalFileStorage as JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(folder / JOURNAL_FILE)))
    if not create:
        return optuna.load_study(study_name=STUDY_NAME, storage=storage)
    n_before = 0
    with contextlib.suppress(KeyError):  # KeyError: no study stored yet
        n_before = len(optuna.load_study(study_name=STUDY_NAME, storage=storage).trials)
    return optuna.create_study(study_name=STUDY_NAME, storage=storage, direction="maximize",
                               load_if_exists=True, sampler=make_sampler(study, n_before),
                               pruner=make_pruner(study))


def make_sampler(study: Study, n_before: int) -> Any:
    """The study's sampler. Random and TPE are seeded by the trials so far, so that a sweep
    started again does not propose the points it proposed the first time; the grid's seed
    (its order) stays fixed, as it numbers the grid's points in the journal."""
    import optuna

    if study.sampler == "grid":
        space: dict[str, list[Any]] = {k: list(v) for k, v in study.axes().items()}
        space["seed"] = list(range(study.seeds))
        return optuna.samplers.GridSampler(space, seed=0)
    if study.sampler == "random":
        return optuna.samplers.RandomSampler(seed=n_before)
    return optuna.samplers.TPESampler(seed=n_before)


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
    elif folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"--out {folder}: exists and is not a study folder (no {STUDY_FILE}); "
                        "give another --out")


def sweep(study_file: str | Path, out: str | Path | None = None,
          data_source: str | None = None) -> Path:
    """Run (or continue) the study in `study_file`; return the study folder."""
    study = load_study(study_file, data_source)
    folder = Path(out) if out is not None else Path("runs") / Path(study_file).stem
    check_folder(folder, study, str(study_file))
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / STUDY_FILE).is_file():
        import yaml

        (folder / STUDY_FILE).write_text(yaml.safe_dump(study.to_dict(), sort_keys=False))
    optuna_study = open_study(folder, study, create=True)
    retry_cut_short(optuna_study, study)
    finished = count_finished(optuna_study)
    todo = study.budget() - finished
    log.info(f"study {folder}: {finished} of {study.budget()} trials finished")
    if todo > 0:
        objective = Objective(study, folder)
        optuna_study.optimize(objective, n_trials=todo, catch=(TrainingFailed,))
    log.info(f"study {folder}: {count_finished(optuna_study)} of {study.budget()} trials "
             f"finished; summary: cifarlab study {folder}")
    return folder


def count_finished(optuna_study: Any) -> int:
    """Trials with an outcome: completed, pruned, or failed in training (a NaN loss)."""
    from optuna.trial import TrialState

    return sum(1 for t in optuna_study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
               or t.state == TrialState.FAIL and "failed" in t.user_attrs)


def retry_cut_short(optuna_study: Any, study: Study) -> None:
    """Queue again each trial cut short: RUNNING in the journal (its process is gone: one
    sweep at a time per folder) or FAIL without a training failure of its own."""
    from optuna.trial import TrialState

    storage = optuna_study._storage
    trials = optuna_study.get_trials(deepcopy=False)
    for t in trials:
        if t.state == TrialState.RUNNING:
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = optuna_study.get_trials(deepcopy=False)
    settled = {t.user_attrs.get("run") for t in trials
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.WAITING)}
    for t in trials:
        run = t.user_attrs.get("run")
        if (t.state == TrialState.FAIL and run is not None and run not in settled
                and "failed" not in t.user_attrs):
            params = dict(t.params)
            optuna_study.enqueue_trial(params, user_attrs={"seed": t.user_attrs["seed"]})
            settled.add(run)
            log.info(f"trial {run} was cut short; it runs again, from its last.pt if any")


class Objective:
    """One trial: a point and a seed, trained into its run folder; best val. accuracy."""

    def __init__(self, study: Study, folder: Path) -> None:
        self.study = study
        self.folder = folder

    def suggest(self, trial: Any) -> tuple[dict[str, Any], int]:
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
            seed = trial.suggest_categorical("seed", list(range(self.study.seeds)))
        elif "seed" in trial.user_attrs:  # a repeat of a point, queued with its seed
            seed = trial.user_attrs["seed"]
        else:  # a new point: seed 0 here, the other seeds queued as trials of their own
            seed = 0
            for other in range(1, self.study.seeds):
                trial.study.enqueue_trial(params, user_attrs={"seed": other})
        return params, int(seed)

    def __call__(self, trial: Any) -> float:
        import optuna

        from cifarlab.train import fit

        params, seed = self.suggest(trial)
        name = run_name(params, seed)
        trial.set_user_attr("seed", seed)
        trial.set_user_attr("run", name)
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
