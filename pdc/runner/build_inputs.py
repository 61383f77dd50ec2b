"""What a build's stages read: source models (materialized once), stage outputs or the models
`pdc check` substitutes for them, tokenizers, token shards by role (`stage_blocks`, one place
that decides what each stage reads), and the check of every existing input before a run writes
anything. Mixed into `pdc.runner.build.Build`."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

from pdc.errors import PdcError
from pdc.files import write_json
from pdc.inputs.assets import local_tasks_dir
from pdc.inputs.corpora import concrete
from pdc.inputs.generated import META as GENERATED_META
from pdc.inputs.data import check_corpus, split_blocks, take, token_blocks
from pdc.inputs.models import materialize_model
from pdc.inputs.shards import Blocks
from pdc.inputs.verify import check_same_vocabulary, load_tokenizer, verify_checkpoint
from pdc.lang.settings import DataSource
from pdc.plan.stage_graph import ModelRef, Node, SourceRef, StageRef


HELDOUT_MORE = "heldout:"  # the role of each further perplexity corpus: "heldout:NAME"
DATA_FILE = "data.json"  # the generated and mixed corpora a build read (`write_data_record`)


class BuildInputs:
    """A build's models, tokenizers and data (part of `Build`)."""

    def source_dir(self, name: str) -> Path:
        if name not in self._sources:
            checked = self.spec.source_config if name == self.spec.source_model else None
            self._sources[name] = materialize_model(self.spec.models[name], self.base, checked)
        return self._sources[name]

    def model_dir(self, ref: ModelRef) -> Path:
        if isinstance(ref, SourceRef):
            return self.source_dir(ref.model)
        if ref.stage in self._overrides:
            return self._overrides[ref.stage]
        return self.out / ref.stage / ref.output

    def use_model(self, ref: ModelRef, model_dir: Path) -> None:
        """Read `model_dir` wherever the graph reads `ref` (`pdc check --prune-input/--build`)."""
        if isinstance(ref, SourceRef):
            self._sources[ref.model] = Path(model_dir)
        else:
            self._overrides[ref.stage] = Path(model_dir)

    def tokenizer(self, model_dir: Path, stage: Optional[str] = None):
        if model_dir not in self._tokenizers:
            self._tokenizers[model_dir] = load_tokenizer(model_dir, stage=stage)
        return self._tokenizers[model_dir]

    def input_model(self, ref: ModelRef, stage: str) -> Path:
        """The model `ref` as `stage` reads it, verified (once per run) before it is trusted."""
        path = self.model_dir(ref)
        if path not in self._verified:
            try:
                self._tokenizers[path] = verify_checkpoint(path, stage).tokenizer
            except PdcError as exc:
                if isinstance(ref, StageRef) and ref.stage not in self._overrides:
                    exc.message += f" [written by stage {ref.stage}: delete {self.out / ref.stage} and run again]"
                exc.stage = exc.stage or stage
                raise
            self._verified.add(path)
        return path

    def check_vocabularies(self, teacher: Path, student: Path, stage: str) -> None:
        check_same_vocabulary(teacher, self.tokenizer(teacher, stage), student, self.tokenizer(student, stage), stage)

    def corpus(self, data_name: str, stage: str) -> DataSource:
        """A data declaration as a corpus on disk (generated or mixed data made once, in the cache)."""
        if data_name not in self._corpora:
            for part, _, _ in self.spec.data[data_name].parts:  # made (and recorded) under their own names
                self.corpus(part, stage)
            self._corpora[data_name] = concrete(self.spec.data[data_name], self.base, stage, self.progress,
                                                data_name)
        return self._corpora[data_name]

    def write_data_record(self) -> None:
        """`data.json`: the generated and mixed corpora this build read, where they are and how they
        were made (the generation's `generated.json`), for the report."""
        made = {}
        for name, corpus in self._corpora.items():
            kind = self.spec.data[name].kind
            if kind in ("generate", "mix"):
                meta = Path(corpus.ref).parent / GENERATED_META
                made[name] = {"kind": kind, "corpus": corpus.ref,
                              "generated": json.loads(meta.read_text()) if meta.exists() else None}
        if made:
            write_json(self.out / DATA_FILE, made)

    def blocks(self, data_name: str, model_dir: Path, seq_len: int, stage: str) -> Blocks:
        """The token shards of a data declaration (tokenized once, memory-mapped)."""
        return token_blocks(self.corpus(data_name, stage), self.tokenizer(model_dir), seq_len, self.base, stage,
                            progress=self.progress, label=f"data '{data_name}'")

    def tasks_dir(self) -> Optional[Path]:
        evaluate = self.graph.of_kind("evaluate")
        ref = evaluate[0].decl.tasks_dir if evaluate else None
        if ref is None:
            return None
        if ref == "builtin":
            return local_tasks_dir()
        path = Path(ref).expanduser()
        return path if path.is_absolute() else self.base / path

    def check_inputs(self, names: list[str]) -> None:
        """Verify every model and corpus that the stages to run will read and that exists now
        (a model written later in this run is verified when it is handed over)."""
        t0 = time.perf_counter()
        to_run = [n for n in names if not self.done(n)]
        models, corpora = set(), set()
        for name in to_run:
            node = self.graph.node(name)
            ready = {role: ref for role, ref in node.inputs.items()
                     if isinstance(ref, SourceRef) or ref.stage not in to_run}
            for ref in ready.values():
                models.add(self.input_model(ref, name))
            for d in node.data:
                check_corpus(self.corpus(d, name), self.base, name)
                corpora.add(d)
            # the token blocks the stage will read: enough text for its samples and sequences
            tokenizer_of = self.model_dir(ready.get("model") or ready.get("teacher") or SourceRef(self.spec.source_model))
            stage_blocks(self, node, tokenizer_of if tokenizer_of.exists() else self.source_dir(self.spec.source_model))
            if node.kind == "distill" and {"teacher", "student"} <= set(ready):
                self.check_vocabularies(self.model_dir(ready["teacher"]), self.model_dir(ready["student"]), name)
        if models or corpora:
            counted = [f"{len(models)} model{'s' * (len(models) != 1)}"] if models else []
            counted += [f"{len(corpora)} corpus" if len(corpora) == 1 else f"{len(corpora)} corpora"] if corpora else []
            print(f"[pdc] inputs checked: {', '.join(counted)} ({time.perf_counter() - t0:.1f}s)")


