"""CPU inference speed of checkpoints and exported files, side by side.

Each model runs in the runtimes that apply to it: a checkpoint (or run folder) in eager
PyTorch float32; an `.onnx` file in onnxruntime (float32, or int8 when it holds quantized
operators), OpenVINO, the fastest of them ("auto", as choice.choose decides) or each of them
("all"); an OpenVINO IR (`.xml`) in OpenVINO (the precision that ran in the runtime's name);
an ExecuTorch `.pte` in ExecuTorch's runtime (XNNPACK). Every runtime gets the same number of
threads (torch.set_num_threads, onnxruntime's intra_op_num_threads, OpenVINO's
INFERENCE_NUM_THREADS, ExecuTorch's thread pool). Batch-1 latency is the median and 90th
percentile of single calls after a warm-up; batch-64 throughput is 64 images over the median
call.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import cifarlab
from cifarlab.deploy import choice, runtime
from cifarlab.errors import UserError

log = logging.getLogger("cifarlab")

BATCH = 64
# Calls per measurement: the full bench, and the quick one quantize uses to rank candidates.
LATENCY_RUNS, LATENCY_WARMUP = 200, 20
THROUGHPUT_RUNS, THROUGHPUT_WARMUP = 20, 3
QUICK = {"latency_runs": 30, "latency_warmup": 5, "throughput_runs": 5, "throughput_warmup": 1}


@dataclass
class Timing:
    latency_ms: float  # batch 1, median
    latency_p90_ms: float
    throughput: float  # images per second at batch BATCH (median call)


def _seconds(fn: Callable[[], Any], runs: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def measure(run: Callable[[np.ndarray], Any], images: np.ndarray, *, latency_runs: int =
            LATENCY_RUNS, latency_warmup: int = LATENCY_WARMUP, throughput_runs: int =
            THROUGHPUT_RUNS, throughput_warmup: int = THROUGHPUT_WARMUP) -> Timing:
    """`run` takes a uint8 NHWC batch; the input conversion is inside the timed call, as on a
    device that receives decoded images."""
    one = images[:1]
    batch = np.resize(images, (BATCH, *images.shape[1:]))  # repeats images when fewer
    single = _seconds(lambda: run(one), latency_runs, latency_warmup)
    many = _seconds(lambda: run(batch), throughput_runs, throughput_warmup)
    return Timing(1000 * statistics.median(single),
                  1000 * float(np.percentile(single, 90)),
                  BATCH / statistics.median(many))


def time_module(module: Any, images: np.ndarray) -> Timing:
    """A torch module in eager mode, float32, on the CPU."""
    return measure(lambda x: torch_logits(module, x), images)


def torch_logits(module: Any, images: np.ndarray) -> np.ndarray:
    """Logits of uint8 NHWC images, in chunks of 256."""
    import torch

    with torch.inference_mode():
        out = [module(torch.from_numpy(runtime.to_input(images[i : i + 256])))
               for i in range(0, len(images), 256)]
    return torch.cat(out).numpy()


def time_onnx(model: runtime.OnnxClassifier, images: np.ndarray, quick: bool = False) -> Timing:
    return measure(lambda x: model.run(runtime.to_input(x)), images, **(QUICK if quick else {}))


@dataclass
class Row:
    model: str  # the path as given
    runtime: str  # "torch eager fp32", "onnxruntime fp32", "openvino int8", ...
    architecture: dict[str, Any]
    params: int
    macs: int  # per image, forward
    file_mb: float  # 1 MB = 10^6 bytes
    latency_ms: float
    latency_p90_ms: float
    throughput: float
    acc: float | None = None  # percent, on `acc_split`
    acc_split: str | None = None  # "test" or "validation" (of the model's own seeded split)
    acc_images: int | None = None


@dataclass
class Header:
    cpu: str
    flags: list[str]
    threads: int
    torch: str
    onnxruntime: str
    cifarlab: str
    python: str
    load_average: list[float]  # 1, 5, 15 minutes, before the measurement
    load_average_after: list[float] = field(default_factory=list)
    date: str = ""
    openvino: str | None = None  # its version, where installed
    executorch: str | None = None

    def lines(self) -> list[str]:
        return [f"CPU: {self.cpu}; ISA: {', '.join(self.flags) or 'no AVX2'}",
                f"threads: {self.threads} (every runtime); {self.versions()}, Python "
                f"{self.python}; {self.date}",
                "load average (1/5/15 min): before " + _load(self.load_average)
                + (", after " + _load(self.load_average_after) if self.load_average_after
                   else "")]


    def versions(self) -> str:
        return ", ".join(f"{name} {version}" for name, version in (
            ("torch", self.torch), ("onnxruntime", self.onnxruntime),
            ("openvino", self.openvino), ("executorch", self.executorch)) if version)


def _load(values: Sequence[float]) -> str:
    return " ".join(f"{v:.2f}" for v in values)


def header(threads: int) -> Header:
    import onnxruntime
    import torch

    cpu = runtime.cpu_info()
    return Header(cpu.model, cpu.flags, threads, torch.__version__, onnxruntime.__version__,
                  cifarlab.__version__, platform.python_version(), list(os.getloadavg()),
                  date=time.strftime("%Y-%m-%d %H:%M %Z"), openvino=_version("openvino"),
                  executorch=_version("executorch"))


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def eval_set(spec: str, data_root: str | Path, split: dict[str, Any], classes: list[str]
             ) -> tuple[str, Any]:
    """The images to score a model on: `spec`'s test split, or when it has none the
    validation split of the model's own run (`split`: its data settings)."""
    from cifarlab.data.sources import load_source

    source = load_source(spec, data_root, label_set=split.get("label_set", "fine"))
    if source.test is None:
        return "validation", validation_set(spec, data_root, split, classes)
    if source.test.classes != classes:
        raise UserError(f"--data {spec}: classes {source.test.classes} are not the model's "
                        f"{classes}; give data of the same classes")
    return "test", source.test


