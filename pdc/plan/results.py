"""Typed stage results: what each stage built, where, its metrics and its timings.

Every stage function returns one of these dataclasses; the runner stores it in
`<stage>/stage.json` next to the stage's content key, and every reader (the runner's skip logic,
the report, the lock, `pdc check`, the model card) reads it back through `read_record`. Nothing
reads a stage's outputs by string key: a renamed or missing field fails `decode` with a one-line
error ("written by another pdc version: rerun the stage"), never silently as a "-" in a report.

Paths inside a result are relative to the stage directory (`model` = `<stage>/model/`), so a
build directory can be moved or restored from a CI cache.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from pdc.errors import PdcError
from pdc.files import write_json

RECORD_FILE = "stage.json"
RECORD_VERSION = 3
# The evaluation table's model columns, in the order a reader compares them.
MODEL_COLUMNS = ("teacher", "corrected teacher", "pruned", "distilled")


# ---- training stages ----------------------------------------------------------------------
@dataclass(frozen=True)
class TeacherCorrection:
    """The teacher correction a distillation ran in its own loop (`order=concurrent`)."""

    steps: int
    method: str
    trainable_params: int
    model: str = "teacher"


@dataclass(frozen=True)
class TrainResult:
    """Teacher correction or distillation (`kind`). Losses are mean next-token NLL in nats on the
    stage's held-out blocks; KL is the student-teacher forward KL per token."""

    kind: str
    steps: int
    tokens: int
    global_batch: int
    micro_batch: int
    grad_accumulation: int
    world_size: int
    seq_len: int
    precision: str
    zero: int
    trainable_params: int
    resumed_from_step: int
    val_loss_start: Optional[float]
    val_loss_end: Optional[float]
    train_loss_first: Optional[float]
    train_loss_last: Optional[float]
    tokens_per_s: Optional[float]
    wall_s: float
    method: Optional[str] = None  # correction: full | lora | norm
    loss: Optional[str] = None  # distillation: kl_forward | kl_reverse | ce
    teacher_val_loss: Optional[float] = None
    val_kl_start: Optional[float] = None
    val_kl_end: Optional[float] = None
    activation_checkpointing: bool = False
    # distillation: replicated | zero3 (partitioned over the ranks) | cached (read from the
    # teacher_logits stage's cache: the KL is over its top k and a tail bucket) | None (loss=ce)
    teacher_placement: Optional[str] = None
    cache_k: Optional[int] = None  # the teacher cache's k when the teacher was cached
    val_every: int = 0  # validation every N steps as well (log.jsonl's val_loss / val_kl)
    # distillation with a concurrent teacher correction (`order=concurrent`): what trained
    # (steps, method, trainable_params), and the teacher's validation loss before it; the
    # corrected teacher is in `teacher/` beside `model/`
    teacher_correction: Optional[TeacherCorrection] = None
    teacher_val_loss_start: Optional[float] = None
    model: str = "model"
    log: str = "log.jsonl"
    plot: str = "loss.png"


@dataclass(frozen=True)
class TeacherLogitsResult:
    """The teacher pass of a cached distillation: the cache it filled (beside the token shards, shared by
    every build; `pdc.inputs.teacher_cache`), how many of the blocks the distillation reads were
    computed by this run (0: all were cached), the size on disk and the share of the teacher's
    probability inside the top k (mean over those blocks' tokens)."""

    cache_dir: str
    key: str
    k: int
    temperature: float
    seq_len: int
    blocks: int
    blocks_computed: int
    tokens_per_s: Optional[float]
    bytes_per_token: float
    cache_bytes: int
    topk_mass: float
    wall_s: float


# ---- pruning ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    layers: tuple[int, ...]
    value: float


