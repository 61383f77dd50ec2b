"""The lowered, checked spec: what the runner and the dry run consume.

`CheckedSpec.stages` is in execution order (correct -> prune... -> distill -> evaluate) and every
name in it refers to a key of `models` / `data`. Stage configs are the shared dataclasses of
`pdc/lang/settings.py`; each stage keeps the `span` of its statement for error messages at run time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal, Optional, Union

from pdc.arch import Arch
from pdc.lang.diagnostics import Diagnostic, Span, render
from pdc.lang.search_settings import SearchConfig
from pdc.lang.settings import (
    EMIT_FILES,
    EMIT_OUTPUTS,
    DataSource,
    DepthTarget,
    EvalConfig,
    ImportanceConfig,
    ModelSource,
    ReconstructConfig,
    TrainConfig,
    WidthTarget,
)

_NOSPAN = Span("<none>", 0, 0, 0, 0)
# Stage kinds in the order they run (the paper's): the one definition of stage order. A
# `teacher_logits` stage is not written in a spec: the plan adds it before a distillation that
# reads a teacher cache (`teacher_logits=cached`).
STAGE_KINDS = ("correct", "prune", "teacher_logits", "distill", "evaluate")


@dataclass(frozen=True)
class CorrectStage:
    """Teacher correction: fine-tune `model` on `data` before the distillation of the pruned
    student (`sequential`: the corrected teacher is pruned and teaches; `parallel`: the original
    teacher is pruned, the corrected one teaches). `concurrent` (the paper's Figure 4) never
    reaches the stage list: the checker folds it into `DistillStage.teacher_correction`."""

    stage_kind: ClassVar[str] = "correct"

    model: str
    data: str
    train: TrainConfig
    order: Literal["sequential", "parallel", "concurrent"] = "sequential"
    span: Span = field(default=_NOSPAN, compare=False)
    name: str = "correct"


@dataclass(frozen=True)
class PruneStage:
    """One pruning step. Exactly one of `width`/`depth` is set, matching `kind`. `data` names the
    calibration data (activation importance, loss/cosine saliency). `source_arch` is the
    architecture this stage starts from and `target_arch` the one it produces."""

    stage_kind: ClassVar[str] = "prune"

    kind: Literal["width", "depth", "search"]
    width: Optional[WidthTarget]
    depth: Optional[DepthTarget]
    importance: ImportanceConfig
    data: Optional[str]
    target_arch: Arch
    source_arch: Optional[Arch] = None
    span: Span = field(default=_NOSPAN, compare=False)
    name: str = "prune"
    # (rtol, atol) that `pdc check` allows on the lock's numbers; None = the defaults. Not part of
    # what the stage computes, so it is left out of the stage's content key and lock identity.
    check_tolerance: tuple = (None, None)
    # Where each setting was written, for diagnostics raised after checking (the plan layer).
    setting_spans: dict = field(default_factory=dict, compare=False)
    # width: refit the projections reading pruned units (None: plain slicing, the paper's)
    reconstruct: Optional[ReconstructConfig] = None
    # `prune search`: the budgets and ranking (target_arch is then the source's: the shape is
    # chosen when the stage runs, and recorded in its result and lock)
    search: Optional[SearchConfig] = None
    # the outputs it writes (`emit=`); the lock names the deployable files left out
    emit: tuple = EMIT_OUTPUTS

    @property
    def not_emitted(self) -> list[str]:
        """The files this stage leaves out (and so does not verify), as the lock lists them."""
        return [f for o, f in EMIT_FILES.items() if o not in self.emit]


@dataclass(frozen=True)
class DistillStage:
    """Logit distillation from `teacher` (the corrected teacher when a correct stage exists).
    `teacher_correction` (`correct ... { order=concurrent }`, the paper's Figure 4): the teacher
    is fine-tuned on next-token loss in the same loop, on the same batches, for its first
    `teacher_correction.total_steps()` steps, while the student learns from it; its batch
    geometry equals `train`'s."""

    stage_kind: ClassVar[str] = "distill"

    teacher: str
    data: str
    train: TrainConfig
    teacher_correction: Optional[TrainConfig] = None
    span: Span = field(default=_NOSPAN, compare=False)
    name: str = "distill"


@dataclass(frozen=True)
class EvaluateStage:

    stage_kind: ClassVar[str] = "evaluate"
    eval: EvalConfig
    tasks_dir: Optional[str] = None  # absolute path, "builtin", or None (lm-eval's registry)
    harness: str = "lm_eval"
    span: Span = field(default=_NOSPAN, compare=False)
    name: str = "evaluate"


Stage = Union[CorrectStage, PruneStage, DistillStage, EvaluateStage]


@dataclass(frozen=True)
class VariantSpec:
    """One variant of a comparison: its name, what it changes (one line per item) and the
    checked spec it amounts to."""

    name: str
    changes: tuple[str, ...]
    spec: "CheckedSpec"
    span: Span = field(default=_NOSPAN, compare=False)


@dataclass(frozen=True)
class Expectation:
    """`expect WINNER beats LOSER on METRIC`: the winner's final model scores better on `task`'s
    accuracy or, without a task, on held-out perplexity on `data` (None: the headline corpus)."""

    winner: str
    loser: str
    text: str  # the claim as written, for the report
    task: Optional[str] = None
    data: Optional[str] = None
    span: Span = field(default=_NOSPAN, compare=False)
    # a speed metric (`SPEED_METRICS`): the winner's student is the faster, by its speed-up over
    # the teacher, when every variant's evaluation measures speed (`speed=true`)
    speed: Optional[str] = None


# `expect A beats B on METRIC` over inference speed: decode at batch 1, decode at the larger
# batch, prefill at the longest prompt (`pdc.runner.speed_table.metric_measure`)
SPEED_METRICS = ("decode_speed", "batch_decode_speed", "prefill_speed")


@dataclass(frozen=True)
class Comparison:
    """`compare NAME { variant ... expect ... }`: variants of the recipe, run side by side, and
    the claims the report checks."""

    name: str
    variants: tuple[VariantSpec, ...]
    span: Span = field(default=_NOSPAN, compare=False)
    expects: tuple[Expectation, ...] = ()


@dataclass(frozen=True)
class CheckedSpec:
    """A parsed and checked spec. Invariants: names in stages exist in `models`/`data`; stages
    are in order; `final_arch` is the last prune stage's target (or the source)."""

    path: Path
    text: str
    models: dict[str, ModelSource]
    data: dict[str, DataSource]
    source_model: str
    source_arch: Arch
    source_config: dict
    stages: tuple[Stage, ...]
    warnings: tuple[Diagnostic, ...] = ()
    source_span: Optional[Span] = field(default=None, compare=False)  # the source model's declaration
    comparison: Optional[Comparison] = None  # variants of this recipe, when the spec compares

    def render_warnings(self) -> str:
        """Compiler-style text of the checker's warnings ("" when there are none)."""
        return render(self.warnings, self.text) if self.warnings else ""

    @property
    def base_dir(self) -> Path:
        return Path(self.path).resolve().parent

    @property
    def final_arch(self) -> Arch:
        arch = self.source_arch
        for s in self.stages:
            if isinstance(s, PruneStage):
                arch = s.target_arch
        return arch

    def stage(self, name: str) -> Optional[Stage]:
        for s in self.stages:
            if s.name == name:
                return s
        return None

    def prune_stages(self) -> tuple[PruneStage, ...]:
        return tuple(s for s in self.stages if isinstance(s, PruneStage))