def test_images(spec: str, data_root: str | Path, label_set: str, classes: list[str],
                whose: str) -> Any:
    """--test-data: the test split of `spec` (its training images when it has no split),
    checked to be of `classes` (`whose`, e.g. "the checkpoint's", names them in the error)."""
    from cifarlab.data.sources import load_source

    source = load_source(spec, data_root, label_set=label_set)
    data = source.test if source.test is not None else source.train
    if data.classes != classes:
        raise UserError(f"--test-data {spec}: classes {data.classes} are not {whose} "
                        f"{classes}; give test data of the same classes")
    return data


def validation_set(spec: str, data_root: str | Path, split: dict[str, Any],
                   classes: list[str]) -> Any:
    """The validation split of a model's own run, redrawn from `spec` with the run's split
    settings (`split`: its data settings, or the `split` an exported file records)."""
    import dataclasses

    from cifarlab.config import DataConfig
    from cifarlab.data.splits import prepare_splits

    known = {k: split[k] for k in ("val_fraction", "split_seed", "limit", "label_set",
                                   "resize") if k in split}
    config = dataclasses.replace(DataConfig(), source=spec, test_source="none",
                                 root=str(data_root), **known)
    data = prepare_splits(config).val
    if data.classes != classes:
        raise UserError(f"--data {spec}: classes {data.classes} are not the model's {classes}; "
                        "give data of the same classes")
    return data


def timing_images() -> np.ndarray:
    """The seeded batch every model is timed on (pixel values do not change the time)."""
    return np.random.default_rng(0).integers(0, 256, size=(BATCH, 32, 32, 3), dtype=np.uint8)


def accuracy(logits: Callable[[np.ndarray], np.ndarray], data: Any) -> float:
    """Percent of `data`'s images (an ImageSet) whose top-1 class is right."""
    return 100.0 * float((logits(data.images).argmax(1) == data.labels).mean())


