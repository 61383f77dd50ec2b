"""Run-time inputs are verified before they are trusted: every checkpoint and corpus fault is one
line naming the file, before any work. Faults are made by damaging what a producer wrote
(tests/bad_inputs.py). The full matrix through `pdc compile`/`pdc run` is the slow harness in
tests/test_bad_inputs_soak.py; a checkpoint fault and a corpus fault run here by default."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bad_inputs import CHECKPOINT_FAULTS, DATA_FAULTS, swap_tokenizer, tree_digest
from conftest import make_tiny_tokenizer, save_tiny_checkpoint
from pdc.cli import main as pdc_main
from pdc.errors import PdcError, one_line
from pdc.graph.weights import WeightStore
from pdc.inputs import models as models_mod
from pdc.inputs.data import check_corpus, token_blocks
from pdc.inputs.verify import check_same_vocabulary, verify_checkpoint
from pdc.lang.settings import DataSource
from tiny_builds import PRUNE_SPEC, make_project, write_corpus


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    """Scan records and token caches of these tests stay out of the user's cache."""
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("good") / "tiny", "llama")


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---- the reported bug: half a weights file became a pruned model -----------------------------------
def test_half_length_weights_stop_pdc_compile_before_any_work(tmp_path):
    """`pdc compile` on a checkpoint whose model.safetensors was cut to half its length: exit 1,
    one line naming the file, no traceback, and no build directory at all."""
    spec = make_project(tmp_path, PRUNE_SPEC, "p")
    weights = tmp_path / "tiny" / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PDC_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-m", "pdc.cli", "compile", str(spec)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 1, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("pdc: error:")]
    assert errors == [f"pdc: error: prune: {weights}: truncated: the header describes 559,360 bytes of tensor "
                      f"data, the file holds 277,688 (an interrupted download, copy or save: copy or save it again)"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "build").exists()


def test_weight_store_reads_are_length_checked(good_checkpoint, tmp_path):
    """A file that shrinks after its header was read: the read fails, it never returns zeros."""
    d = _copy(good_checkpoint, tmp_path / "m")
    store = WeightStore(d)
    name = max(store.names(), key=lambda n: store.index[n].offset)  # the last tensor in the file
    full = store.load(name)
    assert full.abs().sum() > 0
    os.truncate(d / "model.safetensors", store.index[name].offset + 16)
    with pytest.raises(PdcError, match=r"model\.safetensors: truncated: tensor .* needs bytes") as info:
        store.load(name)
    assert info.value.stage == "prune" and "\n" not in info.value.message


# ---- every checkpoint fault ------------------------------------------------------------------------
@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS, ids=lambda f: f.name)
def test_each_checkpoint_fault_is_one_line_naming_the_file(fault, good_checkpoint, tmp_path):
    d = _copy(good_checkpoint, tmp_path / "m")
    fault.damage(d)
    with pytest.raises(PdcError, match=fault.expect) as info:
        verify_checkpoint(d, "prune")
    assert info.value.stage == "prune"
    assert "\n" not in info.value.message and str(d) in info.value.message


def test_a_good_checkpoint_passes_and_is_scanned_once(good_checkpoint, tmp_path):
    """The NaN/Inf scan reads a file once; writing to it (ctime changes) makes it scan again."""
    d = _copy(good_checkpoint, tmp_path / "m")
    first = verify_checkpoint(d, "prune")
    assert first.scanned and first.tensors == 39
    assert not verify_checkpoint(d, "prune").scanned
    weights = d / "model.safetensors"
    st = weights.stat()
    weights.write_bytes(weights.read_bytes())
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size and mtime, like `cp -p`
    assert verify_checkpoint(d, "prune").scanned


def test_nan_in_a_bf16_checkpoint_is_found(tmp_path):
    """bfloat16 weights (no numpy dtype) are scanned by their bit patterns."""
    from transformers import AutoModelForCausalLM

    d = save_tiny_checkpoint(tmp_path / "bf16", "qwen2")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    with torch.no_grad():
        model.model.layers[1].self_attn.o_proj.weight[0, 0] = float("-inf")
        model.model.layers[2].mlp.down_proj.weight[1, 2] = float("nan")
    model.save_pretrained(d)
    with pytest.raises(PdcError, match=r"'model\.layers\.1\.self_attn\.o_proj\.weight' holds 0 NaN and 1 Inf .*"
                                       r"; 1 more tensor\(s\) too"):
        verify_checkpoint(d, "prune")


def test_distillation_needs_one_vocabulary(good_checkpoint, tmp_path):
    """A student whose tokenizer has the same size but other ids: named before training."""
    from transformers import AutoTokenizer

    student = _copy(good_checkpoint, tmp_path / "student")
    swap_tokenizer(student)
    teacher_tok, student_tok = AutoTokenizer.from_pretrained(good_checkpoint), AutoTokenizer.from_pretrained(student)
    assert len(teacher_tok) == len(student_tok)
    with pytest.raises(PdcError, match=r"the student's tokenizer .* differs from the teacher's .* entries differ"):
        check_same_vocabulary(good_checkpoint, teacher_tok, student, student_tok, "distill")
    check_same_vocabulary(good_checkpoint, teacher_tok, good_checkpoint, teacher_tok, "distill")


