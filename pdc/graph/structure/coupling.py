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
from pdc.graph.program import Program, STAGE
from pdc.graph.structure.moe import expert_linears, keeps_last_dim
from pdc.graph.structure.ops import (ELEMENTWISE, IGNORED, LAYER_NORM, PASSTHROUGH, REDUCTIONS, UnionFind, fail,
                                     last_dim, shape_of)

aten = torch.ops.aten


@dataclass
class Channels:
    """The coupled channels of one graph. `linears`: [(node, weight, bias)]; `experts`: the
    per-expert projections {squeeze node: (weight, input, ids, inner nodes)}; `carried`: nodes
    that keep their input's channels in the last dim."""

    uf: UnionFind = field(default_factory=UnionFind)
    label: dict = field(default_factory=dict)
    param_of: dict = field(default_factory=dict)
    linears: list = field(default_factory=list)
    experts: dict = field(default_factory=dict)
    carried: set = field(default_factory=set)
    embed_node: Optional[torch.fx.Node] = None
    embed_name: str = ""
    hidden_root: object = None
    hidden_size: int = 0
    inner: set = field(default_factory=set)
    fresh: int = 0

    def in_hidden(self, node) -> bool:
        return node in self.label and self.uf.find(self.label[node]) == self.hidden_root

    def new_label(self, node) -> tuple:
        """A label of its own: an op whose output channels are coupled to nothing yet."""
        self.fresh += 1
        return ("opaque", node.name, self.fresh)


def couple_channels(program: Program) -> Channels:
    """Label every node's last dimension and unite the labels that must be sliced together."""
    experts = expert_linears(program.gm, program.prefix)  # squeeze node -> (weight, input, ids, inner nodes)
    ch = Channels(experts=experts, inner={n for e in experts.values() for n in e[3]})
    for node in program.gm.graph.nodes:
        if node.op == "get_attr":
            if isinstance(node.target, str) and node.target.startswith(program.prefix):
                name = node.target[len(program.prefix):]
                ch.param_of[node] = name
                shape = shape_of(node) or tuple(program.param(name).shape)
                ch.label[node] = (name, len(shape) - 1)
        elif node.op != "call_function" or node.target in IGNORED:
            if node.op in ("placeholder", "call_function"):
                ch.label[node] = ch.new_label(node)
        else:
            _label_op(ch, node)
    if ch.embed_node is None:
        raise PdcError("cannot find the token embedding (aten.embedding on a parameter) in the graph", STAGE)
    ch.embed_name = ch.param_of[ch.embed_node.args[0]]
    ch.hidden_root = ch.uf.find((ch.embed_name, 1))
    ch.hidden_size = int(program.param(ch.embed_name).shape[1])
    return ch


def _label_op(ch: Channels, node: torch.fx.Node) -> None:
    """The label of an op's output, uniting the labels the op couples."""
    uf, label, param_of = ch.uf, ch.label, ch.param_of
    t = node.target
    tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and a in label]
    if node in ch.experts:  # a per-expert projection: couples like a linear with weight [E, out, in]
        wname, x, _, _ = ch.experts[node]
        uf.union(label[x], (wname, 2))
        label[node] = (wname, 1)
    elif node in ch.inner:
        label[node] = ch.new_label(node)
    elif tensor_args and node.args[0] in label and node.args[0] not in param_of and keeps_last_dim(node):
        label[node] = label[node.args[0]]
        ch.carried.add(node)
    elif t is aten.embedding.default:
        weight = node.args[0]
        if weight in param_of:
            ch.embed_node = ch.embed_node or node
            label[node] = (param_of[weight], 1)
        else:
            label[node] = ch.new_label(node)
    elif t is aten.linear.default:
        _label_linear(ch, node)
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
            label[node] = ch.new_label(node)
    else:
        label[node] = ch.new_label(node)


def _label_linear(ch: Channels, node: torch.fx.Node) -> None:
    """`linear(x, W, b)`: x's channels are W's columns, the output's are W's rows (and b's)."""
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else None
    if w not in ch.param_of:
        raise fail(node, "linear weight is not a parameter")
    wname = ch.param_of[w]
    ch.uf.union(ch.label[x], (wname, 1))
    ch.label[node] = (wname, 0)
    bname = None
    if isinstance(b, torch.fx.Node):
        bname = ch.param_of.get(b)
        if bname is None:
            raise fail(node, "bias is not a parameter")
        ch.uf.union((bname, 0), (wname, 0))
    ch.linears.append((node, wname, bname))


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
