"""`generate(...)` and `mix(...)` data: text the teacher samples, cached by content and resumable,
and corpora interleaved by shares, both made by the path `pdc compile` runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import save_tiny_checkpoint
from pdc.inputs import generated
from pdc.inputs.mixture import interleave
from pdc.lang import check_text
from pdc.runner.build import Build
from pdc.runner.report import write_report
from tiny_builds import write_corpus

SPEC = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")
data gen = generate(teacher, prompts=corpus, tokens=150, length=16, prompt_tokens=8, batch=4, temperature=TEMP)
data mixed = mix(corpus=0.5, gen=0.5)
prune width { hidden=48 mlp=64 importance=activation(samples=4, seq_len=32) data=mixed }
distill from teacher on mixed { steps=2 global_batch=4 micro_batch=2 seq_len=32 }
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))
    save_tiny_checkpoint(tmp_path / "tiny")
    write_corpus(tmp_path / "corpus.jsonl")
    return tmp_path


def _spec(root: Path, temperature: str = "1") -> Path:
    path = root / "gen.pds"
    path.write_text(SPEC.replace("TEMP", temperature))
    return path


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_run_generates_and_mixes_before_its_stages(project):
    spec = check_text(_spec(project).read_text(), project / "gen.pds")
    build = Build(spec, project / "build", progress=False)
    build.check_inputs(["prune", "distill"])  # what `pdc compile`/`pdc run` do before any stage
    (corpus,) = (project / "cache" / "generated").glob("*/corpus.jsonl")
    docs = _records(corpus)
    prompts = [r["text"][:8] for r in _records(project / "corpus.jsonl")]
    # samples cycle through the first ceil(150/16) = 10 prompts, each cut to 8 (character) tokens
    assert [d["text"][:8] for d in docs] == [prompts[i % 10] for i in range(len(docs))]
    new = sum(d["new_tokens"] for d in docs)
    assert new >= 150 and new - sum(d["new_tokens"] for d in docs[-4:]) < 150  # parts until the budget
    meta = json.loads((corpus.parent / generated.META).read_text())
    assert meta["new_tokens"] == new and meta["parts"] == len(docs) // 4
    (mixed,) = (project / "cache" / "mixed").glob("*/corpus.jsonl")
    texts = [r["text"] for r in _records(mixed)]
    gen_texts = [d["text"] for d in docs]
    assert [t for t in texts if t in gen_texts] == gen_texts  # all of the smaller corpus, in order
    # and what the stages read is the mixture's token blocks
    blocks = build.blocks("mixed", project / "tiny", 32, "prune")
    assert str(mixed) in str(blocks.array.meta["source"])
    # the run records the corpora it made, and the report lists them
    build.write_plan()
    build.write_data_record()
    made = json.loads((project / "build" / "data.json").read_text())
    assert made["gen"]["corpus"] == str(corpus) and made["gen"]["generated"]["new_tokens"] == new
    assert made["mixed"] == {"kind": "mix", "corpus": str(mixed), "generated": None}
    md = write_report(project / "build")[0].read_text()
    assert "Data made for this build" in md and f"{new:,} new tokens" in md


def test_generation_resumes_at_the_missing_part_with_the_same_bits(project, monkeypatch):
    spec = check_text(_spec(project).read_text(), project / "gen.pds")
    cfg, model = spec.data["gen"].generate, project / "tiny"
    prompts = [r["text"] for r in _records(project / "corpus.jsonl")]
    first = generated.generated_corpus(cfg, model, prompts)
    whole = first.read_bytes()
    parts = sorted(first.parent.glob("part-*.jsonl"))
    assert len(parts) >= 2
    first.unlink()
    parts[-1].unlink()  # as if killed while writing the last part (it is renamed only when whole)
    calls = []
    real = generated.sample_part
    monkeypatch.setattr(generated, "sample_part", lambda *a: calls.append(a[4]) or real(*a))
    again = generated.generated_corpus(cfg, model, prompts)
    assert again == first and again.read_bytes() == whole
    assert calls == [len(parts) - 1]
    assert generated.generated_corpus(cfg, model, prompts) == first and len(calls) == 1  # cached: nothing runs


def test_the_stage_keys_follow_generation_settings_without_generating(project):
    keys = []
    for temperature in ("1", "0.5"):
        spec = check_text(_spec(project, temperature).read_text(), project / "gen.pds")
        build = Build(spec, project / "build" / temperature, progress=False)
        keys.append(build.stage_key("distill"))
    assert keys[0] != keys[1]
    assert not (project / "cache" / "generated").exists()


def test_interleave_keeps_the_shares_in_order_and_stops_at_the_first_exhausted():
    a = [f"a{i:03d}" + "x" * 6 for i in range(100)]  # 10 characters each
    b = [f"b{i:03d}" + "y" * 26 for i in range(100)]  # 30 characters each
    out = interleave([a, b], [0.25, 0.75])
    assert out == interleave([a, b], [0.25, 0.75])
    assert [d for d in out if d[0] == "a"] == a[: len([d for d in out if d[0] == "a"])]
    assert [d for d in out if d[0] == "b"] == b[: len([d for d in out if d[0] == "b"])]
    chars_a = sum(len(d) for d in out if d[0] == "a")
    chars_b = sum(len(d) for d in out if d[0] == "b")
    assert abs(chars_b - 3 * chars_a) <= 30 + 3 * 10  # within one document of each
    assert chars_b == 3000  # b runs out first: 3000 characters need 1000 of a


def test_data_only_a_variant_distills_on_is_not_reported_unused(project):
    text = SPEC.replace("TEMP", "1").replace("on mixed", "on corpus") + """
compare data {
  variant corpus {}
  variant mixed { distill from teacher on mixed { steps=2 global_batch=4 micro_batch=2 seq_len=32 } }
}
"""
    warned = check_text(text, project / "gen.pds").warnings
    assert not [w for w in warned if "never used" in w.message]
    alone = check_text(SPEC.replace("TEMP", "1").replace("on mixed", "on corpus").replace("data=mixed", ""),
                       project / "gen.pds").warnings
    # and what an unused mixture reads is unused with it
    assert {w.message for w in alone if "never used" in w.message} == {
        "data 'mixed' is declared but never used", "data 'gen' is declared but never used"}
