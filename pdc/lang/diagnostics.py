"""Compiler-style diagnostics for `.pds` files.

A `Diagnostic` is one message at one `Span`, with optional `note`s at related places. A
`SpecError` carries every diagnostic of one run (the checker collects them all before raising)
and renders them like a C compiler:

    spec.pds:7:3: error: hidden=8192 is larger than the source (4096)
        7 |   hidden=8192 mlp=9216
          |   ^~~~~~~~~~~
    spec.pds:1:17: note: model 'teacher' declared here (hidden=4096)
        1 | model teacher = hf("meta-llama/Llama-3.1-8B")
          |                 ^~~~~~~~~~~~~~~~~~~~~~~~~~~~~
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Sequence


@dataclass(frozen=True)
class Span:
    """A source range; lines and columns are 1-based, `end_col` is exclusive."""

    file: str
    line: int
    col: int
    end_line: int
    end_col: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.col}"


@dataclass(frozen=True)
class Note:
    message: str
    span: Optional[Span] = None


@dataclass(frozen=True)
class Diagnostic:
    message: str
    span: Optional[Span]
    severity: Literal["error", "warning"] = "error"
    notes: tuple[Note, ...] = ()

    def headline(self) -> str:
        """`line:col: error: message` (the form the diagnostics tests expect)."""
        where = f"{self.span.line}:{self.span.col}: " if self.span else ""
        return f"{where}{self.severity}: {self.message}"


def _excerpt(span: Span, lines: Sequence[str]) -> list[str]:
    """The source line of `span` and a caret line under it (first line only for long spans)."""
    if not (1 <= span.line <= len(lines)):
        return []
    text = lines[span.line - 1].expandtabs(1)
    width = len(str(span.line))
    gutter = " " * (4 + width) + " |"
    end = span.end_col if span.end_line == span.line else len(text) + 1
    length = max(1, min(end, len(text) + 1) - span.col)
    caret = " " * (span.col - 1) + "^" + "~" * (length - 1)
    return [f"    {span.line} | {text}", f"{gutter} {caret}".rstrip()]


def render(diags: Sequence[Diagnostic], text: str | None) -> str:
    lines = [l.rstrip("\r") for l in text.split("\n")] if text is not None else []  # Lark counts only \n
    out: list[str] = []

    def one(kind: str, message: str, span: Optional[Span]) -> None:
        out.append(f"{span}: {kind}: {message}" if span else f"pdc: {kind}: {message}")
        if span is not None and lines:
            out.extend(_excerpt(span, lines))

    for d in diags:
        one(d.severity, d.message, d.span)
        for n in d.notes:
            one("note", n.message, n.span)
    errors = sum(d.severity == "error" for d in diags)
    if errors > 1:
        out.append(f"{errors} errors")
    elif errors == 0 and len(diags) > 1:
        out.append(f"{len(diags)} warnings")
    return "\n".join(out)


class SpecError(Exception):
    """Bad `.pds` input: one or more diagnostics. The CLI prints `render()` and exits 2."""

    def __init__(self, diagnostics: Sequence[Diagnostic], text: str | None = None):
        self.diagnostics = tuple(diagnostics)
        self.text = text
        super().__init__(self.render())

    @classmethod
    def single(cls, message: str, span: Span | None = None, text: str | None = None,
               notes: Sequence[Note] = ()) -> "SpecError":
        return cls([Diagnostic(message, span, notes=tuple(notes))], text)

    def render(self) -> str:
        return render(self.diagnostics, self.text)

    def headlines(self) -> list[str]:
        return [d.headline() for d in self.diagnostics]


@dataclass
class DiagnosticSink:
    """Collects diagnostics during checking; `raise_if_errors` raises one SpecError for all."""

    text: str | None = None
    diagnostics: list[Diagnostic] = field(default_factory=list)

    def error(self, message: str, span: Span | None, *notes: Note) -> None:
        self.diagnostics.append(Diagnostic(message, span, "error", tuple(notes)))

    def warn(self, message: str, span: Span | None, *notes: Note) -> None:
        self.diagnostics.append(Diagnostic(message, span, "warning", tuple(notes)))

    @property
    def warnings(self) -> tuple[Diagnostic, ...]:
        return tuple(d for d in self.diagnostics if d.severity == "warning")

    @property
    def has_errors(self) -> bool:
        return any(d.severity == "error" for d in self.diagnostics)

    def raise_if_errors(self) -> None:
        if self.has_errors:
            ordered = sorted(
                self.diagnostics,
                key=lambda d: (d.span.line, d.span.col) if d.span else (0, 0),
            )
            raise SpecError(ordered, self.text)
