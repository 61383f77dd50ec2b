"""`pdc fmt`: print a spec in canonical form.

Rules (gofmt-like: normalise spacing, respect the author's line grouping):
- one statement per line start; consecutive declarations are aligned (`model teacher = ...` /
  `data  corpus  = ...`); at most one blank line where the source had any;
- `key=value` without spaces, calls as `f(a, b=c)`, numbers exactly as written (`94B` stays),
  strings re-escaped canonically;
- a block written on one line stays on one line (`{ a=1 b=2 }`); otherwise each source line of
  items becomes one line indented by two spaces and `}` closes on its own line;
- comments are kept: own-line comments where they were, trailing comments after their line;
- a `compare` block is always multi-line, one variant or `expect` per line; a variant written
  on several lines keeps one item per line, and a stage statement inside a variant is one line.

Invariants (property-tested): `fmt(fmt(x)) == fmt(x)` and `parse(fmt(x)) == parse(x)` (spans
aside).
"""

from __future__ import annotations

from pdc.lang import ast
from pdc.lang.parser import parse_text

INDENT = "  "


def format_string(value: str) -> str:
    out = []
    for ch in value:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif ch == "\r":
            out.append("\\r")
        elif ord(ch) < 0x20 or ch in "\x7f\u2028\u2029":
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def format_value(v) -> str:
    if isinstance(v, ast.Number):
        return v.text or repr(v.value)
    if isinstance(v, ast.Str):
        return format_string(v.value)
    if isinstance(v, ast.Name):
        return v.value
    if isinstance(v, ast.Names):
        return ",".join(n.value for n in v.items)
    if isinstance(v, ast.Kwarg):
        return f"{v.key.value}={format_value(v.value)}"
    if isinstance(v, ast.Call):
        return f"{v.name.value}({', '.join(format_value(a) for a in v.args)})"
    if isinstance(v, ast.Setting):
        return f"{v.key.value}={format_value(v.value)}"
    if isinstance(v, ast.Entry):
        return format_value(v.value)
    if isinstance(v, ast.Limit):
        return f"{format_value(v.metric)}<={format_value(v.value)}"
    if isinstance(v, ast.Override):
        return f"{v.stage.value}.{v.key.value}={format_value(v.value)}"
    if isinstance(v, ast.Without):
        return f"without {v.stage.value}"
    if isinstance(v, ast.StageStmt):
        items = " ".join(format_value(i) for i in v.block.items)
        return f"{_header(v)} {{ {items} }}" if items else f"{_header(v)} {{}}"
    raise TypeError(f"cannot format {type(v).__name__}")


def _header(st) -> str:
    if isinstance(st, ast.CorrectStmt):
        return f"correct {st.model.value} on {st.data.value}"
    if isinstance(st, ast.PruneStmt):
        return f"prune {st.kind.value}"
    if isinstance(st, ast.DistillStmt):
        return f"distill from {st.teacher.value} on {st.data.value}"
    return f"evaluate with {st.harness.value}"


