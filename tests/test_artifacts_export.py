"""The prune stage's outputs from one rewritten program: the checkpoint, `program.pt2` and ONNX
each reproduce the program's logits (also on shapes the probe never had), failures leave nothing
behind, the graph fingerprint tracks structure only, and a compile traces each prune stage's
source once and seals its result once."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import make_tiny_model, save_tiny_checkpoint
from pdc.cli import main as pdc_main
from pdc.emit import artifacts
from pdc.emit.fingerprint import graph_fingerprint
from pdc.emit.pruned import emit_pruned
from pdc.errors import PdcError
from pdc.graph import export as export_mod
from pdc.graph.export import export_model, seal
from pdc.graph.manager import PassManager
from pdc.passes.slice_mlp import SliceMlp
from pdc.plan.results import read_record
from tiny_builds import write_corpus

pytestmark = pytest.mark.filterwarnings("ignore")


def _ids(batch: int, seq: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _leftovers(directory) -> list[str]:
    """Hidden temporaries the writers create next to their destination."""
    return [name for name in os.listdir(directory) if name.startswith(".")]


def _pruned_program(family="llama", layers=1, seed=0):
    """A rewritten program: the tiny model with half of every MLP cut by the pass manager."""
    program = export_model(make_tiny_model(family, num_hidden_layers=layers, seed=seed))
    PassManager([SliceMlp({i: torch.arange(0, 96, 2) for i in range(layers)})]).run(program)
    return program


# One family in the default run (each ONNX export costs seconds on 2 cores); all three with
# `pytest -m slow`.
@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.slow),
                                    pytest.param("qwen2", marks=pytest.mark.slow)])
def test_onnx_matches_the_program_on_each_family(family, tmp_path):
    """onnxruntime reproduces the rewritten program's logits to 1e-4, also on a batch size and
    length other than the probe's, so both axes are dynamic; the same file checked against
    another program's weights fails. Llama goes through the external-data layout."""
    program = _pruned_program(family)
    external = family == "llama"
    path = tmp_path / "model.onnx"
    assert artifacts.export_onnx(seal(program), program, path, external_data=external) <= 1e-4
    data = tmp_path / ("model.onnx" + artifacts.ONNX_DATA_SUFFIX)
    assert data.exists() == external
    other = _ids(3, 13, seed=1)
    assert artifacts.check_onnx(path, program, other) <= 1e-4
    assert artifacts.onnx_logits(path, other).shape == (3, 13, 128)
    with pytest.raises(PdcError, match="ONNX logits differ"):
        artifacts.check_onnx(path, _pruned_program(family, seed=7), other)
    assert _leftovers(tmp_path) == []


