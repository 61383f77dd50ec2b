"""Attention: the output projection's q/k/v projections, read from the attention core's operands
(SDPA, or the two matmuls of eager attention), their head spans, the head-related integers in
size lists (`head_shape_consts`: repeat_kv's expand/reshape, the head split and merge), and the
norms inside attention (over a projection's rows, or over head_dim)."""

from __future__ import annotations

import torch
import torch.fx

from pdc.graph.structure.groups import AttentionGroup, ShapeConst
from pdc.graph.structure.ops import (MATMULS, SDPA, SHAPE_OPS, ancestors, fail, last_dim, linear_ancestors,
                                     path_back, shape_of)
from pdc.graph.structure.spans import span_of

aten = torch.ops.aten


def has_attention_core(start, readers: set) -> bool:
    region = ancestors(start, stop=readers)
    return any(n.target is SDPA or n.target in MATMULS for n in region)


def attention_group(program, o_node, o_wb, readers, order, param_of, uf, nodes) -> AttentionGroup:
    o_w, o_b = o_wb
    o_in = o_node.args[0]
    reader_set = set(readers)
    projections = linear_ancestors(o_in, reader_set, set())
    if not 1 <= len(projections) <= 3:
        raise fail(o_node, f"expected the q/k/v projections before it, found {len(projections)} linears")
    operands = attention_operands(o_node, o_in, projections, order)
    head_dim = last_dim(operands[0])
    if head_dim is None:
        raise fail(operands[0], "the query's head size is not a constant")
    spans, splits = [], []
    for what, operand in zip(("query", "key", "value"), operands):
        path = path_back(operand, projections)
        if not path:
            raise fail(operand, f"the attention {what} is not computed from a projection")
        split, axis = head_split(path, head_dim)
        path = path[:path.index(split) + 1]
        w, b = readers[path[0]]
        spans.append(span_of(program, nodes, [n.name for n in path], axis, w, b, head_dim, what))
        splits.append((split, axis))
    q, k, v = spans
    attn = AttentionGroup(q=q, k=k, v=v, o=o_w, o_bias=o_b, heads=q.units, kv_heads=k.units, head_dim=head_dim,
                          o_input=o_in.name)
    if v.units != k.units or (k.units and q.units % k.units):
        raise fail(o_node, f"{q.units} query heads over {k.units} key and {v.units} value heads")
    attn.shape_consts = head_shape_consts(splits, o_in, q.units, k.units, head_dim)
    # Norms inside the attention: over a projection's rows (sliced with them) or over head_dim.
    region = ancestors(o_in, stop=projections)
    own = {n for s in spans for n in (s.param, s.bias)} | {o_w, o_b}
    weights = {s.param for s in spans}
    for node in sorted(region, key=lambda n: order[n]):
        if node not in param_of or param_of[node] in own or not isinstance(program.param(param_of[node]), torch.nn.Parameter):
            continue
        name = param_of[node]
        if name in attn.row_norms or name in attn.head_norms:
            continue
        coupled = [w for w in weights if uf.find((name, 0)) == uf.find((w, 0))]
        size = int(program.param(name).shape[0]) if program.param(name).dim() == 1 else None
        if program.param(name).dim() == 1 and len(coupled) == 1 and size == program.param(coupled[0]).shape[0]:
            attn.row_norms[name] = coupled[0]
        elif size == head_dim and not coupled:
            attn.head_norms.append(name)
        else:
            user = next(iter(node.users))
            raise fail(user, f"parameter {name} inside the attention is neither a norm over a q/k/v "
                              f"projection's rows nor one over head_dim ({head_dim})")
    return attn


def head_split(path: list, head_dim: int) -> tuple:
    """The first node on `path` (after a view/reshape) whose last dim is head_dim, and its head
    axis: the one other dim of constant size."""
    viewed = False
    for node in path[1:]:
        viewed = viewed or node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
        shape = shape_of(node)
        if viewed and shape and shape[-1] == head_dim:
            axes = [i for i, d in enumerate(shape[:-1]) if isinstance(d, int)]
            if len(axes) != 1:
                raise fail(node, f"cannot tell the head axis of shape {tuple(shape)}")
            return node, axes[0]
    raise fail(path[0], "its output is never split into heads")


def attention_operands(o_node, o_in, qkv: set, order: dict) -> tuple:
    """The nodes that enter the attention core as query, key and value."""
    region = ancestors(o_in, stop=set(qkv))
    cores = sorted((n for n in region if n.target is SDPA), key=lambda n: order[n])
    if len(cores) == 1:
        return tuple(cores[0].args[:3])
    if cores:
        raise fail(o_node, f"{len(cores)} attention cores feed it")
    # Explicit matmuls: the last one before o is probs @ V, the one before the softmax Q @ K^T.
    matmuls = sorted((n for n in region if n.target in MATMULS), key=lambda n: order[n])
    if len(matmuls) < 2:
        raise fail(o_node, "attention without scaled_dot_product_attention or two matmuls")
    qk, av = matmuls[-2], matmuls[-1]
    return qk.args[0], qk.args[1], av.args[1]


