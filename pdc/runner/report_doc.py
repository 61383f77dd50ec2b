"""The reports' document model: a tiny list of blocks (headings, paragraphs, tables, images)
rendered twice, to Markdown and to self-contained HTML, so both files always agree. Used by the
run report (`pdc.runner.report`) and the comparison report (`pdc.runner.comparison_report`).
"""

from __future__ import annotations

import base64
import html
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

@dataclass
class Doc:
    blocks: list[tuple] = field(default_factory=list)

    def h(self, level: int, text: str):
        self.blocks.append(("h", level, text))

    def p(self, text: str):
        self.blocks.append(("p", text))

    def muted(self, text: str):
        self.blocks.append(("muted", text))

    def pre(self, text: str):
        self.blocks.append(("pre", text))

    def table(self, header: Sequence[str], rows: Iterable[Sequence[Any]], align: str | None = None):
        """`align`: one char per column, "l" or "r" (default: first left, others right)."""
        rows = [[str(c) for c in r] for r in rows]
        align = align or "l" + "r" * (len(header) - 1)
        self.blocks.append(("table", list(header), rows, align))

    def img(self, path: Path, rel: str, alt: str):
        self.blocks.append(("img", path, rel, alt))


def render_markdown(doc: Doc) -> str:
    out: list[str] = []
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "muted":
            out.append(f"_{b[1]}_")
        elif kind == "pre":
            out.append("```\n" + b[1].rstrip("\n") + "\n```")
        elif kind == "table":
            _, header, rows, align = b
            esc = lambda c: c.replace("|", "\\|")  # noqa: E731
            out.append("| " + " | ".join(map(esc, header)) + " |")
            out.append("|" + "|".join("---:" if a == "r" else "---" for a in align) + "|")
            out.extend("| " + " | ".join(map(esc, r)) + " |" for r in rows)
        elif kind == "img":
            out.append(f"![{b[3]}]({b[2]})")
        out.append("")
    return "\n".join(out)


_CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:60rem;margin:2rem auto;
padding:0 1rem;color:#1f2328;line-height:1.5}
h1{border-bottom:2px solid #d0d7de;padding-bottom:.3rem}h2{border-bottom:1px solid #d0d7de;
padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0}th,td{border:1px solid #d0d7de;padding:.25rem .7rem}
th{background:#f6f8fa}td.r,th.r{text-align:right;font-variant-numeric:tabular-nums}
tr:nth-child(even) td{background:#fafbfc}
pre{background:#f6f8fa;padding:.8rem;overflow-x:auto;border-radius:6px;font-size:.85rem}
img{max-width:100%;border:1px solid #eaeef2;margin:.4rem 0}.muted{color:#656d76;font-style:italic}
"""


def render_html(doc: Doc, title: str) -> str:
    e = html.escape
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           f"<title>{e(title)}</title><style>{_CSS}</style></head><body>"]
    for b in doc.blocks:
        kind = b[0]
        if kind == "h":
            out.append(f"<h{b[1]}>{e(b[2])}</h{b[1]}>")
        elif kind == "p":
            out.append(f"<p>{_inline_code(b[1])}</p>")
        elif kind == "muted":
            out.append(f'<p class="muted">{_inline_code(b[1])}</p>')
        elif kind == "pre":
            out.append(f"<pre>{e(b[1])}</pre>")
        elif kind == "table":
            _, header, rows, align = b
            cls = lambda i: ' class="r"' if align[i] == "r" else ""  # noqa: E731
            out.append("<table><thead><tr>" + "".join(f"<th{cls(i)}>{e(h)}</th>" for i, h in enumerate(header))
                       + "</tr></thead><tbody>")
            for r in rows:
                out.append("<tr>" + "".join(f"<td{cls(i)}>{_inline_code(c)}</td>" for i, c in enumerate(r)) + "</tr>")
            out.append("</tbody></table>")
        elif kind == "img":
            data = base64.b64encode(b[1].read_bytes()).decode("ascii")
            out.append(f'<img alt="{e(b[3])}" src="data:image/png;base64,{data}">')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _inline_code(text: str) -> str:
    """HTML-escape `text`, turning Markdown `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
