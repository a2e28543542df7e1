"""A run folder is the run's own: the files a run appends to or rewrites in it are regular
files there (a symbolic link or a FIFO is refused, never followed), and one process holds it
at a time (a second `train` into it, or a second --resume, is refused while one runs)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from cifarlab.cli import main
from cifarlab.rundir import RUN_LOCK

TINY = ["--data", "synthetic:300", "--epochs", "1", "--workers", "0", "--set",
        "model.width=4", "--set", "optim.warmup_epochs=1", "--batch-size", "64"]


@pytest.fixture
def run(trained_run, tmp_path):
    """A copy of a finished 2-epoch run, to resume or to report on."""
    copy = tmp_path / "run"
    shutil.copytree(trained_run, copy)
    return copy


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", ["train.log", "metrics.csv", "config.yaml", "last.pt",
                                  "best.pt", "run_id"])
def test_resume_refuses_a_run_file_that_is_a_symbolic_link(run, tmp_path, capsys, name):
    elsewhere = tmp_path / "elsewhere"
    shutil.copy(run / name, elsewhere)  # the link points at a good copy: still refused
    before = elsewhere.read_bytes()
    (run / name).unlink()
    (run / name).symlink_to(elsewhere)
    assert main(["train", "--resume", str(run), "--epochs", "3", "--allow-changes"]) == 2
    err = one_line(capsys.readouterr().err)
    assert f"{run / name}: a symbolic link" in err and "regular file" in err
    assert elsewhere.read_bytes() == before  # nothing appended or rewritten there
    assert (run / name).is_symlink()


def test_resume_refuses_a_fifo_in_place_of_the_log(run, capsys):
    (run / "train.log").unlink()
    os.mkfifo(run / "train.log")  # appending to it would block the run
    assert main(["train", "--resume", str(run), "--epochs", "3", "--allow-changes"]) == 2
    assert "train.log: not a regular file" in one_line(capsys.readouterr().err)


def test_report_refuses_a_report_that_is_a_symbolic_link(run, tmp_path, capsys):
    elsewhere = tmp_path / "page.html"
    elsewhere.write_text("someone else's page")
    (run / "report.html").unlink()
    (run / "report.html").symlink_to(elsewhere)
    assert main(["report", str(run)]) == 2
    assert "report.html: a symbolic link" in one_line(capsys.readouterr().err)
    assert elsewhere.read_text() == "someone else's page"


HOLDER = textwrap.dedent("""
    import sys
    from cifarlab.locks import hold
    with hold(sys.argv[1], str):
        print("held", flush=True)
        sys.stdin.read()  # until the test closes it
""")


def held_by_another_process(lock):
    """A process that holds the lock file `lock` until its stdin is closed."""
    src = str(Path(__file__).parents[1] / "src")  # this checkout's cifarlab
    path = os.pathsep.join(p for p in (src, os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(lock)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    assert proc.stdout.readline() == "held\n"
    return proc


def release(proc):
    proc.stdin.close()
    assert proc.wait(timeout=30) == 0


def test_a_second_resume_of_a_held_run_is_refused(run, capsys):
    metrics = (run / "metrics.csv").read_bytes()
    holder = held_by_another_process(run / RUN_LOCK)
    try:
        assert main(["train", "--resume", str(run), "--epochs", "3", "--allow-changes"]) == 2
    finally:
        release(holder)
    err = one_line(capsys.readouterr().err)
    assert f"run folder {run} is in use by another cifarlab process" in err
    assert f":{holder.pid})" in err  # the holder, host:pid
    assert (run / "metrics.csv").read_bytes() == metrics  # nothing written
    # Once the holder has gone, the run resumes; its lock is released at the end.
    assert main(["train", "--resume", str(run), "--epochs", "3", "--allow-changes"]) == 0
    assert len((run / "metrics.csv").read_text().splitlines()) == 4
    release(held_by_another_process(run / RUN_LOCK))


def test_a_second_train_into_a_held_new_run_folder_is_refused(tmp_path, capsys):
    folder = tmp_path / "same"
    folder.mkdir()
    holder = held_by_another_process(folder / RUN_LOCK)  # a train started just before
    try:
        assert main(["train", *TINY, "--out", str(tmp_path), "--name", "same"]) == 2
    finally:
        release(holder)
    assert "is in use by another cifarlab process" in one_line(capsys.readouterr().err)
    assert [p.name for p in folder.iterdir()] == [RUN_LOCK]  # nothing of its own written
    # The lock a finished holder leaves behind does not make the folder a used one.
    assert main(["train", *TINY, "--out", str(tmp_path), "--name", "same"]) == 0
    assert (folder / "result.json").exists()


@pytest.fixture(params=[0o022, 0o077])
def umask(request):
    previous = os.umask(request.param)
    yield request.param
    os.umask(previous)


def test_an_atomic_write_respects_the_umask(umask, tmp_path):
    from cifarlab import checkpoint

    path = tmp_path / "file.txt"
    checkpoint.write_atomic(path, lambda f: f.write(b"new"))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    path.chmod(0o600)  # a rewrite is a new file: the umask's mode again
    checkpoint.write_atomic(path, lambda f: f.write(b"newer"))
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask and path.read_bytes() == b"newer"
    assert [p.name for p in tmp_path.iterdir()] == ["file.txt"]  # no temporary file left


def test_every_file_a_run_writes_respects_the_umask(umask, tmp_path):
    assert main(["train", *TINY, "--out", str(tmp_path), "--name", "r"]) == 0
    files = [p for p in (tmp_path / "r").rglob("*") if p.is_file()]
    assert {"best.pt", "last.pt", "config.yaml", "metrics.csv", "result.json", "report.html",
            "curves.png", "train.log", RUN_LOCK} <= {p.name for p in files}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o666 & ~umask) for p in files}
