"""Slice hidden (embedding/residual) channels everywhere they are coupled.

Before: the hidden group (discovered from the graph by channel coupling) lists every (parameter,
dim) tied to the residual stream: embedding columns, q/k/v/gate/up input columns, o/down output
rows (and o bias), every norm weight, the output head's columns, tied or not.
After: every member keeps exactly the channels `keep` (ascending, into the current channels), in
the same order, so residual adds stay aligned; every layer norm's normalized_shape and every view's trailing hidden size (tokens flattened
before a mixture of experts) is the new size; `program.arch.hidden` and `program.kept["hidden"]`
follow. Keeping every channel is the identity. (RMSNorm then averages over fewer channels: that
is the intended effect of hidden pruning, not a graph edit.)
"""

from __future__ import annotations

import torch

from pdc.graph.manager import PassResult
from pdc.graph.program import Program
from pdc.graph.rewrite import slice_param
from pdc.graph.structure import structure_of


class SliceHidden:
    name = "slice_hidden"
    keeps_topology = True  # slices parameters and shape constants only: no node changes

    def __init__(self, keep: torch.Tensor):
        self.keep = torch.as_tensor(keep, dtype=torch.long).sort().values

    def __call__(self, program: Program) -> PassResult:
        group = structure_of(program).hidden
        # Rule (data): every coupled (param, dim) keeps the same channels.
        for name, dim in group.members:
            slice_param(program, name, dim, self.keep)
        # Rule (data): a layer norm's normalized_shape is the hidden size.
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for name in group.size_args:
            node = nodes[name]
            node.args = (node.args[0], [len(self.keep)], *node.args[2:])
        # Rule (data): a view that flattens the tokens ([..., hidden]) ends in the hidden size.
        for name in group.view_args:
            node = nodes[name]
            node.args = (node.args[0], [*node.args[1][:-1], len(self.keep)], *node.args[2:])
        program.kept["hidden"] = [program.kept["hidden"][i] for i in self.keep.tolist()]
        program.arch = program.arch.with_sizes(hidden=len(self.keep))
        return PassResult(self.name, {"hidden": [group.size, len(self.keep)], "members": len(group.members)})
