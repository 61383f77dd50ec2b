"""Drop routed experts: keep some experts of each mixture-of-experts layer.

Before: a layer's mixture (discovered from the graph) has `experts` experts; expert e is slice e
along dim 0 of every expert weight (gate|up [E, 2I, H], down [E, H, I]) and row e of the router
[E, H] (and of its bias). The top-k runs over the router's outputs, so the expert ids the graph
gathers with are positions in that output.
After: layer i keeps exactly the experts `keep[i]` (ascending ids into its current experts), at
least the router's top-k of them: the same slices of every expert weight and the same router
rows, in the same order, so the top-k picks among the kept experts and its ids address them
(the graph holds no expert count: nothing else changes). Every token is then routed to its
top-k among the kept experts, with routing weights renormalised over those when the family
renormalises (the softmax runs over the kept router rows): what the emitted checkpoint
computes. Keeping every expert is the identity.
`program.arch.experts` and `program.kept["layers"][*]["experts"]` (source expert ids; their
`expert_mlp` entries follow) are updated.
"""

from __future__ import annotations

import torch

from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.graph.rewrite import Rule, apply_rules, source_layer
from pdc.graph.structure import structure_of

RULES = [
    Rule("the router scores each expert in one row", lambda e: [e.router, e.router_bias], dim=0),
    Rule("each expert's gate|up rows are one slice of the stacked weight", lambda e: e.rows, dim=0),
    Rule("each expert's down projection is one slice of the stacked weight", lambda e: [e.down], dim=0),
]


class SliceExperts:
    name = "slice_experts"
    keeps_topology = True  # slices parameters only: no node or constant changes

    def __init__(self, keep: dict[int, torch.Tensor]):
        self.keep = keep  # current layer index -> kept expert ids

    def __call__(self, program: Program) -> PassResult:
        changed, sizes = {}, set()
        for layer in structure_of(program).layers:
            if layer.index not in self.keep:
                continue
            moe = layer.moe
            if moe is None:
                raise PdcError(f"slice_experts: layer {layer.index} is not a mixture of experts", STAGE)
            keep = torch.as_tensor(self.keep[layer.index], dtype=torch.long).sort().values
            if len(keep) < moe.top_k:
                raise PdcError(f"slice_experts: layer {layer.index} would keep {len(keep)} experts, fewer than "
                               f"the router's top-k ({moe.top_k})", STAGE)
            apply_rules(program, RULES, moe, keep)
            key = source_layer(program, layer.index)
            entry = program.kept["layers"][key]
            entry["experts"] = [entry["experts"][i] for i in keep.tolist()]
            entry["expert_mlp"] = {str(e): entry["expert_mlp"][str(e)] for e in entry["experts"]}
            changed[key] = {"experts": [moe.experts, len(keep)]}
            sizes.add(len(keep))
        if len(sizes) == 1:
            program.arch = program.arch.with_sizes(experts=sizes.pop())
        return PassResult(self.name, {"layers": changed})
