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

GOLDEN = Path(__file__).parent / "golden" / "graph_structure_llama.txt"


def test_golden_structure_tiny_llama():
    """The discovered structure of the tiny llama matches the reviewed snapshot."""
    text = exported("llama").structure().describe()
    if os.environ.get("PDC_UPDATE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_structure_covers_every_parameter(family):
    """Every parameter the graph reads is in the hidden group, one MLP group or one attention
    group; sizes agree with the config."""
    program = exported(family)
    s = program.structure()
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
        program.structure()


def test_resized_structure_equals_rediscovery_after_slicing():
    """Slicing passes keep the graph's topology, so the pass manager keeps the structure and only
    re-reads its sizes; with check="full" it re-propagates shapes and rediscovers after every
    pass and fails if the two differ. The final structure has the sliced sizes."""
    from pdc.graph.manager import PassManager
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
    s = program.structure()
    assert s.hidden.size == 32
    assert all((l.mlp.size, l.attn.heads, l.attn.kv_heads) == (40, 2, 2) for l in s.layers)
    assert program.forward(program.probe).shape == (*program.probe.shape, program.arch.vocab)