def stage_blocks(build: BuildInputs, node: Node, model_dir: Path) -> dict[str, Blocks]:
    """The token blocks `node` reads, by role ("train"/"val", "calibration", "saliency",
    "heldout"), tokenized with `model_dir`'s tokenizer. The runner asks for them before a run
    writes anything (too little text is refused with how much there is and how much was asked)
    and the stage reads them: one place decides what each stage reads."""
    st = node.decl
    if node.kind in ("correct", "teacher_logits", "distill"):
        blocks = build.blocks(st.data, model_dir, st.train.seq_len, node.name)
        train, val = split_blocks(blocks, st.train.val_fraction, node.name)
        return {"train": train, "val": val}
    if node.kind == "prune" and st.kind in ("width", "search") and st.importance.method == "activation":
        imp = st.importance
        return {"calibration": take(build.blocks(st.data, model_dir, imp.seq_len, node.name), imp.samples,
                                    imp.seed, "samples", node.name)}
    if node.kind == "prune" and st.kind == "depth" and st.depth.saliency.kind in ("loss", "cosine"):
        sal = st.depth.saliency
        return {"saliency": take(build.blocks(sal.data or st.data, model_dir, sal.seq_len, node.name), sal.samples,
                                 0, "samples", node.name)}
    if node.kind == "evaluate" and st.eval.perplexity_data:
        # "heldout": the first data named; "heldout:NAME" each further one
        first, *more = st.eval.perplexity_data
        out = {"heldout": heldout_blocks(build, st.eval, first)}
        out.update({f"{HELDOUT_MORE}{name}": heldout_blocks(build, st.eval, name) for name in more})
        return out
    return {}


HELDOUT_MORE = "heldout:"


def heldout_blocks(build: BuildInputs, cfg, name: str) -> Blocks:
    blocks = build.blocks(name, build.source_dir(build.spec.source_model), cfg.seq_len, "evaluate")
    for node in build.graph.of_kind("distill"):
        if node.decl.data == name:
            # The same corpus as training: only its held-out tail is fair to measure on.
            blocks = split_blocks(blocks, node.decl.train.val_fraction, "evaluate")[1]
    # `limit` caps the perplexity blocks as it caps task examples (the first N, fixed).
    return blocks[: cfg.limit] if cfg.limit else blocks
