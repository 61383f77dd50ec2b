"""Slice attention heads, aware of grouped-query attention and fused projections.

Before: each layer's attention group has `heads` query heads laid out group-major over `kv_heads`
key/value groups (query head h reads kv group h // (heads // kv_heads)); the rows of each head
in its projection weight are a span (`Span`: separate q/k/v weights, or one fused weight with
q|k|v stacked or interleaved per head), o's input columns are head_dim blocks per query head,
and the graph's shape constants for kv count, repeat count and head count (and the slice/split
bounds of a fused projection) are recorded in the group.
After: layer i keeps the kv groups `keep_kv[i]` and, inside each kept group, the same number of
query heads (`keep_heads[i]`, source-relative ids of the current heads, all inside kept groups):
the rows of kept heads in every span (with biases and norms over the projection's rows), o
columns of kept heads, and every recorded constant recomputed from the new counts. Norms over
head_dim are shared by all heads and stay as they are. Keeping everything is the identity.
"""

from __future__ import annotations

import torch

from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.graph.rewrite import Rule, apply_rules, slice_spans, source_layer
from pdc.graph.structure import structure_of

# The q, k and v rows follow their spans (`slice_spans`); the one plain rule left:
OUTPUT_RULES = [
    Rule("output projection columns read the query heads", lambda a: [a.o], dim=1, unit="head"),
]


def check_even(keep_heads: torch.Tensor, keep_kv: torch.Tensor, heads: int, kv_heads: int) -> int:
    """Heads must sit only in kept groups, the same number in each. Returns heads per group."""
    rep = heads // kv_heads
    groups = keep_heads // rep
    counts = torch.bincount(groups, minlength=kv_heads)
    kept_groups = set(keep_kv.tolist())
    if set(groups.tolist()) - kept_groups:
        raise PdcError("slice_heads: a kept query head reads a dropped kv group", STAGE)
    per = {int(counts[g]) for g in kept_groups}
    if len(per) != 1 or 0 in per:
        raise PdcError(f"slice_heads: kept query heads are uneven across kv groups ({sorted(per)})", STAGE)
    return per.pop()


class SliceHeads:
    name = "slice_heads"
    keeps_topology = True  # slices parameters and shape constants only: no node changes

    def __init__(self, keep_heads: dict[int, torch.Tensor], keep_kv: dict[int, torch.Tensor]):
        self.keep_heads = keep_heads
        self.keep_kv = keep_kv

    def __call__(self, program: Program) -> PassResult:
        changed, counts = {}, set()
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for layer in structure_of(program).layers:
            if layer.index not in self.keep_heads:
                continue
            attn = layer.attn
            keep_h = torch.as_tensor(self.keep_heads[layer.index], dtype=torch.long).sort().values
            keep_kv = torch.as_tensor(self.keep_kv.get(layer.index, range(attn.kv_heads)), dtype=torch.long).sort().values
            per_group = check_even(keep_h, keep_kv, attn.heads, attn.kv_heads)
            slice_spans(program, [(attn.q, keep_h), (attn.k, keep_kv), (attn.v, keep_kv)], attn.row_norms)
            apply_rules(program, OUTPUT_RULES, attn, keep_h, attn.head_dim)
            sizes = {"head": len(keep_h), "kv": len(keep_kv), "rep": per_group, "hd": attn.head_dim}
            for const in attn.shape_consts:  # the graph's view/expand/reshape sizes follow the counts
                node = nodes[const.node]
                size_list = list(node.args[1])
                value = 1
                for role in const.roles:
                    value *= sizes[role]
                size_list[const.index] = value
                node.args = (node.args[0], size_list, *node.args[2:])
            key = source_layer(program, layer.index)
            entry = program.kept["layers"][key]
            entry["heads"] = [entry["heads"][i] for i in keep_h.tolist()]
            entry["kv_heads"] = [entry["kv_heads"][i] for i in keep_kv.tolist()]
            changed[key] = {"heads": [attn.heads, len(keep_h)], "kv_heads": [attn.kv_heads, len(keep_kv)],
                            "shape_consts": len(attn.shape_consts)}
            counts.add((len(keep_h), len(keep_kv)))
        if len(counts) == 1:
            heads, kv = counts.pop()
            program.arch = program.arch.with_sizes(heads=heads, kv_heads=kv)
        return PassResult(self.name, {"layers": changed})
