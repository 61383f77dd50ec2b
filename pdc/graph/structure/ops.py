"""What structure discovery reads from an fx graph: the op families it understands (casts and
activations that keep the channels, broadcasting elementwise ops, reductions, reshapes, the
attention core), node shapes, the union-find over channel labels, backward walks over the graph,
and the one error it raises (`fail`: the node it cannot classify, and the module it came from)."""

from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx

from pdc.errors import PdcError
from pdc.graph.program import STAGE

aten = torch.ops.aten


# Ops whose output last dim is the input's last dim, element for element.
PASSTHROUGH = {
    aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.silu.default, aten.gelu.default,
    aten.relu.default, aten.neg.default, aten.rsqrt.default, aten.pow.Tensor_Scalar, aten.alias.default,
    aten.contiguous.default, aten.clone.default, aten.dropout.default, aten.tanh.default,
    aten.sigmoid.default, aten.exp.default, aten.detach.default, aten.type_as.default,
    aten.mul.Scalar, aten.div.Scalar, aten.add.Scalar, aten.sub.Scalar,
}
# Elementwise ops with broadcasting between tensor operands.
ELEMENTWISE = {
    aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor, aten.where.self,
    aten.maximum.default, aten.minimum.default, operator.add, operator.mul,
}
# Reductions over the last dim: read the hidden channels, couple nothing.
REDUCTIONS = {aten.mean.dim, aten.sum.dim_IntList, aten.var.correction, aten.amax.default}
# Ops that carry no data.
IGNORED = {aten._assert_tensor_metadata.default, aten.sym_size.int}
SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default}
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
SDPA = aten.scaled_dot_product_attention.default  # (query, key, value, attn_mask, ...)
LAYER_NORM = aten.layer_norm.default  # (x, normalized_shape, weight, bias, eps)


class UnionFind:
    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        root = x
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, a, b):
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[rb] = ra
        return ra


def shape_of(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def same_shape(a, b) -> bool:
    """Equal shapes, symbolic sizes compared by name (no symbolic guard is evaluated)."""
    sa, sb = shape_of(a), shape_of(b)
    return sa is not None and sb is not None and tuple(map(str, sa)) == tuple(map(str, sb))


def last_dim(node) -> Optional[int]:
    s = shape_of(node)
    if not s:
        return None
    return int(s[-1]) if isinstance(s[-1], int) else None


def describe_node(node: torch.fx.Node) -> str:
    return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


def module_path(node: torch.fx.Node) -> str:
    """The Hugging Face module a node was traced from (`model.layers.3.self_attn.q_norm`), from
    export's `nn_module_stack`; '' when unknown."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path[2:] if path.startswith("m.") else path
    return "" if path == "m" else path


def fail(node: torch.fx.Node, why: str) -> PdcError:
    where = module_path(node)
    return PdcError(f"cannot classify node {describe_node(node)}{f' from {where}' if where else ''}: {why}", STAGE)


def from_param(node: torch.fx.Node, param_of: dict) -> bool:
    """`node` is a parameter, or computed from one parameter by casts and scalar arithmetic
    (Gemma's `1 + weight`)."""
    while node not in param_of:
        inputs = node.all_input_nodes
        if node.op != "call_function" or len(inputs) != 1:
            return False
        node = inputs[0]
    return True


def is_scalar_like(node) -> bool:
    shape = shape_of(node)
    return shape is not None and all(isinstance(d, int) and d == 1 for d in shape)


def linear_ancestors(start, linear_nodes: set, stop: set) -> set:
    """Linear nodes reached walking backwards from `start`, not past a linear or a `stop` node."""
    seen, found, stack = set(), set(), [start]
    if start in linear_nodes:
        return {start}
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in seen or a in stop:
                continue
            seen.add(a)
            if a in linear_nodes:
                found.add(a)
            else:
                stack.append(a)
    return found


def path_back(target: torch.fx.Node, sources: set) -> list:
    """The shortest chain of nodes from one of `sources` to `target` (inclusive), found walking
    backwards; [] when none reaches it."""
    parent = {target: None}
    queue = [target]
    while queue:
        n = queue.pop(0)
        if n in sources:
            path = [n]
            while parent[path[-1]] is not None:
                path.append(parent[path[-1]])
            return path
        for a in n.all_input_nodes:
            if a not in parent:
                parent[a] = n
                queue.append(a)
    return []


def ancestors(start, stop: set) -> list:
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and a not in stop:
                seen.add(a)
                stack.append(a)
    return list(seen) + [start]
