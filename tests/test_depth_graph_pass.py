"""passes/drop_layers.py: the rewritten graph computes the source model without the dropped
layers (compared with a hand-built shorter model), its state dict is a valid checkpoint of the
shorter model, and the bookkeeping follows."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_model
from depth_reference import hand_built
from pdc.errors import PdcError
from pdc.graph.export import export_dir, export_model
from pdc.graph.manager import PassManager
from pdc.graph.structure import structure_of
from pdc.passes.drop_layers import DropLayers
from pdc.plan.counts import count_arch

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
    with torch.no_grad():
        return hand_built(model, drop)(input_ids=IDS).logits


@pytest.mark.parametrize("family, drop", [("llama", [1, 2]), ("qwen2", [0, 3]), ("mistral", [1]), ("llama", [3])])
def test_graph_without_layers_equals_hand_built_model(exported, family, drop):
    """After the pass (through the PassManager, as the depth stage runs it), the program's logits
    equal the hand-built shorter model's; the state dict holds layers 0..n-1 only and loads
    strictly into that model; the parameter count is the architecture's."""
    model, program = exported(family)
    (result,) = PassManager([DropLayers(drop)]).run(program)
    assert result.changed == {"layers": [4, 4 - len(drop)], "dropped_layers": drop}
    torch.testing.assert_close(program.forward(IDS), _reference(model, drop), rtol=1e-5, atol=1e-5)
    kept = [i for i in range(4) if i not in drop]
    assert program.kept["dropped_layers"] == drop
    assert sorted(map(int, program.kept["layers"])) == kept
    assert program.arch.layers == len(kept) == program.hf_config["num_hidden_layers"]
    assert program.num_params() == count_arch(program.hf_config, program.arch).total
    state = program.state_dict()
    reference = hand_built(model, drop).state_dict()
    if program.arch.tied:  # the graph reads the shared tensor under one name; HF stores both
        state.setdefault("model.embed_tokens.weight", state.get("lm_head.weight"))
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    assert set(state) == set(reference)
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_dropping_the_first_layer_hands_on_the_scaled_embedding():
    """Gemma scales the embedding by sqrt(hidden) before layer 0: without layer 0 the next layer
    reads the scaled embedding, as the shorter checkpoint computes it (it used to read the
    unscaled one, 0.1 off in the logits)."""
    model = make_tiny_model("custom", model_type="gemma2", vocab_size=128, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    program = export_model(model)
    PassManager([DropLayers([0, 1])]).run(program)
    torch.testing.assert_close(program.forward(IDS), _reference(model, [0, 1]), rtol=1e-5, atol=1e-5)


def test_passes_compose_in_source_indices(exported):
    """Dropping current layer 1 twice drops source layers 1 and 2; kept keys stay source keys."""
    model, program = exported("llama")
    PassManager([DropLayers([1]), DropLayers([1])]).run(program)
    assert structure_of(program).layers[-1].index == 1
    assert program.kept["dropped_layers"] == [1, 2]
    assert sorted(map(int, program.kept["layers"])) == [0, 3]
    torch.testing.assert_close(program.forward(IDS), _reference(model, [1, 2]), rtol=1e-5, atol=1e-5)


def test_per_layer_config_lists_follow(tmp_path):
    """`layer_types` (qwen2 lists one entry per layer) keeps the surviving layers' entries."""
    model = make_tiny_model("qwen2", num_hidden_layers=4, layer_types=["full_attention", "sliding_attention"] * 2,
                            use_sliding_window=True, sliding_window=4, max_window_layers=2)
    program = export_model(model)
    PassManager([DropLayers([0, 3])]).run(program)
    assert program.hf_config["layer_types"] == ["sliding_attention", "full_attention"]
    torch.testing.assert_close(program.forward(IDS), _reference(model, [0, 3]), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("drop, message", [([4], "do not exist"), ([0, 1, 2, 3], "cannot drop all")])
def test_bad_drop_is_pdc_error(exported, drop, message):
    _, program = exported("llama")
    with pytest.raises(PdcError, match=message):
        PassManager([DropLayers(drop)]).run(program)


def test_meta_weights_keep_their_source_names(tmp_path):
    """A source exported without weights drops layers before any is read: the renumbered layers
    read their source tensors (`Program.source_name`), so the result equals dropping on real ones."""
    from pdc.graph.export import materialize
    from pdc.graph.rewrite import materialize_sliced

    make_tiny_model("llama").save_pretrained(tmp_path / "src")
    on_meta, real = export_dir(tmp_path / "src"), export_dir(tmp_path / "src")
    materialize(real)
    for program in (on_meta, real):
        PassManager([DropLayers([1])]).run(program)
    assert on_meta.source_name("model.layers.1.mlp.up_proj.weight") == "model.layers.2.mlp.up_proj.weight"
    materialize_sliced(on_meta)
    assert torch.equal(on_meta.forward(IDS), real.forward(IDS))


def test_empty_drop_changes_nothing(exported):
    model, program = exported("llama")
    before = program.forward(IDS)
    (result,) = PassManager([DropLayers([])]).run(program)
    assert result.changed == {"layers": [4, 4], "dropped_layers": []} and program.kept["dropped_layers"] == []
    assert torch.equal(program.forward(IDS), before)