def head_shape_consts(splits, o_in, heads, kv_heads, head_dim) -> list[ShapeConst]:
    """Propagate per-dimension roles from the head splits of q, k and v (`splits`: [(node, head
    axis)]) to the output projection's input and collect the explicit head-related integers in
    size lists along the way."""
    sizes = {"head": heads, "kv": kv_heads, "rep": heads // max(1, kv_heads), "hd": head_dim}
    starts = [n for n, _ in splits]
    region = set(ancestors(o_in, stop=set(starts)))
    roles: dict = {}
    for (node, axis), role in zip(splits, ("head", "kv", "kv")):
        shape = shape_of(node)
        roles[node] = [(f"x{i}",) for i in range(len(shape))]
        roles[node][axis] = (role,)
        roles[node][-1] = ("hd",)
    consts: list[ShapeConst] = []
    graph_nodes = list(o_in.graph.nodes)
    for node in graph_nodes:
        if node not in region or node in roles or node.op != "call_function":
            continue
        ins = [a for a in node.all_input_nodes if a in roles]
        if ins and node.target in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default,
                                   aten.unbind.int):
            src = roles[ins[0]]
            dim = node.args[1 if node.target is aten.unbind.int else 2] if len(node.args) > (
                1 if node.target is aten.unbind.int else 2) else 0
            if any(r in ("head", "kv", "rep") for r in src[dim % len(src)]):
                raise fail(node, "it splits the attention heads apart (a computation per head, e.g. one "
                                  "norm module per head): pdc cannot slice per-head modules")
        shape = shape_of(node)
        if not ins or shape is None:
            continue
        src = roles[ins[0]]
        t = node.target
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            out = regroup(src, shape_of(ins[0]), shape, sizes)
        elif t is aten.transpose.int:
            d0, d1 = (d % len(src) for d in node.args[1:3])
            out = list(src)
            out[d0], out[d1] = out[d1], out[d0]
        elif t is aten.permute.default:
            out = [src[d] for d in node.args[1]]
        elif t is aten.unsqueeze.default:
            d = node.args[1] % (len(src) + 1)
            out = src[:d] + [("1",)] + src[d:]
        elif t is aten.expand.default:
            out = [("rep",) if r == ("1",) and s != 1 else r for r, s in zip(src, shape)]
        elif t in MATMULS:
            b_roles = roles.get(node.args[1])
            out = src[:-1] + ([b_roles[-1]] if b_roles else [(f"y{node.name}",)])
        elif t is SDPA:  # the query's layout; the value's head_dim
            q_roles, v_roles = roles.get(node.args[0]), roles.get(node.args[2])
            if q_roles is None or v_roles is None:
                raise fail(node, "cannot follow the head layout from the q/v projections to its operands")
            out = q_roles[:-1] + [v_roles[-1]]
        else:  # elementwise, softmax, slice/cat on the head dim, casts: same layout as the first input
            out = list(src) if len(src) == len(shape) else [(f"z{i}",) for i in range(len(shape))]
        roles[node] = out
        if t in SHAPE_OPS:
            for i, arg in enumerate(node.args[1]):
                if isinstance(arg, int) and arg != -1 and i < len(out):
                    dim_roles = out[i]
                    if any(r in ("head", "kv", "rep") for r in dim_roles):
                        consts.append(ShapeConst(node.name, i, tuple(dim_roles)))
    return consts


def regroup(src_roles, src_shape, out_shape, sizes):
    """Roles of a view/reshape output: flatten input roles to atoms, regroup by output sizes."""
    atoms = []
    for r, s in zip(src_roles, src_shape):
        if len(r) == 1:
            atoms.append((r[0], s))
        else:
            atoms.extend((a, sizes.get(a)) for a in r)
    out, i = [], 0
    for s in out_shape:
        if isinstance(s, int) and s == 1 and (i >= len(atoms) or atoms[i][1] != 1):
            out.append(("1",))
            continue
        group, prod = [], 1
        while i < len(atoms):
            role, size = atoms[i]
            group.append(role)
            i += 1
            if not isinstance(size, int) or not isinstance(s, int):
                break  # symbolic dims (batch, sequence) map one to one
            prod *= size
            if prod >= s:
                break
        out.append(tuple(group) if group else ("?",))
    return out
