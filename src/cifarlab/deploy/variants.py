"""Variants of one model side by side: accuracy against MACs, parameters, file size and
CPU latency, with the Pareto front of each (`cifarlab compare --variants`).

A variant is a run folder or checkpoint (PyTorch eager, float32) or a deployed file: an
`.onnx` file from `cifarlab export` (float32) or `cifarlab quantize` (int8), run in
onnxruntime or OpenVINO (`wanted`), an OpenVINO IR or an ExecuTorch `.pte`: the baseline, a
pruned or a distilled model, their exports. Every variant must classify the same classes.

- Accuracy is the validation accuracy of each variant's own seeded split, never the test
  accuracy (shown beside it, never used). Run folders and checkpoints: what training recorded
  in the checkpoint. Deployed files: measured here on the validation split of the source
  run's split settings (in the file's metadata) drawn from `data`, when `data` is given;
  otherwise what quantize measured (int8) or the source checkpoint's, which export records
  (float32, checked to match PyTorch); else not measured. Where it came from is in `acc_from`.
- Parameters and MACs: profile.model_size of the model's `model_args` (the checkpoint's, or
  the `architecture` an exported file records), so pruned architectures count as built.
- File size: bytes of the deployable file: the `.onnx` file; for PyTorch the checkpoint's
  model weights as `torch.save` writes them (best.pt less its config and bookkeeping).
- Speed: bench.measure, as `cifarlab bench` measures (batch-1 median and 90th percentile,
  batch-64 throughput), every runtime pinned to the same number of threads.

A variant is on the Pareto front of a cost (MACs, parameters, size, latency) when no other
variant has higher-or-equal accuracy and lower-or-equal cost, one of them strictly; equal
variants are both on it. Variants without an accuracy are left out of the fronts. The figure
and the written report are variants_report.py's.
"""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from cifarlab.deploy import bench, choice
from cifarlab.errors import UserError

VARIANTS_MD, VARIANTS_HTML, VARIANTS_PNG = "variants.md", "variants.html", "variants.png"
FIGURE_SIZE = (12.0, 9.0)  # inches
RUNTIME_COLORS = {"torch eager fp32": "tab:blue", "onnxruntime fp32": "tab:green",
                  "onnxruntime int8": "tab:red", "openvino fp32": "tab:purple",
                  "openvino bf16": "tab:brown", "openvino int8": "tab:orange",
                  "executorch xnnpack fp32": "tab:olive", "executorch xnnpack int8": "tab:pink"}
NONE = "\u2014"  # an em dash where there is no value
# Where a variant's validation accuracy came from (Variant.acc_from).
ACC_FROM = {
    "checkpoint": "recorded in the checkpoint by training",
    "export": "the source checkpoint's, recorded by cifarlab export (its outputs match)",
    "quantize": "measured by cifarlab quantize on the validation split",
    "measured": "measured here on the validation split drawn from --data",
}


@dataclass(frozen=True)
class Cost:
    key: str  # in Variant.pareto and the JSON
    name: str  # in the table
    label: str  # the figure's x axis
    of: Callable[[Variant], float]  # the value drawn


COSTS = (
    Cost("macs", "MACs", "MACs per image, forward (millions)", lambda v: v.macs / 1e6),
    Cost("params", "params", "parameters (millions)", lambda v: v.params / 1e6),
    Cost("size", "size", "file size (MB, 10^6 bytes)", lambda v: v.file_bytes / 1e6),
    Cost("latency", "latency", "batch-1 latency, median (ms)", lambda v: v.latency_ms),
)


@dataclass
class Variant:
    label: str  # how the table and the figure name it
    given: str  # the path as given
    file: str  # the file read (a run folder's best.pt)
    runtime: str  # "torch eager fp32", "onnxruntime fp32" or "onnxruntime int8"
    architecture: dict[str, Any]  # create_model's arguments
    val_acc: float | None  # percent, on the validation split of the variant's own run
    acc_from: str | None  # a key of ACC_FROM; None without an accuracy
    test_acc: float | None  # percent; the run's recorded one; shown, never used
    params: int
    macs: int  # multiply-accumulates per 32x32 image, forward
    file_bytes: int
    latency_ms: float  # batch 1, median
    latency_p90_ms: float
    throughput: float  # images per second at batch bench.BATCH
    pareto: dict[str, bool] = field(default_factory=dict)  # Cost.key -> on that front