class _Formatter:
    def __init__(self, spec: ast.Spec, text: str):
        self.spec = spec
        self.lines = text.split("\n")  # as Lark counts lines (splitlines also breaks at \x85 etc.)
        self.trailing: dict[int, str] = {}  # source line -> trailing comment
        self.owner: dict[int, int] = {}  # source line -> id of the statement its comment trails
        self.trailing_col: dict[int, int] = {}  # source line -> column of its trailing comment
        self.standalone: list[ast.Comment] = []
        for c in spec.comments:
            before = self.lines[c.line - 1][: c.col - 1] if c.line <= len(self.lines) else ""
            if before.strip():
                self.trailing[c.line] = c.text.rstrip()
                self.owner[c.line] = id(self._statement_before(c))
                self.trailing_col[c.line] = c.col
            else:
                self.standalone.append(c)

    def _statement_before(self, c: ast.Comment):
        """The statement a trailing comment belongs to: of those covering its line, the one that
        starts last before it (several statements can share a line)."""
        covering = [s for s in self.spec.statements
                    if (s.span.line, s.span.col) < (c.line, c.col) and s.span.end_line >= c.line]
        return max(covering, key=lambda s: (s.span.line, s.span.col)) if covering else None

    def _blank_between(self, end_line: int, start_line: int) -> bool:
        return any(not self.lines[i - 1].strip() for i in range(end_line + 1, start_line)
                   if 0 < i <= len(self.lines))

    def _trail(self, text: str, st, *source_lines: int) -> list[str]:
        """`text` with the trailing comments of `source_lines` that belong to statement `st`; when
        a construct spanning several source lines had several, all but the last move onto their
        own lines above it."""
        comments = [self.trailing.pop(line) for line in sorted(set(source_lines))
                    if line in self.trailing and self.owner[line] == id(st)]
        if not comments:
            return [text]
        indent = text[: len(text) - len(text.lstrip())]
        return [indent + c for c in comments[:-1]] + [f"{text}  {comments[-1]}"]

    def _compare_lines(self, st: ast.CompareStmt) -> list[str]:
        """A compare block: entries (text, depth, source start) in order; own-line comments
        go before the first entry after them, trailing ones after the last entry before them."""
        entries: list[list] = [[f"compare {st.name.value} {{", 0, (st.span.line, st.span.col), []]]
        for v in sorted(st.variants + st.expects, key=lambda x: (x.span.line, x.span.col)):
            start = (v.span.line, v.span.col)
            if isinstance(v, ast.Expect):
                entries.append([f"expect {v.winner.value} beats {v.loser.value} on {format_value(v.metric)}", 1,
                                start, []])
                continue
            inner = any(v.span.line < c.line < v.span.end_line for c in self.standalone)
            if v.span.line == v.span.end_line and not inner:
                items = " ".join(format_value(i) for i in v.items)
                entries.append([f"variant {v.name.value} {{ {items} }}" if items else f"variant {v.name.value} {{}}",
                                1, start, []])
                continue
            entries.append([f"variant {v.name.value} {{", 1, start, []])
            entries += [[format_value(i), 2, (i.span.line, i.span.col), []] for i in v.items]
            entries.append(["}", 1, (v.span.end_line, v.span.end_col - 1), []])
        entries.append(["}", 0, (st.span.end_line, st.span.end_col - 1), []])
        for line in sorted(self.trailing):
            if self.owner[line] != id(st):
                continue
            pos = (line, self.trailing_col[line])
            owner = max((e for e in entries if e[2] < pos), key=lambda e: e[2], default=entries[0])
            owner[3].append(self.trailing.pop(line))
        out: list[str] = []
        inside = [c for c in self.standalone if st.span.line < c.line < st.span.end_line]
        for text, depth, start, trailing in entries:
            pad = INDENT * depth
            for c in [c for c in inside if c.line < start[0]]:
                out.append(pad + c.text.rstrip())
                inside.remove(c)
            out += [pad + c for c in trailing[:-1]]
            out.append(pad + text + (f"  {trailing[-1]}" if trailing else ""))
        for c in inside:
            self.standalone.remove(c)
        for c in [c for c in self.standalone if st.span.line < c.line < st.span.end_line]:
            self.standalone.remove(c)
        return out

    def _stmt_lines(self, st, decl_widths: tuple[int, int] | None) -> list[str]:
        span = st.span
        if isinstance(st, ast.CompareStmt):
            return self._compare_lines(st)
        if isinstance(st, (ast.ModelDecl, ast.DataDecl)):
            kw = "model" if isinstance(st, ast.ModelDecl) else "data"
            kw_w, name_w = decl_widths or (len(kw), len(st.name.value))
            text = f"{kw.ljust(kw_w)} {st.name.value.ljust(name_w)} = {format_value(st.source)}"
            return self._trail(text, st, *range(span.line, span.end_line + 1))
        block = st.block
        header = _header(st)
        inner = [c for c in self.standalone if block.span.line < c.line < block.span.end_line]
        if block.span.line == block.span.end_line and not inner:
            items = " ".join(format_value(i) for i in block.items)
            text = f"{header} {{ {items} }}" if items else f"{header} {{}}"
            above = [c.text.rstrip() for c in self.standalone if span.line < c.line < block.span.line]
            return above + self._trail(text, st, *range(span.line, span.end_line + 1))
        # own-line comments between the header's tokens go above the header
        out = [c.text.rstrip() for c in self.standalone if span.line < c.line < block.span.line]
        out.extend(self._trail(f"{header} {{", st, *range(span.line, block.span.line + 1)))
        groups: list[list] = []
        for item in block.items:
            if groups and groups[-1][0].span.line == item.span.line:
                groups[-1].append(item)
            else:
                groups.append([item])
        for group in groups:
            start = group[0].span.line
            for c in [c for c in inner if c.line < start]:
                out.append(INDENT + c.text.rstrip())
                inner.remove(c)
            text = INDENT + " ".join(format_value(i) for i in group)
            end = max(i.span.end_line for i in group)
            # a trailing comment on the header line belongs to the header, not the first group
            # (and one on the closing line belongs to the `}`)
            lines = [l for l in range(start, end + 1)
                     if l != block.span.end_line and (l != block.span.line or start != block.span.line)]
            out.extend(self._trail(text, st, *lines))
        for c in inner:
            out.append(INDENT + c.text.rstrip())
        out.extend(self._trail("}", st, block.span.end_line))
        for c in [c for c in self.standalone if block.span.line < c.line < block.span.end_line]:
            self.standalone.remove(c)
        return out

    def run(self) -> str:
        # Top-level elements in source order: statements and own-line comments outside them.
        stmts = list(self.spec.statements)
        inside = {c for c in self.standalone for s in stmts
                  if s.span.line < c.line < s.span.end_line and not isinstance(s, (ast.ModelDecl, ast.DataDecl))}
        elements: list[tuple[int, int, object]] = [(s.span.line, s.span.end_line, s) for s in stmts]
        elements += [(c.line, c.line, c) for c in self.standalone if c not in inside]
        # a comment inside a multi-line declaration is moved before it
        elements.sort(key=lambda e: (e[0], 0 if isinstance(e[2], ast.Comment) else 1))

        # Alignment groups: runs of declarations on consecutive lines with nothing in between.
        widths: dict[int, tuple[int, int]] = {}
        run: list = []

        def close_run() -> None:
            if len(run) > 1:
                kw_w = max(5 if isinstance(d, ast.ModelDecl) else 4 for d in run)
                name_w = max(len(d.name.value) for d in run)
                for d in run:
                    widths[id(d)] = (kw_w, name_w)
            run.clear()

        prev_end = None
        for start, end, el in elements:
            is_decl = isinstance(el, (ast.ModelDecl, ast.DataDecl))
            # A multi-line declaration with several trailing comments gets comment lines above
            # it in the output, which will separate it from the run on the next formatting.
            moved = is_decl and sum(self.owner.get(line) == id(el) for line in range(start, end + 1)) > 1
            if not is_decl or moved or (run and (self._blank_between(prev_end, start) or start > prev_end + 1)):
                close_run()
            if is_decl:
                run.append(el)
            prev_end = end
        close_run()

        out: list[str] = []
        prev_end = None
        for start, end, el in elements:
            if prev_end is not None and self._blank_between(prev_end, start):
                out.append("")
            if isinstance(el, ast.Comment):
                out.append(el.text.rstrip())
            else:
                out.extend(self._stmt_lines(el, widths.get(id(el))))
            prev_end = max(end, prev_end or 0)
        return "\n".join(out) + "\n" if out else ""


def format_spec(spec: ast.Spec, text: str) -> str:
    """The canonical text of `spec`, which was parsed from `text` (needed for comments)."""
    return _Formatter(spec, text).run()


def fmt(text: str, filename: str = "<spec>") -> str:
    """Parse `text` and return its canonical form. Raises SpecError on a syntax error."""
    return format_spec(parse_text(text, filename), text)
