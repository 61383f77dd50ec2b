"""Exported program (`program.pt2`) and ONNX outputs: round trips reproduce the PyTorch logits,
dynamic axes hold, failures leave nothing behind."""

from __future__ import annotations

import os

import pytest
import torch

from conftest import make_tiny_model
from pdc.emit import artifacts
from pdc.errors import PdcError

pytestmark = pytest.mark.filterwarnings("ignore")


def _ids(batch: int, seq: int, seed: int = 0, vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def _leftovers(directory) -> list[str]:
    """Hidden temporaries the writers create next to their destination."""
    return [name for name in os.listdir(directory) if name.startswith(".")]


# One family in the default run (each ONNX export costs tens of seconds on 2 cores); all three
# with `pytest -m slow`.
@pytest.mark.parametrize("family", ["llama", pytest.param("mistral", marks=pytest.mark.slow),
                                    pytest.param("qwen2", marks=pytest.mark.slow)])
def test_onnx_matches_pytorch_on_each_family(family, tmp_path):
    """Invariants: onnxruntime reproduces the model's logits to 1e-4, also on a batch size and
    length other than the (batch-1) probe's, so both axes are dynamic; the same file checked
    against another model's weights fails. Llama goes through the external-data layout."""
    model = make_tiny_model(family, num_hidden_layers=1)
    external = family == "llama"
    path = artifacts.export_onnx(model, _ids(1, 8), tmp_path / "model.onnx", external_data=external)
    assert path == tmp_path / "model.onnx" and path.exists()
    data = tmp_path / ("model.onnx" + artifacts.ONNX_DATA_SUFFIX)
    assert data.exists() == external
    if external:
        embedding = model.get_input_embeddings().weight
        assert data.stat().st_size >= embedding.numel() * embedding.element_size()
    other = _ids(3, 13, seed=1)
    assert artifacts.check_onnx(path, model, other, atol=1e-4) <= 1e-4
    assert artifacts.onnx_logits(path, other).shape == (3, 13, model.config.vocab_size)
    stranger = make_tiny_model(family, num_hidden_layers=1, seed=7)
    with pytest.raises(PdcError, match="ONNX logits differ"):
        artifacts.check_onnx(path, stranger, other)
    assert _leftovers(tmp_path) == []


def test_failed_onnx_verification_leaves_nothing(tmp_path, monkeypatch):
    """Invariant: a file that fails verification never appears at the destination."""

    class Garbage:
        def save(self, destination, external_data=None):
            with open(destination, "wb") as fh:
                fh.write(b"not an onnx model")

    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: Garbage())
    model = make_tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(PdcError, match="onnxruntime cannot load"):
        artifacts.export_onnx(model, _ids(1, 6), tmp_path / "model.onnx")
    assert os.listdir(tmp_path) == []


def test_emit_all_writes_verified_program_and_onnx(tmp_path):
    """The prune stage's artifacts for `prune/model`: `program.pt2` round-trips through
    `torch.export.save/load` and `model.onnx` through onnxruntime, both reproducing the
    checkpoint's logits on a batch size and length the probe did not have; the results record
    sizes and the measured errors; no temporaries remain."""
    model = make_tiny_model("qwen2", num_hidden_layers=1)
    model.save_pretrained(tmp_path / "model")
    record = artifacts.emit_all(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["model", "model.onnx", "program.pt2"]
    assert record["model.onnx"].max_abs_diff <= record["model.onnx"].tolerance
    assert record["program.pt2"].max_abs_diff <= 1e-5
    assert record["program.pt2"].bytes == (tmp_path / "program.pt2").stat().st_size
    other = _ids(3, 11, seed=3)
    with torch.no_grad():
        expected = model(input_ids=other, use_cache=False).logits
    loaded = artifacts.load_exported_program(tmp_path / "program.pt2")
    assert torch.allclose(loaded.module()(other), expected, atol=1e-5, rtol=0)
    assert torch.allclose(artifacts.onnx_logits(tmp_path / "model.onnx", other), expected, atol=1e-4, rtol=0)


def test_bad_probe_and_missing_file_are_one_line_errors(tmp_path):
    model = make_tiny_model("llama", num_hidden_layers=1)
    with pytest.raises(PdcError, match="probe ids"):
        artifacts.save_exported_program(model, torch.zeros(4), tmp_path / "program.pt2")
    with pytest.raises(PdcError, match="at least 2 tokens"):
        artifacts.export_onnx(model, torch.zeros(1, 1, dtype=torch.long), tmp_path / "m.onnx")
    with pytest.raises(PdcError, match="not found"):
        artifacts.load_exported_program(tmp_path / "nothing.pt2")
    with pytest.raises(PdcError, match="not found"):
        artifacts.onnx_logits(tmp_path / "nothing.onnx", torch.zeros(1, 2, dtype=torch.long))
    assert os.listdir(tmp_path) == []


def test_graph_fingerprint_tracks_structure_not_weights_or_probe():
    """Invariants: the fingerprint depends neither on the probe's shape (dynamic dims are renamed
    canonically) nor on the weights; a narrower MLP changes the hash but not the op counts."""
    base = make_tiny_model("llama", num_hidden_layers=1)
    fp_base = artifacts.graph_fingerprint(artifacts.export_program(base, _ids(1, 8)))
    reweighted = make_tiny_model("llama", num_hidden_layers=1, seed=5)
    fp_other = artifacts.graph_fingerprint(artifacts.export_program(reweighted, _ids(3, 5)))
    assert fp_base["dynamic"] and fp_other == fp_base
    narrow = make_tiny_model("llama", num_hidden_layers=1, intermediate_size=48)
    fp_narrow = artifacts.graph_fingerprint(artifacts.export_program(narrow, _ids(1, 8)))
    assert fp_narrow["hash"] != fp_base["hash"]
    assert fp_narrow["op_counts"] == fp_base["op_counts"]  # same ops, other shapes


def test_width_pass_program_is_saved_as_rewritten(tmp_path):
    """The width pass's in-memory `Program` (its re-export) is accepted: the saved program
    reproduces the model's logits on a new batch size and length."""
    from pdc.graph.export import export_model

    model = make_tiny_model("llama", num_hidden_layers=1)
    program = export_model(model)
    path = artifacts.save_exported_program(program, _ids(2, 8), tmp_path / "program.pt2")
    other = _ids(3, 11, seed=4)
    with torch.no_grad():
        expected = model(input_ids=other, use_cache=False).logits
    got = artifacts.load_exported_program(path).module()(other)
    assert torch.allclose(got, expected, atol=1e-5, rtol=0)
