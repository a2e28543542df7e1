"""Studies with several workers: --workers K on one machine (the journal file), and many
workers sharing a study in a real PostgreSQL server that these tests start themselves
(skipped, with the reason, only where its binaries are missing or it cannot start)."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from cifarlab.cli import main
from cifarlab.studies.summary import load

pytest.importorskip("optuna")  # studies run on Optuna; without it they skip

TINY = {"model.width": 4, "data.workers": 0, "batch_size": 64, "optim.warmup_epochs": 1,
        "data.source": "synthetic:200"}
WAIT = 120  # seconds any subprocess here may take before the test fails
HEARTBEAT = "1,3"  # CIFARLAB_HEARTBEAT: a heartbeat each second, retried after 3 s without


def write_study(path: Path, epochs: int = 1, **fields) -> Path:
    study = {"preset": "seed", "settings": {**TINY, "epochs": epochs}, "seeds": 2,
             "sampler": "grid", "space": {"optim.label_smoothing": [0.0, 0.1]}}
    study.update(fields)
    path.write_text(yaml.safe_dump(study))
    return path


def sweep_command(spec: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "cifarlab", "sweep", str(spec), "--out", str(out), *extra]


def env(**extra: str) -> dict[str, str]:
    src = str(Path(__file__).parents[1] / "src")
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def start(cmd: list[str], log: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT,
                            env=env(**extra))


def finish(proc: subprocess.Popen) -> int:
    try:
        return proc.wait(timeout=WAIT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise


def wait_for(test, what: str, timeout: float = WAIT) -> None:
    end = time.monotonic() + timeout
    while not test():
        if time.monotonic() > end:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.05)


def run_folders(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.is_dir())


def epochs_logged(run: Path) -> list[int]:
    """The epochs of a run's metrics.csv: each once when no two processes trained it."""
    return [int(line.split(",")[0]) for line in (run / "metrics.csv").read_text().splitlines()[1:]]


def check_each_run_once(out: Path, trials, runs: int, epochs: int) -> None:
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert sorted(t.user_attrs["run"] for t in done) == run_folders(out)  # one trial each
    assert len(run_folders(out)) == runs
    for name in run_folders(out):
        assert (out / name / "result.json").is_file()
        assert epochs_logged(out / name) == list(range(1, epochs + 1))


# --------------------------------------------------------------------- one machine, journal

def test_a_sweep_with_two_workers_killed_and_started_again_finishes_each_run_once(
        tmp_path, capfd):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "k.yaml", epochs=3, seeds=1)
    sweep = start(sweep_command(spec, out, "--workers", "2"), tmp_path / "first.log")
    wait_for(lambda: any(out.glob("*/last.pt")), "a trial's first epoch")
    sweep.kill()  # its workers follow it (SIGTERM from the kernel), saving last.pt
    sweep.wait()
    # Started again: it waits for the old workers to leave their runs, then resumes them.
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "2"]) == 0
    assert "(resuming)" in capfd.readouterr().out
    _, study = load(out)
    check_each_run_once(out, study.get_trials(), runs=2, epochs=3)
    assert not list(out.glob(".*=*.lock"))  # every run lock let go
    assert main(["sweep", str(spec), "--out", str(out), "--workers", "2"]) == 0
    assert len(load(out)[1].get_trials()) == len(study.get_trials())  # nothing more to run