@dataclass(frozen=True)
class SaliencyResult:
    """Depth saliency: every candidate's metric and the choice. `better` says which direction
    is better for the model after removal ("lower" loss / influence, "higher" accuracy)."""

    kind: str
    metric: str
    better: str
    contiguous: bool
    task: Optional[str]
    shots: Optional[int]
    baseline: Optional[float]  # the full model's metric (None for cosine)
    chosen: Optional[float]  # the metric with every dropped layer removed together
    candidates: tuple[Candidate, ...]
    dropped_layers: tuple[int, ...]
    items: Optional[int] = None  # task saliency: the items each candidate was scored on
    table: str = "saliency.json"
    plot: str = "saliency.png"


@dataclass(frozen=True)
class ArtifactResult:
    """One emitted file (`program.pt2`, `model.onnx`) and how it was verified."""

    path: str
    bytes: int
    seconds: float
    max_abs_diff: float
    tolerance: float


@dataclass(frozen=True)
class ModelIdentity:
    """A checkpoint directory by content: sha256 of its config (canonical JSON, tool-version keys
    left out) and of each weight file; `sha256` digests both (the key a CI cache stores it by)."""

    sha256: str
    config_sha256: Optional[str]
    weights_sha256: dict[str, str]


@dataclass(frozen=True)
class TokensIdentity:
    """Token ids by content: shape and sha256 of the int64 bytes."""

    shape: tuple[int, ...]
    sha256: str


@dataclass(frozen=True)
class PruneInputs:
    """Everything a prune stage reads, by content hash: the model it prunes (the source or the
    corrected teacher), its calibration tokens (None when it reads none, e.g. task saliency), the
    probe its program is checked and fingerprinted on, and the task files task saliency reads."""

    model: ModelIdentity
    calibration: Optional[TokensIdentity]
    probe: TokensIdentity
    tasks: Optional[dict[str, str]] = None  # task saliency: sha256 of each file of the local tasks directory


@dataclass(frozen=True)
class LogitsSummary:
    mean: float
    std: float
    abs_max: float
    rms: float
    last_slice: list[list[float]]  # the first vocab entries at each probe row's last position
    last_logsumexp: list[float]


@dataclass(frozen=True)
class ProgramFingerprint:
    """The rewritten program in two views. Structure: the sealed `ExportedProgram`'s op/shape
    list (its sha256, length, op counts, whether batch and sequence stayed dynamic) and every
    parameter's shape. Numbers: logits on the probe and next-token loss on the probe and on the
    first calibration blocks (`calibration_blocks` of them; loss None without calibration)."""

    graph_sha256: str
    nodes: int
    op_counts: dict[str, int]
    dynamic: bool
    param_shapes: dict[str, list[int]]
    logits: LogitsSummary
    probe_loss: float
    calibration_loss: Optional[float]
    calibration_blocks: int


@dataclass(frozen=True)
class PruneResult:
    """Width or depth pruning (`kind`). `arch_before/after` are sizes by axis; `kept` is the
    kept-indices map (source indices per axis and layer, and the dropped layers); `inputs` and
    `fingerprint` are what the lock pins."""

    kind: str
    params_before: int
    params_after: int
    arch_before: dict[str, int]
    arch_after: dict[str, int]
    kept: dict[str, Any]
    seconds: dict[str, float]
    inputs: PruneInputs
    fingerprint: ProgramFingerprint
    importance: Optional[str] = None  # width: activation | magnitude | random
    calibration_tokens: Optional[int] = None
    saliency: Optional[SaliencyResult] = None  # depth
    artifacts: dict[str, ArtifactResult] = field(default_factory=dict)
    model: str = "model"
    plot: Optional[str] = None  # width: importance.png
    # width with `reconstruct=`: method, damp and the calibration output errors (plain, refit)
    reconstruct: Optional[dict[str, Any]] = None
    search: Optional[dict[str, Any]] = None  # prune search: the space, every score, both rankings (search.json)


# ---- evaluation --------------------------------------------------------------------------------
@dataclass(frozen=True)
class TaskScore:
    """One task on one model: every metric lm-eval reported, its standard errors, and which
    metric is the task's primary one (the report's row)."""

    shots: int
    primary: str
    values: dict[str, float]
    stderr: dict[str, float]
    items: Optional[int] = None
    # The primary metric of each scored item, in the task's order: paired comparisons between
    # models on the same items (McNemar, paired bootstrap) need them.
    per_item: tuple[float, ...] = ()


