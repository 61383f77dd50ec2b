"""Mixtures of experts: per-expert projections (`squeeze(bmm(index(W, [ids]), unsqueeze(x, -1)))`),
ops that move whole token rows and keep their channels, and the mixture itself: router and top-k,
expert neuron spans along dim 1, routing weights, an optional shared expert and its gate."""

from __future__ import annotations

import operator

import torch
import torch.fx

from pdc.graph.structure.groups import MoeGroup
from pdc.graph.structure.mlp import mlp_group
from pdc.graph.structure.ops import RESHAPES, fail, last_dim, linear_ancestors, shape_of
from pdc.graph.structure.spans import paths_from, span_of

aten = torch.ops.aten


# ---- mixtures of experts -------------------------------------------------------------------
def keeps_last_dim(node: torch.fx.Node) -> bool:
    """Ops that move whole rows and keep each row's channels in place: a view/reshape that
    keeps the last size (tokens flattened), `repeat_interleave` and a reduction over other dims,
    and indexing rows by a tensor of row numbers."""
    t, shape, src = node.target, shape_of(node), shape_of(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    if not shape or not src or last_dim(node) is None or last_dim(node) != last_dim(node.args[0]):
        return False
    if t in RESHAPES:
        return True
    if t is aten.repeat_interleave.self_int:
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        return dim is not None and dim % len(src) != len(src) - 1
    if t is aten.sum.dim_IntList:
        return all(d % len(src) != len(src) - 1 for d in node.args[1]) and len(shape) < len(src)
    if t is aten.index.Tensor:
        index = node.args[1]
        return len(index) == 1 and index[0] is not None and len(src) >= 2
    return False


def expert_linears(gm: torch.fx.GraphModule, prefix: str) -> dict:
    """Per-expert projections: `squeeze(bmm(index(W, [ids]), unsqueeze(x, -1)), -1)` with W a
    parameter [experts, out, in]: each (token, slot) row of x multiplied by its expert's slice.
    {squeeze node: (W's name, x, ids, {index, unsqueeze, bmm nodes})}."""
    out = {}
    for node in gm.graph.nodes:
        if node.target is not aten.squeeze.dim or node.args[1] != -1:
            continue
        bmm = node.args[0]
        if not isinstance(bmm, torch.fx.Node) or bmm.target is not aten.bmm.default:
            continue
        sel, col = bmm.args
        if sel.target is not aten.index.Tensor or col.target is not aten.unsqueeze.default or col.args[1] != -1:
            continue
        w, index = sel.args
        if w.op != "get_attr" or not str(w.target).startswith(prefix) or len(index) != 1 or len(shape_of(w) or ()) != 3:
            continue
        out[node] = (w.target[len(prefix):], col.args[0], index[0], {sel, col, bmm})
    return out


def skip_reshapes(node: torch.fx.Node) -> torch.fx.Node:
    while node.target in RESHAPES or node.target in (aten.to.dtype, aten._to_copy.default):
        node = node.args[0]
    return node


def moe_group(program, down_node, experts: dict, shared_nodes: list, readers: dict, writers: dict, nodes: dict) -> MoeGroup:
    """The mixture of experts whose down projection is the expert projection `down_node`."""
    down_w, x, ids, _ = experts[down_node]
    sources = linear_ancestors(x, set(readers), set())
    if not sources or any(src not in experts for src in sources):
        raise fail(down_node, "the experts' down projection is not fed by per-expert input projections")
    spans = []
    for src in sorted(sources, key=lambda n: n.name):
        if experts[src][2] is not ids:
            raise fail(src, "its experts are chosen by other expert ids than the down projection's")
        for path in paths_from(x, src, set(readers)):
            spans.append(span_of(program, nodes, [n.name for n in path], -1, experts[src][0], None, 1, "expert MLP"))
    spans.sort(key=lambda s: (s.param, s.offset))
    size = int(program.param(down_w).shape[2])
    if any(s.units != size for s in spans):
        raise fail(down_node, f"{spans[0].describe()} does not have one row per expert neuron ({size})")
    pick = skip_reshapes(ids)
    topk = pick.args[0] if pick.target is operator.getitem and pick.args[1] == 1 else None
    if topk is None or topk.target is not aten.topk.default:
        raise fail(down_node, "its expert ids do not come from a top-k over router scores")
    routers = [n for n in linear_ancestors(topk.args[0], set(readers), set()) if n not in experts]
    n_experts = int(program.param(down_w).shape[0])
    if len(routers) != 1 or int(program.param(readers[routers[0]][0]).shape[0]) != n_experts:
        raise fail(topk, f"expected one router (a linear with {n_experts} outputs) before the top-k, found {len(routers)}")
    router_w, router_b = readers[routers[0]]
    scaled = [u for u in down_node.users if u.target in (aten.mul.Tensor, operator.mul)]
    if len(scaled) != 1:
        raise fail(down_node, "the experts' outputs are not scaled by routing weights")
    other = next(a for a in scaled[0].args if isinstance(a, torch.fx.Node) and a is not down_node)
    weights = other.args[0] if other.target is aten.unsqueeze.default else other
    moe = MoeGroup(router=router_w, router_bias=router_b, top_k=int(topk.args[1]), experts=n_experts, spans=spans,
                   down=down_w, size=size, down_input=x.name, expert_ids=ids.name, weights=weights.name,
                   weighted_output=scaled[0].name)
    if len(shared_nodes) == 1:
        shared = shared_nodes[0]
        moe.shared = mlp_group(program, shared, writers[shared], readers, nodes)
        for user in shared.users:
            if user.target in (aten.mul.Tensor, operator.mul):
                gate_in = next(a for a in user.args if isinstance(a, torch.fx.Node) and a is not shared)
                gates = [n for n in linear_ancestors(gate_in, set(readers), set())
                         if int(program.param(readers[n][0]).shape[0]) == 1]
                if len(gates) == 1:
                    moe.shared_gate = readers[gates[0]][0]
    return moe
