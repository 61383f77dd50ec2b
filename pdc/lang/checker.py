"""Check a parsed spec and lower it to `CheckedSpec`.

Checking is one pass that records every problem in a `DiagnosticSink` and raises a single
`SpecError` at the end, so a user fixes all mistakes in one round. Nothing here loads weights:
the source architecture comes from `pdc.lang.sources.resolve_config` (config metadata only).

Invariants of a returned `CheckedSpec`:
- every model/data name used by a stage is declared, and no name is declared twice;
- stages are in the order correct -> prune... -> distill -> evaluate, at most one of each
  except prune;
- each prune stage's target is no larger than its source on any axis, heads divide into
  kv_heads groups no larger than the source's, and the target is a config transformers accepts;
- a width stage changes no depth and a depth stage changes no width.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Optional

from pdc.arch import Arch
from pdc.lang import ast
from pdc.lang.checked import (
    STAGE_KINDS,
    SPEED_METRICS,
    CheckedSpec,
    Comparison,
    Expectation,
    CorrectStage,
    DistillStage,
    EvaluateStage,
    PruneStage,
    VariantSpec,
)
from pdc.lang.check_search import check_search
from pdc.lang.diagnostics import Diagnostic, DiagnosticSink, Note, Span, SpecError
from pdc.lang.settings import (
    DataSource,
    DepthTarget,
    EvalConfig,
    EvalTask,
    ImportanceConfig,
    ModelSource,
    Saliency,
    DEFAULT_CACHE_K,
    TrainConfig,
    WidthTarget,
    paper_correction,
)
from pdc.lang.sources import SourceError, local_path, resolve_config
from pdc.lang.variants import apply_variant, describe, stage_name

MODEL_KINDS = ("hf", "dir", "gguf", "builtin")
DATA_KINDS = ("hf", "json", "jsonl", "text", "parquet", "builtin")
# The carried text domains (pdc/data/manifest.json; a test keeps the two lists equal).
BUILTIN_DATA = ("wiki", "wiki-heldout", "reddit", "amazon")
RETIRED_DATA = {"news": "the New York Times paragraphs came from the bigbench 1.0.0 sdist, which is no longer "
                        "served; use 'amazon' or 'reddit' (other SQuAD-shifts domains) or a jsonl file"}


class _Bad(Exception):
    """A value error inside a setting; becomes one diagnostic at `span`."""

    def __init__(self, message: str, span: Span | None = None, *notes: Note):
        super().__init__(message)
        self.message, self.span, self.notes = message, span, notes


def _describe(v: ast.Value) -> str:
    if isinstance(v, ast.Number):
        return f"number {v.text}"
    if isinstance(v, ast.Str):
        return f"string {v.value!r}"
    if isinstance(v, ast.Name):
        return f"name '{v.value}'"
    return f"call {v.name.value}(...)"


def _suggest(word: str, choices) -> str:
    choices = list(choices)
    # word-order slips (`lr_min` for `min_lr`) are too far apart for difflib
    swapped = [c for c in choices if sorted(c.split("_")) == sorted(word.split("_"))]
    close = swapped or difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# ---- value readers: (value node, key) -> python value, or raise _Bad ------------------------


def _tolerance(got: dict) -> tuple:
    """(rtol, atol) for `pdc check` as written in a prune block; None where not written."""
    return tuple(got[k][0] if k in got else None for k in ("check_rtol", "check_atol"))


def _absent_axis(axis: str, arch: Arch) -> str:
    """Why `arch` has no `axis` to prune ("" when it has one)."""
    if axis in ("experts", "expert_mlp") and not arch.experts:
        return "the source is not a mixture of experts (its config names no routed experts)"
    if axis == "shared_mlp" and not arch.shared_mlp:
        return "the source has no shared expert"
    if axis == "mlp" and not arch.mlp:
        return "the source has no dense MLP (its experts' width is expert_mlp)"
    return ""


def _spans(got: dict) -> dict:
    """Where each setting was written (the plan layer points its diagnostics there)."""
    return {k: node.span for k, (_, node) in got.items()}


def _int(lo: int | None = None, hi: int | None = None) -> Callable[[ast.Value, str], int]:
    def read(v: ast.Value, key: str) -> int:
        if not isinstance(v, ast.Number):
            raise _Bad(f"{key} expects an integer, got {_describe(v)}", v.span)
        val = v.value
        if isinstance(val, float):
            if not (math.isfinite(val) and val == int(val)):
                raise _Bad(f"{key}={v.text} is not a whole number", v.span)
            val = int(val)
        if lo == 1 and val < 1:
            raise _Bad(f"{key}={v.text} must be positive", v.span)
        if lo is not None and val < lo:
            raise _Bad(f"{key}={v.text} must be at least {lo}", v.span)
        if hi is not None and val > hi:
            raise _Bad(f"{key}={v.text} must be at most {hi}", v.span)
        return val

    return read


def _float(lo: float | None = None, positive: bool = False, hi: float | None = None):
    def read(v: ast.Value, key: str) -> float:
        if not isinstance(v, ast.Number):
            raise _Bad(f"{key} expects a number, got {_describe(v)}", v.span)
        val = float(v.value)
        if not math.isfinite(val):
            raise _Bad(f"{key}={v.text} is not a finite number", v.span)
        if positive and val <= 0:
            raise _Bad(f"{key}={v.text} must be positive", v.span)
        if lo is not None and val < lo:
            raise _Bad(f"{key}={v.text} must be at least {lo:g}", v.span)
        if hi is not None and val > hi:
            raise _Bad(f"{key}={v.text} must be at most {hi:g}", v.span)
        return val

    return read


def _enum(*choices: str, what: str = ""):
    def read(v: ast.Value, key: str) -> str:
        word = v.value if isinstance(v, (ast.Name, ast.Str)) else None
        if word not in choices:
            got = f"'{word}'" if word is not None else _describe(v)
            raise _Bad(
                f"unknown {what or key} {got}: expected one of {', '.join(choices)}"
                + (_suggest(word, choices) if word else ""),
                v.span,
            )
        return word

    return read


def _bool(v: ast.Value, key: str) -> bool:
    if isinstance(v, ast.Name) and v.value in ("true", "false"):
        return v.value == "true"
    raise _Bad(f"{key} expects true or false, got {_describe(v)}", v.span)


def _precision(v: ast.Value, key: str) -> str:
    """fp32 or bf16. fp16 is refused: training in fp16 needs dynamic loss scaling, which pdc's
    training loop does not run, and bf16 (same memory, fp32's range) is what the paper used."""
    if isinstance(v, ast.Name) and v.value == "fp16":
        raise _Bad("precision=fp16 is not supported: fp16 training needs loss scaling, which pdc does not "
                   "run; use bf16 (GPUs from Ampere on; same memory as fp16) or fp32", v.span)
    return _enum("fp32", "bf16", what="precision")(v, key)


def _string(v: ast.Value, key: str) -> str:
    if isinstance(v, ast.Str):
        return v.value
    raise _Bad(f"{key} expects a string, got {_describe(v)}", v.span)


def _word(v: ast.Value, key: str) -> str:
    """A bare name or a string (task names may be written either way)."""
    if isinstance(v, (ast.Name, ast.Str)):
        return v.value
    raise _Bad(f"{key} expects a name, got {_describe(v)}", v.span)


# ---- the checker ---------------------------------------------------------------------------


class _Checker:
    def __init__(self, spec: ast.Spec, text: str, base_dir: Path, resolve):
        self.spec = spec
        self.text = text
        self.base_dir = base_dir
        self.resolve = resolve
        self.sink = DiagnosticSink(text)
        self.models: dict[str, ModelSource] = {}
        self.data: dict[str, DataSource] = {}
        self.decl: dict[str, ast.ModelDecl | ast.DataDecl] = {}
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
                hint = _suggest(key, schema) or f" (known: {', '.join(sorted(schema))})"
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
            except _Bad as bad:
                self.error(bad.message, bad.span or item.span, *bad.notes)
            except _Silent:
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

    # -- declarations -------------------------------------------------------------------------
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
                   + _suggest(kind, kinds), call.name.span)
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
            schema = {"split": _string, "field": _string}
        elif kind in ("json", "jsonl", "parquet"):
            schema = {"field": _string}
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
                + _suggest(value, BUILTIN_DATA),
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
        self.error(f"undefined model '{n}'" + _suggest(n, [k for k, d in self.decl.items()
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
        self.error(f"undefined data '{n}'" + _suggest(n, [k for k, d in self.decl.items()
                                                          if isinstance(d, ast.DataDecl)]), name.span)
        return None

    def data_reader(self):
        def read(v: ast.Value, key: str) -> Optional[str]:
            if not isinstance(v, ast.Name):
                raise _Bad(f"{key} expects the name of a data declaration, got {_describe(v)}", v.span)
            ref = self.data_ref(v)
            if ref is None:
                raise _Silent()
            return ref

        return read

    # -- stage order ----------------------------------------------------------------------------
    def check_order(self, stages) -> None:
        seen: dict[str, Any] = {}
        for st in stages:
            kind = _stage_kind(st)
            if kind != "prune" and kind in seen:
                self.error(f"second '{kind}' stage; a spec has at most one", _head_span(st),
                           Note(f"first '{kind}' stage here", _head_span(seen[kind])))
                continue
            later = [s for k, s in seen.items() if STAGE_KINDS.index(k) > STAGE_KINDS.index(kind)]
            if later:
                first_later = min(later, key=lambda s: (s.span.line, s.span.col))
                self.error(
                    f"'{kind}' must come before '{_stage_kind(first_later)}' "
                    "(stages run correct -> prune -> distill -> evaluate)",
                    _head_span(st),
                    Note(f"'{_stage_kind(first_later)}' is here", _head_span(first_later)),
                )
            seen.setdefault(kind, st)

    # -- train settings -------------------------------------------------------------------------
    def engine(self, v: ast.Value, key: str) -> dict:
        if not (isinstance(v, ast.Call) and v.name.value == "deepspeed") and not (
            isinstance(v, ast.Name) and v.value == "deepspeed"
        ):
            raise _Bad(f"engine expects deepspeed(zero=N, precision=P), got {_describe(v)}", v.span)
        if isinstance(v, ast.Name):
            return {}
        got = self.call_args(v, [], {"zero": _int(0, 3), "precision": _precision}, "deepspeed(...)")
        return {k: val for k, (val, _) in got.items()}

    def loss(self, v: ast.Value, key: str) -> str:
        if isinstance(v, ast.Name) and v.value == "kl":
            return "kl_forward"
        if isinstance(v, ast.Name) and v.value == "ce":
            return "ce"
        if isinstance(v, ast.Call) and v.name.value == "kl":
            pos = v.positional
            if len(pos) == 1 and not v.keywords:
                direction = _enum("forward", "reverse", what="KL direction")(pos[0], "kl")
                return f"kl_{direction}"
            raise _Bad("kl(...) takes one argument: forward or reverse", v.span)
        raise _Bad(f"loss expects kl(forward), kl(reverse) or ce, got {_describe(v)}", v.span)

    def teacher_logits(self, v: ast.Value, key: str) -> Optional[int]:
        """`online` (None) or `cached` / `cached(k=N)`: the cache's k, 0 when not written."""
        if isinstance(v, ast.Name) and v.value == "online":
            return None
        if isinstance(v, ast.Name) and v.value == "cached":
            return 0
        if isinstance(v, ast.Call) and v.name.value == "cached":
            got = self.call_args(v, [], {"k": _int(1)}, "cached(...)")
            return got["k"][0] if "k" in got else 0
        raise _Bad(f"teacher_logits expects online, cached or cached(k=N), got {_describe(v)}", v.span)

    def train_schema(self, extra: dict[str, Callable]) -> dict[str, Callable]:
        schema = {
            "tokens": _int(1), "steps": _int(1), "lr": _float(positive=True), "min_lr": _float(lo=0),
            "warmup": _int(0), "schedule": _enum("cosine", "constant", "linear", what="schedule"),
            "global_batch": _int(1), "micro_batch": _int(1), "seq_len": _int(1),
            "engine": self.engine, "seed": _int(0), "checkpoint_every": _int(1),
            "weight_decay": _float(lo=0), "log_every": _int(1), "val_fraction": _float(lo=0, hi=0.5),
            "val_every": _int(1), "activation_checkpointing": _bool,
        }
        schema.update(extra)
        return schema

    def train_config(self, block: ast.Block, extra: dict[str, Callable], where: str,
                     head: Span) -> tuple[TrainConfig, dict]:
        for e in block.entries:
            self.error(f"unexpected entry in {where}; settings are written key=value", e.span)
        got = self.settings(block.settings, self.train_schema(extra), where)
        fields = {k: v for k, (v, _) in got.items() if k not in ("engine", "order", "teacher_logits")}
        if "engine" in got:
            fields.update(got["engine"][0])
        if "tokens" in got and "steps" in got:
            self.error("set either tokens= or steps=, not both", got["steps"][1].key.span,
                       Note("tokens set here", got["tokens"][1].key.span))
        elif "tokens" not in got and "steps" not in got:
            self.error(f"{where} needs a budget: tokens=N or steps=N", head)
        if "min_lr" in got and "lr" in got and got["min_lr"][0] > got["lr"][0]:
            self.error(f"min_lr={got['min_lr'][1].value.text} is larger than lr={got['lr'][1].value.text}",
                       got["min_lr"][1].span)
        cfg = TrainConfig()
        mb = fields.get("micro_batch", cfg.micro_batch)
        gb = fields.get("global_batch", cfg.global_batch)
        if gb % mb:
            node = got.get("global_batch", got.get("micro_batch"))[1]
            self.error(f"global_batch={gb} is not a multiple of micro_batch={mb}", node.span)
        if "lora_rank" in got and fields.get("method") != "lora":
            self.error("lora_rank is only used with method=lora", got["lora_rank"][1].key.span)
        if "min_lr" not in got and "lr" in got:
            fields["min_lr"] = min(cfg.min_lr, fields["lr"])
        return replace(cfg, **fields), got

    # -- stages -------------------------------------------------------------------------------
    def correct(self, st: ast.CorrectStmt) -> Optional[CorrectStage]:
        model = self.model_ref(st.model, "correct")
        data = self.data_ref(st.data)
        train, got = self.train_config(
            st.block,
            {"method": _enum("full", "lora", "norm", what="correction method"), "lora_rank": _int(1),
             "order": _enum("sequential", "parallel", "concurrent", what="order")},
            "correct", _head_span(st),
        )
        order = got.get("order", ("sequential",))[0]
        self.correct_keys_given = set(got)
        self.correct_settings = got
        if model is None or data is None:
            return None
        return CorrectStage(model, data, train, order, span=st.span)

    def distill(self, st: ast.DistillStmt) -> Optional[DistillStage]:
        teacher = self.model_ref(st.teacher, "teacher")
        data = self.data_ref(st.data)
        train, got = self.train_config(
            st.block,
            {"loss": self.loss, "temperature": _float(positive=True), "ce_weight": _float(lo=0, hi=1),
             "top_k": _int(1), "teacher_logits": self.teacher_logits},
            "distill", _head_span(st),
        )
        train = replace(train, cache_k=self.check_teacher_settings(train, got))
        self.distill_settings = got
        if teacher is None or data is None:
            return None
        return DistillStage(teacher, data, train, span=st.span)

    def check_teacher_settings(self, train: TrainConfig, got: dict) -> Optional[int]:
        """The settings that only mean something with a teacher, checked against `loss`; returns
        the teacher cache's k (None: the teacher runs online)."""
        def written(key: str) -> str:
            node = got[key][1]
            return f"{key}={self.text_of(node.value)}"

        if train.loss == "ce":
            loss_note = Note("loss=ce set here", got["loss"][1].span)
            why = {
                "teacher_logits": "cross-entropy trains on the text alone and reads no teacher logits "
                              "(in a compare variant, also write distill.teacher_logits=online)",
                "temperature": "the temperature softens the teacher's distribution, and loss=ce has no teacher",
                "top_k": "top_k restricts the teacher's distribution, and loss=ce has no teacher",
                "ce_weight": "ce_weight adds cross-entropy to a KL loss; loss=ce is cross-entropy already",
            }
            for key, reason in why.items():
                if key in got and (key != "teacher_logits" or got[key][0] is not None):
                    self.error(f"{written(key)} with loss=ce: {reason}", got[key][1].span, loss_note)
            return None
        if "teacher_logits" not in got or got["teacher_logits"][0] is None:
            return None
        k, node = got["teacher_logits"]
        if k and train.top_k is not None and k != train.top_k:
            self.error(f"{written('teacher_logits')} caches {k} logits per token, but top_k={train.top_k} "
                       f"distills on the teacher's top {train.top_k}: the cache must hold exactly those "
                       "(write teacher_logits=cached, which takes top_k's k)",
                       node.value.span, Note(f"top_k={train.top_k} set here", got["top_k"][1].span))
            return None
        k = k or train.top_k or DEFAULT_CACHE_K
        vocab = self.source_arch.vocab if self.source_arch is not None else None
        if vocab is not None and k > vocab:
            self.error(f"{written('teacher_logits')} caches more logits per token than the vocabulary has "
                       f"({vocab:,})", node.value.span)
            return None
        return k

    def text_of(self, v: ast.Value) -> str:
        """The source text of a value, as written."""
        s = v.span
        lines = self.text.splitlines()
        if s.line == s.end_line and 0 < s.line <= len(lines):
            return lines[s.line - 1][s.col - 1:s.end_col - 1]
        return _describe(v)

    def evaluate(self, st: ast.EvaluateStmt) -> Optional[EvaluateStage]:
        if st.harness.value != "lm_eval":
            self.error(f"unknown evaluation harness '{st.harness.value}': expected lm_eval"
                       + _suggest(st.harness.value, ["lm_eval"]), st.harness.span)
        got = self.settings(
            st.block.settings,
            {"limit": _int(1), "seq_len": _int(1), "tasks_dir": self.tasks_dir, "allow_code_execution": _bool,
             "precision": _enum("fp32", "bf16"), "speed": _bool},
            "evaluate",
        )
        tasks: list[EvalTask] = []
        seen: dict[str, ast.Entry] = {}
        perplexity: list[str] = []
        for e in st.block.entries:
            v = e.value
            name = v.value if isinstance(v, ast.Name) else v.name.value
            if name in seen:
                self.error(f"task '{name}' listed twice", e.span, Note("first listed here", seen[name].span))
                continue
            seen[name] = e
            if name == "perplexity":
                args = v.positional if isinstance(v, ast.Call) else ()
                if not args or not all(isinstance(a, ast.Name) for a in args) or (isinstance(v, ast.Call) and v.keywords):
                    self.error("perplexity(...) takes the names of data declarations, e.g. perplexity(heldout, news)",
                               e.span)
                    continue
                named: dict[str, ast.Name] = {}
                for arg in args:
                    if arg.value in named:
                        self.error(f"perplexity on '{arg.value}' listed twice", arg.span,
                                   Note("first listed here", named[arg.value].span))
                        continue
                    named[arg.value] = arg
                    ref = self.data_ref(arg)
                    if ref is not None:
                        perplexity.append(ref)
                continue
            shots = 0
            if isinstance(v, ast.Call):
                got_shots = self.call_args(v, ["shots"], {"shots": _int(0)}, f"task {name}")
                shots = got_shots.get("shots", (0,))[0]
            tasks.append(EvalTask(name, shots))
        if not st.block.entries:
            self.error("evaluate lists no tasks (e.g. winogrande(5) or perplexity(DATA))", _head_span(st))
        cfg = EvalConfig(
            tasks=tuple(tasks), perplexity_data=tuple(perplexity),
            **{k: got[k][0] for k in ("limit", "seq_len", "allow_code_execution", "precision", "speed") if k in got},
        )
        return EvaluateStage(cfg, got.get("tasks_dir", (None,))[0], st.harness.value, span=st.span)

    def tasks_dir(self, v: ast.Value, key: str) -> str:
        if isinstance(v, ast.Name) and v.value == "builtin":
            return "builtin"
        if isinstance(v, ast.Str):
            path = local_path(v.value, self.base_dir)
            if not path.is_dir():
                raise _Bad(f"tasks_dir not found: {path}", v.span)
            return str(path)
        raise _Bad(f'tasks_dir expects a path string or builtin, got {_describe(v)}', v.span)

    # -- prune ----------------------------------------------------------------------------------
    def importance(self, v: ast.Value, key: str) -> tuple[ImportanceConfig, Optional[str]]:
        methods = ("activation", "magnitude", "random")
        method = v.value if isinstance(v, ast.Name) else v.name.value if isinstance(v, ast.Call) else None
        if method not in methods:
            got = f"'{method}'" if method else _describe(v)
            raise _Bad(f"unknown importance method {got}: expected one of {', '.join(methods)}"
                       + (_suggest(method, methods) if method else ""), v.span)
        if isinstance(v, ast.Name):
            return ImportanceConfig(method=method), None
        schema: dict[str, Callable] = {"seed": _int(0)}
        if method == "activation":
            schema.update(
                samples=_int(1), seq_len=_int(1), data=self.data_reader(),
                batch=_enum("l2", "mean", what="batch aggregation"),
                seq=_enum("mean", "l2", what="sequence aggregation"),
                experts=_enum("mass", "output", what="expert score"),
            )
        got = self.call_args(v, [], schema, f"{method}(...)")
        names = {"batch": "batch_agg", "seq": "seq_agg", "experts": "expert_score"}
        fields = {names.get(k, k): val for k, (val, _) in got.items() if k != "data"}
        return ImportanceConfig(method=method, **fields), got.get("data", (None,))[0]

    def saliency(self, v: ast.Value, key: str) -> Saliency:
        kinds = ("loss", "task", "cosine")
        kind = v.value if isinstance(v, ast.Name) else v.name.value if isinstance(v, ast.Call) else None
        if kind not in kinds:
            got = f"'{kind}'" if kind else _describe(v)
            raise _Bad(f"unknown saliency {got}: expected one of {', '.join(kinds)}"
                       + (_suggest(kind, kinds) if kind else ""), v.span)
        if isinstance(v, ast.Name):
            if kind == "task":
                raise _Bad("task saliency needs a task: task(winogrande, shots=5)", v.span)
            return Saliency(kind=kind)
        if kind == "task":
            got = self.call_args(v, ["task", "shots"],
                                 {"task": _word, "shots": _int(0), "limit": _int(1),
                                  "precision": _enum("fp32", "bf16")}, "task(...)")
            if "task" not in got:
                raise _Bad("task saliency needs a task: task(winogrande, shots=5)", v.span)
        else:
            got = self.call_args(v, ["data"], {"data": self.data_reader(), "samples": _int(1),
                                                "seq_len": _int(1)}, f"{kind}(...)")
        return Saliency(kind=kind, **{k: val for k, (val, _) in got.items()})

    def prune(self, st: ast.PruneStmt, arch: Optional[Arch], default_data: Optional[str],
              source_note: Note) -> Optional[PruneStage]:
        kind = st.kind.value
        if kind == "search":
            return check_search(self, st, arch, default_data, source_note)
        if kind not in ("width", "depth"):
            self.error(f"unknown prune kind '{kind}': expected width, depth or search"
                       + _suggest(kind, ("width", "depth", "search")),
                       st.kind.span)
            return None
        for e in st.block.entries:
            self.error("unexpected entry in prune; settings are written key=value", e.span)
        axes = {"hidden": _int(1), "mlp": _int(1), "heads": _int(1), "kv_heads": _int(1), "depth": _int(1),
                "experts": _int(1), "expert_mlp": _int(1), "shared_mlp": _int(1)}
        # check_rtol/check_atol: the numeric tolerance `pdc check` allows against the lock.
        schema = dict(axes, data=self.data_reader(), check_rtol=_float(lo=0), check_atol=_float(lo=0))
        if kind == "width":
            schema["importance"] = self.importance
        else:
            schema.update(saliency=self.saliency, contiguous=_bool)
        got = self.settings(st.block.settings, schema, f"prune {kind}")
        if arch is None:  # the source could not be resolved (reported); keys and types were checked
            return None
        sizes = {"hidden": arch.hidden, "mlp": arch.mlp, "heads": arch.heads,
                 "kv_heads": arch.kv_heads, "depth": arch.layers, "experts": arch.experts,
                 "expert_mlp": arch.expert_mlp, "shared_mlp": arch.shared_mlp}
        bad_axis = False
        for axis in axes:
            if axis not in got:
                continue
            value, node = got[axis]
            absent = _absent_axis(axis, arch)
            if absent:
                self.error(f"{axis}={value}: {absent}", node.span, source_note)
                bad_axis = True
            elif axis == "experts" and value < arch.top_k:
                self.error(f"experts={value} is below the router's top-k ({arch.top_k} experts per token)",
                           node.span, source_note)
                bad_axis = True
            elif axis == "depth" and value > sizes[axis]:
                self.error(f"depth={value} is out of range 1..{sizes[axis]} (the source has "
                           f"{sizes[axis]} layers)", node.span, source_note)
                bad_axis = True
            elif value > sizes[axis]:
                self.error(f"{axis}={value} is larger than the source ({sizes[axis]})"
                           if arch is self.source_arch else
                           f"{axis}={value} is larger than the previous prune stage's result ({sizes[axis]})",
                           node.span, source_note)
                bad_axis = True
        # The paper prunes width and depth in separate stages; a no-op setting is tolerated.
        other = ("depth",) if kind == "width" else ("hidden", "mlp", "heads", "kv_heads", "experts",
                                                   "expert_mlp", "shared_mlp")
        for axis in other:
            if axis in got and got[axis][0] < sizes[axis]:
                self.error(
                    f"{axis}={got[axis][0]} in a {kind} stage: prune width and depth in separate "
                    f"stages (`prune {'depth' if kind == 'width' else 'width'} {{ ... }}`)",
                    got[axis][1].span,
                )
                bad_axis = True
        data = got.get("data", (None,))[0]
        if kind == "width":
            importance, imp_data = got.get("importance", ((ImportanceConfig(), None), None))[0]
            if imp_data and data and imp_data != data:
                self.error("calibration data given twice (data= and importance data=) with different names",
                           got["data"][1].span)
            data = imp_data or data or default_data
            if importance.method == "activation" and data is None and "data" not in got:
                self.error("activation importance needs calibration data: declare `data NAME = ...`",
                           _head_span(st))
            width_axes = ("hidden", "mlp", "heads", "kv_heads", "experts", "expert_mlp", "shared_mlp")
            targets = {a: got[a][0] for a in width_axes if a in got}
            written = {i.key.value for i in st.block.settings}
            if not targets:
                if not written & set(width_axes):  # else: already reported
                    self.error("prune width sets no target (hidden=, mlp=, heads=, kv_heads=, or for a mixture "
                               "of experts experts=, expert_mlp=, shared_mlp=)", _head_span(st))
                return None
            width = WidthTarget(**targets)
            target = arch.with_sizes(**targets)
            if not bad_axis:
                self.check_heads(target, arch, got, source_note)
            return PruneStage("width", width, None, importance, data, target, arch, span=st.span,
                              check_tolerance=_tolerance(got), setting_spans=_spans(got))
        # depth
        if "depth" not in got:
            if not any(k == "depth" for k in (s.key.value for s in st.block.settings)):
                self.error("prune depth needs depth=N (the number of layers to keep)", _head_span(st))
            return None
        saliency = got.get("saliency", (Saliency(),))[0]
        if saliency.kind in ("loss", "cosine"):
            sal_data = saliency.data or data or default_data
            if sal_data is None:
                self.error(f"{saliency.kind} saliency needs data: declare `data NAME = ...`", _head_span(st))
            saliency = replace(saliency, data=sal_data)
            data = sal_data
        depth = DepthTarget(got["depth"][0], saliency, got.get("contiguous", (True,))[0])
        target = arch.with_sizes(layers=depth.depth)
        return PruneStage("depth", None, depth, ImportanceConfig(), data or default_data, target, arch,
                          span=st.span, check_tolerance=_tolerance(got), setting_spans=_spans(got))

    def check_heads(self, target: Arch, source: Arch, got: dict, source_note: Note) -> None:
        def where(*keys: str) -> Span | None:
            for k in keys:
                if k in got:
                    return got[k][1].span
            return None

        if target.heads % target.kv_heads:
            self.error(f"heads={target.heads} is not a multiple of kv_heads={target.kv_heads}",
                       where("heads", "kv_heads"))
            return
        group, source_group = target.heads // target.kv_heads, source.heads // source.kv_heads
        if group > source_group:
            self.error(
                f"heads={target.heads} with kv_heads={target.kv_heads} needs {group} query heads per KV "
                f"head, but the source has {source_group}; pruning cannot grow a group",
                where("kv_heads", "heads"), source_note,
            )
            return

    # -- whole spec -----------------------------------------------------------------------------
    def run(self, path: Path) -> CheckedSpec:
        stages = [s for s in self.spec.statements if isinstance(s, ast.StageStmt)]
        for s in self.spec.statements:
            if isinstance(s, (ast.ModelDecl, ast.DataDecl)):
                self.declare(s)
        self.check_order(stages)
        by_kind: dict[str, list] = {}
        for s in stages:
            by_kind.setdefault(_stage_kind(s), []).append(s)
        correct_st = (by_kind.get("correct") or [None])[0]
        distill_st = (by_kind.get("distill") or [None])[0]

        # The pruned model is the teacher: distill's, else correct's, else the first model.
        source_name_node: Optional[ast.Name] = None
        if distill_st is not None:
            source_name_node = distill_st.teacher
        elif correct_st is not None:
            source_name_node = correct_st.model
        model_decls = [s for s in self.spec.statements if isinstance(s, ast.ModelDecl)]
        if correct_st is not None and distill_st is not None and \
                correct_st.model.value != distill_st.teacher.value:
            self.error(
                f"distill teacher '{distill_st.teacher.value}' is not the corrected model "
                f"'{correct_st.model.value}' (pdc corrects, prunes and distills from one teacher)",
                distill_st.teacher.span, Note("corrected model named here", correct_st.model.span),
            )
        if source_name_node is None:
            if not model_decls:
                self.error("no model declared (e.g. model teacher = builtin(\"smollm2-135m\"))",
                           Span(self.spec.file, 1, 1, 1, 2))
                self.sink.raise_if_errors()
            source_name_node = model_decls[0].name
        source_name = source_name_node.value
        if source_name not in self.models:
            # undefined (reported when its stage is checked): check prune targets against the
            # first usable model so their own mistakes are still reported in this round
            usable = [d.name.value for d in model_decls if d.name.value in self.models]
            if usable and source_name not in self.decl:
                source_name = usable[0]

        arch: Optional[Arch] = None
        cfg: dict = {}
        source_note = Note(f"model '{source_name}' declared here", None)
        if source_name in self.models:
            decl = self.decl[source_name]
            try:
                cfg = self.resolve(self.models[source_name], self.base_dir)
                arch = Arch.from_hf_config(cfg)
            except SourceError as exc:
                self.error(exc.message, decl.source.span)
            except (KeyError, TypeError, ValueError) as exc:
                self.error(f"model config lacks or mangles a field: {exc}", decl.source.span)
            if arch is not None:
                source_note = Note(
                    f"model '{source_name}' declared here (hidden={arch.hidden}, mlp={arch.mlp}, "
                    f"depth={arch.layers}, heads={arch.heads}, kv_heads={arch.kv_heads})",
                    decl.source.span,
                )

        self.source_arch = arch
        default_data = None
        for st in (distill_st, correct_st):
            if st is not None and st.data.value in self.data:
                default_data = st.data.value
                break
        if default_data is None:
            data_decls = [s for s in self.spec.statements if isinstance(s, ast.DataDecl)]
            if data_decls and data_decls[0].name.value in self.data:
                default_data = data_decls[0].name.value

        lowered = []
        current = arch
        has_prune = False
        for st in stages:
            kind = _stage_kind(st)
            try:
                if kind == "correct":
                    lowered.append(self.correct(st))
                elif kind == "distill":
                    if not has_prune:
                        self.error("distill needs a prune stage before it (there is no student yet)",
                                   _head_span(st))
                    lowered.append(self.distill(st))
                elif kind == "evaluate":
                    lowered.append(self.evaluate(st))
                else:
                    has_prune = True
                    stage = self.prune(st, current, default_data, source_note)
                    lowered.append(stage)
                    if stage is not None:
                        current = stage.target_arch
                        # a later prune stage starts from this one's result: say so in notes
                        source_note = Note(
                            f"it starts from the previous prune stage's result (hidden={current.hidden}, "
                            f"mlp={current.mlp}, depth={current.layers}, heads={current.heads}, "
                            f"kv_heads={current.kv_heads})", st.span)
            except _Silent:
                lowered.append(None)
        correct_stage = next((s for s in lowered if isinstance(s, CorrectStage)), None)
        if correct_stage is not None and correct_stage.order in ("parallel", "concurrent") and distill_st is None:
            self.error(f"order={correct_stage.order} corrects the teacher alongside distillation, but there is "
                       "no distill stage", correct_st.block.span)
        lowered = self.paper_correction_defaults(lowered)
        self.warn_unused(lowered)
        lowered = self.fold_concurrent_correction(lowered, correct_st, distill_st)
        if arch is None and not self.sink.has_errors:  # defensive: every path above reports
            self.error(f"cannot determine the architecture of model '{source_name}'", self.decl[source_name].span
                       if source_name in self.decl else None)
        self.sink.raise_if_errors()
        prune_count = sum(isinstance(s, PruneStage) for s in lowered)
        named, k = [], 0
        for s in lowered:
            if isinstance(s, PruneStage):
                k += 1
                s = replace(s, name=stage_name("prune", k, prune_count))
            named.append(s)
        return CheckedSpec(
            path=path, text=self.text, models=dict(self.models), data=dict(self.data),
            source_model=source_name, source_arch=arch, source_config=cfg, stages=tuple(named),
            warnings=self.sink.warnings,
            source_span=self.decl[source_name].source.span if source_name in self.decl else None,
        )

    def paper_correction_defaults(self, lowered):
        """The paper's teacher-correction settings where the spec gives none
        (`pdc.lang.settings.paper_correction`)."""
        correct = next((s for s in lowered if isinstance(s, CorrectStage)), None)
        distill = next((s for s in lowered if isinstance(s, DistillStage)), None)
        if correct is None:
            return lowered
        given = frozenset(getattr(self, "correct_keys_given", set()))
        t = paper_correction(correct.train, distill.train if distill else None, given)
        if t.min_lr > t.lr:
            self.error(f"min_lr={t.min_lr:g} is larger than the default correction lr={t.lr:g} "
                       "(one fifth of the distillation lr); set lr= explicitly", correct.span)
        fixed = replace(correct, train=t)
        return [fixed if s is correct else s for s in lowered]

    # Settings of a concurrent correction that must equal the distillation's: the teacher trains
    # on exactly the micro-batches it teaches on.
    CONCURRENT_SHARED = ("global_batch", "micro_batch", "seq_len", "val_fraction", "seed")

    def fold_concurrent_correction(self, lowered, correct_st, distill_st):
        """`correct ... { order=concurrent }`: no stage of its own; its training settings become
        the distillation's `teacher_correction`, checked against the distillation."""
        correct = next((s for s in lowered if isinstance(s, CorrectStage)), None)
        distill = next((s for s in lowered if isinstance(s, DistillStage)), None)
        if correct is None or correct.order != "concurrent" or distill is None:
            return lowered
        got, dgot = self.correct_settings, self.distill_settings
        order_span = got["order"][1].span
        why = "order=concurrent trains the teacher inside the distillation loop"
        if correct.data != distill.data:
            self.error(f"{why}, on the distillation's batches: its data must be the distillation's "
                       f"'{distill.data}', not '{correct.data}'", correct_st.data.span,
                       Note("distillation data named here", distill_st.data.span))
        c, d = correct.train, distill.train
        for key in self.CONCURRENT_SHARED:
            if key in got and getattr(c, key) != getattr(d, key):
                self.error(f"{key}={self.text_of(got[key][1].value)} in a concurrent correction: {why}, whose "
                           f"{key} is {getattr(d, key)}; leave it out (it follows distill)", got[key][1].span,
                           Note("order=concurrent set here", order_span))
        steps, dsteps = c.total_steps(), d.total_steps()
        if steps and dsteps and steps > dsteps:
            budget = got.get("steps", got.get("tokens"))
            self.error(f"a concurrent correction of {steps} steps outlasts the {dsteps} steps of distillation it runs "
                       "in (it corrects the teacher during the first N steps)",
                       budget[1].span if budget else _head_span(correct_st))
        if not d.uses_teacher:
            self.error(f"{why}, but loss=ce trains the student without a teacher", order_span,
                       Note("loss=ce set here", dgot["loss"][1].span))
        elif d.cache_k is not None:
            self.error(f"{why}, so its logits change every step and cannot be cached: use teacher_logits=online",
                       dgot["teacher_logits"][1].span, Note("order=concurrent set here", order_span))
        if c.zero == 3:
            self.error("a concurrent correction under zero=3 is not supported (the trained teacher is gathered "
                       "on one process to be saved): use zero=0, 1 or 2", got["engine"][1].span)
        shared = {key: getattr(d, key) for key in self.CONCURRENT_SHARED}
        folded = replace(distill, teacher_correction=replace(c, **shared))
        return [folded if s is distill else s for s in lowered if s is not correct]

    def warn_unused(self, lowered) -> None:
        """Warnings, not errors: declarations no stage uses, warmup that outlasts training."""
        used = set()
        for s in lowered:
            if isinstance(s, CorrectStage):
                used |= {s.model, s.data}
            elif isinstance(s, PruneStage):
                used |= {s.data}
                if s.depth is not None:
                    used |= {s.depth.saliency.data}
            elif isinstance(s, DistillStage):
                used |= {s.teacher, s.data}
            elif isinstance(s, EvaluateStage):
                used |= set(s.eval.perplexity_data)
        models = [d for d in self.decl.values() if isinstance(d, ast.ModelDecl)]
        for name, decl in self.decl.items():
            if name in used or (isinstance(decl, ast.ModelDecl) and decl is models[0]):
                continue
            what = "model" if isinstance(decl, ast.ModelDecl) else "data"
            self.sink.warn(f"{what} '{name}' is declared but never used", decl.name.span)
        for s in lowered:
            if isinstance(s, (CorrectStage, DistillStage)) and s.train.warmup and \
                    s.train.total_steps():  # a missing budget is already an error
                steps = s.train.total_steps()
                if s.train.warmup >= steps:
                    self.sink.warn(f"warmup={s.train.warmup} is not shorter than the {steps} training steps "
                                   f"of {s.name}; the learning rate never reaches its peak", _head_span_of(s))


class _Silent(Exception):
    """A reference error already reported; skip the value without a second message."""


def _stage_kind(st) -> str:
    return {ast.CorrectStmt: "correct", ast.PruneStmt: "prune", ast.DistillStmt: "distill",
            ast.EvaluateStmt: "evaluate"}[type(st)]


def _head_span_of(stage) -> Span:
    s = stage.span
    return Span(s.file, s.line, s.col, s.line, s.col + len(stage.name))


def _head_span(st) -> Span:
    """The span of a stage's keyword (its first line up to the block), for stage-level errors."""
    s = st.span
    return Span(s.file, s.line, s.col, s.line, s.col + len(_stage_kind(st)))


def _check_one(spec: ast.Spec, text: str, path: Path, resolve) -> CheckedSpec:
    return _Checker(spec, text, path.resolve().parent, resolve).run(path)


def check(spec: ast.Spec, text: str, path: str | Path, resolve=resolve_config) -> CheckedSpec:
    """Check `spec` (parsed from `text`, read from `path`) and lower it, with every variant of
    its comparison; raises one SpecError holding every problem found."""
    path = Path(path)
    compares = [s for s in spec.statements if isinstance(s, ast.CompareStmt)]
    base_ast = replace(spec, statements=tuple(s for s in spec.statements if not isinstance(s, ast.CompareStmt)))
    diagnostics: list[Diagnostic] = []

    def attempt(tree: ast.Spec) -> Optional[CheckedSpec]:
        try:
            return _check_one(tree, text, path, resolve)
        except SpecError as exc:
            diagnostics.extend(d for d in exc.diagnostics if d not in diagnostics)
            return None

    base = attempt(base_ast)
    comparison = None
    if compares:
        for extra in compares[1:]:
            diagnostics.append(Diagnostic("a spec holds one compare block", extra.name.span,
                                          notes=(Note("the first one is here", compares[0].name.span),)))
        comparison = _comparison(compares[0], base_ast, diagnostics, attempt)
    if diagnostics:
        raise SpecError(diagnostics, text)
    return replace(base, comparison=comparison) if comparison else base


def _comparison(stmt: ast.CompareStmt, base_ast: ast.Spec, diagnostics: list, attempt) -> Optional[Comparison]:
    if len(stmt.variants) < 2:
        diagnostics.append(Diagnostic(f"compare '{stmt.name.value}' needs at least two variants "
                                      "(`variant NAME { ... }`; an empty one is the recipe as written)",
                                      stmt.name.span))
    seen: dict[str, ast.Variant] = {}
    variants = []
    for variant in stmt.variants:
        name = variant.name.value
        if name in seen:
            diagnostics.append(Diagnostic(f"variant '{name}' is declared twice", variant.name.span,
                                          notes=(Note("first declared here", seen[name].name.span),)))
            continue
        seen[name] = variant
        statements, errors = apply_variant(base_ast.statements, variant)
        diagnostics.extend(e for e in errors if e not in diagnostics)
        checked = attempt(replace(base_ast, statements=statements))
        if checked is not None:
            variants.append(VariantSpec(name, tuple(describe(i) for i in variant.items), checked, variant.span))
    expects = tuple(e for e in (_expectation(x, seen, variants, diagnostics) for x in stmt.expects) if e)
    return Comparison(stmt.name.value, tuple(variants), stmt.span, expects)


def _expectation(x: ast.Expect, declared: dict, variants: list[VariantSpec], diagnostics: list) -> Optional[Expectation]:
    """The checked claim of `expect A beats B on METRIC`: both variants declared and different,
    and METRIC measured by every variant's evaluation."""
    ok = True
    for side in (x.winner, x.loser):
        if side.value not in declared:
            diagnostics.append(Diagnostic(f"expect names variant '{side.value}', which is not declared"
                                          + _suggest(side.value, declared), side.span))
            ok = False
    if ok and x.winner.value == x.loser.value:
        diagnostics.append(Diagnostic(f"expect compares variant '{x.winner.value}' with itself", x.loser.span))
        ok = False
    evaluations = [next((s.eval for s in v.spec.stages if isinstance(s, EvaluateStage)), None) for v in variants]
    measured: dict[str, tuple[Optional[str], Optional[str]]] = {}  # written form -> (task, data)
    if evaluations and all(evaluations):
        tasks = set.intersection(*({t.name for t in e.tasks} for e in evaluations))
        corpora = set.intersection(*(set(e.perplexity_data) for e in evaluations))
        headline = evaluations[0].perplexity_data[0] if evaluations[0].perplexity_data else None
        if headline is not None and all(e.perplexity_data[:1] == (headline,) for e in evaluations):
            measured["perplexity"] = (None, None)
        for d in sorted(corpora):
            measured[f"perplexity({d})"] = (None, None if d == headline else d)
        for t in sorted(tasks):
            measured[t] = (t, None)
        if all(e.speed for e in evaluations):
            measured.update({m: (None, None) for m in SPEED_METRICS})
    m = x.metric
    written = m.value if isinstance(m, ast.Name) else (
        f"{m.name.value}({', '.join(a.value for a in m.args if isinstance(a, ast.Name))})"
        if all(isinstance(a, ast.Name) for a in m.args) else None)
    if written not in measured:
        what = f"'{written}'" if written else "this metric"
        listed = ", ".join(measured) if measured else "nothing (the variants have no common evaluate stage)"
        diagnostics.append(Diagnostic(f"expect on {what}: every variant's evaluation must measure it; they all "
                                      f"measure {listed}", m.span))
        return None
    if not ok:
        return None
    task, data = measured[written]
    return Expectation(x.winner.value, x.loser.value, f"{x.winner.value} beats {x.loser.value} on {written}",
                       task, data, x.span, speed=written if written in SPEED_METRICS else None)