def test_a_worker_signalled_as_the_sweep_started_again_fails_its_trial_stops_there(
        tmp_path, monkeypatch, capsys):
    """The race above, made certain: SIGTERM reaches a worker in its trial's last steps, and
    the sweep started again marks the trial failed before the worker reports the epoch. The
    worker stops with its last.pt saved; it does not take the trial for lost to another
    worker and go on to train the others."""
    from cifarlab import checkpoint, train
    from cifarlab.studies.spec import load_study
    from cifarlab.studies.sweep import open_study
    from cifarlab.studies.workers import retry_cut_short

    out = tmp_path / "study"
    spec = write_study(tmp_path / "r.yaml", epochs=2, seeds=1)
    real_fit = train.fit

    def signalled(config, resume=None, on_epoch=None):
        def hook(epoch, row):
            os.kill(os.getpid(), signal.SIGTERM)
            study = load_study(spec)
            retry_cut_short(open_study(out, study, create=False), study)  # started again
            on_epoch(epoch, row)  # Optuna refuses a report of a failed trial

        return real_fit(config, resume=resume, on_epoch=hook)

    monkeypatch.setattr(train, "fit", signalled)
    assert main(["sweep", str(spec), "--out", str(out)]) == 143
    assert "stopped by SIGTERM" in capsys.readouterr().err
    (run,) = run_folders(out)  # no other trial started
    assert list(checkpoint.load(out / run / "last.pt")["train_state"]["position"]) == [2, 0]
    monkeypatch.setattr(train, "fit", real_fit)
    assert main(["sweep", str(spec), "--out", str(out)]) == 0
    assert "(resuming)" in capsys.readouterr().out
    check_each_run_once(out, load(out)[1].get_trials(), runs=2, epochs=2)


def test_a_crashed_worker_is_reported_and_its_trial_run_by_the_other(tmp_path):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "c.yaml", epochs=3, seeds=1)
    sweep = start(sweep_command(spec, out, "--workers", "2"), tmp_path / "sweep.log")

    def training_worker() -> int | None:  # a worker past its trial's first epoch
        for lock in out.glob(".*.lock"):
            holder = lock.read_text().strip().rpartition(":")[2] if lock.exists() else ""
            if holder.isdigit() and (out / lock.name[1:-5] / "last.pt").is_file():
                return int(holder)
        return None

    wait_for(lambda: training_worker() is not None, "a worker's first epoch")
    victim = training_worker()
    os.kill(victim, signal.SIGKILL)
    assert finish(sweep) == 1  # the others finished the study; the crash is reported
    text = (tmp_path / "sweep.log").read_text()
    assert f"(pid {victim}) exited with code -9; its trial is queued again" in text
    assert "training failed: worker" in text and "(resuming)" in text
    _, study = load(out)
    check_each_run_once(out, study.get_trials(), runs=2, epochs=3)