@dataclass
class VariantsResult:
    header: bench.Header
    variants: list[Variant]
    data: str | None  # the --data the .onnx files were scored on
    test_data: str | None = None  # --test-data: every variant's test accuracy measured on it
    test_images: int = 0

    def to_json(self) -> str:
        return json.dumps({"header": asdict(self.header), "data": self.data,
                           "test_data": self.test_data, "test_images": self.test_images,
                           "variants": [asdict(v) for v in self.variants]}, indent=2)

    @classmethod
    def from_json(cls, text: str) -> VariantsResult:
        raw = json.loads(text)
        return cls(bench.Header(**raw["header"]), [Variant(**v) for v in raw["variants"]],
                   raw["data"], raw.get("test_data"), raw.get("test_images", 0))


def pareto_front(accs: Sequence[float | None], costs: Sequence[float]) -> list[bool]:
    """Per point: no other point has accuracy >= and cost <=, one of them strictly.
    Points without an accuracy are never on the front and beat no other."""
    points = [(a, c) for a, c in zip(accs, costs, strict=True)]

    def beaten(a: float, c: float) -> bool:
        return any(b is not None and b >= a and d <= c and (b > a or d < c) for b, d in points)

    return [a is not None and not beaten(a, c) for a, c in points]


# ------------------------------------------------------------------------------ measuring


def labels_of(items: Sequence[str]) -> list[str]:
    """A run folder by its name, a file by its folder and name; the path as given where
    those repeat."""
    def short(item: str) -> str:
        path = Path(item).resolve()
        return path.name if path.is_dir() else f"{path.parent.name}/{path.name}"

    names = [short(i) for i in items]
    return [n if names.count(n) == 1 else i for n, i in zip(names, items, strict=True)]


def _open(item: str, threads: int, wanted: str) -> bench.Opened:
    if not Path(item).exists():
        raise UserError(f"variant {item}: no such file or folder; give a run folder, a "
                        "checkpoint or an .onnx file from cifarlab export or quantize")
    model = bench.open_model(item, threads, wanted)
    if model.architecture is None:
        raise UserError(f"variant {item}: no architecture in its metadata; give a file "
                        "written by cifarlab export or cifarlab quantize")
    return model


def _check_classes(labels: list[str], models: list[bench.Opened]) -> None:
    first = models[0].classes
    for label, model in zip(labels[1:], models[1:], strict=True):
        if model.classes == first:
            continue
        if len(model.classes) != len(first):
            how = f"{len(model.classes)} classes, {labels[0]} {len(first)}"
        else:
            i = next(i for i, (a, b) in enumerate(zip(model.classes, first, strict=True))
                     if a != b)
            how = f"class {i} is {model.classes[i]!r}, in {labels[0]} {first[i]!r}"
        raise UserError(f"variant {label} is not comparable with {labels[0]} ({how}); compare "
                        "variants of one model, trained on the same classes")


def _recorded(item: str, model: bench.Opened) -> tuple[float | None, str | None, float | None]:
    """Validation accuracy, where it came from, and test accuracy, as the files record them."""
    if model.deployed is not None:
        if model.deployed.meta("quantization") is not None:
            acc = (model.deployed.meta("quantization") or {}).get("val_acc_int8")
            return acc, "quantize" if acc is not None else None, None
        acc = model.deployed.meta("source_val_acc")
        return acc, "export" if acc is not None else None, None
    assert model.ckpt is not None
    acc = model.ckpt.get("val_acc")
    test = None
    folder = Path(item)
    if folder.is_dir() and (folder / "result.json").is_file():
        from cifarlab.runs import read_run

        test = read_run(folder).test_acc
    return acc, "checkpoint" if acc is not None else None, test


def _weights_bytes(ckpt: dict[str, Any]) -> int:
    import torch

    buffer = io.BytesIO()
    torch.save(ckpt["model"], buffer)
    return buffer.tell()


def test_set(spec: str, data_root: str | Path, model: bench.Opened) -> Any:
    """--test-data: the test images of `spec`, of the variants' classes."""
    return bench.test_images(spec, data_root, model.split.get("label_set", "fine"),
                             model.classes, "the variants'")


