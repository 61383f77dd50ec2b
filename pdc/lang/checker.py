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

The rules live by family, one module each, mixed into `_Checker` here: `check_settings` (the
value readers and the generic `key=value` reader, `CheckerBase`), `check_sources` (model and data
declarations and references), `check_prune` (width and depth targets, importance, saliency),
`check_training` (correct and distill: budgets, batch geometry, loss, teacher logits, concurrent
correction), `check_evaluate` (tasks and perplexity), `check_compare` (compare variants and
expectations). This module holds the whole-spec rules (stage order, the source model, unused
declarations) and the one dispatch from a stage statement to its family (`lower_stages`).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

from pdc.arch import Arch
from pdc.lang import ast
from pdc.lang.check_compare import check_comparison
from pdc.lang.check_evaluate import EvaluateRules
from pdc.lang.check_prune import PruneRules
from pdc.lang.check_settings import Silent, head_span, head_span_of, stage_kind
from pdc.lang.check_sources import SourceRules
from pdc.lang.check_training import TrainingRules
from pdc.lang.checked import CheckedSpec, CorrectStage, DistillStage, EvaluateStage, PruneStage, STAGE_KINDS
from pdc.lang.diagnostics import Diagnostic, Note, Span, SpecError
from pdc.lang.sources import SourceError, resolve_config
from pdc.lang.variants import stage_name


class _Checker(SourceRules, TrainingRules, EvaluateRules, PruneRules):
    # -- stage order ----------------------------------------------------------------------------
    def check_order(self, stages) -> None:
        seen: dict[str, Any] = {}
        for st in stages:
            kind = stage_kind(st)
            if kind != "prune" and kind in seen:
                self.error(f"second '{kind}' stage; a spec has at most one", head_span(st),
                           Note(f"first '{kind}' stage here", head_span(seen[kind])))
                continue
            later = [s for k, s in seen.items() if STAGE_KINDS.index(k) > STAGE_KINDS.index(kind)]
            if later:
                first_later = min(later, key=lambda s: (s.span.line, s.span.col))
                self.error(
                    f"'{kind}' must come before '{stage_kind(first_later)}' "
                    "(stages run correct -> prune -> distill -> evaluate)",
                    head_span(st),
                    Note(f"'{stage_kind(first_later)}' is here", head_span(first_later)),
                )
            seen.setdefault(kind, st)

    # -- whole spec -----------------------------------------------------------------------------
    def run(self, path: Path) -> CheckedSpec:
        stages = [s for s in self.spec.statements if isinstance(s, ast.StageStmt)]
        for s in self.spec.statements:
            if isinstance(s, (ast.ModelDecl, ast.DataDecl)):
                self.declare(s)
        self.check_order(stages)
        by_kind: dict[str, list] = {}
        for s in stages:
            by_kind.setdefault(stage_kind(s), []).append(s)
        correct_st = (by_kind.get("correct") or [None])[0]
        distill_st = (by_kind.get("distill") or [None])[0]
        source_name = self.source_model(correct_st, distill_st)
        arch, cfg, source_note = self.resolve_source(source_name)
        self.source_arch = arch
        lowered = self.lower_stages(stages, arch, self.default_data(correct_st, distill_st), source_note)
        correct_stage = next((s for s in lowered if isinstance(s, CorrectStage)), None)
        if correct_stage is not None and correct_stage.order in ("parallel", "concurrent") and distill_st is None:
            self.error(f"order={correct_stage.order} corrects the teacher alongside distillation, but there is "
                       "no distill stage", correct_st.block.span)
        lowered = self.paper_correction_defaults(lowered)
        self.warn_unused(lowered)
        self.check_prompt_leaks({d for s in lowered if isinstance(s, EvaluateStage) for d in s.eval.perplexity_data})
        lowered = self.fold_concurrent_correction(lowered, correct_st, distill_st)
        if arch is None and not self.sink.has_errors:  # defensive: every path above reports
            self.error(f"cannot determine the architecture of model '{source_name}'", self.decl[source_name].span
                       if source_name in self.decl else None)
        self.sink.raise_if_errors()
        return CheckedSpec(
            path=path, text=self.text, models=dict(self.models), data=dict(self.data),
            source_model=source_name, source_arch=arch, source_config=cfg, stages=_named(lowered),
            warnings=self.sink.warnings,
            source_span=self.decl[source_name].source.span if source_name in self.decl else None,
        )

    def lower_stages(self, stages, arch: Optional[Arch], default_data: Optional[str], source_note: Note) -> list:
        """Each stage statement checked by its rule family and lowered (None where it cannot be):
        the one dispatch from a stage to the module that checks it. A prune stage starts from the
        previous one's target."""
        lowered = []
        current = arch
        has_prune = False
        for st in stages:
            kind = stage_kind(st)
            try:
                if kind == "correct":
                    lowered.append(self.correct(st))  # check_training
                elif kind == "distill":
                    if not has_prune:
                        self.error("distill needs a prune stage before it (there is no student yet)",
                                   head_span(st))
                    lowered.append(self.distill(st))  # check_training
                elif kind == "evaluate":
                    lowered.append(self.evaluate(st))  # check_evaluate
                else:
                    has_prune = True
                    stage = self.prune(st, current, default_data, source_note)  # check_prune
                    lowered.append(stage)
                    if stage is not None:
                        current = stage.target_arch
                        # a later prune stage starts from this one's result: say so in notes
                        source_note = Note(
                            f"it starts from the previous prune stage's result (hidden={current.hidden}, "
                            f"mlp={current.mlp}, depth={current.layers}, heads={current.heads}, "
                            f"kv_heads={current.kv_heads})", st.span)
            except Silent:
                lowered.append(None)
        return lowered

    def source_model(self, correct_st, distill_st) -> str:
        """The model that is pruned: the teacher, i.e. distill's, else correct's, else the first
        model declared."""
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
        return source_name

    def resolve_source(self, source_name: str) -> tuple[Optional[Arch], dict, Note]:
        """The source model's architecture and config (metadata only), and the note that points
        prune diagnostics at its declaration."""
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
        return arch, cfg, source_note

    def default_data(self, correct_st, distill_st) -> Optional[str]:
        """The data a prune stage calibrates on when it names none: distill's, else correct's,
        else the first data declared."""
        for st in (distill_st, correct_st):
            if st is not None and st.data.value in self.data:
                return st.data.value
        data_decls = [s for s in self.spec.statements if isinstance(s, ast.DataDecl)]
        if data_decls and data_decls[0].name.value in self.data:
            return data_decls[0].name.value
        return None

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
        used |= self.variant_uses
        for name in reversed(list(self.uses)):  # what generated and mixed data read is used with them
            if name in used:
                used |= self.uses[name]
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
                                   f"of {s.name}; the learning rate never reaches its peak", head_span_of(s))


