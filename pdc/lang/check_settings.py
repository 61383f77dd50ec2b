"""Reading a spec's `key=value` settings: the value readers (`read_int(lo, hi)`, `read_enum(...)`,
...: (value node, key) -> python value, or raise `Bad`), the two exceptions a reader raises, the
stage keyword spans diagnostics point at, and `CheckerBase`: the checker's state (the sink of
diagnostics, declared models and data, the source architecture) and its generic settings and
call-argument reader, which every rule family uses."""

from __future__ import annotations

import difflib
import math
from pathlib import Path
from typing import Any, Callable, Optional

from pdc.arch import Arch
from pdc.lang import ast
from pdc.lang.diagnostics import DiagnosticSink, Note, Span
from pdc.lang.settings import DataSource, ModelSource


class Bad(Exception):
    """A value error inside a setting; becomes one diagnostic at `span`."""

    def __init__(self, message: str, span: Span | None = None, *notes: Note):
        super().__init__(message)
        self.message, self.span, self.notes = message, span, notes


def describe_value(v: ast.Value) -> str:
    if isinstance(v, ast.Number):
        return f"number {v.text}"
    if isinstance(v, ast.Str):
        return f"string {v.value!r}"
    if isinstance(v, ast.Name):
        return f"name '{v.value}'"
    if isinstance(v, ast.Names):
        return f"list {','.join(n.value for n in v.items)}"
    return f"call {v.name.value}(...)"


def suggest(word: str, choices) -> str:
    choices = list(choices)
    # word-order slips (`lr_min` for `min_lr`) are too far apart for difflib
    swapped = [c for c in choices if sorted(c.split("_")) == sorted(word.split("_"))]
    close = swapped or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


class Silent(Exception):
    """A reference error already reported; skip the value without a second message."""


def stage_kind(st) -> str:
    return {ast.CorrectStmt: "correct", ast.PruneStmt: "prune", ast.DistillStmt: "distill",
            ast.EvaluateStmt: "evaluate"}[type(st)]


def head_span_of(stage) -> Span:
    s = stage.span
    return Span(s.file, s.line, s.col, s.line, s.col + len(stage.name))


def head_span(st) -> Span:
    """The span of a stage's keyword (its first line up to the block), for stage-level errors."""
    s = st.span
    return Span(s.file, s.line, s.col, s.line, s.col + len(stage_kind(st)))


# ---- value readers: (value node, key) -> python value, or raise Bad ------------------------


def read_int(lo: int | None = None, hi: int | None = None) -> Callable[[ast.Value, str], int]:
    def read(v: ast.Value, key: str) -> int:
        if not isinstance(v, ast.Number):
            raise Bad(f"{key} expects an integer, got {describe_value(v)}", v.span)
        val = v.value
        if isinstance(val, float):
            if not (math.isfinite(val) and val == int(val)):
                raise Bad(f"{key}={v.text} is not a whole number", v.span)
            val = int(val)
        if lo == 1 and val < 1:
            raise Bad(f"{key}={v.text} must be positive", v.span)
        if lo is not None and val < lo:
            raise Bad(f"{key}={v.text} must be at least {lo}", v.span)
        if hi is not None and val > hi:
            raise Bad(f"{key}={v.text} must be at most {hi}", v.span)
        return val

    return read


def read_float(lo: float | None = None, positive: bool = False, hi: float | None = None):
    def read(v: ast.Value, key: str) -> float:
        if not isinstance(v, ast.Number):
            raise Bad(f"{key} expects a number, got {describe_value(v)}", v.span)
        val = float(v.value)
        if not math.isfinite(val):
            raise Bad(f"{key}={v.text} is not a finite number", v.span)
        if positive and val <= 0:
            raise Bad(f"{key}={v.text} must be positive", v.span)
        if lo is not None and val < lo:
            raise Bad(f"{key}={v.text} must be at least {lo:g}", v.span)
        if hi is not None and val > hi:
            raise Bad(f"{key}={v.text} must be at most {hi:g}", v.span)
        return val

    return read


def read_enum(*choices: str, what: str = ""):
    def read(v: ast.Value, key: str) -> str:
        word = v.value if isinstance(v, (ast.Name, ast.Str)) else None
        if word not in choices:
            got = f"'{word}'" if word is not None else describe_value(v)
            raise Bad(
                f"unknown {what or key} {got}: expected one of {', '.join(choices)}"
                + (suggest(word, choices) if word else ""),
                v.span,
            )
        return word

    return read