# ---- every corpus fault ----------------------------------------------------------------------------
@pytest.mark.parametrize("fault", DATA_FAULTS, ids=lambda f: f.name)
def test_each_data_fault_is_one_line_naming_the_file(fault, tmp_path):
    corpus = write_corpus(tmp_path / "corpus.jsonl")
    assert check_corpus(DataSource("jsonl", str(corpus))) == 200
    fault.damage(corpus)
    with pytest.raises(PdcError, match=fault.expect) as info:  # the path every stage reads text through
        token_blocks(DataSource("jsonl", str(corpus)), make_tiny_tokenizer(), 16, stage="prune")
    assert info.value.stage == "prune" and "\n" not in info.value.message
    assert str(corpus) in info.value.message


def test_json_array_and_text_corpora(tmp_path):
    """`json(...)` reads an array of records (a syntax error names line and column); `text(...)`
    one document per line."""
    good = tmp_path / "a.json"
    good.write_text('[{"text": "one"},\n {"text": "two"}]\n')
    assert check_corpus(DataSource("json", str(good))) == 2
    bad = tmp_path / "b.json"
    bad.write_text('[{"text": "one"},\n {"text": "two"]\n')
    with pytest.raises(PdcError, match=r"b\.json:2:\d+: not valid JSON"):
        check_corpus(DataSource("json", str(bad)))
    wrong = tmp_path / "c.json"
    wrong.write_text('[{"text": "one"}, {"text": 7}]')
    with pytest.raises(PdcError, match=r"c\.json: record 2: field 'text' is a number"):
        check_corpus(DataSource("json", str(wrong)))
    lines = tmp_path / "d.txt"
    lines.write_text("first line\n\nsecond line\n")
    assert check_corpus(DataSource("text", str(lines))) == 2


def test_a_dependency_error_keeps_its_cause():
    """An exception with an empty message is described by its cause, never a bare colon."""
    try:
        try:
            raise ValueError("the real reason\nmore detail")
        except ValueError as inner:
            raise RuntimeError("") from inner
    except RuntimeError as exc:
        assert one_line(exc) == "ValueError: the real reason"
    assert one_line(KeyError()) == "KeyError"
    assert one_line(FileNotFoundError(2, "No such file or directory", "/x")) == \
        "FileNotFoundError: No such file or directory: /x"


# ---- through the CLI on a real build: the default-run subset of the harness ------------------------
def _project_copy(width_build: Path, tmp_path: Path) -> Path:
    root = tmp_path / "project"
    shutil.copytree(width_build.parent.parent, root, symlinks=True)
    return root


def _fails_cleanly(capsys, argv: list[str], expect: str, stage: str) -> None:
    capsys.readouterr()
    assert pdc_main(argv) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("pdc: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"pdc: error: {stage}: "), err
    assert __import__("re").search(expect, errors[0]), errors[0]
    assert "Traceback" not in err


def test_truncated_source_leaves_a_previous_build_untouched(width_build, tmp_path, capsys):
    fault = CHECKPOINT_FAULTS[0]
    root = _project_copy(width_build, tmp_path)
    before = tree_digest(root / "build")
    fault.damage(root / "tiny")
    _fails_cleanly(capsys, ["run", str(root / "tiny.pds")], fault.expect, "correct")
    assert tree_digest(root / "build") == before


def test_malformed_corpus_leaves_a_previous_build_untouched(width_build, tmp_path, capsys):
    fault = next(f for f in DATA_FAULTS if f.name == "malformed JSON line")
    root = _project_copy(width_build, tmp_path)
    before = tree_digest(root / "build")
    fault.damage(root / "corpus.jsonl")
    _fails_cleanly(capsys, ["compile", str(root / "tiny.pds")], fault.expect, "correct")
    assert tree_digest(root / "build") == before


def test_malformed_corpus_creates_no_build(tmp_path, capsys):
    spec = make_project(tmp_path, PRUNE_SPEC, "p")
    next(f for f in DATA_FAULTS if f.name == "field is a number").damage(tmp_path / "corpus.jsonl")
    _fails_cleanly(capsys, ["compile", str(spec)], r"corpus\.jsonl:5: field 'text' is a number", "prune")
    assert not (tmp_path / "build").exists()


# ---- cached GGUF conversions are checked by content --------------------------------------------------
def test_cached_gguf_conversion_is_checked_by_content(tmp_path, monkeypatch, capsys):
    """A reused conversion is compared with the hashes recorded when it was made: damage that
    keeps size and mtime, or another GGUF at the same path, size and mtime, converts again."""
    calls = []

    def convert(path, out_dir, verify=True):  # stands in for the dequantizer: the same producer output
        calls.append(path)
        save_tiny_checkpoint(out_dir, "llama")
        return {}

    monkeypatch.setattr(models_mod, "convert_gguf", convert)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(1000))
    first = models_mod.converted_gguf(gguf)
    assert models_mod.converted_gguf(gguf) == first and len(calls) == 1

    weights = first / "model.safetensors"
    st = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    capsys.readouterr()
    assert models_mod.converted_gguf(gguf) == first and len(calls) == 2
    assert "model.safetensors differ from the recorded sha256" in capsys.readouterr().out

    st = gguf.stat()
    gguf.write_bytes(b"GGUF" + bytes(999) + b"\x01")
    os.utime(gguf, ns=(st.st_atime_ns, st.st_mtime_ns))
    models_mod._digest.cache_clear()
    assert models_mod.converted_gguf(gguf) == first and len(calls) == 3
    assert "converted from a GGUF file with other contents" in capsys.readouterr().out
    assert verify_checkpoint(first, "prune").tensors == 39
