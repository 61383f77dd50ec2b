"""Layers from the residual stream. From the embedding, the stream advances through full-width
adds (through casts, dropout and scalar scalings on the way); each add merges a branch, and the
projections onto the hidden channels inside the branch are its writers: one with an attention
core before it is attention, the other an MLP (or a mixture of experts). Attention then MLP (in
one add or two, the parallel residual) is one decoder layer; dropping it redirects the users of
its last add to the stream entering it."""

from __future__ import annotations

import operator

import torch
import torch.fx

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program
from pdc.graph.structure.attention import attention_group, has_attention_core
from pdc.graph.structure.coupling import Channels
from pdc.graph.structure.groups import LayerBlock
from pdc.graph.structure.mlp import mlp_group
from pdc.graph.structure.moe import moe_group
from pdc.graph.structure.ops import REDUCTIONS, fail, is_scalar_like, last_dim, linear_ancestors, same_shape

aten = torch.ops.aten


def decoder_layers(program: Program, ch: Channels, readers: dict, writers: dict, order: dict,
                   nodes: dict) -> list[LayerBlock]:
    """The decoder layers along the residual stream, in order: each step is the one full-width add
    that merges a branch (attention, MLP, or both in parallel) into the stream."""
    updates = residual_updates(ch.embed_node, ch.in_hidden, ch.hidden_size, order)
    stream_nodes = {u[0] for u in updates} | {u[1] for u in updates}
    experts = ch.experts
    layers: list[LayerBlock] = []
    pending_attn, layer_in = None, None
    for stream_in, merge, branch in updates:
        found = sorted(linear_ancestors(branch, set(writers), stream_nodes), key=lambda n: order[n])
        if not found:
            raise fail(merge, "a residual add whose branch has no projection onto the hidden channels")
        expert_nodes = [n for n in found if n in experts]
        attn_nodes = [n for n in found if n not in experts and has_attention_core(n.args[0], set(readers))]
        mlp_nodes = [n for n in found if n not in attn_nodes and n not in experts]
        if len(expert_nodes) > 1:
            raise fail(merge, f"{len(expert_nodes)} routed expert outputs merge in one residual add")
        if len(attn_nodes) > 1 or len(mlp_nodes) > 1:
            raise fail(merge, f"{len(attn_nodes)} attention and {len(mlp_nodes)} MLP outputs merge in one residual add")
        if attn_nodes:
            if pending_attn is not None:
                raise fail(attn_nodes[0], "attention block without an MLP before the next attention")
            pending_attn, layer_in = attention_group(program, attn_nodes[0], writers[attn_nodes[0]], readers, order,
                                                     ch.param_of, ch.uf, nodes), stream_in
        if mlp_nodes or expert_nodes:
            if pending_attn is None:
                raise fail((expert_nodes or mlp_nodes)[0], "MLP without a preceding attention block")
            moe, mlp = None, None
            if expert_nodes:
                moe = moe_group(program, expert_nodes[0], experts, mlp_nodes, readers, writers, nodes)
            else:
                mlp = mlp_group(program, mlp_nodes[0], writers[mlp_nodes[0]], readers, nodes)
            attn, pending_attn = pending_attn, None
            params = attn.params() + (moe.params() if moe else mlp.params())
            norms = [n for n in norms_between(program.gm, order, layer_in, merge, ch.param_of, ch.uf, ch.hidden_root,
                                              program) if n not in params]
            params += norms
            layers.append(LayerBlock(
                index=len(layers), prefix=common_prefix(params), input=layer_in.name, output=merge.name,
                attn=attn, mlp=mlp, norms=norms, params=params, parallel=bool(attn_nodes), moe=moe,
            ))
    if pending_attn is not None:
        raise PdcError(f"cannot classify the attention at {pending_attn.o}: attention block without an MLP", STAGE)
    if not layers:
        raise PdcError("cannot find any decoder layer (attention + MLP merged into the residual stream)", STAGE)
    return layers


def stream_aliases(node: torch.fx.Node) -> list:
    """`node` and the nodes computing the same stream value up to casts, dropout and scaling by
    scalars (Granite's multipliers, Gemma's embedding scale)."""
    out, stack = [node], [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op != "call_function" or u in out or not same_shape(u, n):
                continue
            if all(a is n or is_scalar_like(a) for a in u.all_input_nodes) and u.target not in REDUCTIONS:
                out.append(u)
                stack.append(u)
    return out


def residual_updates(embed_node, in_hidden, hidden_size: int, order: dict) -> list:
    """[(stream before, merging add, branch operand)] along the residual stream, in order. The
    stream before an add is the alias the add reads: after Gemma's embedding scale, not before,
    so a layer skipped by reading its input still sees the scaled embedding."""
    updates, current = [], embed_node
    while True:
        adds = []
        for alias in stream_aliases(current):
            for u in alias.users:
                if u.target not in (aten.add.Tensor, operator.add) or not in_hidden(u) or last_dim(u) != hidden_size:
                    continue
                others = [a for a in u.args if isinstance(a, torch.fx.Node) and a is not alias]
                if len(others) == 1 and same_shape(others[0], u):
                    adds.append((u, others[0], alias))
        adds = list(dict.fromkeys(adds))
        if not adds:
            return updates
        if len(adds) > 1:
            raise fail(adds[0][0], f"the residual stream {current.name} feeds {len(adds)} residual adds")
        merge, branch, stream = adds[0]
        updates.append((stream, merge, branch))
        current = merge


def feeds_output_only(node, output_node) -> bool:
    """`node` reaches the graph output through ops with no other tensor input (casts, logit
    scaling and soft-capping by constants)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u is output_node:
                return True
            if u.op == "call_function" and u not in seen and all(
                    a is n or is_scalar_like(a) for a in u.all_input_nodes) and same_shape(u, n):
                seen.add(u)
                stack.append(u)
    return False


def norms_between(gm, order, start, end, param_of, uf, root, program) -> list[str]:
    lo, hi = order[start], order[end]
    out = []
    for node in gm.graph.nodes:
        if lo <= order[node] <= hi and node.op == "call_function":
            for a in node.all_input_nodes:
                if a in param_of and program.param(param_of[a]).dim() == 1 and uf.find((param_of[a], 0)) == root:
                    out.append(param_of[a])
    return list(dict.fromkeys(out))


def common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common) + "." if common else ""