@dataclass(frozen=True)
class HeldoutScore:
    """Held-out perplexity on one corpus, with each block's mean next-token NLL (paired
    bootstrap intervals between models on the same blocks)."""

    perplexity: float
    block_nll: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelScores:
    path: str
    perplexity: Optional[float]  # on the first data `perplexity(...)` names (the headline)
    tasks: dict[str, TaskScore]
    # Mean next-token NLL of each held-out block (equal lengths), in block order: paired
    # bootstrap intervals of perplexity differences between models.
    block_nll: tuple[float, ...] = ()
    # perplexity on each further data `perplexity(...)` names, by data name (other text domains)
    more_perplexity: dict[str, HeldoutScore] = field(default_factory=dict)


# ---- inference speed ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimate:
    """A median with a distribution-free interval (order statistics of the repeats; see
    `pdc.stages.speed.median_interval` for its coverage)."""

    median: float
    low: float
    high: float


@dataclass(frozen=True)
class Measure:
    """One measure on one model: the seconds of every timed repeat, in round order (round i of
    every model ran back to back), the tokens one repeat reads or writes, and tokens/s."""

    seconds: tuple[float, ...]
    tokens: int
    tokens_per_s: Estimate


@dataclass(frozen=True)
class ModelSpeed:
    """A model's measures by name (`torch prefill@128`, `torch decode@b1`, `onnx prefill@512`, ...),
    its size and memory, and, for a student, its speed-up over the teacher on every measure: the
    median over rounds of teacher seconds / student seconds in the same round."""

    path: str
    params: int
    weights_bytes: int
    kv_bytes_per_token: int  # keys and values of every layer, one sequence, one position
    peak_bytes: int  # weights + the KV cache of the largest decode measured
    flops_per_token: int  # 2 x the parameters a token runs through (embedding lookup excluded)
    measures: dict[str, Measure]
    speedup: dict[str, Estimate] = field(default_factory=dict)
    onnx: Optional[str] = None  # the ONNX file onnxruntime ran


@dataclass(frozen=True)
class SpeedResult:
    """The teacher and its students measured in one session, interleaved round by round."""

    teacher: str  # the label of the teacher in `models`
    models: dict[str, ModelSpeed]
    device: str
    hardware: str
    threads: int
    precision: str
    prompt_lens: tuple[int, ...]
    batches: tuple[int, ...]
    context: int  # the prompt length the decode measures start from
    decode_tokens: int
    warmup: int
    repeats: int
    confidence: float  # coverage of the intervals
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluateResult:
    """Scores per model column (`MODEL_COLUMNS` order where present)."""

    models: dict[str, ModelScores]
    limit: Optional[int]
    perplexity_tokens: Optional[int] = None
    perplexity_data: tuple[str, ...] = ()  # the data names measured, in order (the first is `perplexity`)
    precision: str = "fp32"  # the dtype the models were scored in
    speed: Optional[SpeedResult] = None  # `speed=true`: the teacher against the student, measured


StageResult = Union[TrainResult, TeacherLogitsResult, PruneResult, EvaluateResult]
RESULT_TYPES = {cls.__name__: cls for cls in (TrainResult, TeacherLogitsResult, PruneResult, EvaluateResult)}


@dataclass(frozen=True)
class StageRecord:
    """What `<stage>/stage.json` holds: the content key the stage was built under, its wall
    time, and its typed result."""

    name: str
    kind: str
    key: str
    seconds: float
    result: StageResult


# ---- serialization -----------------------------------------------------------------------------
class ResultError(PdcError):
    pass


