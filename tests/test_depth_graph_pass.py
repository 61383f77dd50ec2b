"""passes/drop_layers.py: the rewritten graph computes the source model without the dropped
layers, its state dict is a valid checkpoint of the shorter model, and bookkeeping follows."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from pdc.stages.prune_depth import layers_removed
from pdc.errors import PdcError
from pdc.graph.export import export_model, materialize
from pdc.graph.manager import PassManager
from pdc.graph.structure import structure_of
from pdc.passes.drop_layers import DropLayers

IDS = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def exported():
    """One export per family (export is the slow part); tests work on clones."""
    cache = {}

    def get(family):
        if family not in cache:
            model = make_tiny_model(family, num_hidden_layers=4)
            cache[family] = (model, export_model(model))
        model, program = cache[family]
        return model, program.clone()

    return get


def _reference(model, drop):
    with torch.no_grad(), layers_removed(model, drop):
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("family, drop", [("llama", [1, 2]), ("qwen2", [0, 3]), ("qwen2", [1]), ("llama", [3])])
def test_graph_without_layers_equals_model_without_layers(exported, family, drop):
    """After the pass, program logits == the HF model with the same layers removed; the state
    dict has layers 0..n-1 only and loads strictly into the shorter HF model. (Called directly:
    the manager's shape refresh is slow and exercised once below.)"""
    from transformers import AutoConfig, AutoModelForCausalLM

    model, program = exported(family)
    result = DropLayers(drop)(program)
    assert result.changed == {"layers": [4, 4 - len(drop)], "dropped_layers": drop}
    with torch.no_grad():
        torch.testing.assert_close(program.forward(IDS), _reference(model, drop), rtol=1e-5, atol=1e-5)
    kept = [i for i in range(4) if i not in drop]
    assert program.kept["dropped_layers"] == drop
    assert sorted(map(int, program.kept["layers"])) == kept
    assert program.arch.layers == len(kept) == program.hf_config["num_hidden_layers"]
    layer_ids = {int(k.split(".")[2]) for k in program.state_dict() if k.startswith("model.layers.")}
    assert layer_ids == set(range(len(kept)))
    assert program.num_params() == program.arch.total_params()
    config = AutoConfig.for_model(**program.arch.to_hf_config(program.hf_config))
    shorter = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    state = program.state_dict()
    if program.arch.tied:  # the graph reads the shared tensor under one name; HF stores the embedding
        state["model.embed_tokens.weight"] = state.pop("lm_head.weight")
    shorter.load_state_dict(state, strict=False)
    assert set(shorter.state_dict()) - set(state) <= {"lm_head.weight"}
    with torch.no_grad():
        torch.testing.assert_close(shorter(input_ids=IDS).logits, program.forward(IDS), rtol=1e-5, atol=1e-5)


def test_passes_compose_in_source_indices(exported):
    """Dropping current layer 1 twice drops source layers 1 and 2; kept keys stay source keys."""
    model, program = exported("llama")
    PassManager([DropLayers([1])]).run(program)  # through the pass manager: lint, shape refresh, probe forward
    structure_of(program)
    DropLayers([1])(program)
    assert program.kept["dropped_layers"] == [1, 2]
    assert sorted(map(int, program.kept["layers"])) == [0, 3]
    with torch.no_grad():
        torch.testing.assert_close(program.forward(IDS), _reference(model, [1, 2]), rtol=1e-5, atol=1e-5)


class _DictStore:
    """Stands in for `WeightStore`: serves source tensors by HF name."""

    def __init__(self, state):
        self.state = state

    def load(self, name, dtype=None):
        return self.state[name].clone() if dtype is None else self.state[name].to(dtype)

    def shape(self, name):
        return list(self.state[name].shape)


def test_meta_weights_follow_the_rename_and_emit_generates(exported, tmp_path):
    """With weights on meta (as `export_dir` leaves them), dropping then materialising reads the
    right source tensors under the renumbered names; the emitted checkpoint generates the same
    greedy tokens with and without the KV cache."""
    from transformers import AutoModelForCausalLM

    from pdc.emit.checkpoint import emit_checkpoint

    model, program = exported("qwen2")
    for name, tensor in program.state_dict().items():
        program.set_param(name, torch.empty_like(tensor, device="meta"))
    program.weights = _DictStore({k: v.detach().clone() for k, v in model.state_dict().items()})
    assert program.on_meta()
    DropLayers([0, 2])(program)
    materialize(program)
    with torch.no_grad():
        torch.testing.assert_close(program.forward(IDS), _reference(model, [0, 2]), rtol=1e-5, atol=1e-5)
    out = emit_checkpoint(program, tmp_path / "model")
    pruned = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert pruned.config.num_hidden_layers == 2
    prompt = IDS[:1, :4]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        assert torch.equal(pruned.generate(prompt, use_cache=True, **kwargs),
                           pruned.generate(prompt, use_cache=False, **kwargs))


@pytest.mark.parametrize("drop, message", [([4], "do not exist"), ([0, 1, 2, 3], "cannot drop all")])
def test_bad_drop_is_pdc_error(exported, drop, message):
    _, program = exported("llama")
    with pytest.raises(PdcError, match=message):
        DropLayers(drop)(program)


def test_empty_drop_changes_nothing(exported):
    model, program = exported("llama")
    assert DropLayers([])(program).changed == {"layers": [4, 4], "dropped_layers": []}
    with torch.no_grad():
        torch.testing.assert_close(program.forward(IDS), model(input_ids=IDS).logits)
