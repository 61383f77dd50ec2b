"""Slice MLP neurons: keep some intermediate channels of each decoder layer's MLP.

Before: each layer's MLP group (discovered from the graph) has `size` neurons: one row per neuron
in each of its spans (gate and up projections, or the two halves of one fused gate|up weight,
with their biases) and one column of the down projection.
After: layer i keeps exactly `keep[i]` (ascending source-relative indices into the current
neurons); the same neurons are kept in every span and in the down projection (a fused weight
keeps gate then up rows, and its split size follows), so the layer computes the source MLP
restricted to those neurons (keeping all of them is the identity).
`program.arch.mlp` and `program.kept["layers"][*]["mlp"]` follow.
"""

from __future__ import annotations

import torch

from pdc.graph.manager import PassResult
from pdc.graph.program import Program
from pdc.graph.rewrite import Rule, apply_rules, slice_spans, source_layer
from pdc.graph.structure import MlpGroup, structure_of

# The neuron rows follow the group's spans (`slice_spans`); the one plain rule left:
RULES = [
    Rule("down projection reads the neurons through its columns", lambda g: [g.down], dim=1),
]


def slice_mlp_group(program: Program, group: MlpGroup, keep: torch.Tensor) -> None:
    """Keep neurons `keep` of one dense MLP (a layer's, or a mixture's shared expert)."""
    slice_spans(program, [(span, keep) for span in group.spans])
    apply_rules(program, RULES, group, keep)


class SliceMlp:
    name = "slice_mlp"
    keeps_topology = True  # slices parameters and shape constants only: no node changes

    def __init__(self, keep: dict[int, torch.Tensor]):
        self.keep = keep  # current layer index -> kept neuron indices

    def __call__(self, program: Program) -> PassResult:
        changed, sizes = {}, set()
        for layer in structure_of(program).layers:
            if layer.index not in self.keep or layer.mlp is None:  # a mixture of experts has no dense MLP
                continue
            keep = torch.as_tensor(self.keep[layer.index], dtype=torch.long).sort().values
            slice_mlp_group(program, layer.mlp, keep)
            key = source_layer(program, layer.index)
            entry = program.kept["layers"][key]
            entry["mlp"] = [entry["mlp"][i] for i in keep.tolist()]
            changed[key] = {"mlp": [layer.mlp.size, len(keep)]}
            sizes.add(len(keep))
        if len(sizes) == 1:
            program.arch = program.arch.with_sizes(mlp=sizes.pop())
        return PassResult(self.name, {"layers": changed})
