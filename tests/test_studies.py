"""Studies: the study file's checks, sweeps on Optuna (grid, TPE, pruning, a study started
again), the statistics and the summary, and fit's on_epoch callback they rely on."""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path

import pytest
import yaml

from cifarlab import train
from cifarlab.cli import main
from cifarlab.config import apply_dict, nest
from cifarlab.presets import get_preset
from cifarlab.studies import stats
from cifarlab.studies.sweep import JOURNAL_FILE, STUDY_FILE, open_study, run_name

optuna = pytest.importorskip("optuna")  # studies run on Optuna; without it they skip

TINY = {"epochs": 1, "model.width": 4, "data.workers": 0, "batch_size": 64,
        "optim.warmup_epochs": 1, "data.source": "synthetic:200"}


def write_study(path: Path, **fields) -> Path:
    study = {"preset": "seed", "settings": dict(TINY), "seeds": 1, "sampler": "grid"}
    study.update(fields)
    path.write_text(yaml.safe_dump(study))
    return path


def trials(folder: Path) -> list[optuna.trial.FrozenTrial]:
    from cifarlab.studies.summary import load

    return load(folder)[1].get_trials()


def states(folder: Path) -> list[str]:
    return sorted(t.state.name for t in trials(folder))


def run_folders(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir())


# --------------------------------------------------------------------------------- statistics

def test_student_t_and_welch_match_published_values():
    assert stats.t_ppf(0.975, 2) == pytest.approx(4.302653, abs=1e-5)
    assert stats.t_ppf(0.975, 10) == pytest.approx(2.228139, abs=1e-5)
    assert stats.t_sf(2.0, 10) == pytest.approx(0.036694, abs=1e-6)
    s = stats.summarize([1.0, 2.0, 3.0])
    assert (s.n, s.mean, s.sd) == (3, 2.0, 1.0)
    assert s.ci_high - s.mean == pytest.approx(4.302653 / math.sqrt(3), abs=1e-5)
    # Welch: t = -2.611, df = 6.98 (by hand); p from the t distribution
    assert stats.welch_p([1, 2, 3, 4], [3, 4, 5, 6, 7]) == pytest.approx(0.03494, abs=2e-4)
    assert stats.welch_p([1.0], [2.0, 3.0]) is None
    assert stats.summarize([5.0]).ci_low is None


def test_t_distribution_without_scipy(monkeypatch):
    monkeypatch.setattr(stats, "_scipy_stats", None)
    assert stats.t_ppf(0.975, 1) == pytest.approx(12.7062, abs=1e-3)
    assert stats.t_ppf(0.975, 30) == pytest.approx(2.0423, abs=1e-4)
    assert 2 * stats.t_sf(0.0, 5) == pytest.approx(1.0)


# ------------------------------------------------------------------------ fit's on_epoch hook

class Stop(Exception):
    pass


def test_on_epoch_sees_each_epoch_and_an_exception_leaves_the_run_resumable(tmp_path):
    config = get_preset("seed")
    for key, value in {**TINY, "epochs": 2, "out": str(tmp_path), "name": "r"}.items():
        config = apply_dict(config, nest(key, value))
    seen = []

    def stop_after_first(epoch, row):
        seen.append((epoch, row["val_acc"]))
        raise Stop

    with pytest.raises(Stop):
        train.fit(config, on_epoch=stop_after_first)
    run = tmp_path / "r"
    assert [e for e, _ in seen] == [1]
    assert (run / "last.pt").is_file() and not (run / "result.json").exists()
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # header and epoch 1
    result = train.fit(config, resume=run, on_epoch=lambda e, row: seen.append((e, None)))
    assert [e for e, _ in seen] == [1, 2] and result.epochs_run == 2
    assert (run / "result.json").is_file()


# ----------------------------------------------------------------------------------- sweeps

