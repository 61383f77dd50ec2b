"""Slice the neurons of each mixture's shared expert (the dense MLP every token runs beside the
routed experts, Qwen2-MoE style).

Before: a layer's mixture of experts (discovered from the graph) has a `shared` MLP group of
`size` neurons (gate and up rows, down columns), like a dense layer's MLP.
After: layer i's shared expert keeps exactly `keep[i]` (ascending ids into its current neurons)
in every span and in its down projection; its gate [1, hidden] reads the hidden channels only
and stays. `program.arch.shared_mlp` and `program.kept["layers"][*]["shared_mlp"]` follow.
Keeping every neuron is the identity.
"""

from __future__ import annotations

import torch

from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.graph.rewrite import source_layer
from pdc.graph.structure import structure_of
from pdc.passes.slice_mlp import slice_mlp_group


class SliceSharedMlp:
    name = "slice_shared_mlp"
    keeps_topology = True  # slices parameters only

    def __init__(self, keep: dict[int, torch.Tensor]):
        self.keep = keep  # current layer index -> kept neuron indices of its shared expert

    def __call__(self, program: Program) -> PassResult:
        changed, sizes = {}, set()
        for layer in structure_of(program).layers:
            if layer.index not in self.keep:
                continue
            if layer.moe is None or layer.moe.shared is None:
                raise PdcError(f"slice_shared_mlp: layer {layer.index} has no shared expert", STAGE)
            shared = layer.moe.shared
            keep = torch.as_tensor(self.keep[layer.index], dtype=torch.long).sort().values
            before = shared.size
            slice_mlp_group(program, shared, keep)
            key = source_layer(program, layer.index)
            entry = program.kept["layers"][key]
            entry["shared_mlp"] = [entry["shared_mlp"][i] for i in keep.tolist()]
            changed[key] = {"shared_mlp": [before, len(keep)]}
            sizes.add(len(keep))
        if len(sizes) == 1:
            program.arch = program.arch.with_sizes(shared_mlp=sizes.pop())
        return PassResult(self.name, {"layers": changed})
