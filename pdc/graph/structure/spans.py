"""Rows of a projection as spans: the ops between a projection and where its units (heads,
MLP neurons) appear are run on a tensor of row numbers, and the result must be evenly strided
blocks. The same code re-finds the rows after a slice (`retrace`) and recounts the slice bounds,
split sizes and view sizes on the path for the rows a pass keeps (`row_constants`)."""

from __future__ import annotations

import operator

import torch
import torch.fx

from pdc.errors import one_line
from pdc.graph.program import Program
from pdc.graph.structure.groups import Span
from pdc.graph.structure.ops import ancestors, fail, path_back, same_shape, shape_of

aten = torch.ops.aten


# Ops run on the row-number tensor as they are (batch and sequence are 1 there).
FOLLOW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor, aten.split.Tensor,
          aten.split_with_sizes.default, aten.chunk.default, aten.expand.default, aten.select.int}


def concrete(value, prev, x):
    if value is prev:
        return x
    if isinstance(value, torch.fx.Node):
        if value.target is aten.sym_size.int or isinstance(value.meta.get("val"), torch.SymInt):
            return 1  # batch and sequence
        raise ValueError(f"it depends on {value.name}")
    if isinstance(value, (list, tuple)):
        return type(value)(concrete(v, prev, x) for v in value)
    return value


def run_path(program: Program, nodes: dict, path: list[str], rows: int):
    """Run the path's ops on row numbers: [(node, input, output)] per step after the linear."""
    first = nodes[path[0]]
    shape = [d if isinstance(d, int) else 1 for d in (shape_of(first) or (1, 1, rows))]
    shape[-1] = rows
    x = torch.arange(rows).reshape(shape)
    steps, prev = [], first
    for name in path[1:]:
        node = nodes[name]
        if node.target is operator.getitem:
            y = x[node.args[1]]
        elif node.target in FOLLOW:
            try:
                y = node.target(*concrete(node.args, prev, x), **concrete(node.kwargs, prev, x))
            except Exception as exc:
                raise fail(node, f"cannot follow the rows of {path[0]} through it: {one_line(exc)}") from None
        elif isinstance(x, torch.Tensor) and same_shape(node, prev):
            y = x  # elementwise, casts, norms: rows stay where they are
        else:
            raise fail(node, f"cannot follow the rows of {path[0]} through it (it changes the shape)")
        steps.append((node, x, y))
        x, prev = y, node
    return steps, x


def span_of(program, nodes, path, axis, param, bias, block, what) -> Span:
    """The span of `param` read along `path`, whose end holds units along `axis` and `block`
    contiguous elements in its last dim (block 1: one element per unit)."""
    rows = int(program.param(param).shape[-2])  # output rows: dim 0 of a linear, dim 1 of an expert weight
    _, x = run_path(program, nodes, path, rows)
    end = nodes[path[-1]]
    if block > 1:
        mat = x.movedim(axis, 0).movedim(-1, 1).reshape(x.shape[axis], x.shape[-1], -1)[:, :, 0]
    else:
        mat = x.reshape(-1, 1)
    units = mat.shape[0]
    offset = int(mat[0, 0])
    stride = int(mat[1, 0] - mat[0, 0]) if units > 1 else block
    want = offset + torch.arange(units)[:, None] * stride + torch.arange(mat.shape[1])[None, :]
    if not torch.equal(mat, want) or mat.shape[1] != block:
        raise fail(end, f"the {what} rows of {param} are not laid out as evenly strided blocks")
    return Span(param=param, bias=bias, offset=offset, stride=stride, block=block, units=units, path=list(path),
                axis=axis)


def retrace(program: Program, nodes: dict, span: Span) -> None:
    """Re-find `span`'s rows after its weight and the constants on its path were sliced."""
    fresh = span_of(program, nodes, span.path, span.axis, span.param, span.bias, span.block, "")
    span.offset, span.stride, span.units = fresh.offset, fresh.stride, fresh.units


def row_constants(program: Program, span: Span, kept: torch.Tensor) -> dict:
    """New size arguments for the nodes on `span`'s path once its weight keeps rows `kept`
    (a bool mask over the current rows): {node name: new args}. Slices and splits count the
    kept rows before each bound; view/reshape/expand sizes count the kept positions per dim."""
    nodes = {n.name: n for n in program.gm.graph.nodes}
    steps, _ = run_path(program, nodes, span.path, int(kept.numel()))
    out = {}
    for node, x, y in steps:
        t = node.target
        if t not in (aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default, aten.view.default,
                     aten.reshape.default, aten._unsafe_view.default, aten.expand.default):
            continue
        args = list(node.args)
        if t in (aten.slice.Tensor, aten.split.Tensor, aten.split_with_sizes.default):
            dim = args[1] if t is aten.slice.Tensor else (args[2] if len(args) > 2 else 0)
            present = kept[x].movedim(dim, 0).reshape(x.shape[dim], -1).any(1)
            before = torch.cat([torch.zeros(1, dtype=torch.long), present.long().cumsum(0)])
            if t is aten.slice.Tensor:
                for i in (2, 3):
                    if i < len(args) and isinstance(args[i], int) and 0 <= args[i] < x.shape[dim]:
                        args[i] = int(before[args[i]])
            elif t is aten.split.Tensor:
                counts = [int(c.sum()) for c in present.split(args[1])]
                if len(set(counts[:-1])) > 1 or counts[-1] > counts[0]:
                    raise fail(node, f"a split into equal chunks would keep {counts} rows per chunk")
                args[1] = counts[0]
            else:
                args[1] = [int(c.sum()) for c in present.split(list(args[1]))]
        else:
            mask = kept[y]
            sizes = list(args[1])
            for i, v in enumerate(sizes):
                if isinstance(v, int) and v > 1:
                    sizes[i] = int(mask.movedim(i, 0).reshape(mask.shape[i], -1).any(1).sum())
            args[1] = sizes
        if tuple(args) != tuple(node.args):
            out[node.name] = tuple(args)
    return out


def paths_from(target, source, linears: set) -> list:
    """One path from `source` to `target` per distinct output of a splitting node (getitem index)
    that leads there: a fused gate|up weight reaches the neurons twice."""
    region = set(ancestors(target, stop=linears)) | {source}
    paths = []
    for branch in getitem_branches(source, region):
        if branch is None:
            paths.append(path_back(target, {source}))
        else:
            paths.append(path_back(branch, {source})[:-1] + path_back(target, {branch}))
    return paths


def getitem_branches(source, region) -> list:
    """The getitem nodes right after the first split of `source`'s output inside `region`, or
    [None] when its rows reach the target unsplit."""
    stack, seen = [source], set()
    while stack:
        n = stack.pop()
        for u in n.users:
            if u not in region or u in seen:
                continue
            seen.add(u)
            if u.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default):
                items = sorted((g for g in u.users if g.target is operator.getitem and g in region),
                               key=lambda g: g.args[1])
                return items
            stack.append(u)
    return [None]