def test_grid_study_continues_without_counting_a_trial_twice(tmp_path, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "g.yaml", space={"optim.label_smoothing": [0.0, 0.1]},
                       trials=1)
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert states(out) == ["COMPLETE"] and len(run_folders(out)) == 1
    write_study(spec, space={"optim.label_smoothing": [0.0, 0.1]}, trials=2)
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert states(out) == ["COMPLETE", "COMPLETE"]
    assert run_folders(out) == ["optim.label_smoothing=0,seed=0",
                                "optim.label_smoothing=0.1,seed=0"]
    assert main(["sweep", str(spec), "--out", str(out)]) == 0  # the budget is spent
    assert len(trials(out)) == 2
    for name in run_folders(out):
        assert (out / name / "result.json").is_file()
    stored = yaml.safe_load((out / STUDY_FILE).read_text())
    assert stored["space"] == {"optim.label_smoothing": [0.0, 0.1]}

    capsys.readouterr()
    assert main(["study", str(out)]) == 0
    printed = capsys.readouterr().out
    text = (out / "study.md").read_text()
    assert text in printed
    assert "| optim.label_smoothing=0 | 1 |" in text
    assert "| optim.label_smoothing=0.1 | 1 |" in text
    assert "Best point by mean validation accuracy: optim.label_smoothing=" in text
    assert (out / "optimization_history.png").stat().st_size > 0
    assert "param_importances.png: skipped" in printed  # one parameter only


class Killed(BaseException):
    """A process killed mid-trial: Optuna leaves the trial RUNNING in the journal."""


def test_a_trial_cut_short_is_resumed_from_its_last_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "study"
    settings = {**TINY, "epochs": 2}
    spec = write_study(tmp_path / "k.yaml", settings=settings, sampler="tpe", trials=1,
                       space={"optim.lr": {"low": 0.02, "high": 0.4, "log": True}})
    real_fit = train.fit
    calls = []

    def killed_after_epoch_1(config, resume=None, on_epoch=None):
        calls.append(resume)

        def hook(epoch, row):
            on_epoch(epoch, row)
            raise Killed

        return real_fit(config, resume=resume, on_epoch=hook)

    monkeypatch.setattr(train, "fit", killed_after_epoch_1)
    with pytest.raises(Killed):
        main(["sweep", str(spec), "--out", str(out)])
    assert states(out) == ["RUNNING"]
    monkeypatch.setattr(train, "fit", lambda config, resume=None, on_epoch=None: (
        calls.append(resume), real_fit(config, resume=resume, on_epoch=on_epoch))[1])
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    (run,) = (out / name for name in run_folders(out))
    assert calls == [None, run]  # the same point again, from its last.pt
    assert states(out) == ["COMPLETE", "FAIL"]
    assert run_folders(out) == [run.name]
    assert len((run / "metrics.csv").read_text().splitlines()) == 3  # epochs 1 and 2 once
    done = [t for t in trials(out) if t.state.name == "COMPLETE"][0]
    assert sorted(done.intermediate_values) == [1, 2]  # epoch 1 replayed from metrics.csv


def test_a_grid_study_stopped_in_its_first_trial_resumes_it_then_runs_the_rest(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "g.yaml", settings={**TINY, "epochs": 2},
                       space={"optim.label_smoothing": [0.0, 0.1]})
    real_fit = train.fit

    def signalled(config, resume=None, on_epoch=None):
        def hook(epoch, row):
            on_epoch(epoch, row)
            os.kill(os.getpid(), signal.SIGTERM)  # the sweep is stopped after epoch 1

        return real_fit(config, resume=resume, on_epoch=hook)

    monkeypatch.setattr(train, "fit", signalled)
    assert main(["sweep", str(spec), "--out", str(out)]) == 143
    monkeypatch.setattr(train, "fit", real_fit)
    err = capsys.readouterr().err  # a sweep is continued by the sweep, not by train --resume
    assert "run the same command to continue the study" in err and "--resume" not in err
    # The retried trial is queued, so Optuna's grid sampler gives it no grid id.
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert "(resuming)" in capsys.readouterr().out
    assert states(out) == ["COMPLETE", "COMPLETE", "FAIL"]
    for run in run_folders(out):  # epochs 1 and 2, each once
        assert len((out / run / "metrics.csv").read_text().splitlines()) == 3


