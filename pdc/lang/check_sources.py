"""Models and data: `model NAME = kind("...")` and `data NAME = kind("...")` declarations, their
source kinds and keyword arguments, builtin data, and references to declared names from stages."""

from __future__ import annotations

from typing import Callable, Optional

from pdc.lang import ast
from pdc.lang.check_generated import GeneratedRules
from pdc.lang.check_settings import Bad, CheckerBase, Silent, describe_value, read_string, suggest
from pdc.lang.diagnostics import Note
from pdc.lang.settings import DataSource, ModelSource
from pdc.lang.sources import local_path


MODEL_KINDS = ("hf", "dir", "gguf", "builtin")
DATA_KINDS = ("hf", "json", "jsonl", "text", "parquet", "builtin", "generate", "mix")
# The carried text domains (pdc/data/manifest.json; a test keeps the two lists equal).
BUILTIN_DATA = ("wiki", "wiki-heldout", "reddit", "amazon")
RETIRED_DATA = {"news": "the New York Times paragraphs came from the bigbench 1.0.0 sdist, which is no longer "
                        "served; use 'amazon' or 'reddit' (other SQuAD-shifts domains) or a jsonl file"}


class SourceRules(GeneratedRules, CheckerBase):
    """Models and data: declarations, their sources and references to them."""

    def declare(self, stmt) -> None:
        name = stmt.name.value
        if name in self.decl:
            prev = self.decl[name]
            what = "model" if isinstance(prev, ast.ModelDecl) else "data"
            self.error(
                f"'{name}' is already declared", stmt.name.span,
                Note(f"{what} '{name}' first declared here", prev.name.span),
            )
            return
        self.decl[name] = stmt
        if isinstance(stmt, ast.ModelDecl):
            src = self.model_source(stmt.source)
            if src is not None:
                self.models[name] = src
        elif stmt.source.name.value in ("generate", "mix"):  # data read from other declarations
            made = (self.generated_source if stmt.source.name.value == "generate" else self.mixed_source)(stmt.source)
            if made is not None:
                self.data[name], self.uses[name] = made
        else:
            src = self.data_source(stmt.source)
            if src is not None:
                self.data[name] = src

    def _one_string(self, call: ast.Call, what: str) -> Optional[ast.Str]:
        pos = call.positional
        if len(pos) != 1 or not isinstance(pos[0], ast.Str):
            self.error(f'{call.name.value}(...) needs one string argument, the {what}', call.span)
            return None
        return pos[0]

    def _source_kind(self, call: ast.Call, kinds, noun: str) -> Optional[str]:
        """The call's name if it is a known source kind; else an error with a suggestion."""
        kind = call.name.value
        if kind in kinds:
            return kind
        self.error(f"unknown {noun} source '{kind}': expected one of {', '.join(kinds)}"
                   + suggest(kind, kinds), call.name.span)
        return None

    def model_source(self, call: ast.Call) -> Optional[ModelSource]:
        kind = self._source_kind(call, MODEL_KINDS, "model")
        if kind is None:
            return None
        what = {"hf": "hub id", "dir": "directory", "gguf": "file", "builtin": "asset name"}[kind]
        ref = self._one_string(call, what)
        if call.keywords:
            self.error(f"{kind}(...) takes no keyword arguments", call.keywords[0].span)
        if ref is None:
            return None
        value = ref.value
        if kind in ("dir", "gguf"):
            value = str(local_path(value, self.base_dir))
        return ModelSource(kind, value)

    def data_source(self, call: ast.Call) -> Optional[DataSource]:
        kind = self._source_kind(call, DATA_KINDS, "data")
        if kind is None:
            return None
        what = {"hf": "dataset name", "builtin": "asset name"}.get(kind, "file")
        ref = self._one_string(call, what)
        schema: dict[str, Callable] = {}
        if kind == "hf":
            schema = {"split": read_string, "field": read_string}
        elif kind in ("json", "jsonl", "parquet"):
            schema = {"field": read_string}
        opts = self.settings(call.keywords, schema, f"{kind}(...)")
        if ref is None:
            return None
        value = ref.value
        if kind == "builtin" and value in RETIRED_DATA:
            self.error(f"builtin data '{value}' is no longer bundled: {RETIRED_DATA[value]}", ref.span)
            return None
        if kind == "builtin" and value not in BUILTIN_DATA:
            self.error(
                f"unknown builtin data '{value}': expected one of {', '.join(BUILTIN_DATA)}"
                + suggest(value, BUILTIN_DATA),
                ref.span,
            )
            return None
        if kind in ("json", "jsonl", "text", "parquet"):
            path = local_path(value, self.base_dir)
            if not path.is_file():
                self.error(f"data file not found: {value} (relative paths start at the spec's directory)",
                           ref.span)
                return None
            value = str(path)
        return DataSource(
            kind, value,
            split=opts.get("split", ("train",))[0],
            field=opts.get("field", ("text",))[0],
        )

    def model_ref(self, name: ast.Name, role: str) -> Optional[str]:
        n = name.value
        if n in self.models:
            return n
        if n in self.decl:
            if isinstance(self.decl[n], ast.DataDecl):
                self.error(f"{role} '{n}' is data, not a model", name.span,
                           Note(f"'{n}' declared here", self.decl[n].name.span))
            return None  # declared but its source was bad: already reported
        self.error(f"undefined model '{n}'" + suggest(n, [k for k, d in self.decl.items()
                                                           if isinstance(d, ast.ModelDecl)]), name.span)
        return None

    def data_ref(self, name: ast.Name) -> Optional[str]:
        n = name.value
        if n in self.data:
            return n
        if n in self.decl:
            if isinstance(self.decl[n], ast.ModelDecl):
                self.error(f"'{n}' is a model, not data", name.span,
                           Note(f"'{n}' declared here", self.decl[n].name.span))
            return None
        self.error(f"undefined data '{n}'" + suggest(n, [k for k, d in self.decl.items()
                                                          if isinstance(d, ast.DataDecl)]), name.span)
        return None

    def data_reader(self):
        def read(v: ast.Value, key: str) -> Optional[str]:
            if not isinstance(v, ast.Name):
                raise Bad(f"{key} expects the name of a data declaration, got {describe_value(v)}", v.span)
            ref = self.data_ref(v)
            if ref is None:
                raise Silent()
            return ref

        return read
