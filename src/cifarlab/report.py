"""The written report of a run: its results, curves, test set, data, model, settings and
epoch log, as a document (document.py) rendered twice, Markdown with its figures as files
beside it and one self-contained HTML page. `write_report(run_dir)` writes both into the run
folder; `train` calls it at the end of every run, `cifarlab report` at any time.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from cifarlab import __version__, checkpoint
from cifarlab.comparison import comparison_tables
from cifarlab.document import (
    NONE,
    Block,
    Code,
    Details,
    Document,
    Image,
    Section,
    Table,
    Text,
    to_html,
    to_markdown,
    write_files,
)
from cifarlab.errors import UserError
from cifarlab.plots import confusion_figure, curves_figure, figure_bytes
from cifarlab.profile import ModelProfile, has_layer_tables, profile_model
from cifarlab.runs import Run, read_run, read_runs

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"


# ------------------------------------------------------------------------------- the report


def write_report(run_dir: str | Path, against: str | Path | None = None) -> Path:
    """Write report.md, report.html and their figures into `run_dir`; return the HTML path.

    With `against`, the figure and a table compare the run with that run (deltas against it).
    Raises UserError for a folder that is not a run, or when the files cannot be written.
    """
    run_dir = Path(run_dir)
    checkpoint.check_run_files(run_dir, (REPORT_MD, REPORT_HTML, CURVES_PNG, CONFUSION_PNG))
    if against is None:
        run, other = read_run(run_dir), None
    else:
        run, other = read_runs([run_dir, against])
    classes, data = _classes_and_data(run)
    model = run.config.model
    pruning = _read_pruning(run_dir)  # a pruned run's architecture is in prune.json
    # Without torchinfo the report leaves its layer table out rather than fail at a run's end.
    profile = profile_model(model.name, classes=len(classes), width=model.width,
                            args=pruning["model_args"] if pruning else None,
                            table=has_layer_tables())

    figures = {CURVES_PNG: figure_bytes(curves_figure([run] if other is None else [run, other]))}
    confusion = run.result.get("test_confusion") if run.result else None
    if confusion is not None:
        title = (f"Test set, best checkpoint (epoch {run.best.epoch}): "
                 f"{run.test_acc:.2f} % correct")
        figures[CONFUSION_PNG] = figure_bytes(confusion_figure(confusion, classes, title))
    document = build_document(run, other, classes, data, profile, pruning)
    outputs = dict(figures)
    outputs[REPORT_MD] = to_markdown(document).encode()
    outputs[REPORT_HTML] = to_html(document, figures).encode()
    write_files(run_dir, outputs, f"free disk space or make the folder writable, then run: "
                f"cifarlab report {run_dir}")
    return run_dir / REPORT_HTML


def _classes_and_data(run: Run) -> tuple[list[str], dict[str, Any]]:
    """Class names and the data statistics (image counts, measured mean and std): from
    result.json, or for an unfinished run from its last checkpoint (without counts)."""
    if run.result is not None and run.result.get("data"):
        return run.result["classes"], run.result["data"]
    ckpt = checkpoint.load(run.folder / "last.pt")
    return ckpt["classes"], {"mean": ckpt["mean"], "std": ckpt["std"]}


def build_document(run: Run, other: Run | None, classes: list[str], data: dict[str, Any],
                   profile: ModelProfile, pruning: dict[str, Any] | None = None) -> Document:
    curves = Image(CURVES_PNG, "Training curves", _curves_caption(run, other))
    sections = [Section("Results", [_results_table(run, data)]), Section("Curves", [curves])]
    if other is not None:
        sections.append(Section(f"Comparison with {other.label}", [
            Text(f"Deltas against {other.label}: accuracy in percentage points, time in "
                 "seconds; then every setting that differs."),
            *comparison_tables([other, run]),
        ]))
    sections.append(Section("Test set", _test_blocks(run, classes)))
    sections.append(Section("Data", _data_blocks(run, classes, data)))
    sections.append(Section("Model", _model_blocks(profile)))
    if pruning is not None:
        sections.append(Section("Pruning", _pruning_blocks(run, pruning)))
    # A pruned run's config.yaml would train its unpruned architecture: its repeat is prune.
    config_file = run.folder / "config.yaml"
    repeat = f"`cifarlab train --config {config_file} --name NEW_NAME`"
    if pruning is not None:
        flag = {"macs": "--target-macs", "params": "--target-params", "ratio": "--ratio"}[
            pruning["target"]["measure"]]
        repeat = (f"`cifarlab prune {pruning['parent']} {flag} "
                  f"{pruning['target']['fraction']:g} --importance {pruning['importance']} "
                  f"--steps {pruning['steps']} --round-to {pruning['round_to']} --config "
                  f"{config_file} --name NEW_NAME` (the pruned architecture is what prune "
                  "makes, not a setting: `train --config` would train the unpruned one)")
    sections.append(Section("Settings", [
        Text(f"The resolved settings (config.yaml); repeat the run with {repeat}."),
        Code(run.config.to_yaml().rstrip()),
    ]))
    sections.append(Section("Epoch log", [_epoch_table(run)]))
    written = time.strftime("%Y-%m-%d %H:%M")
    footer = f"Written by cifarlab {__version__} on {written} from the run folder {run.folder}."
    return Document(f"Run {run.label}", [Text(_summary(run))], sections, footer)


def _summary(run: Run) -> str:
    model, best = run.config.model, run.best
    text = (f"{model.name} (width {model.width}) trained with the {run.config.preset} preset on "
            f"{run.config.data.source}. Best validation accuracy {best.val_acc:.2f} % at epoch "
            f"{best.epoch} of {run.epochs_run}")
    if run.test_acc is not None:
        text += f"; test accuracy of that checkpoint {run.test_acc:.2f} %"
    if run.result is None:
        return text + ". The run is unfinished (interrupted or still training): no test accuracy."
    return text + f". Trained in {run.train_seconds:,.1f} s on {run.result['device']}."


def _results_table(run: Run, data: dict[str, Any]) -> Table:
    best = run.best
    test = NONE
    if run.test_acc is not None:
        test = f"{run.test_acc:.2f} % of {data.get('test_images', 0):,} images (best.pt)"
    elif run.finished:
        test = f"{NONE} (no test data)"
    rows = [
        ["best validation accuracy", f"{best.val_acc:.2f} % at epoch {best.epoch}"],
        ["test accuracy", test],
        ["epochs run", f"{run.epochs_run} of {run.config.epochs}: {_status(run)}"],
        ["training time", f"{run.train_seconds:,.1f} s "
                          f"({run.train_seconds / run.epochs_run:,.1f} s per epoch)"],
    ]
    if run.config.tta_flip or run.config.tta_translate:
        views = [*(["its mirror image (tta_flip)"] if run.config.tta_flip else []),
                 *(["copies shifted by one pixel (tta_translate)"]
                   if run.config.tta_translate else [])]
        rows.append(["scoring", "each validation and test image by the mean logits of it and "
                                + " and ".join(views)])
    teacher = run.result.get("teacher") if run.result is not None else None
    if teacher:
        rows.append(["distilled from", _teacher_text(teacher, run.config.distill)])
    if run.result is not None:
        rows.append(["device", f"{run.result['device']}, torch {run.result['torch_version']}"])
        if "precision" in run.result:  # runs from before the precision choice lack it
            n = run.result["threads"]
            rows.append(["precision", f"trained in {run.result['precision']} with {n} "
                                      f"thread{'s' if n != 1 else ''}: "
                                      f"{run.result['precision_reason']}"])
    return Table(["", ""], rows)


def _teacher_text(teacher: dict[str, Any], distill: Any) -> str:
    """The teacher of a distilled run: its file, model and accuracies, and the loss's
    settings."""
    own = teacher.get("val_acc")
    here = teacher.get("val_acc_on_student_split")
    scores = [f"{own:.2f} % on its own validation split" if own is not None else None,
              f"{here:.2f} % on this run's" if here is not None else None]
    shown = "; ".join(s for s in scores if s)
    return (f"{teacher['path']} ({teacher['model']}{'; ' + shown if shown else ''}), "
            f"temperature {distill.temperature:g}, alpha {distill.alpha:g}")


def _status(run: Run) -> str:
    if run.status == "stopped early":
        return f"stopped early, no better validation accuracy in {run.config.patience} epochs"
    if run.status == "unfinished":
        return "unfinished (interrupted or still training)"
    return run.status


def _curves_caption(run: Run, other: Run | None) -> str:
    loss = "cross-entropy"
    if run.config.optim.label_smoothing:
        loss += f" with label smoothing {run.config.optim.label_smoothing:g}"
    last = (f"the validation accuracy of {run.label} and {other.label}" if other is not None
            else "the time per epoch")
    return (f"Loss ({loss}) and accuracy of {run.label} per epoch, the dotted line and star at "
            f"the best epoch; the learning rate at the last step of each epoch; {last}.")


def _test_blocks(run: Run, classes: list[str]) -> list[Block]:
    if run.result is None:
        return [Text("The run is unfinished: the test set is scored when it ends.")]
    confusion = run.result.get("test_confusion")
    if run.test_acc is None or confusion is None:
        return [Text("No test data: the run had no test split (data.test_source).")]
    rows = []
    for i, name in enumerate(classes):
        total = sum(confusion[i])
        acc = run.result["test_per_class_acc"][i]
        wrong = [(count, j) for j, count in enumerate(confusion[i]) if j != i and count]
        mistaken = NONE
        if wrong:
            count, j = max(wrong)
            mistaken = f"{classes[j]} ({count:,})"
        rows.append([name, f"{total:,}", f"{confusion[i][i]:,}",
                     NONE if acc is None else f"{acc:.2f}", mistaken])
    table = Table(["class", "test images", "correct", "accuracy (%)", "most often taken for"],
                  rows, "lrrrl")
    return [
        Text(f"The checkpoint with the best validation accuracy (epoch {run.best.epoch}) on the "
             f"test split: {run.test_acc:.2f} % correct."),
        table,
        Image(CONFUSION_PNG, "Confusion matrix",
              "Confusion matrix: rows are true classes, columns predictions; counts in the "
              "cells, colour by the share of the true class."),
    ]


def _data_blocks(run: Run, classes: list[str], data: dict[str, Any]) -> list[Block]:
    config = run.config.data

    def count(key: str) -> str:
        return f"{data[key]:,}" if key in data else NONE

    limit = f", a class-balanced subset of {config.limit:,}" if config.limit else ""
    split = Table(["", ""], [
        ["source", f"{config.source}{limit}"],
        ["test source", config.test_source],
        ["training images", count("train_images")],
        ["validation images", f"{count('val_images')} ({config.val_fraction:.0%} of the "
                              f"training data, split seed {config.split_seed})"],
        ["test images", count("test_images")],
        [f"classes ({len(classes)})", ", ".join(classes)],
    ])
    channels = Table(["channel", "mean", "std", "mean (0-255)", "std (0-255)"], [
        [name, f"{m:.4f}", f"{s:.4f}", f"{255 * m:.2f}", f"{255 * s:.2f}"]
        for name, m, s in zip(("red", "green", "blue"), data["mean"], data["std"], strict=True)
    ], "lrrrr")
    return [split, Text("Normalisation: per-channel mean and standard deviation measured on "
                        "the training split, pixel values scaled to [0, 1]."), channels]


def _model_blocks(profile: ModelProfile) -> list[Block]:
    table = Table(["", ""], [
        ["model", f"{profile.model}, width {profile.width}, {profile.classes} classes"],
        ["parameters", f"{profile.params:,} ({profile.trainable_params:,} trainable)"],
        ["weights", f"{profile.weights_mb:.2f} MB (float32, parameters and buffers)"],
        ["MACs per image, forward", f"{_giga(profile.macs)} (multiply-accumulates)"],
        ["FLOPs per image, forward", _giga(profile.flops_forward)],
        ["FLOPs per image, training step", f"{_giga(profile.flops_train_step)} "
                                           "(forward + backward)"],
    ])
    layers: Block = (Details("Layer table (torchinfo)", Code(profile.table)) if profile.table
                     else Text("The layer table needs the torchinfo package (pip install "
                               "torchinfo), which is not installed here."))
    return [Text("Per 32x32 image. MACs counted as torchinfo counts them, FLOPs by "
                 "torch.utils.flop_counter: FLOPs = 2 x MACs, a multiply-accumulate being two "
                 "floating-point operations."),
            table, layers]


def _read_pruning(run_dir: Path) -> dict[str, Any] | None:
    """The run's prune.json (cifarlab prune writes it), or None."""
    path = run_dir / "prune.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read it ({e}); check the file") from None


