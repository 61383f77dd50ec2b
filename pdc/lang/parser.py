"""Parse `.pds` text into the frozen AST of `pdc.lang.ast`.

The grammar is the single file `grammar/pds.lark`, installed as `pdc.grammar/pds.lark` and loaded
through `importlib.resources` so it works from a wheel. Lark (LALR, contextual lexer) builds a
parse tree; `_ToAst` turns it into dataclasses with spans. Lark's exceptions never escape: they
become a `SpecError` in the compiler format ("expected ...").
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import importlib.resources
import re
from pathlib import Path

import lark
from lark import Lark, Token, Transformer, v_args

from pdc.lang import ast
from pdc.lang.diagnostics import Note, Span, SpecError

_comments: contextvars.ContextVar[list] = contextvars.ContextVar("pds_comments")

# What a NUMBER token must be (the lexer takes letters glued to a number so this can say so).
_WELL_FORMED_NUMBER = re.compile(r"[+-]?(\d[\d_]*(\.[\d_]*)?|\.\d[\d_]*)([eE][+-]?\d+)?([kKMBGT]|x)?")

# Human names for terminals in "expected ..." messages.
_TERMINAL_WORDS = {
    "NAME": "a name",
    "NUMBER": "a number",
    "STRING": "a string",
    "$END": "end of file",
}


def grammar_text() -> str:
    return importlib.resources.files("pdc.grammar").joinpath("pds.lark").read_text("utf-8")


def _collect_comment(token: Token) -> Token:
    bucket = _comments.get(None)
    if bucket is not None:
        bucket.append(ast.Comment(str(token), token.line, token.column))
    return token


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    return Lark(
        grammar_text(),
        parser="lalr",
        lexer="contextual",
        propagate_positions=True,
        maybe_placeholders=False,
        lexer_callbacks={"COMMENT": _collect_comment},
    )


def _decode_string(literal: str) -> str:
    body = literal[1:-1]
    out: list[str] = []
    i = 0
    simple = {'"': '"', "\\": "\\", "n": "\n", "t": "\t", "r": "\r"}
    while i < len(body):
        c = body[i]
        if c == "\\":
            nxt = body[i + 1]
            if nxt == "u":
                out.append(chr(int(body[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append(simple[nxt])
            i += 2
            continue
        out.append(c)
        i += 1
    return "".join(out)


class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def _span(self, meta) -> Span:
        if getattr(meta, "empty", False):
            return Span(self.file, 0, 0, 0, 0)
        return Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def _tok_span(self, tok: Token) -> Span:
        return Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    def _name(self, tok: Token) -> ast.Name:
        return ast.Name(str(tok), self._tok_span(tok))

    @v_args(meta=True)
    def start(self, meta, children):
        return ast.Spec(tuple(children), self.file, span=self._span(meta))

    @v_args(meta=True)
    def model_decl(self, meta, c):
        return ast.ModelDecl(self._name(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def data_decl(self, meta, c):
        return ast.DataDecl(self._name(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def correct_stmt(self, meta, c):
        return ast.CorrectStmt(self._name(c[0]), self._name(c[1]), c[2], self._span(meta))

    @v_args(meta=True)
    def prune_stmt(self, meta, c):
        return ast.PruneStmt(self._name(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def distill_stmt(self, meta, c):
        return ast.DistillStmt(self._name(c[0]), self._name(c[1]), c[2], self._span(meta))

    @v_args(meta=True)
    def evaluate_stmt(self, meta, c):
        return ast.EvaluateStmt(self._name(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def compare_stmt(self, meta, c):
        return ast.CompareStmt(self._name(c[0]), tuple(x for x in c[1:] if isinstance(x, ast.Variant)),
                               self._span(meta), tuple(x for x in c[1:] if isinstance(x, ast.Expect)))

    @v_args(meta=True)
    def expect(self, meta, c):
        return ast.Expect(self._name(c[0]), self._name(c[1]), c[2], self._span(meta))

    @v_args(meta=True)
    def variant(self, meta, c):
        return ast.Variant(self._name(c[0]), tuple(c[1:]), self._span(meta))

    @v_args(meta=True)
    def override(self, meta, c):
        return ast.Override(c[0], self._name(c[1]), c[2], self._span(meta))

    @v_args(meta=True)
    def without(self, meta, c):
        return ast.Without(c[0], self._span(meta))

    def stage_ref(self, c):
        return self._name(c[0])

    @v_args(meta=True)
    def block(self, meta, c):
        return ast.Block(tuple(c), self._span(meta))

    @v_args(meta=True)
    def setting(self, meta, c):
        return ast.Setting(self._name(c[0]), c[1], self._span(meta))

    @v_args(meta=True)
    def limit(self, meta, c):
        return ast.Limit(c[0], c[1], self._span(meta))

    @v_args(meta=True)
    def entry(self, meta, c):
        return ast.Entry(c[0], self._span(meta))

    @v_args(meta=True)
    def call(self, meta, c):
        return ast.Call(self._name(c[0]), tuple(c[1:]), self._span(meta))

    source = call

    @v_args(meta=True)
    def kwarg(self, meta, c):
        return ast.Kwarg(self._name(c[0]), c[1], self._span(meta))

    def name(self, c):
        return self._name(c[0])

    @v_args(meta=True)
    def names(self, meta, c):
        return ast.Names(tuple(c), self._span(meta))

    def number(self, c):
        tok = c[0]
        if not _WELL_FORMED_NUMBER.fullmatch(str(tok)):
            raise SpecError.single(f"malformed number '{tok}' (unit suffixes: k M B G T)", self._tok_span(tok))
        return ast.Number(ast.number_value(str(tok)), str(tok), self._tok_span(tok))

    def string(self, c):
        tok = c[0]
        return ast.Str(_decode_string(str(tok)), self._tok_span(tok))


def _describe_expected(names) -> str:
    parser = _parser()
    words = []
    for n in sorted(names):
        if n in _TERMINAL_WORDS:
            words.append(_TERMINAL_WORDS[n])
            continue
        try:
            pattern = parser.get_terminal(n).pattern
        except KeyError:
            words.append(n.lower())
            continue
        if isinstance(pattern, lark.lexer.PatternStr):
            words.append(f"'{pattern.value}'")
        else:
            words.append(n.lower())
    words = sorted(set(words))
    if len(words) == 1:
        return words[0]
    return "one of " + ", ".join(words)


def _token_text(tok: Token) -> str:
    if tok.type == "$END":
        return "end of file"
    text = str(tok)
    return f"'{text[:40]}'"


def _open_brackets(text: str, line: int, col: int) -> list[tuple[str, int, int]]:
    """Brackets `{` / `(` still open at (line, col), skipping strings and comments."""
    stack: list[tuple[str, int, int]] = []
    ln, cn, i = 1, 1, 0
    while i < len(text) and (ln, cn) < (line, col):
        ch = text[i]
        if ch == "#":
            while i < len(text) and text[i] != "\n":
                i += 1
            continue
        if ch == '"':
            i += 1
            cn += 1
            while i < len(text) and text[i] not in '"\n':
                step = 2 if text[i] == "\\" else 1
                i += step
                cn += step
            if i < len(text) and text[i] == '"':
                i += 1
                cn += 1
            continue
        if ch in "{(":
            stack.append((ch, ln, cn))
        elif ch in "})" and stack and stack[-1][0] == {"}": "{", ")": "("}[ch]:
            stack.pop()
        if ch == "\n":
            ln, cn = ln + 1, 1
        else:
            cn += 1
        i += 1
    return stack


def _syntax_error(exc: lark.exceptions.UnexpectedInput, file: str, text: str) -> SpecError:
    line, col = max(exc.line, 1), max(exc.column, 1)
    if isinstance(exc, lark.exceptions.UnexpectedToken):
        tok = exc.token
        expected = exc.expected
        if exc.interactive_parser is not None:
            # LALR merges states, so `exc.expected` may list tokens that could never come next;
            # the interactive parser simulates the reductions and knows the real set.
            try:
                expected = exc.interactive_parser.accepts() or expected
            except Exception:  # a best-effort refinement; the raw set is still correct-ish
                pass
        if tok.type == "$END":
            lines = text.rstrip().split("\n")
            line, col = len(lines), len(lines[-1]) + 1
            message = f"unexpected end of file, expected {_describe_expected(expected)}"
            end_col = col + 1
        else:
            message = f"unexpected {_token_text(tok)}, expected {_describe_expected(expected)}"
            end_col = (tok.end_column or col + 1) if tok.end_line == tok.line else col + 1
    elif isinstance(exc, lark.exceptions.UnexpectedCharacters):
        lines = text.split("\n")
        ch = lines[line - 1][col - 1] if line <= len(lines) and col <= len(lines[line - 1]) else "?"
        word = re.match(r"[\w.+\-]*", lines[line - 1][col - 1 :]).group(0) if line <= len(lines) else ""
        if ch.isdigit() or (ch in ".+-" and word[1:2].isdigit()):
            message = f"malformed number '{word}' (unit suffixes: k M B G T)"
        elif ch == '"':
            message = "unterminated string or bad escape (allowed: \\\\ \\\" \\n \\t \\r \\uXXXX)"
        else:
            message = f"unexpected character {ch!r}"
        end_col = col + 1
    else:  # UnexpectedEOF
        message = "unexpected end of file"
        end_col = col + 1
    notes = []
    opened = _open_brackets(text, line, col)
    if opened and opened[-1][1] < line:  # an unclosed bracket from an earlier line is the likely cause
        ch, oline, ocol = opened[-1]
        notes.append(Note(f"'{ch}' opened here is not closed", Span(file, oline, ocol, oline, ocol + 1)))
    return SpecError.single(message, Span(file, line, col, line, end_col), text, notes)


def parse_text(text: str, filename: str = "<spec>") -> ast.Spec:
    """Parse `.pds` source. Raises `SpecError` (never a Lark exception) on a syntax error."""
    bucket: list[ast.Comment] = []
    token = _comments.set(bucket)
    try:
        tree = _parser().parse(text)
    except lark.exceptions.UnexpectedInput as exc:
        raise _syntax_error(exc, filename, text) from None
    finally:
        _comments.reset(token)
    try:
        spec = _ToAst(filename).transform(tree)
    except lark.exceptions.VisitError as exc:  # a token the transformer refuses (a malformed number)
        if isinstance(exc.orig_exc, SpecError):
            raise SpecError(exc.orig_exc.diagnostics, text) from None
        raise
    except RecursionError:  # e.g. f(f(f(...))) nested thousands deep
        raise SpecError.single("expression nested too deeply", Span(filename, 1, 1, 1, 2), text) from None
    _check_limits(spec, text)
    return ast.Spec(spec.statements, filename, tuple(bucket), spec.span)


def _check_limits(node, text: str, in_search: bool = False, limit_value=None) -> None:
    """Budgets (`params<=0.85x`) belong in `prune search` blocks, and a relative number (`x`)
    only on the right of a budget: anywhere else `5x` would silently read as 5."""
    if isinstance(node, ast.Number) and node.text.endswith("x") and node is not limit_value:
        raise SpecError.single(f"'{node.text}': a relative size (x) is written only in a search budget "
                               "(`params<=0.85x`)", node.span, text)
    if isinstance(node, ast.Limit) and not in_search:
        raise SpecError.single("a budget (`<=`) is written only in `prune search { ... }`", node.span, text)
    if isinstance(node, ast.PruneStmt):
        in_search = node.kind.value == "search"
    if isinstance(node, (list, tuple)):
        for child in node:
            _check_limits(child, text, in_search)
    elif dataclasses.is_dataclass(node):
        value = node.value if isinstance(node, ast.Limit) else None
        for f in dataclasses.fields(node):
            if f.name not in ("span", "text", "comments"):
                _check_limits(getattr(node, f.name), text, in_search, value)


def read_spec_text(path: str | Path) -> str:
    """The UTF-8 text of a spec file, or a one-line `SpecError` (missing, a directory, binary)."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise SpecError.single(f"cannot read spec '{p}': no such file") from None
    except IsADirectoryError:
        raise SpecError.single(f"cannot read spec '{p}': it is a directory") from None
    except OSError as exc:
        raise SpecError.single(f"cannot read spec '{p}': {exc.strerror or exc}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        col = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise SpecError.single(
            f"spec is not UTF-8 text (byte 0x{data[exc.start]:02x})", Span(str(p), line, col, line, col + 1)
        ) from None
    if text.startswith("\ufeff"):
        text = text[1:]
    return text


def parse_file(path: str | Path) -> tuple[ast.Spec, str]:
    text = read_spec_text(path)
    return parse_text(text, str(path)), text