@dataclass
class Opened:
    """A model in the runtime that applies to it, ready to time and score."""

    path: Path  # the file read: the checkpoint (a run folder's best.pt) or the deployed file
    runtime: str  # as Row.runtime
    architecture: dict[str, Any] | None  # create_model's arguments (model_args)
    split: dict[str, Any]  # the data settings of the model's run
    classes: list[str]
    call: Callable[[np.ndarray], Any]  # what is timed: one runtime call, uint8 NHWC in
    logits: Callable[[np.ndarray], np.ndarray]  # any number of uint8 NHWC images
    ckpt: dict[str, Any] | None = None  # torch models
    deployed: Any = None  # deployed files: the classifier (choice.open_in)


RUNTIME_CHOICES = (*choice.CHOICES, "all")


def open_models(given: str | Path, threads: int, wanted: str = "onnxruntime") -> list[Opened]:
    """A checkpoint or run folder (torch eager), or a deployed file in the runtime `wanted`
    (for an .onnx file; "all": every installed one), each with `threads` threads."""
    path = Path(given)
    if not choice.is_deployed(path):
        return [open_model(given, threads)]
    names = ([n for n in choice.runtimes_for(path) if choice.installed(n)] if wanted == "all"
             else [wanted if len(choice.runtimes_for(path)) > 1 else "auto"])
    if not names:
        raise UserError(f"{given}: none of {', '.join(choice.runtimes_for(path))} is "
                        "installed; install one (pip install 'cifarlab[deploy]')")
    opened = []
    for name in names:
        try:
            model = choice.choose(path, name, "latency", threads).model
        except UserError as e:
            if wanted != "all" or name == names[-1] and not opened:
                raise
            log.warning(f"note: {e}; no {name} row for it")  # the other runtimes still run
            continue
        opened.append(Opened(path, model.label, model.meta("architecture"),
                             model.meta("split", {}), model.classes,
                             lambda x, m=model: m.run(runtime.to_input(x)), model.logits,
                             deployed=model))
    return opened


def open_model(given: str | Path, threads: int, wanted: str = "onnxruntime") -> Opened:
    """A checkpoint or run folder (torch eager), or a deployed file in runtime `wanted`."""
    if choice.is_deployed(given):
        return open_models(given, threads, wanted)[0]
    from cifarlab.deploy.export import load

    loaded = load(given)
    module = loaded.module

    def logits(x: np.ndarray) -> np.ndarray:
        return torch_logits(module, x)

    return Opened(loaded.path, "torch eager fp32", loaded.ckpt["model_args"],
                  loaded.ckpt.get("config", {}).get("data", {}), list(loaded.ckpt["classes"]),
                  logits, logits, ckpt=loaded.ckpt)


def file_bytes(path: Path) -> int:
    """The deployed file's size; an OpenVINO IR's with its .bin."""
    weights = path.with_suffix(".bin")
    return path.stat().st_size + (weights.stat().st_size if path.suffix == ".xml" else 0)


def bench_model(given: str, threads: int, data: str | None, data_root: str | Path,
                wanted: str = "onnxruntime") -> list[Row]:
    """One model, a row per runtime: a checkpoint or run folder (torch eager), or a deployed
    file (open_models)."""
    from cifarlab.profile import model_size

    rows = []
    for model in open_models(given, threads, wanted):
        if model.architecture is None:
            raise UserError(f"{given}: no architecture in its metadata; give a file written "
                            "by cifarlab export or cifarlab quantize")
        timing = measure(model.call, timing_images())
        size = model_size(model.architecture)
        row = Row(given, model.runtime, model.architecture, size.params, size.macs,
                  file_bytes(model.path) / 1e6, **asdict(timing))
        if data is not None:
            row.acc_split, scored = eval_set(data, data_root, model.split, model.classes)
            row.acc = accuracy(model.logits, scored)
            row.acc_images = len(scored.labels)
        rows.append(row)
    return rows


