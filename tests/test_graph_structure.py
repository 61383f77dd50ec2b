"""Structure discovery from exported graphs: golden snapshot, coupling, clear errors.

Regenerate the golden file with PDC_UPDATE_GOLDEN=1 pytest tests/test_graph_structure.py.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from graph_exports import exported
from pdc.errors import PdcError
from pdc.graph.structure import structure_of

GOLDEN = Path(__file__).parent / "golden" / "graph_structure_llama.txt"


def test_golden_structure_tiny_llama():
    """The discovered structure of the tiny llama matches the reviewed snapshot."""
    text = structure_of(exported("llama")).describe()
    if os.environ.get("PDC_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_structure_covers_every_parameter(family):
    """Every parameter the graph reads is in the hidden group, one MLP group or one attention
    group; sizes agree with the config."""
    program = exported(family)
    s = structure_of(program)
    a = program.arch
    assert s.hidden.size == a.hidden and len(s.layers) == a.layers
    grouped = {n for n, _ in s.hidden.members}
    for layer in s.layers:
        assert (layer.attn.heads, layer.attn.kv_heads, layer.attn.head_dim) == (a.heads, a.kv_heads, a.head_dim)
        assert layer.mlp.size == a.mlp and len(layer.mlp.rows) == 2
        assert {c.roles for c in layer.attn.shape_consts} >= {("kv",), ("rep",), ("kv", "rep")}
        grouped |= set(layer.params)
    assert set(program.state_dict()) <= grouped
    # The head is coupled to the residual stream whether tied (qwen2) or not.
    assert (s.hidden.head, 1) in s.hidden.members


def test_unknown_op_on_hidden_channels_names_the_node():
    """A graph that reads the hidden channels through an op pdc cannot slice is rejected with a
    PdcError naming that node."""
    program = exported("llama")
    graph = program.gm.graph
    emb = next(n for n in graph.nodes if n.target is torch.ops.aten.embedding.default)
    with graph.inserting_after(emb):
        flip = graph.call_function(torch.ops.aten.flip.default, (emb, [-1]))
    emb.replace_all_uses_with(flip, delete_user_cb=lambda u: u is not flip)
    program.invalidate()
    with pytest.raises(PdcError, match=f"cannot classify node {flip.name}"):
        structure_of(program)


def test_resized_structure_equals_rediscovery_after_slicing():
    """Slicing passes keep the graph's topology, so the pass manager keeps the structure and only
    re-reads its sizes; with check="full" it re-propagates shapes and rediscovers after every
    pass and fails if the two disagree (groups, sizes, shape-constant values). Cutting to one
    query head per kv group makes the repeat constants ambiguous to rediscovery; the kept
    structure still tracks them. A wrong size or constant is reported."""
    import copy

    from pdc.graph.manager import PassManager
    from pdc.graph.program import refresh_shapes
    from pdc.graph.structure import discover
    from pdc.passes.slice_heads import SliceHeads
    from pdc.passes.slice_hidden import SliceHidden
    from pdc.passes.slice_mlp import SliceMlp

    program = exported("llama")  # 4 heads over 2 kv groups
    layers = range(program.arch.layers)
    PassManager([
        SliceHidden(torch.arange(0, 64, 2)),
        SliceMlp({i: torch.arange(10, 50) for i in layers}),
        SliceHeads({i: torch.tensor([0, 2]) for i in layers}, {i: torch.tensor([0, 1]) for i in layers}),
    ], check="full").run(program)
    kept = structure_of(program)
    assert kept.hidden.size == 32
    assert all((l.mlp.size, l.attn.heads, l.attn.kv_heads) == (40, 2, 2) for l in kept.layers)
    assert {c.roles for c in kept.layers[0].attn.shape_consts} >= {("kv",), ("rep",), ("kv", "rep")}
    refresh_shapes(program)
    fresh = discover(program)
    assert kept.mismatch(fresh, program) is None
    wrong_size = copy.deepcopy(kept)
    wrong_size.layers[1].mlp.size = 41
    assert kept.mismatch(fresh, program) is None and wrong_size.mismatch(fresh, program) == "groups or sizes differ"
    wrong_const = copy.deepcopy(kept)
    wrong_const.layers[0].attn.shape_consts[0].roles = ("head", "hd")
    assert "shape constant" in wrong_const.mismatch(fresh, program)


@pytest.mark.parametrize("keeps_topology, message", [
    (False, "forward on the probe fails after pass cut_up_rows_only"),
    (True, "after pass cut_up_rows_only: layer 0: model.layers.0.mlp.up_proj.weight has 8 MLP neurons, not 96"),
])
def test_pass_manager_names_the_pass_that_breaks_shapes(keeps_topology, message):
    """A pass that leaves the graph inconsistent (an MLP's up rows cut but not its gate rows)
    fails its check with a PdcError naming that pass, not a later one: by the probe forward, or,
    for a pass that declares it keeps the topology, by the structure's shape consistency (no
    forward runs between such passes)."""
    from pdc.graph.manager import PassManager, PassResult
    from pdc.graph.rewrite import slice_param
    from pdc.passes.slice_mlp import SliceMlp

    class CutUpRowsOnly:
        name = "cut_up_rows_only"

        def __call__(self, program):
            slice_param(program, structure_of(program).layers[0].mlp.rows[1], 0, torch.arange(8))
            return PassResult(self.name)

    CutUpRowsOnly.keeps_topology = keeps_topology
    program = exported("llama")
    later = SliceMlp({i: torch.arange(48) for i in range(program.arch.layers)})
    with pytest.raises(PdcError, match=message.replace("(", r"\(")):
        PassManager([CutUpRowsOnly(), later]).run(program)
