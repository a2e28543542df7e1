"""The document model of a written report (sections of text, tables, figures and code) and
its renderers: a plain-text table for the terminal, Markdown with its figures as files
beside it, and one self-contained HTML page (figures embedded as data URIs, inline CSS,
nothing fetched from anywhere); `write_files` writes the rendered files.

The run report (report.py), the comparison of variants (deploy/variants.py) and the study
summary (studies/summary.py) are built as such documents.
"""

from __future__ import annotations

import base64
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from cifarlab import checkpoint
from cifarlab.errors import UserError

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


# ------------------------------------------------------------------------------- files


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
