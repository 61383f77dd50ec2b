"""The plan as a typed stage graph: which stage reads which model.

Every stage of a checked spec becomes a `Node` whose `inputs` map a role ("model", "teacher",
"student", or an evaluation column) to an upstream node or to a declared source model. The
runner computes content keys, input directories and the evaluation's columns from these edges
alone, so the wiring below is the only place that knows the recipe's data flow:

- correction fine-tunes the source model;
- the first prune stage prunes the corrected teacher (sequential correction, the paper's default)
  or the source (parallel correction, the paper's Figure 4 alternative; or no correction); each
  later prune stage prunes the previous one's output;
- distillation teaches the last pruned student with the corrected teacher when there is one;
  a concurrent correction (`order=concurrent`) has no node of its own: the distillation trains
  the source teacher as it teaches and writes it beside the student (`StageRef(distill,
  "teacher")`, the evaluation's corrected-teacher column);
  when it reads a teacher cache (`teacher_logits=cached`), a `teacher_logits` node before it runs
  that teacher once over the blocks it reads, and the distillation needs that node;
- evaluation compares the source, the corrected teacher, the pruned and the distilled model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Optional, Union

from pdc.lang.checked import (
    STAGE_KINDS,
    CheckedSpec,
    CorrectStage,
    DistillStage,
    EvaluateStage,
    PruneStage,
    Stage,
)
from pdc.lang.diagnostics import Span
from pdc.lang.settings import TrainConfig
from pdc.plan.results import MODEL_COLUMNS


@dataclass(frozen=True)
class SourceRef:
    """A model declared in the spec (`model NAME = ...`), before any stage."""

    model: str


@dataclass(frozen=True)
class StageRef:
    """A model a stage wrote: `<stage>/<output>/` (`model`; a distillation that corrects its
    teacher concurrently also writes `teacher`)."""

    stage: str
    output: str = "model"


ModelRef = Union[SourceRef, StageRef]

# Where a distillation with a concurrent teacher correction writes the corrected teacher.
CONCURRENT_TEACHER = "teacher"


@dataclass(frozen=True)
class TeacherLogitsStage:
    """The teacher pass of a cached distillation: `teacher`'s top-k log-probabilities on the
    blocks of `data` the distillation reads. `train` keeps only the distillation settings that
    decide those blocks and what is cached (budget, batch, seed, split, seq_len, k, temperature),
    so the stage's key, and its sharing between comparison variants, ignore the rest."""

    stage_kind: ClassVar[str] = "teacher_logits"

    teacher: str
    data: str
    train: TrainConfig
    span: Span
    name: str = "teacher_logits"

    @classmethod
    def of(cls, distill: DistillStage) -> "TeacherLogitsStage":
        t = distill.train
        kept = TrainConfig(steps=t.total_steps(), global_batch=t.global_batch, micro_batch=t.micro_batch,
                           seq_len=t.seq_len, seed=t.seed, val_fraction=t.val_fraction, precision=t.precision,
                           temperature=t.temperature, cache_k=t.cache_k)
        return cls(distill.teacher, distill.data, kept, distill.span)


@dataclass(frozen=True)
class Node:
    name: str
    kind: str
    decl: Union[Stage, TeacherLogitsStage]
    inputs: dict[str, ModelRef] = field(default_factory=dict)
    data: tuple[str, ...] = ()  # names of the data declarations the stage reads
    needs: tuple[str, ...] = ()  # stages whose output (not a model) this one reads: a teacher cache

    def upstream(self) -> list[str]:
        return [r.stage for r in self.inputs.values() if isinstance(r, StageRef)] + list(self.needs)


@dataclass(frozen=True)
class StageGraph:
    spec: CheckedSpec
    nodes: dict[str, Node]  # in execution order

    @property
    def names(self) -> list[str]:
        return list(self.nodes)

    def of_kind(self, kind: str) -> list[Node]:
        return [n for n in self.nodes.values() if n.kind == kind]

    def node(self, name: str) -> Node:
        return self.nodes[name]

    def ancestors(self, name: str) -> list[str]:
        """Every stage `name` depends on, in execution order."""
        seen: set[str] = set()
        stack = list(self.nodes[name].upstream())
        while stack:
            up = stack.pop()
            if up not in seen:
                seen.add(up)
                stack.extend(self.nodes[up].upstream())
        return [n for n in self.nodes if n in seen]

    @property
    def correction_order(self) -> Optional[str]:
        correct = self.of_kind("correct")
        return correct[0].decl.order if correct else None

    def teacher(self) -> ModelRef:
        """The model that teaches: the corrected teacher when correction runs, else the source."""
        correct = self.of_kind("correct")
        return StageRef(correct[0].name) if correct else SourceRef(self.spec.source_model)

    def student(self) -> Optional[ModelRef]:
        prunes = self.of_kind("prune")
        return StageRef(prunes[-1].name) if prunes else None


def build_graph(spec: CheckedSpec) -> StageGraph:
    source = SourceRef(spec.source_model)
    correct = next((s for s in spec.stages if isinstance(s, CorrectStage)), None)
    nodes: dict[str, Node] = {}
    previous_prune: Optional[str] = None
    for st in sorted(spec.stages, key=lambda s: STAGE_KINDS.index(s.stage_kind)):
        if isinstance(st, CorrectStage):
            nodes[st.name] = Node(st.name, "correct", st, {"model": SourceRef(st.model)}, (st.data,))
        elif isinstance(st, PruneStage):
            if previous_prune is not None:
                model: ModelRef = StageRef(previous_prune)
            elif correct is not None and correct.order == "sequential":
                model = StageRef(correct.name)
            else:
                model = source
            data = tuple(d for d in (st.data,) if d)
            if st.depth is not None and st.depth.saliency.data and st.depth.saliency.data not in data:
                data += (st.depth.saliency.data,)
            nodes[st.name] = Node(st.name, "prune", st, {"model": model}, data)
            previous_prune = st.name
        elif isinstance(st, DistillStage):
            teacher = StageRef(correct.name) if correct is not None else SourceRef(st.teacher)
            student = StageRef(previous_prune) if previous_prune else source
            needs: tuple[str, ...] = ()
            if st.train.uses_teacher and st.train.cache_k is not None:
                cache = TeacherLogitsStage.of(st)
                nodes[cache.name] = Node(cache.name, "teacher_logits", cache, {"teacher": teacher}, (st.data,))
                needs = (cache.name,)
            nodes[st.name] = Node(st.name, "distill", st, {"teacher": teacher, "student": student}, (st.data,),
                                  needs)
        elif isinstance(st, EvaluateStage):
            columns: dict[str, ModelRef] = {MODEL_COLUMNS[0]: source}
            if correct is not None:
                columns[MODEL_COLUMNS[1]] = StageRef(correct.name)
            if previous_prune is not None:
                columns[MODEL_COLUMNS[2]] = StageRef(previous_prune)
            distill = next((s for s in spec.stages if isinstance(s, DistillStage)), None)
            if distill is not None and distill.teacher_correction is not None:
                columns[MODEL_COLUMNS[1]] = StageRef(distill.name, CONCURRENT_TEACHER)
            if distill is not None:
                columns[MODEL_COLUMNS[3]] = StageRef(distill.name)
            columns = {c: columns[c] for c in MODEL_COLUMNS if c in columns}
            data = tuple(dict.fromkeys(st.eval.perplexity_data))
            nodes[st.name] = Node(st.name, "evaluate", st, columns, data)
    return StageGraph(spec, nodes)
