"""Channel coupling: union-find over "last dimension" labels. Every tensor node gets the label of
its last dimension; a parameter dimension is `(hf_name, dim)`. A linear unites its input with
its weight's columns and labels its output with the weight's rows (its bias joins them); an
embedding labels its output with the weight's columns; `layer_norm` couples its input with its
weight and bias; elementwise ops unite full-width operands; casts and activations pass the label
on; ops that move whole rows (tokens flattened for a mixture of experts) keep it; a per-expert
projection couples like a linear with weight [experts, out, in]. Any other op starts a fresh
label. The class of the embedding's columns is the hidden channel group, and every op reading
those channels must be one whose coupling is understood."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program
from pdc.graph.structure.moe import expert_linears, keeps_last_dim
from pdc.graph.structure.ops import (ELEMENTWISE, IGNORED, LAYER_NORM, PASSTHROUGH, REDUCTIONS, UnionFind, fail,
                                     last_dim, shape_of)

aten = torch.ops.aten


@dataclass
class Channels:
    """The coupled channels of one graph. `linears`: [(node, weight, bias)]; `experts`: the
    per-expert projections {squeeze node: (weight, input, ids, inner nodes)}; `carried`: nodes
    that keep their input's channels in the last dim."""

    uf: UnionFind
    label: dict
    param_of: dict
    linears: list
    experts: dict
    carried: set
    embed_node: torch.fx.Node
    embed_name: str = ""
    hidden_root: object = None
    hidden_size: int = 0
    inner: set = field(default_factory=set)

    def in_hidden(self, node) -> bool:
        return node in self.label and self.uf.find(self.label[node]) == self.hidden_root


def couple_channels(program: Program) -> Channels:
    """Label every node's last dimension and unite the labels that must be sliced together."""
    gm, prefix = program.gm, program.prefix
    uf = UnionFind()
    label: dict[torch.fx.Node, object] = {}
    param_of: dict[torch.fx.Node, str] = {}
    linears: list[tuple[torch.fx.Node, str, Optional[str]]] = []
    embed_node = None
    fresh = 0

    def new_label(node):
        nonlocal fresh
        fresh += 1
        return ("opaque", node.name, fresh)

    experts = expert_linears(gm, prefix)  # squeeze node -> (weight, input node, ids node, inner nodes)
    inner = {n for e in experts.values() for n in e[3]}
    carried: set = set()

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if isinstance(node.target, str) and node.target.startswith(prefix):
                name = node.target[len(prefix):]
                param_of[node] = name
                shape = shape_of(node) or tuple(program.param(name).shape)
                label[node] = (name, len(shape) - 1)
            continue
        if node.op != "call_function" or node.target in IGNORED:
            if node.op in ("placeholder", "call_function"):
                label[node] = new_label(node)
            continue
        t = node.target
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and a in label]
        if node in experts:  # a per-expert projection: couples like a linear with weight [E, out, in]
            wname, x, _, _ = experts[node]
            uf.union(label[x], (wname, 2))
            label[node] = (wname, 1)
            continue
        if node in inner:
            label[node] = new_label(node)
            continue
        if tensor_args and node.args[0] in label and node.args[0] not in param_of and keeps_last_dim(node):
            label[node] = label[node.args[0]]
            carried.add(node)
            continue
        if t is aten.embedding.default:
            weight = node.args[0]
            if weight in param_of:
                embed_node = embed_node or node
                label[node] = (param_of[weight], 1)
            else:
                label[node] = new_label(node)
        elif t is aten.linear.default:
            x, w = node.args[0], node.args[1]
            b = node.args[2] if len(node.args) > 2 else None
            if w not in param_of:
                raise fail(node, "linear weight is not a parameter")
            wname = param_of[w]
            uf.union(label[x], (wname, 1))
            label[node] = (wname, 0)
            bname = None
            if isinstance(b, torch.fx.Node):
                bname = param_of.get(b)
                if bname is None:
                    raise fail(node, "bias is not a parameter")
                uf.union((bname, 0), (wname, 0))
            linears.append((node, wname, bname))
        elif t is LAYER_NORM:  # (x, normalized_shape, weight, bias, eps): elementwise affine on x's channels
            for a in node.args[2:4]:
                if isinstance(a, torch.fx.Node) and a in label:
                    uf.union(label[node.args[0]], label[a])
            label[node] = label[node.args[0]]
        elif t in PASSTHROUGH and tensor_args:
            label[node] = label[tensor_args[0]]
        elif t in ELEMENTWISE and tensor_args:
            out = last_dim(node)
            full = [a for a in tensor_args if last_dim(a) == out and out not in (None, 1)]
            if full:
                for a in full[1:]:
                    uf.union(label[full[0]], label[a])
                label[node] = label[full[0]]
            else:
                label[node] = new_label(node)
        else:
            label[node] = new_label(node)

    if embed_node is None:
        raise PdcError("cannot find the token embedding (aten.embedding on a parameter) in the graph", STAGE)
    embed_name = param_of[embed_node.args[0]]
    return Channels(uf=uf, label=label, param_of=param_of, linears=linears, experts=experts, carried=carried,
                    embed_node=embed_node, embed_name=embed_name, hidden_root=uf.find((embed_name, 1)),
                    hidden_size=int(program.param(embed_name).shape[1]), inner=inner)


def check_hidden_readers(gm: torch.fx.GraphModule, ch: Channels) -> None:
    """Every op that reads the hidden channels must be one whose coupling we understand."""
    for node in gm.graph.nodes:
        if (node.op != "call_function" or node.target in IGNORED or node in ch.carried or node in ch.inner
                or node in ch.experts):
            continue
        known = node.target in PASSTHROUGH or node.target in ELEMENTWISE or node.target in (
            aten.linear.default, aten.embedding.default, LAYER_NORM)
        if known:
            continue
        for a in node.args:
            if isinstance(a, torch.fx.Node) and ch.in_hidden(a):
                if node.target in REDUCTIONS and last_dim(node) == 1:
                    continue
                raise fail(node, "it reads the hidden channels through an op pdc does not know how to slice")