def compare_variants(items: Sequence[str], threads: int | None = None,
                     data: str | None = None, data_root: str | Path = "data",
                     test_data: str | None = None, wanted: str = "onnxruntime"
                     ) -> VariantsResult:
    """Open every variant and check them (classes, data) before measuring any; `wanted`:
    the runtime of .onnx files (choice.CHOICES). With `test_data`, every variant's test
    accuracy is measured on it (shown, never used)."""
    from cifarlab.profile import model_size

    if len(items) < 2:
        raise UserError("compare --variants needs at least two variants (run folders, "
                        "checkpoints or .onnx files); to time one model, use cifarlab bench")
    threads = bench.pin_threads(threads)
    labels = labels_of(items)
    if wanted not in choice.CHOICES:
        raise UserError(f"--runtime {wanted}: must be one of {', '.join(choice.CHOICES)}")
    models = [_open(item, threads, wanted) for item in items]
    _check_classes(labels, models)
    recorded = [_recorded(item, m) for item, m in zip(items, models, strict=True)]
    scored: dict[str, Any] = {}  # split settings (JSON) -> validation images
    to_measure = []
    for item, model, (acc, _, _) in zip(items, models, recorded, strict=True):
        if data is None or (model.deployed is None and acc is not None):
            to_measure.append(None)
            continue
        if "split_seed" not in model.split:
            raise UserError(f"variant {item}: its metadata records no data split, so its "
                            "validation images are unknown; export it again, or leave out "
                            "--data")
        key = json.dumps(model.split, sort_keys=True)
        if key not in scored:
            scored[key] = bench.validation_set(data, data_root, model.split, model.classes)
        to_measure.append(scored[key])
    test = test_set(test_data, data_root, models[0]) if test_data is not None else None
    result = VariantsResult(bench.header(threads), [], data, test_data,
                            len(test.labels) if test is not None else 0)
    images = bench.timing_images()
    for item, label, model, (acc, acc_from, test_acc), val in zip(
            items, labels, models, recorded, to_measure, strict=True):
        timing = bench.measure(model.call, images)
        if val is not None:
            acc, acc_from = bench.accuracy(model.logits, val), "measured"
        if test is not None:
            test_acc = bench.accuracy(model.logits, test)
        size = model_size(model.architecture or {})
        file_bytes = (bench.file_bytes(model.path) if model.ckpt is None
                      else _weights_bytes(model.ckpt))
        result.variants.append(Variant(
            label, item, str(model.path), model.runtime, model.architecture or {}, acc,
            acc_from, test_acc, size.params, size.macs, file_bytes, **asdict(timing)))
    result.header.load_average_after = list(os.getloadavg())
    mark_fronts(result.variants)
    return result


def mark_fronts(variants: list[Variant]) -> None:
    accs = [v.val_acc for v in variants]
    for cost in COSTS:
        for v, on in zip(variants, pareto_front(accs, [cost.of(v) for v in variants]),
                         strict=True):
            v.pareto[cost.key] = on


# ------------------------------------------------------------------------------ rendering


def table(result: VariantsResult) -> Any:
    """One row per variant (a document.Table)."""
    from cifarlab.document import Table

    big = max(v.file_bytes for v in result.variants) >= 10e6
    unit, scale = ("MB", 1e6) if big else ("kB", 1e3)

    def pct(value: float | None) -> str:
        return NONE if value is None else f"{value:.2f}"

    rows = []
    for v in result.variants:
        front = [c.name for c in COSTS if v.pareto.get(c.key)]
        rows.append([v.label, v.runtime, pct(v.val_acc), v.acc_from or NONE, pct(v.test_acc),
                     f"{v.macs / 1e6:,.2f}", f"{v.params:,}", f"{v.file_bytes / scale:,.1f}",
                     f"{v.latency_ms:.3f}", f"{v.throughput:,.0f}",
                     ", ".join(front) or NONE])
    return Table(["variant", "runtime", "val acc (%)", "acc from", "test acc (%)", "MMACs",
                  "params", f"size ({unit})", "batch 1 (ms)", f"img/s @{bench.BATCH}",
                  "Pareto front of"], rows, "llrlrrrrrrl")


def notes(result: VariantsResult) -> list[str]:
    used = [k for k in ACC_FROM if any(v.acc_from == k for v in result.variants)]
    lines = ["val acc: validation accuracy of each variant's own seeded split ("
             + "; ".join(f"{k}: {ACC_FROM[k]}" for k in used) + "); test accuracy is shown, "
             "never used to choose."]
    if result.test_data is not None:
        lines.append(f"test acc: measured here for every variant on {result.test_data} "
                     f"({result.test_images:,} images).")
    missing = [v.label for v in result.variants if v.val_acc is None]
    if missing:
        lines.append(f"No accuracy for {', '.join(missing)} (give --data to measure it); "
                     "left out of the fronts and the figure.")
    lines.append("Pareto front of a cost: no other variant has higher-or-equal validation "
                 "accuracy and lower-or-equal cost (one strictly). Size: the .onnx file, or "
                 "the checkpoint's model weights as torch.save writes them. Batch 1: median "
                 f"of single calls; img/s at batch {bench.BATCH}.")
    return lines


def text(result: VariantsResult, markdown: bool = False) -> str:
    from cifarlab.document import markdown_table, text_table

    render = markdown_table if markdown else text_table
    return "\n".join([*result.header.lines(), "", render(table(result)), "",
                      *notes(result)])
