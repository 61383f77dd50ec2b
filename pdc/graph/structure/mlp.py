"""A dense MLP: the input projections whose rows reach the down projection's input (gate and up,
separate or stacked in one weight), one span per way they reach it."""

from __future__ import annotations

from pdc.graph.structure.groups import MlpGroup
from pdc.graph.structure.ops import fail, linear_ancestors
from pdc.graph.structure.spans import paths_from, span_of


def mlp_group(program, down_node, down_wb, readers, nodes) -> MlpGroup:
    down_w, down_b = down_wb
    x = down_node.args[0]
    sources = linear_ancestors(x, set(readers), set())
    if not sources:
        raise fail(down_node, "MLP output projection without an input projection on the hidden channels")
    spans = []
    for src in sorted(sources, key=lambda n: n.name):
        # every way the rows of this projection reach the neurons (gate and up of one fused weight)
        for path in paths_from(x, src, set(readers)):
            w, b = readers[src]
            spans.append(span_of(program, nodes, [n.name for n in path], -1, w, b, 1, "MLP"))
    spans.sort(key=lambda s: (s.param, s.offset))
    size = int(program.param(down_w).shape[1])
    bad = [s for s in spans if s.units != size]
    if bad:
        raise fail(down_node, f"{bad[0].describe()} does not have one row per MLP neuron ({size})")
    return MlpGroup(spans=spans, down=down_w, down_bias=down_b, size=size, down_input=x.name)