def test_a_signal_in_a_trials_last_epoch_finishes_it_and_stops_the_sweep_there(
        tmp_path, monkeypatch, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "s.yaml", space={"optim.label_smoothing": [0.0, 0.1]})
    real_fit = train.fit

    def signalled(config, resume=None, on_epoch=None):
        def hook(epoch, row):  # epochs: 1, so after the last one, while the run finishes
            os.kill(os.getpid(), signal.SIGTERM)
            on_epoch(epoch, row)

        return real_fit(config, resume=resume, on_epoch=hook)

    monkeypatch.setattr(train, "fit", signalled)
    assert main(["sweep", str(spec), "--out", str(out)]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    (run,) = run_folders(out)  # the next trial never started
    assert (out / run / "result.json").is_file()  # not a last.pt past the run's end
    assert states(out) == ["COMPLETE"]
    monkeypatch.setattr(train, "fit", real_fit)
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert states(out) == ["COMPLETE", "COMPLETE"] and len(run_folders(out)) == 2


def test_tpe_study_repeats_each_point_over_its_seeds(tmp_path, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "t.yaml", sampler="tpe", seeds=2, trials=2,
                       space={"optim.label_smoothing": [0.0, 0.2],
                              "optim.lr": {"low": 0.02, "high": 0.4, "log": True}})
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    done = trials(out)
    assert [t.state.name for t in done] == ["COMPLETE", "COMPLETE"]
    assert done[0].params == done[1].params and 0.02 <= done[0].params["optim.lr"] <= 0.4
    assert [t.user_attrs["seed"] for t in done] == [0, 1]
    assert run_folders(out) == [run_name(done[0].params, 0), run_name(done[0].params, 1)]
    capsys.readouterr()
    assert main(["study", str(out)]) == 0
    row = [line for line in (out / "study.md").read_text().splitlines()
           if line.startswith("| optim.label_smoothing=")]
    assert len(row) == 1 and row[0].split(" | ")[1] == "2"  # one point, two seeds
    values = [t.value for t in done]
    assert float(row[0].split(" | ")[2]) == pytest.approx(sum(values) / 2, abs=0.006)


def test_a_pruned_trial_stops_after_the_epoch_and_counts_in_the_budget(tmp_path,
                                                                       monkeypatch):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "p.yaml", settings={**TINY, "epochs": 3}, space={},
                       pruner="median")
    monkeypatch.setattr(optuna.trial.Trial, "should_prune", lambda self: True)
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert states(out) == ["PRUNED"]
    run = out / "seed=0"
    assert len((run / "metrics.csv").read_text().splitlines()) == 2  # epoch 1 alone
    assert not (run / "result.json").exists()
    assert main(["sweep", str(spec), "--out", str(out)]) == 0  # not tried again
    assert states(out) == ["PRUNED"]


def test_a_trial_that_fails_in_training_is_recorded_and_not_tried_again(tmp_path, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "n.yaml", space={"optim.lr": [1e30]})
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    (failed,) = trials(out)
    assert failed.state.name == "FAIL" and "NaN or infinite" in failed.user_attrs["failed"]
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert states(out) == ["FAIL"]
    assert main(["study", str(out)]) == 0
    assert "No finished trials yet." in (out / "study.md").read_text()


# -------------------------------------------------------------------------------- bad input

BAD = [
    ({"space": {"optim.lrr": [0.1]}}, "did you mean 'optim.lr'"),
    ({"settings": {**TINY, "model.widht": 8}}, "did you mean 'model.width'"),
    ({"space": {}, "sampler": "tpe", "trials": 3}, "needs a space"),
    ({"space": {"optim.lr": {"low": 0.4, "high": 0.02}}, "sampler": "tpe", "trials": 3},
     "low must be below high"),
    ({"space": {"optim.lr": {"low": 0.02, "high": 0.4}}}, "sampler grid needs a list"),
    ({"sampler": "grdi"}, "did you mean 'grid'"),
    ({"pruner": "medain"}, "did you mean 'median'"),
    ({"space": {"optim.label_smoothing": [0.1, 1.5]}}, "optim.label_smoothing"),
    ({"space": {"seed": [0, 1]}}, "seeds: N"),
    ({"seeds": 0}, "seeds must be an integer"),
    ({"sampler": "random", "space": {"optim.lr": [0.1]}}, "needs a budget"),
    ({"space": {"optim.lr": [i / 1e4 + 1e-4 for i in range(100)],
                "optim.momentum": [i / 1e3 for i in range(100)],
                "optim.label_smoothing": [i / 1e3 for i in range(11)]}},
     "the grid has 110,000 points (11 x 100 x 100), over the 100,000"),
    # variants: named bundles of settings (cifarlab ablate writes such a study)
    ({"variants": {"a": {"optim.lrr": 0.1}}}, "variant a: unknown setting 'optim.lrr'"),
    ({"variants": {}}, "one variant or more"),
    ({"variants": {"../up": {}}}, "variant name '../up'"),
    ({"variants": {"a,b": {}}}, "variant name 'a,b'"),
    ({"variants": {"a": {"optim.lr": 0.05}}, "space": {"optim.lr": [0.1, 0.2]}},
     "'optim.lr' is both set by variant a and varied in space"),
    ({"variants": {"a": {"seed": 3}}}, "variant a: 'seed' is set by the study itself"),
    ({"variants": {"a": {"optim.label_smoothing": 2.0}}}, "optim.label_smoothing"),
    ({"variants": {"a": [1]}}, "variant a must be a mapping"),
]