def test_failed_onnx_verification_leaves_nothing(tmp_path, monkeypatch):
    """Invariant: a file that fails verification never appears at the destination."""

    class Garbage:
        def save(self, destination, external_data=None):
            with open(destination, "wb") as fh:
                fh.write(b"not an onnx model")

    program = _pruned_program()
    ep = seal(program)
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Garbage())
    with pytest.raises(PdcError, match="onnxruntime cannot load"):
        artifacts.export_onnx(ep, program, tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_emit_pruned_writes_every_output_from_the_program(tmp_path):
    """`emit_pruned` writes the checkpoint, kept indices, `program.pt2` and `model.onnx`; each is
    verified at emission (the results record sizes and the measured errors) and reproduces the
    program on a batch size and length the probe did not have; the fingerprint's parameter
    shapes are the checkpoint's; no temporaries remain."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    program = _pruned_program("qwen2", layers=2)
    emitted = emit_pruned(program, tmp_path, None, _ids(4, 16, seed=5))
    assert sorted(os.listdir(tmp_path)) == ["kept_indices.json", "model", "model.onnx", "program.pt2"]
    record = emitted.artifacts
    assert set(record) == {"model", "program.pt2", "model.onnx"}
    assert all(a.max_abs_diff <= a.tolerance for a in record.values())
    assert record["program.pt2"].bytes == (tmp_path / "program.pt2").stat().st_size
    other = _ids(3, 11, seed=3)
    expected = program.forward(other)
    loaded = torch.export.load(str(tmp_path / "program.pt2"))
    torch.testing.assert_close(loaded.module()(other), expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(artifacts.onnx_logits(tmp_path / "model.onnx", other), expected, rtol=0, atol=1e-4)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=other).logits, expected, rtol=0, atol=1e-5)
    stored = load_file(tmp_path / "model" / "model.safetensors")
    shapes = emitted.fingerprint.param_shapes
    assert {k: list(v.shape) for k, v in stored.items()} == {k: shapes[k] for k in stored}
    assert emitted.fingerprint.calibration_blocks == 4 and emitted.fingerprint.dynamic
    assert _leftovers(tmp_path) == []


def test_a_checkpoint_that_disagrees_with_the_program_fails(tmp_path):
    """The checkpoint check is real: weights altered after emission fail it by name."""
    from safetensors.torch import load_file, save_file

    program = _pruned_program()
    emit_pruned(program, tmp_path, None, None, deploy=False)
    weights = tmp_path / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.down_proj.weight"] += 0.5
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(PdcError, match="the checkpoint's logits differ from the rewritten program's"):
        artifacts.verify_checkpoint(program, tmp_path / "model", program.probe)


def test_bad_probe_and_missing_file_are_one_line_errors(tmp_path):
    program = _pruned_program()
    ep = seal(program)
    program.probe = torch.zeros(4)
    with pytest.raises(PdcError, match="probe ids"):
        artifacts.save_exported_program(ep, program, tmp_path / "program.pt2")
    program.probe = torch.zeros(1, 1, dtype=torch.long)
    with pytest.raises(PdcError, match="at least 2 tokens"):
        artifacts.export_onnx(ep, program, tmp_path / "m.onnx")
    with pytest.raises(PdcError, match="not found"):
        artifacts.onnx_logits(tmp_path / "nothing.onnx", torch.zeros(1, 2, dtype=torch.long))
    assert os.listdir(tmp_path) == []


def test_graph_fingerprint_tracks_structure_not_weights_or_probe():
    """The sealed program's fingerprint depends neither on the probe's shape (dynamic dims are
    renamed canonically) nor on the weights; a narrower MLP changes the hash but not the op
    counts."""
    base = graph_fingerprint(seal(export_model(make_tiny_model("llama", num_hidden_layers=1), _ids(2, 8))))
    other = graph_fingerprint(seal(export_model(make_tiny_model("llama", num_hidden_layers=1, seed=5), _ids(3, 5))))
    assert base["dynamic"] and other == base
    narrow = graph_fingerprint(seal(_pruned_program()))
    assert narrow["hash"] != base["hash"]
    assert narrow["op_counts"] == base["op_counts"]  # same ops, other shapes


TWO_PRUNES = """\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width { hidden=48 mlp=64 importance=activation(samples=4, seq_len=16) }
prune depth { depth=3 saliency=cosine(corpus, samples=4, seq_len=16) }
"""


@pytest.mark.slow  # two compiles and two checks of a model (44 s)
def test_compile_traces_each_prune_input_once_and_seals_once(tmp_path, monkeypatch):
    """`pdc compile` with a width and a depth prune stage calls `torch.export.export` four times:
    per stage one trace of the model it prunes and one seal of the rewritten program, from which
    the checkpoint, `program.pt2`, ONNX and both fingerprints all come. `pdc check` recompiles
    with the same two calls per stage (without writing `.pt2`/ONNX)."""
    save_tiny_checkpoint(tmp_path / "tiny", "llama")
    write_corpus(tmp_path / "corpus.jsonl")
    spec = tmp_path / "tiny.pds"
    spec.write_text(TWO_PRUNES)
    calls = []
    real_export = torch.export.export
    monkeypatch.setattr(torch.export, "export", lambda *a, **k: calls.append(1) or real_export(*a, **k))
    before = dict(export_mod.EXPORT_CALLS)
    assert pdc_main(["compile", str(spec)]) == 0
    counted = {k: export_mod.EXPORT_CALLS[k] - before[k] for k in before}
    assert counted == {"trace": 2, "seal": 2} and len(calls) == 4
    build = tmp_path / "build" / "tiny"
    names = [n for n in ("prune", "prune2") if (build / n / "stage.json").exists()]
    assert len(names) == 2
    for name in names:
        result = read_record(build / name).result
        assert set(result.artifacts) == {"model", "program.pt2", "model.onnx"}
    calls.clear()
    before = dict(export_mod.EXPORT_CALLS)
    assert pdc_main(["check", str(spec)]) == 0
    assert {k: export_mod.EXPORT_CALLS[k] - before[k] for k in before} == {"trace": 2, "seal": 2} and len(calls) == 4
