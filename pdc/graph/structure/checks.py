"""Shape checks on a discovered structure, from parameter shapes and node arguments alone (no
forward): what a slicing pass must preserve (`check_shapes`), the mixture of experts' part of it
(`check_moe`), and the comparison of a resized structure with a fresh rediscovery (`mismatch`)."""

from __future__ import annotations

from typing import Optional

import torch

from pdc.graph.program import Program
from pdc.graph.structure.groups import MoeGroup

def check_shapes(structure, program: Program) -> Optional[str]:
    """None when every coupled dimension agrees with the (resized) sizes: each hidden member
    has `hidden.size` along its coupled dimension; the spans of every projection weight
    cover its rows exactly once (biases and row norms alike); each MLP's spans and down
    columns have its size; q/o have heads*head_dim, k/v kv_heads*head_dim, heads divide
    evenly over kv groups; every recorded shape constant holds the product of its roles'
    counts. Otherwise one line naming the first parameter or constant that disagrees. From
    parameter shapes and node arguments alone: what a slicing pass must preserve, checked
    without running the graph."""
    def size(name: str, dim: int) -> int:
        return int(program.param(name).shape[dim])

    for name, dim in structure.hidden.members:
        if size(name, dim) != structure.hidden.size:
            return f"{name} has {size(name, dim)} hidden channels along dim {dim}, not {structure.hidden.size}"
    nodes = {n.name: n for n in program.gm.graph.nodes}
    for name in structure.hidden.size_args:
        if list(nodes[name].args[1]) != [structure.hidden.size]:
            return f"{name} normalizes over {list(nodes[name].args[1])}, not [{structure.hidden.size}]"
    for name in structure.hidden.view_args:
        if nodes[name].args[1][-1] != structure.hidden.size:
            return f"{name} views its input as {list(nodes[name].args[1])}, not [..., {structure.hidden.size}]"
    covered: dict[str, list] = {}
    for span in structure.spans():
        covered.setdefault(span.param, []).append(span)
    for name, spans in covered.items():
        rows = torch.cat([s.rows() for s in spans]).sort().values
        if not torch.equal(rows, torch.arange(size(name, 0))):
            return f"{name}: its {size(name, 0)} rows are not covered exactly once by {', '.join(s.describe() for s in spans)}"
        for bias in {s.bias for s in spans if s.bias}:
            if size(bias, 0) != size(name, 0):
                return f"{bias} has {size(bias, 0)} rows, its weight {name} {size(name, 0)}"
    nodes = {n.name: n for n in program.gm.graph.nodes}
    for layer in structure.layers:
        a = layer.attn
        for m in layer.mlps():
            for name, units in [(s.param, s.units) for s in m.spans] + [(m.down, size(m.down, 1))]:
                if units != m.size:
                    return f"layer {layer.index}: {name} has {units} MLP neurons, not {m.size}"
        if layer.moe:
            problem = check_moe(program, layer.moe)
            if problem:
                return f"layer {layer.index}: {problem}"
        if a.kv_heads < 1 or a.heads % a.kv_heads:
            return f"layer {layer.index}: {a.heads} query heads do not split evenly over {a.kv_heads} kv groups"
        if a.q.units != a.heads or a.k.units != a.kv_heads or a.v.units != a.kv_heads:
            return f"layer {layer.index}: q/k/v spans have {a.q.units}/{a.k.units}/{a.v.units} heads, not {a.heads}/{a.kv_heads}"
        if size(a.o, 1) != a.heads * a.head_dim:
            return f"layer {layer.index}: {a.o} has {size(a.o, 1)} columns, not {a.heads} heads x {a.head_dim}"
        for norm, weight in a.row_norms.items():
            if size(norm, 0) != size(weight, 0):
                return f"layer {layer.index}: {norm} has {size(norm, 0)} channels, {weight} {size(weight, 0)} rows"
        for norm in a.head_norms:
            if size(norm, 0) != a.head_dim:
                return f"layer {layer.index}: {norm} has {size(norm, 0)} channels, not head_dim {a.head_dim}"
        counts = {"head": a.heads, "kv": a.kv_heads, "rep": a.heads // a.kv_heads, "hd": a.head_dim}
        for c in a.shape_consts:
            value, expected = nodes[c.node].args[1][c.index], 1
            for role in c.roles:
                expected *= counts[role]
            if value != expected:
                return f"layer {layer.index}: shape constant {c.node}[{c.index}] is {value}, not {'*'.join(c.roles)} = {expected}"
    return None


def mismatch(structure, fresh, program: Program) -> Optional[str]:
    """Compare `structure` (a resized `decoder.Structure`) with `fresh` rediscovery of the same
    graph; None if they agree. Groups and sizes must be equal. Shape constants are compared by value: a
    constant whose count became 1 (or equal to another) is ambiguous to rediscovery, which
    then finds fewer or coarser roles, so each rediscovered constant must be one we track,
    and every tracked constant must hold the product of the current counts of its roles."""
    def strip(text):
        return [line for line in text.splitlines() if "shape const" not in line]

    if strip(structure.describe()) != strip(fresh.describe()):
        return "groups or sizes differ"
    nodes = {n.name: n for n in program.gm.graph.nodes}
    for mine, theirs in zip(structure.layers, fresh.layers):
        a = mine.attn
        sizes = {"head": a.heads, "kv": a.kv_heads, "rep": a.heads // max(1, a.kv_heads), "hd": a.head_dim}
        tracked = {(c.node, c.index) for c in a.shape_consts}
        extra = [(c.node, c.index) for c in theirs.attn.shape_consts if (c.node, c.index) not in tracked]
        if extra:
            return f"layer {mine.index}: untracked shape constants {extra}"
        for c in a.shape_consts:
            want = 1
            for role in c.roles:
                want *= sizes[role]
            if nodes[c.node].args[1][c.index] != want:
                return f"layer {mine.index}: shape constant {c.node}[{c.index}] is not {'*'.join(c.roles)} = {want}"
    return None


def check_moe(program: Program, e: MoeGroup) -> Optional[str]:
    """None when the mixture's parameters agree with its sizes, else what disagrees."""
    shape = lambda name: tuple(program.param(name).shape)  # noqa: E731
    if shape(e.router)[0] != e.experts or (e.router_bias and shape(e.router_bias)[0] != e.experts):
        return f"router {e.router} scores {shape(e.router)[0]} experts, not {e.experts}"
    if e.experts < e.top_k:
        return f"{e.experts} experts are fewer than the router's top-k ({e.top_k})"
    for name in e.rows + [e.down]:
        if shape(name)[0] != e.experts:
            return f"{name} holds {shape(name)[0]} experts, not {e.experts}"
    if shape(e.down)[2] != e.size:
        return f"{e.down} reads {shape(e.down)[2]} neurons per expert, not {e.size}"
    for name in e.rows:
        rows = torch.cat([s.rows() for s in e.spans if s.param == name]).sort().values
        if not torch.equal(rows, torch.arange(shape(name)[1])) or any(s.units != e.size for s in e.spans):
            return f"{name}: its {shape(name)[1]} rows per expert are not {e.size} neurons in each of its spans"
    return None