@dataclass
class BenchResult:
    header: Header
    rows: list[Row]

    def to_json(self) -> str:
        return json.dumps({"header": asdict(self.header), "rows": [asdict(r) for r in self.rows]},
                          indent=2)

    def table(self) -> str:
        lines = self.header.lines()
        lines.append(f"{'model':<36} {'runtime':<24} {'batch 1 ms':>10} {'p90':>6} "
                     f"{'img/s @64':>9} {'MB':>6} {'params':>11} {'MMACs':>7} {'acc %':>6}")
        for r in self.rows:
            acc = f"{r.acc:6.2f}" if r.acc is not None else "     -"
            lines.append(f"{_short(r.model, 36):<36} {r.runtime:<24} {r.latency_ms:>10.2f} "
                         f"{r.latency_p90_ms:>6.2f} {r.throughput:>9.1f} {r.file_mb:>6.1f} "
                         f"{r.params:>11,} {r.macs / 1e6:>7.1f} {acc}")
        scored = {r.acc_split for r in self.rows if r.acc_split}
        if scored:
            lines.append(f"accuracy on the {' / '.join(sorted(scored))} split "
                         f"({self.rows[0].acc_images:,} images)")
        return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "..." + text[-(width - 3):]


def pin_threads(threads: int | None) -> int:
    """Give torch `threads` threads (None: every core this process may use); return the
    count, which onnxruntime sessions are then opened with."""
    import torch

    threads = threads or runtime.cpu_info().cores
    torch.set_num_threads(threads)
    return threads


def bench(models: Sequence[str], threads: int | None = None, data: str | None = None,
          data_root: str | Path = "data", wanted: str = "onnxruntime") -> BenchResult:
    """`wanted`: the runtime of .onnx files (RUNTIME_CHOICES)."""
    if wanted not in RUNTIME_CHOICES:
        raise UserError(f"--runtime {wanted}: must be one of {', '.join(RUNTIME_CHOICES)}")
    threads = pin_threads(threads)
    result = BenchResult(header(threads), [])
    for given in models:
        result.rows.extend(bench_model(given, threads, data, data_root, wanted))
    result.header.load_average_after = list(os.getloadavg())
    return result


# The accuracy axis of bench.png spans at least this many points, so that a few images of
# difference between two files (int8 against float32) does not look like a collapse.
MIN_ACC_SPAN = 10.0


def figure(result: BenchResult) -> Any:
    """Accuracy against batch-1 latency, one numbered point per model and runtime, and a key
    below naming each number; latency from 0 and accuracy over at least MIN_ACC_SPAN."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from cifarlab.plots import label_points

    fig = Figure(figsize=(8, 5.5), layout="constrained")
    ax = fig.add_subplot()
    scored = [r.acc for r in result.rows if r.acc is not None]
    points = [(r.latency_ms, r.acc if r.acc is not None else 0.0) for r in result.rows]
    ax.scatter([x for x, _ in points], [y for _, y in points], s=45, color="tab:blue",
               zorder=3)
    ax.set_xlabel(f"batch-1 latency, median (ms, {result.header.threads} threads)")
    ax.set_ylabel("accuracy (%)" if scored else "accuracy (no --data given)")
    ax.set_title(result.header.cpu, fontsize=10)
    ax.grid(alpha=0.3)
    ax.set_xlim(0, max((x for x, _ in points), default=1.0) * 1.25 or 1.0)
    lo, hi = (min(scored), max(scored)) if scored else (0.0, 0.0)
    pad = max(0.15 * (hi - lo), (MIN_ACC_SPAN - (hi - lo)) / 2)
    ax.set_ylim(max(-5.0, lo - pad), min(105.0, hi + pad))
    fig.legend([Line2D([], [], linestyle="none")] * len(result.rows),
               [f"{i + 1}: {r.model} ({r.runtime})" for i, r in enumerate(result.rows)],
               loc="outside lower center", ncol=1 if len(result.rows) < 4 else 2, fontsize=9,
               frameon=False, handlelength=0, handletextpad=0)
    at: dict[tuple[float, float], list[str]] = {}  # one spot, one label
    for i, xy in enumerate(points):
        at.setdefault(xy, []).append(str(i + 1))
    label_points(ax, list(at), [",".join(n) for n in at.values()], marker_radius=4.0)
    return fig