def _named(lowered: list) -> tuple:
    """The stages with their names: prune stages are numbered when there are several."""
    prune_count = sum(isinstance(s, PruneStage) for s in lowered)
    named, k = [], 0
    for s in lowered:
        if isinstance(s, PruneStage):
            k += 1
            s = replace(s, name=stage_name("prune", k, prune_count))
        named.append(s)
    return tuple(named)


def _check_one(spec: ast.Spec, text: str, path: Path, resolve, variant_uses: frozenset = frozenset()) -> CheckedSpec:
    checker = _Checker(spec, text, path.resolve().parent, resolve)
    checker.variant_uses = variant_uses
    return checker.run(path)


def _variant_uses(compare: ast.CompareStmt) -> frozenset:
    """Model and data names the stages written inside a comparison's variants read."""
    items = (i for v in compare.variants for i in v.items)
    return frozenset(n.value for i in items for n in (getattr(i, a, None) for a in ("model", "data", "teacher"))
                     if isinstance(n, ast.Name))


def check(spec: ast.Spec, text: str, path: str | Path, resolve=resolve_config) -> CheckedSpec:
    """Check `spec` (parsed from `text`, read from `path`) and lower it, with every variant of
    its comparison; raises one SpecError holding every problem found."""
    path = Path(path)
    compares = [s for s in spec.statements if isinstance(s, ast.CompareStmt)]
    base_ast = replace(spec, statements=tuple(s for s in spec.statements if not isinstance(s, ast.CompareStmt)))
    diagnostics: list[Diagnostic] = []

    def attempt(tree: ast.Spec, variant_uses: frozenset = frozenset()) -> Optional[CheckedSpec]:
        try:
            return _check_one(tree, text, path, resolve, variant_uses)
        except SpecError as exc:
            diagnostics.extend(d for d in exc.diagnostics if d not in diagnostics)
            return None

    base = attempt(base_ast, _variant_uses(compares[0]) if compares else frozenset())
    comparison = None
    if compares:
        for extra in compares[1:]:
            diagnostics.append(Diagnostic("a spec holds one compare block", extra.name.span,
                                          notes=(Note("the first one is here", compares[0].name.span),)))
        comparison = check_comparison(compares[0], base_ast, diagnostics, attempt)
    if diagnostics:
        raise SpecError(diagnostics, text)
    return replace(base, comparison=comparison) if comparison else base
