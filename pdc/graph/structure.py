"""Discover the prunable structure of an exported decoder from its graph alone.

No per-model name tables: the groups come from how tensors flow.

1. Channel coupling (union-find over "last dimension" labels). Every tensor node gets the label of
   its last dimension. A parameter dimension is an element `(hf_name, dim)`. `linear(x, W, b)`
   unites x's last dim with W's input dim (W, 1) and labels its output (W, 0) (bias (b, 0) joins
   it); `embedding(W, ids)` labels its output (W, 1); elementwise ops (add, mul, ...) unite the
   last dims of their operands when they have the full (unbroadcast) size; dtype casts and
   activations pass the label through. Any other op starts a fresh label. The class of the
   embedding's (W, 1) is the hidden channel group: embedding, every q/k/v/gate/up input, every
   o/down output, every norm weight and the output head, tied or not. A down projection's input
   class holds its gate/up output rows: one MLP neuron group per layer.
2. Attention: a linear that writes the residual stream but whose input label is opaque (it comes
   from a reshape) is an output projection. Its q/k/v are the nearest linear ancestors of its
   input. The attention core names their roles: `aten.scaled_dot_product_attention(q, k, v,
   mask)` (how pdc exports) by its operands; with explicit matmuls (eager attention), the matmul
   feeding the output projection names v (its right operand), the matmul before the softmax
   names q (left) and k (right). Grouped-query attention is either `repeat_kv` (an
   unsqueeze/expand/reshape of k and v to the query head count, whose constants are recorded
   below) or SDPA's `enable_gqa=True` (no constants: SDPA reads the head counts from q and k).
3. Shape constants: inside each attention region, per-dimension roles ("head", "kv", "rep",
   "hd", flattened tuples like ("head", "hd")) are propagated through view/reshape/transpose/
   unsqueeze/expand/matmul/elementwise nodes using the recorded fake-tensor shapes. Every explicit
   integer in a view/reshape/expand size list whose dimension has a head-related role is recorded
   as a `ShapeConst`; the head pass recomputes it from the new counts.

Invariant: every parameter the graph reads belongs to exactly one group (the hidden group, one
MLP group, one attention group); otherwise `discover` raises `PdcError` naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program, refresh_shapes

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
MATMULS = {aten.matmul.default, aten.bmm.default}
SDPA = aten.scaled_dot_product_attention.default  # (query, key, value, attn_mask, ...)


@dataclass
class ShapeConst:
    """An integer in a size list of `node` (argument 1, position `index`) whose value is the
    product of the current counts of `roles` (e.g. ("kv", "rep") = query heads)."""

    node: str
    index: int
    roles: tuple[str, ...]


@dataclass
class AttentionGroup:
    q: str
    k: str
    v: str
    o: str
    q_bias: Optional[str]
    k_bias: Optional[str]
    v_bias: Optional[str]
    o_bias: Optional[str]
    heads: int
    kv_heads: int
    head_dim: int
    o_input: str  # node feeding the output projection: [B, L, heads*head_dim]
    shape_consts: list[ShapeConst] = field(default_factory=list)


@dataclass
class MlpGroup:
    rows: list[str]  # weights whose output rows are the neurons (gate, up)
    row_biases: list[str]
    down: str
    down_bias: Optional[str]
    size: int
    down_input: str  # node feeding the down projection: [B, L, mlp]


@dataclass
class LayerBlock:
    """One decoder layer. Dropping it = redirect the users of `output` to `input`."""

    index: int
    prefix: str  # common HF-name prefix of its parameters, e.g. "model.layers.3."
    input: str  # residual-stream node entering the layer
    output: str  # residual-stream node leaving it (the second residual add)
    attn: AttentionGroup
    mlp: MlpGroup
    norms: list[str]
    params: list[str]


@dataclass
class HiddenGroup:
    size: int
    members: list[tuple[str, int]]  # (hf_name, dim) sliced together
    norm_outputs: list[str]  # nodes: output of each norm (x * rsqrt(...) * weight)
    embedding: str
    head: str  # output projection weight (may equal `embedding` when tied)


@dataclass
class Structure:
    hidden: HiddenGroup
    layers: list[LayerBlock]

    def resize(self, program: Program) -> None:
        """Re-read every size from the current parameter shapes (after a pass that sliced
        parameters but kept nodes and names: `keeps_topology`). Roles of shape constants do
        not depend on sizes, so the result equals rediscovery on the sliced graph."""
        self.hidden.size = int(program.param(self.hidden.embedding).shape[1])
        for layer in self.layers:
            a, m = layer.attn, layer.mlp
            m.size = int(program.param(m.down).shape[1])
            a.heads = int(program.param(a.q).shape[0]) // a.head_dim
            a.kv_heads = int(program.param(a.k).shape[0]) // a.head_dim

    def check_shapes(self, program: Program) -> Optional[str]:
        """None when every coupled dimension agrees with the (resized) sizes: each hidden member
        has `hidden.size` along its coupled dimension; each MLP's rows, row biases and down
        columns have its size; q/o have heads*head_dim, k/v kv_heads*head_dim, heads divide
        evenly over kv groups; every recorded shape constant holds the product of its roles'
        counts. Otherwise one line naming the first parameter or constant that disagrees. From
        parameter shapes and node arguments alone: what a slicing pass must preserve, checked
        without running the graph."""
        def size(name: str, dim: int) -> int:
            return int(program.param(name).shape[dim])

        for name, dim in self.hidden.members:
            if size(name, dim) != self.hidden.size:
                return f"{name} has {size(name, dim)} hidden channels along dim {dim}, not {self.hidden.size}"
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for layer in self.layers:
            m, a = layer.mlp, layer.attn
            for name, dim in [(r, 0) for r in m.rows + m.row_biases] + [(m.down, 1)]:
                if size(name, dim) != m.size:
                    return f"layer {layer.index}: {name} has {size(name, dim)} MLP neurons, not {m.size}"
            if a.kv_heads < 1 or a.heads % a.kv_heads:
                return f"layer {layer.index}: {a.heads} query heads do not split evenly over {a.kv_heads} kv groups"
            want = {(a.q, 0): a.heads, (a.q_bias, 0): a.heads, (a.o, 1): a.heads,
                    (a.k, 0): a.kv_heads, (a.v, 0): a.kv_heads, (a.k_bias, 0): a.kv_heads, (a.v_bias, 0): a.kv_heads}
            for (name, dim), count in want.items():
                if name is not None and size(name, dim) != count * a.head_dim:
                    return (f"layer {layer.index}: {name} has {size(name, dim)} rows/columns along dim {dim}, "
                            f"not {count} heads x {a.head_dim}")
            counts = {"head": a.heads, "kv": a.kv_heads, "rep": a.heads // a.kv_heads, "hd": a.head_dim}
            for c in a.shape_consts:
                value, expected = nodes[c.node].args[1][c.index], 1
                for role in c.roles:
                    expected *= counts[role]
                if value != expected:
                    return f"layer {layer.index}: shape constant {c.node}[{c.index}] is {value}, not {'*'.join(c.roles)} = {expected}"
        return None

    def mismatch(self, fresh: "Structure", program: Program) -> Optional[str]:
        """Compare this (resized) structure with `fresh` rediscovery of the same graph; None if
        they agree. Groups and sizes must be equal. Shape constants are compared by value: a
        constant whose count became 1 (or equal to another) is ambiguous to rediscovery, which
        then finds fewer or coarser roles, so each rediscovered constant must be one we track,
        and every tracked constant must hold the product of the current counts of its roles."""
        def strip(text):
            return [line for line in text.splitlines() if "shape const" not in line]

        if strip(self.describe()) != strip(fresh.describe()):
            return "groups or sizes differ"
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for mine, theirs in zip(self.layers, fresh.layers):
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

    def describe(self) -> str:
        """Stable text form (golden snapshots)."""
        h = self.hidden
        lines = [f"hidden size={h.size} embedding={h.embedding} head={h.head}"]
        lines += [f"  couple {n}[{d}]" for n, d in sorted(h.members)]
        lines.append(f"  norm outputs: {len(h.norm_outputs)}")
        for layer in self.layers:
            a, m = layer.attn, layer.mlp
            lines.append(f"layer {layer.index} prefix={layer.prefix}")
            lines.append(f"  norms {', '.join(layer.norms)}")
            lines.append(
                f"  attn heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} "
                f"q={a.q} k={a.k} v={a.v} o={a.o} biases={[b for b in (a.q_bias, a.k_bias, a.v_bias, a.o_bias) if b]}"
            )
            for c in a.shape_consts:
                lines.append(f"    shape const arg{c.index} roles={'*'.join(c.roles)}")
            lines.append(f"  mlp size={m.size} rows={m.rows} down={m.down} biases={m.row_biases + ([m.down_bias] if m.down_bias else [])}")
        return "\n".join(lines) + "\n"


class _UnionFind:
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


def _shape(node) -> Optional[tuple]:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def _last(node) -> Optional[int]:
    s = _shape(node)
    if not s:
        return None
    return int(s[-1]) if isinstance(s[-1], int) else None


def _describe_node(node: torch.fx.Node) -> str:
    return f"{node.name} ({node.op} {getattr(node.target, '__name__', node.target)})"


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
    prefix = program.prefix
    uf = _UnionFind()
    label: dict[torch.fx.Node, object] = {}
    param_of: dict[torch.fx.Node, str] = {}
    linears: list[tuple[torch.fx.Node, str, Optional[str]]] = []
    embed_node = None
    fresh = 0

    def new_label(node):
        nonlocal fresh
        fresh += 1
        return ("opaque", node.name, fresh)

    for node in gm.graph.nodes:
        if node.op == "get_attr":
            if isinstance(node.target, str) and node.target.startswith(prefix):
                name = node.target[len(prefix):]
                param_of[node] = name
                shape = _shape(node) or tuple(program.param(name).shape)
                label[node] = (name, len(shape) - 1)
            continue
        if node.op != "call_function" or node.target in IGNORED:
            if node.op in ("placeholder", "call_function"):
                label[node] = new_label(node)
            continue
        t = node.target
        tensor_args = [a for a in node.args if isinstance(a, torch.fx.Node) and a in label]
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
                raise PdcError(f"cannot classify node {_describe_node(node)}: linear weight is not a parameter", STAGE)
            wname = param_of[w]
            uf.union(label[x], (wname, 1))
            label[node] = (wname, 0)
            bname = None
            if isinstance(b, torch.fx.Node):
                bname = param_of.get(b)
                if bname is None:
                    raise PdcError(f"cannot classify node {_describe_node(node)}: bias is not a parameter", STAGE)
                uf.union((bname, 0), (wname, 0))
            linears.append((node, wname, bname))
        elif t in PASSTHROUGH and tensor_args:
            label[node] = label[tensor_args[0]]
        elif t in ELEMENTWISE and tensor_args:
            out = _last(node)
            full = [a for a in tensor_args if _last(a) == out and out not in (None, 1)]
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
    hidden_root = uf.find((embed_name, 1))

    def in_hidden(node) -> bool:
        return node in label and uf.find(label[node]) == hidden_root

    # Every op that reads the hidden channels must be one whose coupling we understand.
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in IGNORED:
            continue
        known = node.target in PASSTHROUGH or node.target in ELEMENTWISE or node.target in (
            aten.linear.default, aten.embedding.default)
        if known:
            continue
        for a in node.args:
            if isinstance(a, torch.fx.Node) and in_hidden(a):
                if node.target in REDUCTIONS and _last(node) == 1:
                    continue
                raise PdcError(
                    f"cannot classify node {_describe_node(node)}: it reads the hidden channels "
                    f"through an op pdc does not know how to slice", STAGE)

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    readers = [(n, w, b) for n, w, b in linears if uf.find((w, 1)) == hidden_root]
    writers = [(n, w, b) for n, w, b in linears if uf.find((w, 0)) == hidden_root]
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    head_linear = None
    for n, w, b in readers:
        if any(u is output_node for u in n.users) or _feeds_output_only(n, output_node):
            head_linear = (n, w, b)
    if head_linear is None:
        raise PdcError("cannot find the output head: no linear on the hidden channels reaches the graph output", STAGE)
    hidden_size = int(program.param(embed_name).shape[1])

    layers: list[LayerBlock] = []
    attn_pending: Optional[tuple] = None
    used: set[str] = {embed_name, head_linear[1]}
    for n, w, b in sorted(writers, key=lambda e: order[e[0]]):
        x = n.args[0]
        x_root = uf.find(label[x])
        residual_add = next((u for u in n.users if u.target in (aten.add.Tensor, operator.add)), None)
        if residual_add is None:
            raise PdcError(f"cannot classify node {_describe_node(n)}: writes the hidden channels without a residual add", STAGE)
        stream_in = next(a for a in residual_add.args if isinstance(a, torch.fx.Node) and a is not n)
        row_readers = [(rn, rw, rb) for rn, rw, rb in readers if uf.find((rw, 0)) == x_root]
        if row_readers:  # an MLP: its input class holds gate/up rows
            if attn_pending is None:
                raise PdcError(f"cannot classify node {_describe_node(n)}: MLP without a preceding attention block", STAGE)
            mlp = MlpGroup(
                rows=[rw for _, rw, _ in row_readers], row_biases=[rb for _, _, rb in row_readers if rb],
                down=w, down_bias=b, size=int(program.param(w).shape[1]), down_input=x.name,
            )
            attn, attn_in, attn_params = attn_pending
            attn_pending = None
            params = attn_params + mlp.rows + mlp.row_biases + [mlp.down] + ([b] if b else [])
            norms = _norms_between(gm, order, attn_in, residual_add, param_of, uf, hidden_root, program)
            params += norms
            used.update(params)
            layers.append(LayerBlock(
                index=len(layers), prefix=_common_prefix(params), input=attn_in.name,
                output=residual_add.name, attn=attn, mlp=mlp, norms=norms, params=params,
            ))
        else:
            attn = _attention(program, n, w, b, readers, order, param_of, label)
            params = [p for p in (attn.q, attn.k, attn.v, attn.o, attn.q_bias, attn.k_bias, attn.v_bias, attn.o_bias) if p]
            attn_pending = (attn, stream_in, params)
    if attn_pending is not None:
        raise PdcError(f"cannot classify node {attn_pending[1].name}: attention block without an MLP", STAGE)

    members = sorted({e for e in uf.parent if isinstance(e, tuple) and len(e) == 2
                      and isinstance(e[0], str) and uf.find(e) == hidden_root and e[0] in set(param_of.values())})
    norm_outputs = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.mul.Tensor, operator.mul):
            if any(a in param_of and program.param(param_of[a]).dim() == 1 and in_hidden(a) for a in node.args if isinstance(a, torch.fx.Node)):
                norm_outputs.append(node.name)
    final_norms = [param_of[a] for a in param_of if a.users and program.param(param_of[a]).dim() == 1
                   and in_hidden(a) and param_of[a] not in used]
    used.update(final_norms)
    for node, name in param_of.items():
        if not node.users or name in used or not isinstance(program.param(name), torch.nn.Parameter):
            continue
        raise PdcError(f"cannot classify node {_describe_node(node)}: parameter {name} is in no prunable group", STAGE)
    hidden = HiddenGroup(size=hidden_size, members=members, norm_outputs=norm_outputs,
                         embedding=embed_name, head=head_linear[1])
    return Structure(hidden=hidden, layers=layers)


def _feeds_output_only(node, output_node) -> bool:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u is output_node:
                return True
            if u.target in PASSTHROUGH or u.target in IGNORED or u.target in (aten.alias.default,):
                if u not in seen:
                    seen.add(u)
                    stack.append(u)
    return False


def _norms_between(gm, order, start, end, param_of, uf, root, program) -> list[str]:
    lo, hi = order[start], order[end]
    out = []
    for node in gm.graph.nodes:
        if lo <= order[node] <= hi and node.op == "call_function":
            for a in node.args:
                if a in param_of and program.param(param_of[a]).dim() == 1 and uf.find((param_of[a], 0)) == root:
                    out.append(param_of[a])
    return list(dict.fromkeys(out))


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    common = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        common.append(segs[0])
    return ".".join(common) + "." if common else ""


def _linear_ancestors(start: torch.fx.Node, linear_nodes: set) -> set:
    """Linear nodes reached walking backwards from `start`, not walking past a linear."""
    seen, found, stack = set(), set(), [start]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a in seen:
                continue
            seen.add(a)
            if a in linear_nodes:
                found.add(a)
            else:
                stack.append(a)
    return found


def _attention(program, o_node, o_w, o_b, readers, order, param_of, label) -> AttentionGroup:
    reader_nodes = {n: (w, b) for n, w, b in readers}
    o_in = o_node.args[0]
    qkv = _linear_ancestors(o_in, set(reader_nodes))
    if len(qkv) != 3:
        raise PdcError(f"cannot classify node {_describe_node(o_node)}: expected q/k/v projections, found {len(qkv)}", STAGE)
    q_in, k_in, v_in = _attention_operands(o_node, o_in, qkv, order)
    v = _linear_ancestors(v_in, set(qkv))
    q = _linear_ancestors(q_in, set(qkv))
    k = _linear_ancestors(k_in, set(qkv))
    if len(v) != 1 or len(q) != 1 or len(k) != 1:
        raise PdcError(f"cannot classify node {_describe_node(o_node)}: q/k/v roles are ambiguous", STAGE)
    (qn,), (kn,), (vn,) = q, k, v
    head_dim = _head_dim(qn)
    q_out = int(program.param(reader_nodes[qn][0]).shape[0])
    kv_out = int(program.param(reader_nodes[kn][0]).shape[0])
    heads, kv_heads = q_out // head_dim, kv_out // head_dim
    attn = AttentionGroup(
        q=reader_nodes[qn][0], k=reader_nodes[kn][0], v=reader_nodes[vn][0], o=o_w,
        q_bias=reader_nodes[qn][1], k_bias=reader_nodes[kn][1], v_bias=reader_nodes[vn][1], o_bias=o_b,
        heads=heads, kv_heads=kv_heads, head_dim=head_dim, o_input=o_in.name,
    )
    attn.shape_consts = _shape_consts(qn, kn, vn, o_in, heads, kv_heads, head_dim)
    return attn


def _attention_operands(o_node, o_in, qkv: set, order: dict) -> tuple:
    """The nodes that enter the attention core as query, key and value."""
    region = _ancestors(o_in, stop=set(qkv))
    cores = sorted((n for n in region if n.target is SDPA), key=lambda n: order[n])
    if len(cores) == 1:
        return tuple(cores[0].args[:3])
    if cores:
        raise PdcError(f"cannot classify node {_describe_node(o_node)}: {len(cores)} attention cores feed it", STAGE)
    # Explicit matmuls: the last one before o is probs @ V, the one before the softmax Q @ K^T.
    matmuls = sorted((n for n in region if n.target in MATMULS), key=lambda n: order[n])
    if len(matmuls) < 2:
        raise PdcError(f"cannot classify node {_describe_node(o_node)}: attention without "
                       "scaled_dot_product_attention or two matmuls", STAGE)
    qk, av = matmuls[-2], matmuls[-1]
    return qk.args[0], qk.args[1], av.args[1]


def _ancestors(start, stop: set) -> list:
    seen, stack = set(), [start]
    while stack:
        n = stack.pop()
        for a in n.all_input_nodes:
            if a not in seen and a not in stop:
                seen.add(a)
                stack.append(a)
    return list(seen) + [start]


def _head_dim(q_linear: torch.fx.Node) -> int:
    for u in q_linear.users:
        if u.target in SHAPE_OPS:
            shape = _shape(u)
            if shape and isinstance(shape[-1], int):
                return int(shape[-1])
    raise PdcError(f"cannot classify node {_describe_node(q_linear)}: its output is never split into heads", STAGE)


def _atoms(roles_dim, sizes):
    """Expand one dim's roles into (role, size) atoms."""
    return [(r, sizes.get(r)) for r in roles_dim]