def read_bool(v: ast.Value, key: str) -> bool:
    if isinstance(v, ast.Name) and v.value in ("true", "false"):
        return v.value == "true"
    raise Bad(f"{key} expects true or false, got {describe_value(v)}", v.span)


def read_precision(v: ast.Value, key: str) -> str:
    """fp32 or bf16. fp16 is refused: training in fp16 needs dynamic loss scaling, which pdc's
    training loop does not run, and bf16 (same memory, fp32's range) is what the paper used."""
    if isinstance(v, ast.Name) and v.value == "fp16":
        raise Bad("precision=fp16 is not supported: fp16 training needs loss scaling, which pdc does not "
                   "run; use bf16 (GPUs from Ampere on; same memory as fp16) or fp32", v.span)
    return read_enum("fp32", "bf16", what="precision")(v, key)


def read_string(v: ast.Value, key: str) -> str:
    if isinstance(v, ast.Str):
        return v.value
    raise Bad(f"{key} expects a string, got {describe_value(v)}", v.span)


def read_word(v: ast.Value, key: str) -> str:
    """A bare name or a string (task names may be written either way)."""
    if isinstance(v, (ast.Name, ast.Str)):
        return v.value
    raise Bad(f"{key} expects a name, got {describe_value(v)}", v.span)


class CheckerBase:
    def __init__(self, spec: ast.Spec, text: str, base_dir: Path, resolve):
        self.spec = spec
        self.text = text
        self.base_dir = base_dir
        self.resolve = resolve
        self.sink = DiagnosticSink(text)
        self.models: dict[str, ModelSource] = {}
        self.data: dict[str, DataSource] = {}
        self.decl: dict[str, ast.ModelDecl | ast.DataDecl] = {}
        self.uses: dict[str, set[str]] = {}  # data made from other declarations -> the names it reads
        self.prompt_uses: list = []  # (data name, span) of each generate(prompts=...)
        self.variant_uses: frozenset = frozenset()  # names only a comparison's variants read
        self.source_arch: Optional[Arch] = None
        # the settings read from the correct and distill blocks (key -> (value, node)), for checks
        # that span both stages
        self.correct_settings: dict = {}
        self.distill_settings: dict = {}

    def error(self, message: str, span: Span | None, *notes: Note) -> None:
        self.sink.error(message, span, *notes)

    # -- generic settings reader ------------------------------------------------------------
    def settings(self, items, schema: dict[str, Callable], where: str) -> dict[str, tuple[Any, Any]]:
        """Read `key=value` items (Setting or Kwarg) against `schema`; returns key -> (value,
        node). Unknown, duplicate and ill-typed keys are reported and skipped."""
        out: dict[str, tuple[Any, Any]] = {}
        first: dict[str, Any] = {}
        for item in items:
            key = item.key.value
            if key not in schema:
                hint = suggest(key, schema) or f" (known: {', '.join(sorted(schema))})"
                self.error(f"unknown key '{key}' in {where}{hint}", item.key.span)
                continue
            if key in first:
                self.error(
                    f"duplicate key '{key}' in {where}",
                    item.key.span,
                    Note(f"'{key}' first set here", first[key].key.span),
                )
                continue
            first[key] = item
            try:
                out[key] = (schema[key](item.value, key), item)
            except Bad as bad:
                self.error(bad.message, bad.span or item.span, *bad.notes)
            except Silent:
                pass
        return out

    def call_args(self, call: ast.Call, positional: list[str], schema: dict[str, Callable], where: str):
        """A call's positional args mapped onto `positional` names, then read like settings."""
        items = []
        pos = call.positional
        if len(pos) > len(positional):
            extra = pos[len(positional)]
            self.error(
                f"{where} takes at most {len(positional)} positional argument"
                f"{'s' if len(positional) != 1 else ''}, got {len(pos)}",
                extra.span,
            )
        for name, value in zip(positional, pos):
            items.append(ast.Kwarg(ast.Name(name, value.span), value, value.span))
        items.extend(call.keywords)
        return self.settings(items, schema, where)

    def text_of(self, v: ast.Value) -> str:
        """The source text of a value, as written."""
        s = v.span
        lines = self.text.splitlines()
        if s.line == s.end_line and 0 < s.line <= len(lines):
            return lines[s.line - 1][s.col - 1:s.end_col - 1]
        return describe_value(v)
