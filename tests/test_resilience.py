"""Runs that survive: real subprocesses, real signals, real broken files."""

import csv
import hashlib
import json
import os
import pickle
import resource
import signal
import subprocess
import sys
import time
import zipfile

import pytest
import torch

from cifarlab import checkpoint
from cifarlab.cli import main
from cifarlab.errors import UserError

# About a second per epoch on two cores: long enough to be killed in the middle of one.
TRAIN = ["train", "--data", "synthetic:800", "--epochs", "3", "--workers", "0",
         "--batch-size", "32", "--set", "model.width=8", "--set", "optim.warmup_epochs=1",
         "--seed", "5"]


# For the tests that compare with no reference run: a quarter of the images.
SMALL = [a.replace("synthetic:800", "synthetic:200") for a in TRAIN]


def cifarlab(*args, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "cifarlab", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def wait_for_epochs(run_dir, n, proc, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        metrics = run_dir / "metrics.csv"
        if metrics.exists() and len(metrics.read_text().splitlines()) > n:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    raise AssertionError("training did not reach the epoch in time")


def metrics_without_seconds(run_dir):
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


def accuracies(run_dir):
    result = json.loads((run_dir / "result.json").read_text())
    return {k: result[k] for k in ("best_val_acc", "best_epoch", "test_acc", "epochs_run",
                                   "stopped_early", "test_per_class_acc")}


def weights(path):
    return checkpoint.load(path)["model"]


def assert_same_run(a, b):
    assert metrics_without_seconds(a) == metrics_without_seconds(b)
    assert accuracies(a) == accuracies(b)
    wa, wb = weights(a / "last.pt"), weights(b / "last.pt")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    ba, bb = weights(a / "best.pt"), weights(b / "best.pt")
    assert all(torch.equal(ba[k], bb[k]) for k in ba)


def uninterrupted(out, args):
    """The run of `args` in `out`/ref, never interrupted."""
    code, _, err = finish(cifarlab(*args, "--out", str(out), "--name", "ref"))
    assert code == 0, err
    return out / "ref"


def signalled_mid_epoch(out, args, sig):
    """The run of `args` in `out`/stopped, sent `sig` in its second epoch: (exit code, stderr,
    run folder)."""
    run_dir = out / "stopped"
    proc = cifarlab(*args, "--out", str(out), "--name", "stopped")
    wait_for_epochs(run_dir, 1, proc)
    time.sleep(0.3)
    proc.send_signal(sig)
    returncode, _, err = finish(proc)
    return returncode, err, run_dir


@pytest.fixture(scope="module")
def reference(once):
    """A run never interrupted (one for every pytest worker)."""
    return once("resilience-reference", lambda out: uninterrupted(out, TRAIN)) / "ref"


def test_cpu_runs_with_one_seed_repeat_bit_for_bit(reference, tmp_path):
    code, _, err = finish(cifarlab(*TRAIN, "--out", str(tmp_path), "--name", "again"))
    assert code == 0, err
    assert_same_run(reference, tmp_path / "again")


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(reference, tmp_path):
    run_dir = tmp_path / "killed"
    proc = cifarlab(*TRAIN, "--out", str(tmp_path), "--name", "killed")
    wait_for_epochs(run_dir, 1, proc)
    time.sleep(0.3)
    proc.kill()  # SIGKILL: no handler runs
    proc.wait()
    assert not (run_dir / "result.json").exists()
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["position"][0] >= 2
    code, out, err = finish(cifarlab("train", "--resume", str(run_dir)))
    assert code == 0, err
    assert "resuming" in out
    assert_same_run(reference, run_dir)


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_mid_epoch_and_resume_is_exact(reference, tmp_path, sig, code):
    returncode, err, run_dir = signalled_mid_epoch(tmp_path, TRAIN, sig)
    assert returncode == code
    assert f"stopped by {signal.Signals(sig).name} at epoch" in err  # not the grace period's
    assert f"cifarlab train --resume {run_dir}" in err and "Traceback" not in err
    assert not (run_dir / "result.json").exists()  # never reports success after an interrupt
    epoch, step = checkpoint.load(run_dir / "last.pt")["train_state"]["position"]
    assert (epoch, step) != (1, 0)
    if sig != signal.SIGINT:  # the same stop; the group test resumes after a SIGTERM
        return
    returncode, _, err = finish(cifarlab("train", "--resume", str(run_dir)))
    assert returncode == 0, err
    assert_same_run(reference, run_dir)


# EMA (selected on), lookahead, mixup/CutMix and a distillation teacher: their state, draws
# and teacher resume exactly too.
RECIPE = [*TRAIN, "--set", "ema.enabled=true", "--set", "ema.select=ema", "--set",
          "ema.decay=0.9", "--set", "mix.mixup_alpha=0.2", "--set", "mix.cutmix_alpha=1",
          "--set", "optim.lookahead_steps=3", "--set", "optim.lookahead_decay=0.9"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """The arguments of RECIPE distilled from a tiny teacher of the same data, and their
    uninterrupted reference run."""
    out = tmp_path_factory.mktemp("recipe")
    code = main([*TRAIN[:TRAIN.index("--epochs")], "--epochs", "1", "--workers", "0",
                 "--set", "model.width=4", "--out", str(out), "--name", "teacher"])
    assert code == 0
    args = [*RECIPE, "--teacher", str(out / "teacher")]
    return args, uninterrupted(out, args)


def test_sigterm_mid_epoch_with_ema_lookahead_mixing_and_a_teacher_then_resume_is_exact(
        recipe, tmp_path):
    args, reference = recipe
    returncode, err, run_dir = signalled_mid_epoch(tmp_path, args, signal.SIGTERM)
    assert returncode == 143, err
    last = checkpoint.load(run_dir / "last.pt")
    stopped = last["train_state"]
    assert stopped["position"] != [1, 0] and stopped["ema"]["updates"] > 0
    assert len(stopped["lookahead"]["slow"]) == len(
        [v for v in last["model"].values() if v.is_floating_point()])
    assert stopped["teacher"]["model"] == "resnet18"
    returncode, out, err = finish(cifarlab("train", "--resume", str(run_dir)))
    assert returncode == 0, err
    assert "teacher" in out
    assert_same_run(reference, run_dir)
    assert "ema_val_acc" in metrics_without_seconds(run_dir)[0]
    ema_a = checkpoint.load(reference / "last.pt")["train_state"]["ema"]
    ema_b = checkpoint.load(run_dir / "last.pt")["train_state"]["ema"]
    assert ema_a["updates"] == ema_b["updates"]
    assert all(torch.equal(ema_a["weights"][k], ema_b["weights"][k]) for k in ema_a["weights"])
    assert json.loads((run_dir / "result.json").read_text())["selected"] == "ema"


def test_second_signal_exits_at_once(tmp_path):
    script = (
        "import os, signal, time\n"
        "from cifarlab.interrupt import StopRequest\n"
        "with StopRequest() as stop:\n"
        "    os.kill(os.getpid(), signal.SIGINT)\n"
        "    assert stop.signum == signal.SIGINT\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(10)\n"
        "    print('not reached')\n"
    )
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 143 and "not reached" not in proc.stdout
    assert time.monotonic() - start < 9


# A run whose first step after epoch 1 blocks forever in native code (GIL released, deaf
# to signals), as a hung oneDNN kernel does.
STUCK = """
import sys, pathlib, torch
from cifarlab import step
from cifarlab.config import apply_dict
from cifarlab.presets import seed
from cifarlab.train import fit
out, grace = pathlib.Path(sys.argv[1]), float(sys.argv[2])
real_step = step.TrainStep.__call__
def step_that_hangs_in_epoch_2(self, x, y):
    if (out / "run" / "metrics.csv").exists():
        (out / "stuck").touch()
        torch.futures.Future().wait()
    return real_step(self, x, y)
step.TrainStep.__call__ = step_that_hangs_in_epoch_2
fit(apply_dict(seed(), {"data": {"source": "synthetic:200", "workers": 0}, "epochs": 3,
                        "batch_size": 64, "model": {"width": 4}, "device": "cpu",
                        "stop_grace": grace, "out": str(out), "name": "run"}))
"""


def stuck_run(tmp_path, grace):
    proc = subprocess.Popen([sys.executable, "-c", STUCK, str(tmp_path), str(grace)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "stuck").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    return proc


def test_a_step_stuck_in_native_code_ends_after_the_grace_period(tmp_path):
    proc = stuck_run(tmp_path, grace=2)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    returncode, _, err = finish(proc, timeout=60)
    assert returncode == 143
    assert 2 <= time.monotonic() - signalled < 30
    assert "no progress for 2 s after SIGTERM" in err
    assert f"continue with: cifarlab train --resume {tmp_path / 'run'}" in err
    assert "in step_that_hangs_in_epoch_2" in err  # the stacks show where it was stuck
    # The checkpoint of epoch 1 is intact and resumable from epoch 2.
    assert checkpoint.load(tmp_path / "run" / "last.pt")["train_state"]["position"] == [2, 0]


def test_a_second_signal_ends_a_stuck_step_at_once(tmp_path):
    proc = stuck_run(tmp_path, grace=600)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    assert proc.poll() is None  # the first signal waits for the step
    proc.send_signal(signal.SIGINT)
    returncode, _, err = finish(proc, timeout=60)
    assert returncode == 130 and time.monotonic() - signalled < 20
    assert "second signal (SIGINT): exiting now" in err and "Traceback" not in err
    assert checkpoint.load(tmp_path / "run" / "last.pt")["train_state"]["position"] == [2, 0]


def test_resume_refuses_changed_settings_unless_allowed(reference, tmp_path, capsys):
    run_dir = tmp_path / "short"
    assert main([*TRAIN, "--epochs", "1", "--out", str(tmp_path), "--name", "short"]) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(run_dir), "--epochs", "3", "--lr", "0.05"]) == 2
    err = capsys.readouterr().err
    assert "epochs: 1 -> 3" in err and "optim.lr: 0.1 -> 0.05" in err
    assert "--allow-changes" in err and err.count("\n") == 1
    # A finished run without more epochs: nothing to resume.
    assert main(["train", "--resume", str(run_dir)]) == 2
    assert "finished" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--allow-changes"]) == 0
    rows = metrics_without_seconds(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert json.loads((run_dir / "result.json").read_text())["epochs_run"] == 2


def test_kill_during_saves_always_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a process that saves checkpoints back to back, at many instants."""
    target = tmp_path / "last.pt"
    script = (
        "import sys, torch\n"
        "from cifarlab import checkpoint\n"
        "i = 0\n"
        "while True:\n"
        "    i += 1\n"
        "    checkpoint.save_atomic({'format': checkpoint.FORMAT, 'i': i,\n"
        "        'model': {'w': torch.full((1 << 20,), float(i))}, 'model_args': {},\n"
        "        'classes': [], 'mean': [], 'std': []}, sys.argv[1])\n"
        "    print(i, flush=True)\n"
    )
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31, 0.43):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline()  # at least one save completed
        time.sleep(delay)
        proc.kill()
        proc.wait()
        ckpt = checkpoint.load(target)
        assert torch.equal(ckpt["model"]["w"], torch.full((1 << 20,), float(ckpt["i"])))
    checkpoint.remove_leftovers(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]


def test_full_disk_while_saving_keeps_the_previous_checkpoints(tmp_path):
    """A file-size limit (as a full disk would) makes the saves of epoch 2 fail."""
    run_dir = tmp_path / "r"
    assert main([*SMALL, "--epochs", "1", "--out", str(tmp_path), "--name", "r"]) == 0
    before = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
              for name in ("last.pt", "best.pt")}
    limit = (run_dir / "best.pt").stat().st_size // 2

    def limit_file_size():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = cifarlab("train", "--resume", str(run_dir), "--epochs", "2", "--allow-changes",
                    preexec_fn=limit_file_size)
    code, _, err = finish(proc)
    assert code == 1 and "could not write" in err and "--resume" in err
    assert "Traceback" not in err
    after = {name: hashlib.sha256((run_dir / name).read_bytes()).hexdigest()
             for name in ("last.pt", "best.pt")}
    assert after == before
    assert not list(run_dir.glob(".*.tmp"))
    assert not (run_dir / "result.json").exists()  # the run is unfinished, not reported done
    assert checkpoint.load(run_dir / "last.pt")["train_state"]["position"] == [2, 0]


def test_non_finite_loss_stops_and_keeps_the_good_checkpoints(tmp_path, capsys):
    run_dir = tmp_path / "r"
    assert main([*SMALL, "--epochs", "1", "--out", str(tmp_path), "--name", "r"]) == 0
    before = {name: (run_dir / name).read_bytes() for name in ("last.pt", "best.pt")}
    capsys.readouterr()
    code = main(["train", "--resume", str(run_dir), "--epochs", "2", "--allow-changes",
                 "--lr", "1e30"])
    err = capsys.readouterr().err
    assert code == 1
    assert "loss became" in err and "epoch 2" in err and "--lr" in err
    assert {name: (run_dir / name).read_bytes() for name in before} == before


def test_fp16_overflow_streak_stops_training():
    from cifarlab.errors import TrainingFailed
    from cifarlab.step import MIN_LOSS_SCALE, check_loss_scale

    check_loss_scale(torch.amp.GradScaler("cpu", init_scale=2.0**16), epoch=3)  # healthy
    check_loss_scale(torch.amp.GradScaler("cpu", enabled=False), epoch=3)  # float32
    # Each skipped step halves the scale: 2^16 -> under 1 after 17 skips in a row.
    collapsed = torch.amp.GradScaler("cpu", init_scale=MIN_LOSS_SCALE / 2)
    with pytest.raises(TrainingFailed, match="epoch 3.*--amp bf16"):
        check_loss_scale(collapsed, epoch=3)


# --- Untrusted checkpoints -------------------------------------------------------------

@pytest.fixture(scope="module")
def good_checkpoint(reference):
    return reference / "best.pt"


def broken_checkpoints(tmp_path, good):
    ckpt = torch.load(good, weights_only=True)
    cases = {}
    data = good.read_bytes()
    cases["truncated"] = (data[: len(data) // 2], "not a readable cifarlab checkpoint")
    cases["empty"] = (b"", "not a readable cifarlab checkpoint")
    cases["foreign-bytes"] = (os.urandom(4096), "not a readable cifarlab checkpoint")

    def saved(obj):
        path = tmp_path / "tmp.pt"
        torch.save(obj, path)
        return path.read_bytes()

    cases["foreign-tensor"] = (saved(torch.zeros(3)), "not a cifarlab checkpoint")
    missing = {k: v for k, v in ckpt.items() if k != "classes"}
    cases["missing-key"] = (saved(missing), "missing ['classes']")
    nan = dict(ckpt, model=dict(ckpt["model"], **{"fc.bias": torch.full((10,), float("nan"))}))
    cases["non-finite"] = (saved(nan), "NaN")
    lost = dict(ckpt, model={k: v for k, v in ckpt["model"].items() if k != "fc.weight"})
    cases["missing-weight"] = (saved(lost), "weights do not fit")
    wide = dict(ckpt, model_args=dict(ckpt["model_args"], width=16))
    cases["wrong-architecture"] = (saved(wide), "weights do not fit")
    classes = dict(ckpt, classes=ckpt["classes"][:3])
    cases["class-count"] = (saved(classes), "3 class names for 10 outputs")
    return cases


def test_broken_checkpoints_are_refused_with_one_line(good_checkpoint, tmp_path, capsys):
    for name, (data, message) in broken_checkpoints(tmp_path, good_checkpoint).items():
        path = tmp_path / f"{name}.pt"
        path.write_bytes(data)
        code = main(["evaluate", str(path), "--data", "synthetic:800"])
        err = capsys.readouterr().err
        assert code == 2, name
        assert message in err and str(path) in err and err.count("\n") == 1, (name, err)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {RunsCode.marker}",))


def test_a_checkpoint_that_runs_code_when_unpickled_does_not_run_it(tmp_path, capsys):
    RunsCode.marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    torch.save({"format": checkpoint.FORMAT, "model": RunsCode()}, path)
    with zipfile.ZipFile(path) as z:  # the payload really is in the file
        assert any(b"system" in z.read(n) for n in z.namelist() if n.endswith("data.pkl"))
    with pytest.raises(UserError, match="not a readable cifarlab checkpoint"):
        checkpoint.load(path)
    assert main(["evaluate", str(path), "--data", "synthetic"]) == 2
    assert not RunsCode.marker.exists()
    # Pickled without torch's container too.
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(RunsCode(), protocol=2))
    with pytest.raises(UserError):
        checkpoint.load(raw)
    assert not RunsCode.marker.exists()


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143),
                                       (signal.SIGHUP, 129)])
def test_a_signal_to_the_process_group_is_a_graceful_stop(reference, tmp_path, sig, code):
    """A terminal's Ctrl-C or hang-up, `timeout`, a job scheduler's SIGTERM, `kill --
    -PGID`: they signal the whole process group, DataLoader workers included."""
    run_dir = tmp_path / "group"
    proc = cifarlab(*TRAIN, "--workers", "1", "--loader", "torchvision", "--out",
                    str(tmp_path), "--name", "group", start_new_session=True)
    wait_for_epochs(run_dir, 1, proc)
    time.sleep(0.3)
    os.killpg(proc.pid, sig)
    returncode, _, err = finish(proc)
    assert returncode == code and "Traceback" not in err and "killed by signal" not in err
    name = signal.Signals(sig).name
    assert f"stopped by {name} at epoch" in err  # the graceful path
    assert f"continue with: cifarlab train --resume {run_dir}" in err
    assert tuple(checkpoint.load(run_dir / "last.pt")["train_state"]["position"]) > (1, 0)
    if sig != signal.SIGTERM:  # the same stop; resumed once here, after SIGINT above
        return
    returncode, _, err = finish(cifarlab("train", "--resume", str(run_dir)))
    assert returncode == 0, err
    assert_same_run(reference, run_dir)  # the number of workers changes nothing


SEND = "import os, sys; os.kill(*map(int, sys.argv[1:]))"  # a signal from another process


def _a_loader_worker(ready) -> None:
    from cifarlab.interrupt import worker_signals

    worker_signals(0)
    ready.set()
    time.sleep(60)


def test_a_loader_worker_ignores_stop_signals_but_its_parents_sigterm():
    """Signals from elsewhere (the group's) are left to the main process; the loader's own
    `terminate` of a stuck worker still ends it."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    ready = context.Event()
    worker = context.Process(target=_a_loader_worker, args=(ready,), daemon=True)
    worker.start()
    try:
        assert ready.wait(30)
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # sent by another process
            subprocess.run([sys.executable, "-c", SEND, str(worker.pid), str(int(sig))],
                           check=True)
        for sig in (signal.SIGINT, signal.SIGHUP):  # its parent's, but not the loader's way
            os.kill(worker.pid, sig)
        worker.join(1.0)
        assert worker.is_alive()
        worker.terminate()  # SIGTERM from its parent, as the loader ends a stuck worker
        worker.join(10)
        assert worker.exitcode == -signal.SIGTERM
    finally:
        if worker.is_alive():
            worker.kill()
