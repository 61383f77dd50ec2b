"""The model card: a `README.md` in every emitted checkpoint directory, in the Hugging Face format
(a YAML metadata block, then markdown), so a student pushed to the Hub says what it is.

A card is a document derived from the typed stage records, like the report: the runner renders
it (`render_card`) for each stage's `model/` after every stage and refreshes it when later stages
add to it (the evaluation table). It holds:

- lineage: the spec (its sha256 and text), the source model (as declared, with the sha256 of its
  config and weight files), every stage from the source to this model;
- pruning: the kept dimensions or the dropped layers, the importance method or depth saliency and
  the calibration tokens, the hash of the model that was pruned and of the kept indices;
- training: tokens, steps and losses of teacher correction and distillation;
- evaluation: the build's comparison table with this model's column marked, when one exists.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import yaml

from pdc.files import write_text
from pdc.plan.results import ModelIdentity, PruneResult, StageRecord, TeacherLogitsResult, TrainResult

CARD_FILE = "README.md"
AXES = (("hidden", "hidden channels"), ("mlp", "MLP neurons per layer"), ("heads", "query heads per layer"),
        ("kv_heads", "kv heads per layer"), ("layers", "decoder layers"))
ROLES = {"correct": "corrected teacher", "prune": "pruned student", "distill": "distilled student"}


@dataclass(frozen=True)
class CardSource:
    """The source model as the spec declares it: `name = kind("ref")`, and its content hashes."""

    name: str
    kind: str
    ref: str
    identity: ModelIdentity

    def declared(self) -> str:
        # A local path says nothing on the Hub (and may say too much): its last part is enough.
        ref = Path(self.ref).name if self.kind in ("dir", "gguf") else self.ref
        return f'{self.name} = {self.kind}("{ref}")'


@dataclass(frozen=True)
class CardEvaluation:
    """The build's comparison table: model columns and rows of cells (first cell the metric)."""

    columns: Sequence[str]
    rows: Sequence[Sequence[str]]
    column: Optional[str]  # this model's column, if it was evaluated
    limit: Optional[int]


def render_card(stage: str, spec_name: str, spec_text: str, source: CardSource,
                lineage: Sequence[StageRecord], evaluation: Optional[CardEvaluation] = None) -> str:
    """README.md text for the model stage `stage` wrote; `lineage` lists the records of every
    stage from the source to `stage` (inclusive), in execution order."""
    kinds = [r.kind for r in lineage]
    this = lineage[-1]
    meta = {"library_name": "transformers", "pipeline_tag": "text-generation",
            "tags": ["pdc", "minitron"] + [t for k, t in (("prune", "pruned"), ("distill", "distilled"))
                                          if k in kinds]}
    if source.kind == "hf":
        meta["base_model"] = source.ref
    out = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", ""]
    role = ROLES.get(this.kind, this.kind)
    out += [f"# {Path(spec_name).stem}: {role} (`{stage}/model`)", ""]
    out += [f"The {role} that pdc built from the spec `{Path(spec_name).name}` "
            f"(sha256 `{_sha(spec_text)}`), starting from `{source.declared()}`: "
            + " -> ".join(["source"] + [r.name if r.name == r.kind else f"{r.name} ({r.kind})" for r in lineage])
            + ".", ""]
    out += _lineage(source, lineage)
    for record in lineage:
        if isinstance(record.result, PruneResult):
            out += _pruning(record.name, record.result)
    trained = [r for r in lineage if isinstance(r.result, TrainResult)]
    if trained:
        out += _training(trained)
    if evaluation is not None:
        out += _evaluation(evaluation)
    out += ["## Use", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
            'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
            'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")', "```", ""]
    out += ["## Spec", "", "```", spec_text.rstrip(), "```", ""]
    return "\n".join(out)


def write_card(model_dir: Path, text: str) -> Path:
    return write_text(Path(model_dir) / CARD_FILE, text)


# ---- sections ----------------------------------------------------------------------------
def _lineage(source: CardSource, lineage: Sequence[StageRecord]) -> list[str]:
    ident = source.identity
    rows = [["source", f"`{source.declared()}`; config sha256 "
             f"`{ident.config_sha256 or '-'}`; " + "; ".join(f"`{f}` sha256 `{h}`" for f, h in ident.weights_sha256.items())]]
    for record in lineage:
        rows.append([record.name if record.name == record.kind else f"{record.name} ({record.kind})",
                     _summary(record)])
    return ["## Lineage", "", *_table(["step", "what it did"], rows), ""]