def _shape_consts(qn, kn, vn, o_in, heads, kv_heads, head_dim) -> list[ShapeConst]:
    """Propagate per-dimension roles from q/k/v outputs to the output projection's input and
    collect the explicit head-related integers in size lists along the way."""
    sizes = {"head": heads, "kv": kv_heads, "rep": heads // max(1, kv_heads), "hd": head_dim}
    region = set(_ancestors(o_in, stop={qn, kn, vn}))
    roles: dict = {}

    def base(node, flat):
        shape = _shape(node)
        return [(f"x{i}",) for i in range(len(shape) - 1)] + [flat]

    roles[qn] = base(qn, ("head", "hd"))
    roles[kn] = base(kn, ("kv", "hd"))
    roles[vn] = base(vn, ("kv", "hd"))
    consts: list[ShapeConst] = []
    graph_nodes = list(qn.graph.nodes)
    for node in graph_nodes:
        if node not in region or node in roles or node.op != "call_function":
            continue
        ins = [a for a in node.all_input_nodes if a in roles]
        shape = _shape(node)
        if not ins or shape is None:
            continue
        src = roles[ins[0]]
        t = node.target
        if t in (aten.view.default, aten.reshape.default, aten._unsafe_view.default):
            out = _regroup(src, _shape(ins[0]), shape, sizes)
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
                raise PdcError(f"cannot classify node {_describe_node(node)}: attention operands are not "
                               "derived from the q/v projections", STAGE)
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


def _regroup(src_roles, src_shape, out_shape, sizes):
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
