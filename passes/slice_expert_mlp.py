"""Slice expert neurons: each kept expert keeps its own best neurons.

Before: a layer's mixture has `size` neurons per expert: rows of the stacked gate|up weight
[E, 2I, H] along dim 1 (the spans: gate rows then up rows, the same layout in every expert; the
graph chunks the product in two) and columns of the down weight [E, H, I] along dim 2.
After: expert e of layer i keeps exactly the neurons `keep[i][e]` (a LongTensor [experts, n],
each row ascending ids into its current neurons): the same count for every expert, as the
stacked weights require, but its own indices, in every span and in its down columns. The chunk
into gate and up halves still splits in two equal halves, so no graph constant changes.
Keeping every neuron is the identity.
`program.arch.expert_mlp` and `program.kept["layers"][*]["expert_mlp"]` (per source expert id)
follow.
"""

from __future__ import annotations

import torch

from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.graph.rewrite import slice_param_per_expert, source_layer
from pdc.graph.structure import structure_of


class SliceExpertMlp:
    name = "slice_expert_mlp"
    keeps_topology = True  # slices parameters only

    def __init__(self, keep: dict[int, torch.Tensor]):
        self.keep = keep  # current layer index -> [experts, n] kept neuron ids per expert

    def __call__(self, program: Program) -> PassResult:
        changed, sizes = {}, set()
        for layer in structure_of(program).layers:
            if layer.index not in self.keep:
                continue
            moe = layer.moe
            keep = torch.as_tensor(self.keep[layer.index], dtype=torch.long).sort(dim=1).values
            if moe is None or keep.dim() != 2 or keep.shape[0] != moe.experts:
                raise PdcError(f"slice_expert_mlp: layer {layer.index} needs one row of neuron ids per expert", STAGE)
            # Rows of every span of the stacked gate|up weight, per expert: [experts, spans x n].
            for name in moe.rows:
                rows = torch.cat([span.offset + keep * span.stride for span in moe.spans if span.param == name], dim=1)
                slice_param_per_expert(program, name, 1, rows.sort(dim=1).values)
            slice_param_per_expert(program, moe.down, 2, keep)  # the down projection reads them as columns
            key = source_layer(program, layer.index)
            entry = program.kept["layers"][key]
            for e, row in zip(entry["experts"], keep.tolist()):
                entry["expert_mlp"][str(e)] = [entry["expert_mlp"][str(e)][i] for i in row]
            changed[key] = {"expert_mlp": [moe.size, int(keep.shape[1])]}
            sizes.add(int(keep.shape[1]))
        if len(sizes) == 1:
            program.arch = program.arch.with_sizes(expert_mlp=sizes.pop())
        return PassResult(self.name, {"layers": changed})