@pytest.mark.parametrize(("fields", "message"), BAD, ids=[m for _, m in BAD])
def test_bad_study_files_are_refused_in_one_line(tmp_path, capsys, fields, message):
    spec = write_study(tmp_path / "bad.yaml", **fields)
    out = tmp_path / "study"
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


EXAMPLE = """\
preset: seed                                # where every trial starts
settings: {epochs: 30, model.width: 32}     # fixed for every trial (any setting key)
space:                                      # what varies: a list is a grid axis,
  optim.label_smoothing: [0.0, 0.1, 0.2]    # a {low, high, log} mapping a range
  optim.lr: {low: 0.02, high: 0.4, log: true}
seeds: 3                                    # repeats of every point
sampler: tpe                                # grid | random | tpe
trials: 40                                  # budget for random and tpe
pruner: none                                # none | median | hyperband
"""


def test_the_readme_example_reads_and_opens_a_study(tmp_path):
    from cifarlab.studies.spec import Range, load_study
    from cifarlab.studies.sweep import make_pruner

    path = tmp_path / "lr.yaml"
    path.write_text(EXAMPLE)
    study = load_study(path)
    assert study.space["optim.lr"] == Range(0.02, 0.4, log=True)
    assert study.budget() == 40 and study.seeds == 3
    config = study.config_for({"optim.label_smoothing": 0.2, "optim.lr": 0.05}, 2)
    assert (config.epochs, config.model.width, config.seed) == (30, 32, 2)
    assert (config.optim.label_smoothing, config.optim.lr) == (0.2, 0.05)
    assert open_study(tmp_path, study, create=True).trials == []
    path.write_text(EXAMPLE.replace("pruner: none", "pruner: hyperband"))
    assert isinstance(make_pruner(load_study(path)), optuna.pruners.HyperbandPruner)
    assert EXAMPLE in (Path(__file__).parents[1] / "README.md").read_text()  # the same text


def test_an_empty_grid_space_is_one_point(tmp_path):
    from cifarlab.studies.spec import load_study

    study = load_study(write_study(tmp_path / "e.yaml", space={}, seeds=2))
    assert study.grid() == [{}] and study.budget() == 2


def test_a_study_folder_refuses_a_different_study(tmp_path, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "a.yaml", space={})
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    before = (out / JOURNAL_FILE).read_bytes()
    write_study(spec, space={"optim.label_smoothing": [0.0, 0.1]})
    capsys.readouterr()
    assert main(["sweep", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "differs from this file in space" in err and err.count("\n") == 1
    assert (out / JOURNAL_FILE).read_bytes() == before
    assert main(["sweep", str(spec), "--out", str(out), "--data", "synthetic:100"]) == 2
    assert main(["study", str(tmp_path)]) == 2  # not a study folder


def test_open_study_reads_the_journal(tmp_path):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "o.yaml", space={})
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    from cifarlab.studies.spec import load_study

    loaded = open_study(out, load_study(spec), create=False)
    assert loaded.best_trial.user_attrs["run"] == "seed=0"


def test_sweep_flags_set_the_data_of_every_trial_and_reach_each_worker(tmp_path):
    from cifarlab.studies.workers import worker_command

    out = tmp_path / "study"
    spec = write_study(tmp_path / "d.yaml", space={"optim.label_smoothing": [0.0]})
    assert main(["sweep", str(spec), "--out", str(out), "--data", "synthetic:300",
                 "--limit", "120", "--test-data", "synthetic:40"]) == 0
    (name,) = run_folders(out)
    data = yaml.safe_load((out / name / "config.yaml").read_text())["data"]
    assert (data["source"], data["limit"], data["test_source"]) == (
        "synthetic:300", 120, "synthetic:40")
    cmd = worker_command(spec, out, 1, {"data.limit": 120, "data.test_source": "x"}, None)
    assert cmd[-4:] == ["--limit", "120", "--test-data", "x"]


def test_a_sweep_limit_below_one_is_refused_before_any_trial(tmp_path, capsys):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "d.yaml")
    assert main(["sweep", str(spec), "--out", str(out), "--limit", "0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cifarlab: error: ") and "data.limit" in err and err.count("\n") == 1
    assert not out.exists()
