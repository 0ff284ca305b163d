"""report.md and report.html of an atlas run, written from one list of document parts.

A part is a heading, a paragraph, a table, a preformatted block or an image;
`to_markdown` and `to_html` render the same parts, so the two files always say
the same thing (the HTML embeds its images and is one self-contained file).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from data.files import write_text_atomic


@dataclass
class Part:
    """One piece of the report: kind is h1 | h2 | h3 | p | table | pre | img."""

    kind: str
    text: str = ""
    header: list[str] = field(default_factory=list)
    rows: list[list[Any]] = field(default_factory=list)
    path: Path | None = None


def heading(text: str, level: int = 2) -> Part:
    """A section heading."""
    return Part(f"h{level}", text)


def para(text: str) -> Part:
    """A paragraph (plain text; `code` spans and **bold** as in Markdown)."""
    return Part("p", text)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> Part:
    """A table of plain values."""
    return Part("table", header=list(header), rows=[list(r) for r in rows])


def pre(text: str) -> Part:
    """A preformatted block."""
    return Part("pre", text)


def image(path: Path, caption: str) -> Part:
    """A PNG beside the report, with its caption."""
    return Part("img", caption, path=path)


def cell_text(value: Any) -> str:
    """A table cell: floats to 2 decimals, None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.2f}"
    return str(value)


def to_markdown(parts: Sequence[Part], base: Path) -> str:
    """The parts as Markdown; images linked relative to `base` (the report's folder)."""
    out = []
    for part in parts:
        if part.kind.startswith("h"):
            out.append("#" * int(part.kind[1]) + " " + part.text)
        elif part.kind == "p":
            out.append(part.text)
        elif part.kind == "table":
            out.append("| " + " | ".join(part.header) + " |")
            out.append("|" + "---|" * len(part.header))
            out += ["| " + " | ".join(cell_text(v).replace("|", "\\|").replace("\n", "<br>") for v in row) + " |"
                    for row in part.rows]
        elif part.kind == "pre":
            out.append("```\n" + part.text + "\n```")
        elif part.kind == "img" and part.path is not None:
            out.append(f"![{part.text}]({part.path.relative_to(base).as_posix()})\n\n*{part.text}*")
        out.append("")
    return "\n".join(out)


def _inline(text: str) -> str:
    """Markdown's `code` and **bold** spans in escaped HTML."""
    escaped = html.escape(text)
    for mark, tag in (("**", "b"), ("`", "code")):
        pieces = escaped.split(mark)
        escaped = "".join(p if i % 2 == 0 else f"<{tag}>{p}</{tag}>" for i, p in enumerate(pieces))
    return escaped


def to_html(parts: Sequence[Part], title: str) -> str:
    """The parts as one self-contained HTML page (images embedded)."""
    out = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title>",
           "<style>body{font-family:sans-serif;margin:1.5em;max-width:1300px} table{border-collapse:collapse;"
           "font-size:12px;margin:0.4em 0} td,th{border:1px solid #ccc;padding:2px 6px;vertical-align:top}"
           " pre{background:#f6f6f6;padding:0.5em;font-size:11px;white-space:pre-wrap} img{max-width:100%}</style>"]
    for part in parts:
        if part.kind.startswith("h"):
            out.append(f"<{part.kind}>{_inline(part.text)}</{part.kind}>")
        elif part.kind == "p":
            out.append(f"<p>{_inline(part.text)}</p>")
        elif part.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in part.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline(cell_text(v)).replace(chr(10), '<br>')}</td>" for v in row)
                           + "</tr>" for row in part.rows)
            out.append(f"<table><tr>{head}</tr>{body}</table>")
        elif part.kind == "pre":
            out.append(f"<pre>{html.escape(part.text)}</pre>")
        elif part.kind == "img" and part.path is not None:
            data = base64.b64encode(part.path.read_bytes()).decode("ascii")
            out.append(f"<figure><img alt='{html.escape(part.text)}' src='data:image/png;base64,{data}'>"
                       f"<figcaption>{html.escape(part.text)}</figcaption></figure>")
    return "\n".join(out)


def write_reports(parts: Sequence[Part], out_dir: Path, title: str) -> tuple[Path, Path]:
    """report.md and report.html in out_dir."""
    md, page = out_dir / "report.md", out_dir / "report.html"
    write_text_atomic(md, to_markdown(parts, out_dir))
    write_text_atomic(page, to_html(parts, title))
    return md, page
