"""A report as a list of blocks (heading, paragraph, table, image) rendered to Markdown and HTML,
so both files always say the same thing."""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import List, Optional, Sequence, Union

NA = "n/a"


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class TableBlock:
    headers: List[str]
    rows: List[List[str]]


@dataclass
class Image:
    alt: str
    filename: str


Block = Union[Heading, Paragraph, TableBlock, Image]


def fmt(value: Optional[float], digits: int = 2) -> str:
    return NA if value is None else f"{value:.{digits}f}"


def fmt_bytes(value: Optional[int]) -> str:
    return NA if value is None else f"{value:,}"


def fmt_mb(value: Optional[int]) -> str:
    return NA if value is None else f"{value / 1e6:.1f}"


def to_markdown(blocks: Sequence[Block]) -> str:
    lines: List[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            lines += ["#" * block.level + " " + block.text, ""]
        elif isinstance(block, Paragraph):
            lines += [block.text, ""]
        elif isinstance(block, TableBlock):
            lines.append("| " + " | ".join(block.headers) + " |")
            lines.append("|" + "|".join("---" for _ in block.headers) + "|")
            lines += ["| " + " | ".join(row) + " |" for row in block.rows]
            lines.append("")
        else:
            lines += [f"![{block.alt}]({block.filename})", ""]
    return "\n".join(lines)


def to_html(blocks: Sequence[Block], title: str) -> str:
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto}"
        "table{border-collapse:collapse;margin:8px 0}"
        "td,th{border:1px solid #ccc;padding:3px 8px;text-align:right}"
        "img{max-width:100%}</style>",
        "</head><body>",
    ]
    for block in blocks:
        if isinstance(block, Heading):
            parts.append(f"<h{block.level}>{html.escape(block.text)}</h{block.level}>")
        elif isinstance(block, Paragraph):
            parts.append(f"<p>{html.escape(block.text)}</p>")
        elif isinstance(block, TableBlock):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            parts.append(f"<table><tr>{head}</tr>{body}</table>")
        else:
            alt, src = html.escape(block.alt), html.escape(block.filename)
            parts.append(f'<p><img src="{src}" alt="{alt}"></p>')
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