def encode(obj: Any) -> Any:
    """JSON data of a result (dataclasses as field dicts, tuples as lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: encode(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [encode(v) for v in obj]
    if isinstance(obj, dict):
        return {str(k): encode(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def decode(cls: Any, data: Any, where: str = "result") -> Any:
    """The value of type `cls` encoded as `data`; `ResultError` when the shapes disagree (a
    missing or unknown field, a wrong type)."""
    origin = typing.get_origin(cls)
    if cls is Any:
        return data
    if origin is typing.Literal:
        if data not in typing.get_args(cls):
            raise ResultError(f"{where}: {data!r} is not one of {', '.join(map(repr, typing.get_args(cls)))}")
        return data
    if origin in (Union, types.UnionType):
        args = typing.get_args(cls)
        if data is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return decode(arg, data, where)
            except ResultError as exc:
                errors.append(str(exc))
        raise ResultError(errors[0] if errors else f"{where}: unexpected null")
    if dataclasses.is_dataclass(cls):
        if not isinstance(data, dict):
            raise ResultError(f"{where}: expected an object for {cls.__name__}")
        hints = typing.get_type_hints(cls)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ResultError(f"{where}: unknown field(s) {', '.join(unknown)} for {cls.__name__}")
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name in data:
                kwargs[f.name] = decode(hints[f.name], data[f.name], f"{where}.{f.name}")
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ResultError(f"{where}: missing field {f.name!r} of {cls.__name__}")
        return cls(**kwargs)
    if origin is tuple:
        if not isinstance(data, list):
            raise ResultError(f"{where}: expected a list")
        (item, *_rest) = typing.get_args(cls)
        return tuple(decode(item, v, f"{where}[{i}]") for i, v in enumerate(data))
    if origin is list:
        if not isinstance(data, list):
            raise ResultError(f"{where}: expected a list")
        (item,) = typing.get_args(cls)
        return [decode(item, v, f"{where}[{i}]") for i, v in enumerate(data)]
    if origin is dict:
        if not isinstance(data, dict):
            raise ResultError(f"{where}: expected an object")
        _, value = typing.get_args(cls)
        return {k: decode(value, v, f"{where}.{k}") for k, v in data.items()}
    if cls is float:
        if isinstance(data, bool) or not isinstance(data, (int, float)):
            raise ResultError(f"{where}: expected a number, got {type(data).__name__}")
        return float(data)
    if cls in (int, str, bool):
        if not isinstance(data, cls) or (cls is int and isinstance(data, bool)):
            raise ResultError(f"{where}: expected {cls.__name__}, got {type(data).__name__}")
        return data
    raise ResultError(f"{where}: cannot decode a value of type {cls!r}")


def write_record(stage_dir: Path, record: StageRecord) -> Path:
    data = {"version": RECORD_VERSION, "name": record.name, "kind": record.kind, "key": record.key,
            "seconds": record.seconds, "result_type": type(record.result).__name__,
            "result": encode(record.result)}
    return write_json(Path(stage_dir) / RECORD_FILE, data)


def read_record(stage_dir: Path) -> Optional[StageRecord]:
    """The record of a finished stage, or None when the stage has not run. A record this pdc
    cannot read (another version, a damaged file) is a `ResultError` naming the stage."""
    path = Path(stage_dir) / RECORD_FILE
    if not path.exists():
        return None
    name = Path(stage_dir).name
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ResultError(f"{path} is not readable JSON ({exc}); rerun the stage", name) from None
    if not isinstance(data, dict) or data.get("version") != RECORD_VERSION:
        raise ResultError(f"{path} was written by another pdc version: rerun the stage", name)
    cls = RESULT_TYPES.get(data.get("result_type"))
    if cls is None:
        raise ResultError(f"{path}: unknown result type {data.get('result_type')!r}; rerun the stage", name)
    try:
        result = decode(cls, data.get("result"), f"{name} result")
        return StageRecord(name=str(data["name"]), kind=str(data["kind"]), key=str(data["key"]),
                           seconds=float(data["seconds"]), result=result)
    except (ResultError, KeyError, TypeError, ValueError) as exc:
        raise ResultError(f"{path} does not match this pdc ({exc}); rerun the stage", name) from None