def test_one_sweep_command_per_journal_folder(tmp_path, capsys):
    import fcntl

    out = tmp_path / "study"
    spec = write_study(tmp_path / "o.yaml")
    out.mkdir()
    with open(out / ".sweep.lock", "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(["sweep", str(spec), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "another cifarlab sweep" in err and err.count("\n") == 1
    assert run_folders(out) == []


def test_a_trial_gives_up_a_run_another_runs_or_a_place_past_the_budget(tmp_path):
    from cifarlab.studies.spec import load_study
    from cifarlab.studies.sweep import open_study
    from cifarlab.studies.workers import Dropped, claim

    study = load_study(write_study(tmp_path / "c.yaml"))
    optuna_study = open_study(tmp_path, study, create=True)
    first, second = optuna_study.ask(), optuna_study.ask()
    for trial in (first, second):
        trial.set_user_attr("run", "seed=0")
    with pytest.raises(Dropped, match="trial 0 runs seed=0"):
        claim(second, "seed=0", budget=2)  # the lower number keeps the run
    claim(first, "seed=0", budget=2)
    optuna_study.tell(first, 0.5)
    third = optuna_study.ask()
    third.set_user_attr("run", "seed=1")
    with pytest.raises(Dropped, match="the budget of 1 runs is taken"):
        claim(third, "seed=1", budget=1)
    claim(third, "seed=1", budget=2)
    dropped = [t.user_attrs.get("dropped") for t in optuna_study.get_trials()]
    assert dropped[0] is None and dropped[1].startswith("trial 0") and "budget" in dropped[2]


def test_a_run_lock_waits_for_a_live_holder_and_takes_a_dead_ones(tmp_path, monkeypatch):
    import threading

    from cifarlab.studies.workers import RunLock

    monkeypatch.setenv("CIFARLAB_HEARTBEAT", "1,2")
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = tmp_path / ".seed=0.lock"
    lock.write_text(f"{socket.gethostname()}:{gone.pid}\n")  # a process of this host, gone
    with RunLock(tmp_path, "seed=0"):
        assert lock.read_text().strip() == f"{socket.gethostname()}:{os.getpid()}"
    assert not lock.exists()
    lock.write_text("elsewhere:1\n")  # another host's, touched just now
    taken = threading.Event()

    def take() -> None:
        with RunLock(tmp_path, "seed=0"):
            taken.set()

    thread = threading.Thread(target=take)
    thread.start()
    assert not taken.wait(1.0)  # its holder may be alive: wait
    assert taken.wait(10)  # untouched for the grace period (2 s): taken over
    thread.join(WAIT)


def test_bad_worker_counts_are_refused(tmp_path, capsys, monkeypatch):
    spec = write_study(tmp_path / "w.yaml")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "s"), "--workers", "0"]) == 2
    assert "--workers 0: must be from 1 to 1024" in capsys.readouterr().err
    monkeypatch.setenv("CIFARLAB_HEARTBEAT", "5,5")
    assert main(["sweep", str(spec), "--out", str(tmp_path / "s"), "--storage",
                 "postgresql://u@127.0.0.1:1/d"]) == 2
    err = capsys.readouterr().err
    assert "CIFARLAB_HEARTBEAT=5,5: give INTERVAL,GRACE" in err and err.count("\n") == 1
    assert not (tmp_path / "s").exists()


# ----------------------------------------------------------------- many machines: PostgreSQL