def _pruning_blocks(run: Run, pruning: dict[str, Any]) -> list[Block]:
    before, after = pruning["before"], pruning["after"]
    target = pruning["target"]

    def ratio(key: str) -> str:
        return f"{after[key] / before[key]:.3f}" if before[key] else NONE

    table = Table(["", "parent", "pruned", "pruned / parent"], [
        ["MACs per image", _giga(before["macs"]), _giga(after["macs"]), ratio("macs")],
        ["parameters", f"{before['params']:,}", f"{after['params']:,}", ratio("params")],
        ["validation accuracy", f"{before['val_acc']:.2f} %",
         f"{after['val_acc_before_finetune']:.2f} % before fine-tuning, "
         f"{run.best.val_acc:.2f} % after", ""],
        ["CPU latency, batch 1 (median)", f"{before['latency_ms']:.2f} ms",
         f"{after['latency_ms']:.2f} ms", ratio("latency_ms")],
        ["CPU throughput, batch 64", f"{before['throughput']:,.0f} images/s",
         f"{after['throughput']:,.0f} images/s", ratio("throughput")],
    ], "lrrr")
    if "latency_p90_ms" in before:
        table.rows.insert(4, ["CPU latency, batch 1 (p90)", f"{before['latency_p90_ms']:.2f} ms",
                              f"{after['latency_p90_ms']:.2f} ms", ratio("latency_p90_ms")])
    layers = Table(["layer", "channels before", "after"], [
        [name, str(b), str(a)] for name, (b, a) in pruning["channels"].items()], "lrr")
    kept = [(b, a) for b, a in pruning["channels"].values()]
    removed, total = sum(b - a for b, a in kept), sum(b for b, _ in kept)
    loads = [s.get("load_average") for s in (before, after)]
    load = (f" Load average (1 min) before each measurement: {loads[0][0]:.2f} and "
            f"{loads[1][0]:.2f}." if all(loads) else "")
    noise = (" **The latencies were noisy** (p90 over 1.5 times the median): their ratio "
             "says little; measure again on an idle machine (`cifarlab bench`)."
             if pruning.get("latency_noisy") else "")
    return [
        Text(f"Pruned from {pruning['parent']} by {pruning['importance']} importance in "
             f"{pruning['steps']} step(s), channels in multiples of {pruning['round_to']}, "
             f"for a target of {target['fraction']:g} ({target['measure']}): {removed:,} of "
             f"the {total:,} channels of the pruned layers removed ({removed / max(total, 1):.1%}"
             "; the multiples make it uneven, per layer below). Latency measured in eager "
             f"PyTorch on this machine's CPU with {pruning['threads']} thread(s); the MAC "
             f"ratio is what papers call the speed-up, the measured one may differ.{load}"
             f"{noise}"),
        table, Details("Channels of each pruned layer", layers)]


def _giga(count: int) -> str:
    """A count of operations in G (10^9), or in M (10^6) for small models."""
    return f"{count / 1e9:.3f} G" if count >= 1e8 else f"{count / 1e6:.2f} M"


def _epoch_table(run: Run) -> Table:
    best = run.best.epoch
    rows = [[str(e.epoch), f"{e.lr:.4g}", f"{e.train_loss:.4f}", f"{e.train_acc:.2f}",
             f"{e.val_loss:.4f}", f"{e.val_acc:.2f}", f"{e.seconds:.1f}",
             "best" if e.epoch == best else ""] for e in run.history]
    return Table(["epoch", "learning rate", "train loss", "train acc (%)", "val loss",
                  "val acc (%)", "time (s)", ""], rows, "rrrrrrrl")
