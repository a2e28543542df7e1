"""The written report of a run, and the table that compares runs.

A report is built once as a small document (sections of text, tables, figures and code)
and rendered twice: Markdown with its figures as files beside it, and one self-contained
HTML page (figures embedded as data URIs, inline CSS, nothing fetched from anywhere).
`write_report(run_dir)` writes both into the run folder; `train` calls it at the end of
every run, `cifarlab report` at any time.
"""

from __future__ import annotations

import base64
import html
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cifarlab import __version__, checkpoint
from cifarlab.config import flat_settings
from cifarlab.errors import UserError
from cifarlab.plots import confusion_figure, curves_figure, figure_bytes
from cifarlab.profile import ModelProfile, has_layer_tables, profile_model
from cifarlab.runs import Run, read_run, read_runs

REPORT_MD = "report.md"
REPORT_HTML = "report.html"
CURVES_PNG = "curves.png"
CONFUSION_PNG = "confusion.png"
# Settings that name a run rather than change what it computes.
IDENTITY = ("name", "out")
NONE = "\u2014"  # an em dash where there is no value


# ------------------------------------------------------------------------------- document


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]
    align: str = ""  # per column: "l" or "r"; missing columns are left-aligned

    def column_align(self, i: int) -> str:
        return self.align[i] if i < len(self.align) else "l"


@dataclass
class Text:
    text: str


@dataclass
class Image:
    file: str  # beside the Markdown file
    alt: str  # a few words, for readers that show no images
    caption: str


@dataclass
class Code:
    text: str


@dataclass
class Details:
    """Shown folded: long material a reader opens when they want it."""

    summary: str
    body: Code


Block = Table | Text | Image | Code | Details


@dataclass
class Section:
    title: str
    blocks: list[Block] = field(default_factory=list)


@dataclass
class Document:
    title: str
    intro: list[Block]
    sections: list[Section]
    footer: str


# ------------------------------------------------------------------------------- tables


def text_table(table: Table) -> str:
    """A plain-text table for the terminal: padded columns, a rule under the header."""
    rows = [table.header, *table.rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(table.header))]

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if table.column_align(i) == "r" else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths, strict=True))).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table.header), rule, *(line(r) for r in table.rows)])


def markdown_table(table: Table) -> str:
    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    rule = ["---:" if table.column_align(i) == "r" else "---" for i in range(len(table.header))]
    return "\n".join([line(table.header), "|" + "|".join(rule) + "|",
                      *(line(r) for r in table.rows)])


def comparison_tables(runs: Sequence[Run]) -> list[Table]:
    """Results with each run's delta against the first (accuracy in percentage points, time
    in seconds), then the settings that differ between the runs (when any do)."""
    ref = runs[0]
    header = [r.label for r in runs]

    def delta(value: float | None, base: float | None, i: int, fmt: str) -> str:
        if value is None:
            return NONE
        if i == 0 or base is None:
            return format(value, fmt)
        return f"{value:{fmt}} ({value - base:+{fmt}})"

    results = Table(["", *header], [
        ["best validation accuracy (%)",
         *(delta(r.best.val_acc, ref.best.val_acc, i, ".2f") for i, r in enumerate(runs))],
        ["test accuracy (%)",
         *(delta(r.test_acc, ref.test_acc, i, ".2f") for i, r in enumerate(runs))],
        ["best epoch", *(str(r.best.epoch) for r in runs)],
        ["epochs run", *(f"{r.epochs_run} of {r.config.epochs}" for r in runs)],
        ["status", *(r.status for r in runs)],
        ["training time (s)",
         *(delta(r.train_seconds, ref.train_seconds, i, ",.0f") for i, r in enumerate(runs))],
        ["device", *(r.result["device"] if r.result else NONE for r in runs)],
    ], "l" + "r" * len(runs))
    settings = [flat_settings(r.config) for r in runs]
    differing = [key for key in settings[0] if key not in IDENTITY
                 and any(s[key] != settings[0][key] for s in settings[1:])]
    if not differing:
        return [results]
    rows = [[key, *(_setting(s[key]) for s in settings)] for key in differing]
    return [results, Table(["setting that differs", *header], rows, "l" + "r" * len(runs))]


