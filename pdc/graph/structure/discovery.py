"""`discover`: a program's structure from its graph and config alone, in four steps: couple the
channels (`coupling`), find the readers and writers of the hidden channels and the output head,
walk the residual stream into decoder layers (`residual`, with `attention`, `mlp`, `moe`), then
collect the hidden group and check that every parameter the graph reads belongs to a group.
`structure_of` caches the result on the program until its next edit."""

from __future__ import annotations

import operator

import torch
import torch.fx

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program, refresh_shapes
from pdc.graph.structure.coupling import Channels, check_hidden_readers, couple_channels
from pdc.graph.structure.decoder import Structure
from pdc.graph.structure.groups import HiddenGroup
from pdc.graph.structure.ops import LAYER_NORM, RESHAPES, fail, from_param, last_dim, shape_of
from pdc.graph.structure.residual import decoder_layers, feeds_output_only

aten = torch.ops.aten


def structure_of(program: Program) -> Structure:
    """The structure of `program`'s current graph, cached on the program until its next edit
    (`Program.invalidate`). Stale shape metadata is refreshed first: discovery reads shapes."""
    if program._structure is None:
        if program._shapes_stale:
            refresh_shapes(program)
        program._structure = discover(program)
    return program._structure


def discover_fresh(program: Program) -> Structure:
    """Rediscover from scratch (shapes re-propagated), without touching the cached structure."""
    refresh_shapes(program)
    return discover(program)


def discover(program: Program) -> Structure:
    gm = program.gm
    ch = couple_channels(program)
    check_hidden_readers(gm, ch)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    readers, writers = _readers_writers(ch)
    head_linear = _head_linear(gm, readers)
    layers = decoder_layers(program, ch, readers, writers, order, nodes)
    head_name, head_bias = readers[head_linear]
    used = {ch.embed_name, head_name} | ({head_bias} if head_bias else set())
    used.update(name for layer in layers for name in layer.params)
    hidden = _hidden_group(program, ch, head_name, used)
    _check_all_grouped(program, ch, used | set(hidden.final_norms))
    return Structure(hidden=hidden, layers=layers)


def _readers_writers(ch: Channels) -> tuple[dict, dict]:
    """The projections reading the hidden channels (their columns coupled to them) and those
    writing them (their rows): {node: (weight, bias)}, linears and per-expert projections."""
    uf, root = ch.uf, ch.hidden_root
    readers = {n: (w, b) for n, w, b in ch.linears if uf.find((w, 1)) == root}
    writers = {n: (w, b) for n, w, b in ch.linears if uf.find((w, 0)) == root}
    readers.update({n: (e[0], None) for n, e in ch.experts.items() if uf.find((e[0], 2)) == root})
    writers.update({n: (e[0], None) for n, e in ch.experts.items() if uf.find((e[0], 1)) == root})
    return readers, writers


def _head_linear(gm: torch.fx.GraphModule, readers: dict) -> torch.fx.Node:
    """The output head: the (last) reader of the hidden channels that reaches the graph output."""
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    head_linear = None
    for n in readers:
        if feeds_output_only(n, output_node):
            head_linear = n
    if head_linear is None:
        raise PdcError("cannot find the output head: no linear on the hidden channels reaches the graph output", STAGE)
    return head_linear


def _hidden_group(program: Program, ch: Channels, head_name: str, used: set) -> HiddenGroup:
    """The hidden channels: the parameter dimensions coupled to them, the norms on them (outputs,
    layer norms' normalized_shape, the final norms no layer holds) and the views whose last size
    is the hidden size."""
    uf, param_of, hidden_size, in_hidden = ch.uf, ch.param_of, ch.hidden_size, ch.in_hidden
    members = sorted({e for e in uf.parent if isinstance(e, tuple) and len(e) == 2
                      and isinstance(e[0], str) and uf.find(e) == ch.hidden_root and e[0] in set(param_of.values())})
    norm_outputs, size_args, view_args = [], [], []
    for node in program.gm.graph.nodes:
        if node.op != "call_function" or not in_hidden(node):
            continue
        if node.target in RESHAPES and node.args[1][-1] == hidden_size:
            view_args.append(node.name)  # [..., hidden]: flattening tokens in front of a mixture of experts
        if node.target is LAYER_NORM:
            if list(node.args[1]) != [hidden_size]:
                raise fail(node, f"a layer norm over {list(node.args[1])} on the hidden channels")
            size_args.append(node.name)
            if any(isinstance(a, torch.fx.Node) and a in param_of for a in node.args[2:4]):
                norm_outputs.append(node.name)
        elif node.target in (aten.mul.Tensor, operator.mul) and last_dim(node) == hidden_size and any(
                isinstance(a, torch.fx.Node) and len(shape_of(a) or ()) == 1 and last_dim(a) == hidden_size
                and in_hidden(a) and from_param(a, param_of)
                for a in node.args):
            norm_outputs.append(node.name)
    final_norms = [param_of[a] for a in param_of if a.users and program.param(param_of[a]).dim() == 1
                   and in_hidden(a) and param_of[a] not in used]
    return HiddenGroup(size=hidden_size, members=members, norm_outputs=norm_outputs, embedding=ch.embed_name,
                       head=head_name, final_norms=final_norms, size_args=size_args, view_args=view_args)


def _check_all_grouped(program: Program, ch: Channels, used: set) -> None:
    """Every parameter the graph reads is in a group; otherwise the error names its first user."""
    for node, name in ch.param_of.items():
        if not node.users or name in used or not isinstance(program.param(name), torch.nn.Parameter):
            continue
        user = next(iter(node.users))
        raise fail(user, f"parameter {name} is in no prunable group (not a projection, a norm on the hidden "
                         "channels or a norm inside attention that pdc can slice)")
