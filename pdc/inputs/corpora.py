"""A data declaration as a corpus the shard pipeline reads: files and builtin data are what they
are; `generate(...)` and `mix(...)` are made into JSONL files in the cache first
(`pdc.inputs.generated`, `pdc.inputs.mixture`), from the corpora they read (made first, in turn)."""

from __future__ import annotations

from pathlib import Path

from pdc.inputs.data import load_text_dataset
from pdc.inputs.generated import generated_corpus
from pdc.inputs.mixture import mixed_corpus
from pdc.inputs.models import materialize_model
from pdc.lang.settings import DataSource


def _texts(source: DataSource, base_dir: Path | None, stage: str | None):
    ds = load_text_dataset(source, base_dir, stage)
    return ds, ds[ds.column_names[0]]


def concrete(source: DataSource, base_dir: Path | None, stage: str | None = None, progress: bool = False,
             label: str = "") -> DataSource:
    """`source` as a file or builtin corpus (generated or mixed into the cache if need be)."""
    if source.kind == "generate":
        g = source.generate
        _, prompts = _texts(concrete(g.prompts, base_dir, stage, progress), base_dir, stage)
        path = generated_corpus(g, materialize_model(g.model, base_dir), prompts, stage, progress,
                                label=f"generating {label or 'data'}")
        return DataSource("jsonl", str(path))
    if source.kind == "mix":
        loaded = [(name, *_texts(concrete(src, base_dir, stage, progress, name), base_dir, stage), share)
                  for name, src, share in source.parts]
        path = mixed_corpus([(name, texts, share) for name, _, texts, share in loaded],
                            [ds._fingerprint for _, ds, _, _ in loaded])
        return DataSource("jsonl", str(path))
    return source