def _summary(record: StageRecord) -> str:
    r = record.result
    if isinstance(r, PruneResult):
        if r.kind == "depth" and r.saliency is not None:
            what = f"dropped layers {list(r.saliency.dropped_layers)} by {r.saliency.kind} saliency"
        else:
            what = f"width pruning by {r.importance} importance on {_count(r.calibration_tokens)} calibration tokens"
        return f"{what}; {r.params_before:,} -> {r.params_after:,} parameters"
    if isinstance(r, TrainResult):
        what = "teacher correction" if r.kind == "correct" else "distillation"
        detail = r.method if r.kind == "correct" else r.loss
        if r.kind == "distill" and r.teacher_placement == "cached":
            detail = f"{detail}, from the teacher's cached top {r.cache_k} logits + tail"
        return (f"{what}" + (f" ({detail})" if detail else "") + f": {r.steps} steps, {_count(r.tokens)} tokens, "
                f"held-out loss {_num(r.val_loss_start)} -> {_num(r.val_loss_end)}")
    if isinstance(r, TeacherLogitsResult):
        return (f"the teacher's top {r.k} log-probabilities (and the mass outside them) cached on {r.blocks:,} blocks "
                f"of {r.seq_len} tokens, {r.bytes_per_token:.0f} bytes/token")
    return record.kind


def _pruning(name: str, r: PruneResult) -> list[str]:
    out = [f"## Pruning ({name})", ""]
    rows = [[label, f"{r.arch_before[axis]:,}", f"{r.arch_after[axis]:,}"]
            for axis, label in AXES if axis in r.arch_before and axis in r.arch_after]
    rows.append(["parameters", f"{r.params_before:,}", f"{r.params_after:,}"])
    out += _table(["", "before", "after"], rows) + [""]
    if r.kind == "depth" and r.saliency is not None:
        s = r.saliency
        task = f" on `{s.task}` ({s.shots}-shot)" if s.task else ""
        out.append(f"Dropped decoder layers (source numbering): {list(s.dropped_layers)}, chosen by {s.kind} "
                   f"saliency{task} over {len(s.candidates)} candidates "
                   f"({'one contiguous block' if s.contiguous else 'any layers'}); {s.metric} "
                   f"({s.better} is better): full model {_num(s.baseline)}, chosen layers removed {_num(s.chosen)}.")
    else:
        out.append(f"Kept dimensions ranked by {r.importance} importance on {_count(r.calibration_tokens)} "
                   "calibration tokens; hidden channels kept (source indices): "
                   f"{_clip(r.kept.get('hidden', []))}.")
    inputs = r.inputs
    calib = inputs.calibration
    out += ["", f"Pruned model sha256 `{inputs.model.sha256}`; calibration tokens "
            + (f"{list(calib.shape)} sha256 `{calib.sha256}`" if calib else "none")
            + f"; kept indices (source indices per axis and layer) sha256 `{_sha(json.dumps(r.kept, sort_keys=True))}`; "
            f"rewritten graph sha256 `{r.fingerprint.graph_sha256}`.", ""]
    return out


def _training(records: Sequence[StageRecord]) -> list[str]:
    keys = [("steps", "steps"), ("tokens", "tokens"), ("global_batch", "global batch"), ("seq_len", "sequence length"),
            ("precision", "precision"), ("val_loss_start", "held-out loss, start"), ("val_loss_end", "held-out loss, end"),
            ("val_kl_start", "held-out KL to the teacher, start"), ("val_kl_end", "held-out KL to the teacher, end"),
            ("train_loss_last", "last training loss")]
    cols = [(r.name, r.result) for r in records]
    rows = [[label] + [_num(getattr(t, key)) for _, t in cols] for key, label in keys
            if any(getattr(t, key) is not None for _, t in cols)]
    header = ["", *[f"{name} ({t.method or t.loss or t.kind})" for name, t in cols]]
    return ["## Training", "", *_table(header, rows), ""]


def _evaluation(ev: CardEvaluation) -> list[str]:
    header = ["metric"] + [f"**{c}** (this model)" if c == ev.column else c for c in ev.columns]
    limit = f" (first {ev.limit} examples per task)" if ev.limit else ""
    return ["## Evaluation", "", f"The build's comparison{limit}:", "", *_table(header, ev.rows), ""]


# ---- helpers -----------------------------------------------------------------------------
def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    cells = lambda row: "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"
    return [cells(header), "|" + "---|" * len(header), *(cells(r) for r in rows)]


def _sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _num(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return f"{x:,}" if isinstance(x, int) else str(x)


def _count(n: Optional[int]) -> str:
    return "-" if n is None else f"{n:,}"


def _clip(items: Sequence[int], n: int = 16) -> str:
    shown = ", ".join(str(v) for v in items[:n])
    return f"{len(items)} of them: [{shown}{', ...' if len(items) > n else ''}]"
