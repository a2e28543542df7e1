"""The report of `cifarlab compare --variants` (variants.py measures): the 2x2 figure of
accuracy against each cost with its Pareto front, and variants.md / variants.html with the
table, the machine and the files."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cifarlab.deploy.variants import (
    COSTS,
    FIGURE_SIZE,
    NONE,
    RUNTIME_COLORS,
    VARIANTS_HTML,
    VARIANTS_MD,
    VARIANTS_PNG,
    VariantsResult,
    notes,
    table,
)
from cifarlab.errors import UserError


def check_report_folder(report_dir: str | Path | None) -> None:
    """Refuse a --report folder that cannot be written, before minutes of measuring."""
    if report_dir is not None:
        folder = Path(report_dir)
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--report {folder}: a file, not a folder; give a folder")
        if not folder.exists() and not folder.parent.is_dir():
            raise UserError(f"--report {folder}: no folder {folder.parent} to create it in; "
                            "create it or choose another --report")


def figure(result: VariantsResult) -> Any:
    """2x2: validation accuracy against MACs, parameters, file size and latency; the Pareto
    front of each as a step line (the best accuracy at that cost or less). Points carry the
    variant's number (variants drawn on one spot share a label); the key below the panels
    names each number, beside the runtimes' colours, clear of the data."""
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    from cifarlab.plots import label_points

    fig = Figure(figsize=FIGURE_SIZE, layout="constrained")
    scored = [v for v in result.variants if v.val_acc is not None]
    number = {id(v): i + 1 for i, v in enumerate(result.variants)}
    threads = result.header.threads
    axes = fig.subplots(2, 2).ravel()
    for ax, cost in zip(axes, COSTS, strict=True):
        ax.set_xlabel(cost.label + (f", {threads} thread{'s' * (threads != 1)}"
                                    if cost.key == "latency" else ""))
        ax.set_ylabel("validation accuracy (%)")
        ax.set_title(f"Accuracy against {cost.name}")
        ax.grid(alpha=0.3)
        if not scored:
            ax.text(0.5, 0.5, "no accuracy: give --data", ha="center", va="center",
                    transform=ax.transAxes)
            continue
        for runtime in sorted({v.runtime for v in scored}):
            points = [v for v in scored if v.runtime == runtime]
            ax.scatter([cost.of(v) for v in points], [v.val_acc for v in points], s=45,
                       color=RUNTIME_COLORS.get(runtime, "tab:gray"), zorder=3)
        front = sorted((cost.of(v), v.val_acc) for v in scored if v.pareto[cost.key])
        ax.scatter([x for x, _ in front], [y for _, y in front], s=130, facecolors="none",
                   edgecolors="black", linewidths=1.2, zorder=4)
        ax.step([x for x, _ in front], [y for _, y in front], where="post", color="0.35",
                linewidth=1.3, zorder=2)
        values = [cost.of(v) for v in scored]
        if min(values) > 0 and max(values) / min(values) > 20:  # orders of magnitude apart
            ax.set_xscale("log")
        ax.margins(x=0.15, y=0.2)  # room for the labels inside the axes
    fig.suptitle(f"Variants: accuracy against cost; {result.header.cpu}", fontsize=12)
    if scored:  # the key first: the panels' final places decide where labels fit
        runtimes = sorted({v.runtime for v in scored})
        handles = [Line2D([], [], linestyle="none", marker="o", markersize=7,
                          color=RUNTIME_COLORS.get(r, "tab:gray")) for r in runtimes]
        handles.append(Line2D([], [], linestyle="none", marker="o", markersize=11,
                              markerfacecolor="none", markeredgecolor="black"))
        labels = [*runtimes, "on the Pareto front"]
        for v in result.variants:
            handles.append(Line2D([], [], linestyle="none"))
            labels.append(f"{number[id(v)]}: {v.label}"
                          + (" (no accuracy: not drawn)" if v.val_acc is None else ""))
        fig.legend(handles, labels, loc="outside lower center", ncol=3, fontsize=9,
                   frameon=False, handletextpad=0.4, columnspacing=2.0)
        for ax, cost in zip(axes, COSTS, strict=True):
            at: dict[tuple[float, float], list[str]] = {}  # one spot, one label
            for v in scored:
                at.setdefault((cost.of(v), v.val_acc), []).append(str(number[id(v)]))
            label_points(ax, list(at), [",".join(n) for n in at.values()])
    return fig


def document(result: VariantsResult) -> Any:
    """The written report (a document.Document)."""
    import time

    from cifarlab import __version__
    from cifarlab.document import Document, Image, Section, Table, Text

    h = result.header
    machine = Table(["", ""], [
        ["CPU", h.cpu], ["ISA flags", ", ".join(h.flags) or NONE],
        ["threads (every runtime)", str(h.threads)],
        ["versions", f"{h.versions()}, Python {h.python}"],
        ["load average (1/5/15 min)", " ".join(f"{x:.2f}" for x in h.load_average)
         + (", after: " + " ".join(f"{x:.2f}" for x in h.load_average_after)
            if h.load_average_after else "")],
        ["measured", h.date],
    ])
    files = Table(["variant", "file", "model", "classes"], [
        [v.label, v.file, _model_text(v.architecture), str(v.architecture.get("num_classes",
                                                                                NONE))]
        for v in result.variants])
    missing = [v.label for v in result.variants if v.val_acc is None]
    caption = ("Validation accuracy against MACs, parameters, file size and batch-1 latency; "
               "the step line is each cost's Pareto front, front points ringed in black.")
    if missing:
        caption += f" Not drawn (no accuracy): {', '.join(missing)}."
    sections = [
        Section("Table", [table(result), *(Text(n) for n in notes(result))]),
        Section("Figure", [Image(VARIANTS_PNG, "Accuracy against cost", caption)]),
        Section("Machine", [machine]),
        Section("Variants", [files]),
    ]
    footer = (f"Written by cifarlab {__version__} on {time.strftime('%Y-%m-%d %H:%M')} "
              "(cifarlab compare --variants).")
    return Document("Variants: accuracy against cost", [Text(
        f"{len(result.variants)} variants of one model, timed on {h.cpu} with {h.threads} "
        f"thread{'s' * (h.threads != 1)}.")], sections, footer)


def _model_text(args: dict[str, Any]) -> str:
    extra = {k: v for k, v in args.items() if k not in ("name", "num_classes", "layers")}
    text = args.get("name", NONE) + "".join(f", {k} {v}" for k, v in extra.items())
    if args.get("layers"):
        text += f", {len(args['layers'])} layers pruned"
    return text


def write_report(result: VariantsResult, folder: str | Path) -> Path:
    """variants.md, variants.png beside it, and a self-contained variants.html in `folder`
    (created when missing); return the HTML file."""
    from cifarlab.document import to_html, to_markdown, write_files
    from cifarlab.plots import figure_bytes

    folder = Path(folder)
    doc = document(result)
    png = figure_bytes(figure(result))
    outputs = {VARIANTS_PNG: png, VARIANTS_MD: to_markdown(doc).encode(),
               VARIANTS_HTML: to_html(doc, {VARIANTS_PNG: png}).encode()}
    try:
        folder.mkdir(exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot write into {folder} ({e.strerror or e}); choose another "
                        "--report") from None
    write_files(folder, outputs, "choose another --report")
    return folder / VARIANTS_HTML