def postgres_binaries() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    for folder in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(folder) / "initdb").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL server (fsync off) on a free localhost port; its URL."""
    pytest.importorskip("psycopg", reason="psycopg is missing: pip install 'cifarlab[cluster]'")
    bins = postgres_binaries()
    if bins is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found; `make test` "
                    "installs them with apt-get where it can (apt-get install postgresql)")
    as_user: list[str] = []
    root = Path(tempfile.mkdtemp(prefix="cifarlab-pg-"))
    root.chmod(0o755)
    if os.geteuid() == 0:  # postgres will not run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: cannot start PostgreSQL as nobody")
        as_user = ["runuser", "-u", "nobody", "--"]
        shutil.chown(root, "nobody")
    port = free_port()
    options = (f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=off "
               "-c synchronous_commit=off -c full_page_writes=off")
    try:
        subprocess.run([*as_user, str(bins / "initdb"), "-D", str(root / "data"), "-A", "trust",
                        "-U", "cifarlab", "--no-sync"], check=True, capture_output=True,
                       timeout=WAIT)
        subprocess.run([*as_user, str(bins / "pg_ctl"), "-D", str(root / "data"), "-l",
                        str(root / "server.log"), "-w", "-t", "60", "-o", options, "start"],
                       check=True, capture_output=True, timeout=WAIT)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        shutil.rmtree(root, ignore_errors=True)
        pytest.skip(f"PostgreSQL did not start: {e}")
    try:
        yield f"postgresql://cifarlab@127.0.0.1:{port}"
    finally:
        subprocess.run([*as_user, str(bins / "pg_ctl"), "-D", str(root / "data"), "-m",
                        "immediate", "stop"], capture_output=True, timeout=WAIT)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def database(postgres, request) -> str:
    """A fresh database of the server for one test; its URL."""
    import psycopg

    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    with psycopg.connect(f"{postgres}/postgres", autocommit=True) as conn:
        conn.execute(f"DROP DATABASE IF EXISTS {name}")
        conn.execute(f"CREATE DATABASE {name}")
    return f"{postgres}/{name}"


def db_trials(out: Path, url: str):
    import optuna

    from cifarlab.studies.storage import open_storage
    from cifarlab.studies.sweep import study_name

    return optuna.load_study(study_name=study_name(out, url),
                             storage=open_storage(out, url)).get_trials()


def test_two_workers_share_a_postgresql_study(tmp_path, database):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "p.yaml", seeds=1,
                       space={"optim.label_smoothing": [0.0, 0.1, 0.2]})
    workers = [start(sweep_command(spec, out, "--storage", database), tmp_path / f"w{i}.log")
               for i in range(2)]
    assert [finish(w) for w in workers] == [0, 0]
    logs = [(tmp_path / f"w{i}.log").read_text() for i in range(2)]
    trials = db_trials(out, database)
    check_each_run_once(out, trials, runs=3, epochs=1)
    for name in run_folders(out):  # trained by one worker, once
        assert sum(text.count(f"results in {out / name}\n") for text in logs) == 1
    assert all("trial" in text for text in logs)  # both took trials
    # The summary reads the study from the database.
    assert main(["study", str(out), "--storage", database]) == 0
    assert "| optim.label_smoothing=0.1 | 1 |" in (out / "study.md").read_text()


def test_a_worker_killed_mid_trial_is_retried_by_another(tmp_path, database):
    out = tmp_path / "study"
    spec = write_study(tmp_path / "h.yaml", epochs=4, space={})  # two seeds, two trials
    beat = {"CIFARLAB_HEARTBEAT": HEARTBEAT}
    doomed = start(sweep_command(spec, out, "--storage", database), tmp_path / "a.log", **beat)
    wait_for(lambda: any((out / f".{p.name}.lock").is_file() and
                         (out / f".{p.name}.lock").read_text().strip().endswith(
                             f":{doomed.pid}") and (p / "last.pt").is_file()
                         for p in out.glob("seed=*")), "the first worker's first epoch")
    other = start(sweep_command(spec, out, "--storage", database), tmp_path / "b.log", **beat)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    assert finish(other) == 0
    text = (tmp_path / "b.log").read_text()
    assert "(resuming)" in text  # the lost trial, from its last.pt
    trials = db_trials(out, database)
    states = sorted(t.state.name for t in trials)
    assert states == ["COMPLETE", "COMPLETE", "FAIL"]  # the lost trial failed, retried once
    (lost,) = [t for t in trials if t.state.name == "FAIL"]
    retried = [t for t in trials if t.user_attrs["run"] == lost.user_attrs["run"]]
    assert [t.state.name for t in retried] == ["FAIL", "COMPLETE"]
    check_each_run_once(out, trials, runs=2, epochs=4)


def test_database_bad_input_is_refused_in_one_line(tmp_path, capsys, database):
    spec = write_study(tmp_path / "b.yaml", seeds=1, space={})
    out = tmp_path / "a" / "study"
    port = free_port()  # nothing listens there
    cases = [
        (f"postgresql://cifarlab:secret@127.0.0.1:{port}/db", "cannot reach the database"),
        ("sqlite:///study.db", "SQLite does not take workers"),
        ("redis://localhost", "give a database URL"),
    ]
    for url, message in cases:
        capsys.readouterr()
        assert main(["sweep", str(spec), "--out", str(out), "--storage", url]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "secret" not in err
        assert not out.exists()
    # A study of another design under the same name (its folder's) is refused.
    assert main(["sweep", str(spec), "--out", str(out), "--storage", database]) == 0
    other = write_study(tmp_path / "c.yaml", seeds=3, space={})
    elsewhere = tmp_path / "b" / "study"
    capsys.readouterr()
    assert main(["sweep", str(other), "--out", str(elsewhere), "--storage", database]) == 2
    err = capsys.readouterr().err
    assert "differs from this file in seeds" in err and err.count("\n") == 1
    assert not elsewhere.exists()
