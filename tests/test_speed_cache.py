"""speed_cache.py and the CPU precision built on it (devices.choose): a speed measured once
per machine, model and batch is kept, so every run of a command takes the same precision;
files that are not a cache are measured anew; a resumed run keeps the precision it started
with."""

import json
import os
import threading

import pytest
import torch
from torch import nn

from cifarlab import devices, speed_cache


@pytest.fixture
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path / "cifarlab" / "speeds.json"


@pytest.fixture
def timings(monkeypatch):
    """A CPU with native bfloat16 whose steps take the seconds in `timings` (per dtype);
    `timings["calls"]` counts the timed steps."""
    seconds = {None: 1.0, torch.bfloat16: 0.5, "calls": 0}

    def step_seconds(*args):
        seconds["calls"] += 1
        return seconds[args[-1]]

    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: True)
    monkeypatch.setattr(devices, "step_seconds", step_seconds)
    return seconds


def net(width=4):
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, width, 3), nn.Flatten(), nn.Linear(width * 900, 10))


def choose(model, batch=64, **kw):
    return devices.choose("auto", torch.device("cpu"), model, batch, torch.channels_last, 10,
                          **kw)


def test_a_measured_speedup_is_kept_and_decides_the_next_runs(cache, timings):
    first = choose(net())
    assert first.dtype is torch.bfloat16 and timings["calls"] == 2
    assert "measured before" not in first.reason
    timings[torch.bfloat16] = 0.99  # timing noise: a new measurement would pick float32
    again = choose(net())
    assert again.dtype is torch.bfloat16 and timings["calls"] == 2  # not measured again
    assert "measured before" in again.reason and str(cache) in again.reason
    (key,) = json.loads(cache.read_text())
    assert "batch 64" in key and torch.__version__ in key
    # Another batch or model is another speed: measured.
    assert choose(net(), batch=32).dtype is None and timings["calls"] == 4
    assert choose(net(width=8)).dtype is None and timings["calls"] == 6
    cache.unlink()  # deleting the file measures again
    assert choose(net()).dtype is None and timings["calls"] == 8


@pytest.mark.parametrize("bad", ["not json", "[1, 2]", '{"k": "fast"}', "fifo", "folder"])
def test_a_file_that_is_not_a_cache_is_measured_anew_and_replaced(cache, timings, bad):
    cache.parent.mkdir(parents=True)
    if bad == "fifo":
        os.mkfifo(cache)  # read naively, it would block the run for ever
    elif bad == "folder":
        cache.mkdir()
    else:
        cache.write_text(bad)
    result = []
    worker = threading.Thread(target=lambda: result.append(choose(net())), daemon=True)
    worker.start()
    worker.join(timeout=20)
    assert result and result[0].dtype is torch.bfloat16 and timings["calls"] == 2
    if bad != "folder":  # a folder in its place cannot be replaced: the speed goes unkept
        assert len(json.loads(cache.read_text())) == 1


def test_an_unwritable_cache_folder_only_leaves_the_speed_unkept(monkeypatch, tmp_path,
                                                                 timings):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # a file where the folder would be
    assert choose(net()).dtype is torch.bfloat16
    assert choose(net()).dtype is torch.bfloat16 and timings["calls"] == 4


def test_processes_measuring_one_key_at_once_take_turns(cache, timings):
    values = []
    threads = [threading.Thread(target=lambda: values.append(
        speed_cache.kept("k", lambda: float(len(values) + 1)))) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert sorted(kept for _, kept in values) == [False, True, True, True]
    assert len({v for v, _ in values}) == 1


@pytest.mark.parametrize("started, native, dtype, measured", [
    ("bf16", True, torch.bfloat16, False),
    ("float32", True, None, False),
    ("bf16", False, None, False),  # moved to a CPU without native bfloat16: float32
    (None, True, torch.bfloat16, True),  # a new run (or a last.pt from before): measured
])
def test_a_resumed_cpu_run_keeps_the_precision_it_started_with(cache, timings, monkeypatch,
                                                               started, native, dtype,
                                                               measured):
    monkeypatch.setattr(devices, "native_cpu_bf16", lambda: native)
    chosen = choose(net(), started=started)
    assert chosen.dtype is dtype and (timings["calls"] > 0) is measured
    if started is not None and native:
        assert "as the run started" in chosen.reason
