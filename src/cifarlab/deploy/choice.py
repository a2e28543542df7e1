"""Which runtime runs a deployed file, and opening it there: onnxruntime or OpenVINO for an
`.onnx` file, OpenVINO for an IR (`.xml`), ExecuTorch for a `.pte`.

`auto` (the default of predict and evaluate) takes the fastest installed runtime for the
file on this machine: from a bench result beside the file (MODEL.bench.json, what
`cifarlab bench MODEL --runtime all --json` prints) when it was measured on this CPU, else
from a short measurement now (QUICK_RUNS calls in each runtime). Speed is batch-1 latency for
predict (a few images) and batch-64 throughput for evaluate (a data set). Nothing here
imports torch: a device needs only the runtime's own package.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cifarlab.deploy import runtime
from cifarlab.errors import UserError

RUNTIMES = ("onnxruntime", "openvino")  # what runs an .onnx file
CHOICES = ("auto", *RUNTIMES)
DEPLOYED = (".onnx", ".xml", ".pte")  # the files export and quantize write for devices
PACKAGES = {"onnxruntime": "onnxruntime", "openvino": "openvino", "executorch": "executorch"}
METRICS = ("latency", "throughput")
QUICK_RUNS = {"latency": (5, 20), "throughput": (1, 3)}  # (warm-up, timed) calls
BATCH = 64


def is_deployed(path: str | Path) -> bool:
    return Path(path).suffix in DEPLOYED


def installed(name: str) -> bool:
    return importlib.util.find_spec(PACKAGES[name]) is not None


def runtimes_for(path: str | Path) -> tuple[str, ...]:
    """The runtimes that can run this file, by its kind (installed or not)."""
    suffix = Path(path).suffix
    return {".xml": ("openvino",), ".pte": ("executorch",)}.get(suffix, RUNTIMES)


def open_in(path: str | Path, name: str, threads: int | None = None) -> Any:
    """The file opened in runtime `name`: an object with classes, meta(), run(), logits()
    and label (e.g. "openvino fp32"); UserError when the package is missing."""
    if name not in runtimes_for(path):
        kinds = {".xml": "an OpenVINO IR", ".pte": "an ExecuTorch program"}
        raise UserError(f"--runtime {name}: {path} is {kinds[Path(path).suffix]}, which only "
                        f"{runtimes_for(path)[0]} runs; give --runtime auto or leave it out")
    if name == "openvino":
        from cifarlab.deploy import openvino

        openvino.import_openvino()
        return openvino.OpenVinoClassifier(path, threads=threads)
    if name == "executorch":
        from cifarlab.deploy import executorch

        return executorch.ExecuTorchClassifier(path, threads=threads)
    from cifarlab.errors import import_package

    import_package("onnxruntime", "onnxruntime", "--runtime onnxruntime",
                   "pip install onnxruntime (or 'cifarlab[deploy]')")
    model = runtime.OnnxClassifier(path, threads=threads)
    int8 = model.meta("quantization") is not None or _onnx_int8(path)
    model.label = "onnxruntime int8" if int8 else "onnxruntime fp32"
    return model


def _onnx_int8(path: str | Path) -> bool:
    try:
        return runtime.is_int8(path)
    except ImportError:  # the onnx package is not on every device; the metadata says it
        return False


@dataclass
class Chosen:
    model: Any  # the opened classifier
    runtime: str  # its runtime's name
    how: str  # why this one: asked for, the only one installed, or the measured times

    def describe(self) -> str:
        return f"runtime: {self.model.label} ({self.how})"


def quick_time(model: Any, metric: str) -> float:
    """Seconds per call of `model.run`: one image (latency) or BATCH (throughput)."""
    warmup, runs = QUICK_RUNS[metric]
    x = np.random.default_rng(0).random((1 if metric == "latency" else BATCH, 3, 32, 32),
                                        dtype=np.float32)
    for _ in range(warmup):
        model.run(x)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        model.run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def recorded_times(path: Path, metric: str) -> dict[str, float]:
    """Seconds per call of each runtime from MODEL.bench.json beside the file, when it timed
    this file on this CPU; {} otherwise."""
    result = path.with_suffix(".bench.json")
    if not result.is_file():  # none, or a FIFO that a read would wait on for ever
        return {}
    try:
        raw = json.loads(result.read_text())
        if raw["header"]["cpu"] != runtime.cpu_info().model:
            return {}
        rows = [r for r in raw["rows"] if Path(r["model"]).name == path.name]
        return {r["runtime"].split()[0]: (r["latency_ms"] / 1000 if metric == "latency"
                                          else BATCH / r["throughput"]) for r in rows}
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return {}


def choose(path: str | Path, wanted: str = "auto", metric: str = "latency",
           threads: int | None = None) -> Chosen:
    """The file opened in runtime `wanted`, or with "auto" in the fastest installed one."""
    if wanted not in (*CHOICES, "executorch"):
        raise UserError(f"--runtime {wanted}: must be one of {', '.join(CHOICES)}")
    path = Path(path)
    if wanted != "auto":
        return Chosen(open_in(path, wanted, threads), wanted, "as asked")
    names = [n for n in runtimes_for(path) if installed(n)]
    if not names:
        need = " or ".join(runtimes_for(path))
        raise UserError(f"{path}: no runtime for it is installed; install {need} "
                        f"(pip install {runtimes_for(path)[0]})")
    if len(names) == 1:
        return Chosen(open_in(path, names[0], threads), names[0], "the one installed")
    recorded = recorded_times(path, metric)
    if all(n in recorded for n in names):
        best = min(names, key=recorded.__getitem__)
        return Chosen(open_in(path, best, threads), best,
                      f"fastest here in {path.with_suffix('.bench.json').name}: "
                      + _times(recorded, names, metric))
    models, refused = {}, []
    for name in names:
        try:
            models[name] = open_in(path, name, threads)
        except UserError as e:  # one runtime cannot read this file (an operator it lacks)
            refused.append(f"{name} cannot run it: {e}")
    if not models:
        raise UserError(refused[0])
    if len(models) == 1:
        (name, model), = models.items()
        return Chosen(model, name, "; ".join(refused))
    times = {n: quick_time(m, metric) for n, m in models.items()}
    best = min(times, key=times.__getitem__)
    return Chosen(models[best], best, "fastest here, measured now: " + _times(times, list(times),
                                                                              metric))


def _times(times: dict[str, float], names: list[str], metric: str) -> str:
    if metric == "latency":
        return ", ".join(f"{n} {1000 * times[n]:.3g} ms" for n in names) + " at batch 1"
    return ", ".join(f"{n} {BATCH / times[n]:,.0f}" for n in names) + f" img/s at batch {BATCH}"