def _setting(value: Any) -> str:
    """A setting as config.yaml writes it."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_setting(v) for v in value) + "]"
    return str(value)


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


def write_files(folder: Path, outputs: dict[str, bytes], fix: str) -> list[Path]:
    """Write each of `outputs` (file name: contents) atomically into `folder`; a one-line
    UserError that ends with `fix` when one cannot be written. Returns the paths."""
    paths = []
    for name, content in outputs.items():
        path = folder / name
        try:
            checkpoint.write_atomic(path, lambda f, content=content: f.write(content))
        except OSError as e:
            raise UserError(f"cannot write {path} ({e.strerror or e}); {fix}") from None
        paths.append(path)
    return paths


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
    sections.append(Section("Settings", [
        Text("The resolved settings (config.yaml); repeat the run with "
             f"`cifarlab train --config {run.folder / 'config.yaml'} --name NEW_NAME`."),
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
    layers = Table(["layer", "channels before", "after"], [
        [name, str(b), str(a)] for name, (b, a) in pruning["channels"].items()], "lrr")
    return [
        Text(f"Pruned from {pruning['parent']} by {pruning['importance']} importance in "
             f"{pruning['steps']} step(s), channels in multiples of {pruning['round_to']}: "
             f"{pruning['channel_ratio']:.3f} of each layer's channels removed for a target "
             f"of {target['fraction']:g} ({target['measure']}). Latency measured in eager "
             f"PyTorch on this machine's CPU with {pruning['threads']} thread(s); the MAC "
             "ratio is what papers call the speed-up, the measured one may differ."),
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


# ------------------------------------------------------------------------------- rendering


def to_markdown(doc: Document) -> str:
    parts = [f"# {doc.title}"]
    parts += [_markdown_block(b) for b in doc.intro]
    for section in doc.sections:
        parts.append(f"## {section.title}")
        parts += [_markdown_block(b) for b in section.blocks]
    parts.append(f"*{doc.footer}*")
    return "\n\n".join(parts) + "\n"


def _markdown_block(block: Block) -> str:
    if isinstance(block, Table):
        return markdown_table(block)
    if isinstance(block, Text):
        return block.text
    if isinstance(block, Image):
        return f"![{block.alt}]({block.file})\n\n*{block.caption}*"
    if isinstance(block, Code):
        return f"```\n{block.text}\n```"
    # GitHub and most viewers fold <details>; the blank lines keep the fence Markdown.
    return (f"<details>\n<summary>{html.escape(block.summary)}</summary>\n\n"
            f"{_markdown_block(block.body)}\n\n</details>")


CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: #1f2328;
       margin: 0; background: #f6f8fa; line-height: 1.5; }
main { max-width: 1240px; margin: 0 auto; padding: 24px 32px 48px; background: #fff; }
h1 { font-size: 1.9em; border-bottom: 2px solid #d0d7de; padding-bottom: 6px; }
h2 { font-size: 1.35em; margin-top: 1.8em; border-bottom: 1px solid #d0d7de; }
table { border-collapse: collapse; margin: 12px 0; font-size: 0.93em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; vertical-align: top; }
th { background: #eef1f4; }
tbody tr:nth-child(even) { background: #f6f8fa; }
td.r, th.r { text-align: right; font-variant-numeric: tabular-nums; }
td.l, th.l { text-align: left; }
figure { margin: 16px 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #d0d7de; }
figcaption { color: #57606a; font-size: 0.9em; margin-top: 4px; }
pre { background: #f6f8fa; border: 1px solid #d0d7de; padding: 10px; overflow-x: auto;
      font-size: 0.85em; }
code { font-family: ui-monospace, "SFMono-Regular", Menlo, Consolas, monospace; }
details summary { cursor: pointer; color: #0969da; }
footer { color: #57606a; font-size: 0.85em; margin-top: 32px; }
"""


def to_html(doc: Document, images: dict[str, bytes]) -> str:
    """One page; `images` maps each figure's file name to its PNG bytes, embedded."""
    body = [f"<h1>{html.escape(doc.title)}</h1>"]
    body += [_html_block(b, images) for b in doc.intro]
    for section in doc.sections:
        body.append(f"<h2>{html.escape(section.title)}</h2>")
        body += [_html_block(b, images) for b in section.blocks]
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(doc.title)}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n"
        + "\n".join(body)
        + f"\n<footer>{html.escape(doc.footer)}</footer>\n</main>\n</body>\n</html>\n"
    )


def _html_block(block: Block, images: dict[str, bytes]) -> str:
    if isinstance(block, Table):
        def cells(tag: str, row: list[str]) -> str:
            return "".join(f'<{tag} class="{block.column_align(i)}">{html.escape(c)}</{tag}>'
                           for i, c in enumerate(row))

        head = f"<thead><tr>{cells('th', block.header)}</tr></thead>" if any(block.header) else ""
        rows = "".join(f"<tr>{cells('td', r)}</tr>" for r in block.rows)
        return f"<table>{head}<tbody>{rows}</tbody></table>"
    if isinstance(block, Text):  # `code` spans, as Markdown reads them
        return "<p>" + re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(block.text)) + "</p>"
    if isinstance(block, Image):
        data = base64.b64encode(images[block.file]).decode("ascii")
        return (f'<figure><img src="data:image/png;base64,{data}" '
                f'alt="{html.escape(block.alt)}">'
                f"<figcaption>{html.escape(block.caption)}</figcaption></figure>")
    if isinstance(block, Code):
        return f"<pre><code>{html.escape(block.text)}</code></pre>"
    return (f"<details><summary>{html.escape(block.summary)}</summary>"
            f"{_html_block(block.body, images)}</details>")
