"""Progress lines inside an epoch when stderr is not a terminal (training/ticker.py)."""

import io

from cifarlab.config import apply_dict
from cifarlab.presets import seed
from cifarlab.train import fit
from cifarlab.training import ticker


def test_a_line_every_so_many_seconds_with_the_pace_and_the_time_left():
    clock = iter(range(0, 1000, 10))  # each step takes 10 s
    out = io.StringIO()
    t = ticker.Ticker(2, 5, 10, every=30, stream=out, clock=lambda: float(next(clock)))
    for done in range(1, 11):
        t.step(done)
    lines = out.getvalue().splitlines()
    assert lines == [
        "epoch 2/5: step 3/10 (30 %), 10.00 s a step, about 70 s left in this epoch",
        "epoch 2/5: step 6/10 (60 %), 10.00 s a step, about 40 s left in this epoch",
        "epoch 2/5: step 9/10 (90 %), 10.00 s a step, about 10 s left in this epoch",
    ]


def test_a_resumed_epoch_times_only_its_own_steps_and_long_waits_read_in_minutes():
    clock = iter([0.0, 600.0])
    out = io.StringIO()
    t = ticker.Ticker(1, 1, 100, first_step=40, every=30, stream=out,
                      clock=lambda: next(clock))
    t.step(50)  # 10 steps in 600 s, 50 to go
    assert out.getvalue() == ("epoch 1/1: step 50/100 (50 %), 60.00 s a step, about 50 min "
                              "left in this epoch\n")


def test_training_with_stderr_in_a_file_prints_progress_lines_but_not_into_train_log(
        tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(ticker, "EVERY_SECONDS", 0.0)
    config = apply_dict(seed(), {"data": {"source": "synthetic:200", "workers": 0},
                                 "epochs": 1, "batch_size": 64, "model": {"width": 4},
                                 "optim": {"warmup_epochs": 0}, "device": "cpu",
                                 "out": str(tmp_path), "name": "r"})
    fit(config)
    err = capsys.readouterr().err  # pytest's capture is not a terminal
    steps = [line for line in err.splitlines() if line.startswith("epoch 1/1: step ")]
    assert [s.split()[3] for s in steps] == ["1/3", "2/3", "3/3"]  # 180 training images
    assert "step 1/3" not in (tmp_path / "r" / "train.log").read_text()
