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

4. Mixtures of experts: a per-expert projection `squeeze(bmm(index(W, [ids]), unsqueeze(x, -1)))`
   with W [experts, out, in] couples like a linear; the expert ids come from a `topk` over a
   router linear; the layer's MLP is then a `MoeGroup` (router, top-k, stacked gate|up and down,
   per-expert neuron spans along dim 1, an optional shared expert). Views that flatten the
   tokens (`[..., hidden]`) keep the channels in place and their trailing size is recorded.

Invariant: every parameter the graph reads belongs to exactly one group (the hidden group, one
MLP or mixture-of-experts group, one attention group); otherwise `discover` raises `PdcError`
naming the node.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.fx

from pdc.errors import PdcError, one_line
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
RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
MATMULS = {aten.matmul.default, aten.bmm.default}
SDPA = aten.scaled_dot_product_attention.default  # (query, key, value, attn_mask, ...)
LAYER_NORM = aten.layer_norm.default  # (x, normalized_shape, weight, bias, eps)


@dataclass
class ShapeConst:
    """An integer in a size list of `node` (argument 1, position `index`) whose value is the
    product of the current counts of `roles` (e.g. ("kv", "rep") = query heads)."""

    node: str
    index: int
    roles: tuple[str, ...]


@dataclass
class Span:
    """The rows of weight `param` (and of `bias`, when its linear has one) that one role reads:
    unit u (a head, or an MLP neuron) owns rows `offset + u * stride + d` for d < `block`. A
    separate projection is one span with offset 0 and stride = block; a fused one (q|k|v or
    gate|up stacked in one weight, or heads interleaved as [q k v] per head) is several spans of
    one weight. `path` lists the nodes from the linear to where the unit axis appears (the head
    split, or the down projection's input); `axis` is that axis there. Rows are found, and
    re-found after every slice, by running those nodes on a tensor of row numbers."""

    param: str
    bias: Optional[str]
    offset: int
    stride: int
    block: int
    units: int
    path: list[str] = field(default_factory=list)
    axis: int = -1

    def rows(self, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Row ids of units `keep` (default all), unit-major: [len(keep) * block]."""
        units = torch.arange(self.units) if keep is None else torch.as_tensor(keep, dtype=torch.long)
        return (self.offset + units[:, None] * self.stride + torch.arange(self.block)[None, :]).reshape(-1)

    def describe(self) -> str:
        return f"{self.param}[{self.offset}+u*{self.stride}, {self.units}x{self.block}]"


@dataclass
class AttentionGroup:
    q: Span
    k: Span
    v: Span
    o: str
    o_bias: Optional[str]
    heads: int
    kv_heads: int
    head_dim: int
    o_input: str  # node feeding the output projection: [B, L, heads*head_dim]
    shape_consts: list[ShapeConst] = field(default_factory=list)
    row_norms: dict[str, str] = field(default_factory=dict)  # norm over a projection's rows -> that weight
    head_norms: list[str] = field(default_factory=list)  # norms over head_dim, shared by all heads

    def params(self) -> list[str]:
        spans = [self.q, self.k, self.v]
        names = [n for s in spans for n in (s.param, s.bias)] + [self.o, self.o_bias]
        names += list(self.row_norms) + self.head_norms
        return list(dict.fromkeys(n for n in names if n))

    def projections(self) -> list[str]:
        """The weights of the linears the attention multiplies (LoRA targets)."""
        return list(dict.fromkeys([self.q.param, self.k.param, self.v.param, self.o]))


@dataclass
class MlpGroup:
    spans: list[Span]  # rows that are the neurons (gate, up; or one fused gate|up weight)
    down: str
    down_bias: Optional[str]
    size: int
    down_input: str  # node feeding the down projection: [B, L, mlp]

    @property
    def rows(self) -> list[str]:
        return list(dict.fromkeys(s.param for s in self.spans))

    @property
    def row_biases(self) -> list[str]:
        return list(dict.fromkeys(s.bias for s in self.spans if s.bias))

    def params(self) -> list[str]:
        return self.rows + self.row_biases + [self.down] + ([self.down_bias] if self.down_bias else [])


@dataclass
class MoeGroup:
    """A mixture of experts: a router scores the experts per token, the top_k of them run and
    their outputs are summed weighted by the routing weights. Found from the graph: an expert
    projection is a weight [experts, out, in] indexed by the chosen expert ids and multiplied
    per (token, slot) pair (`index` + `bmm`); the ids come from a `topk` over the router's
    output; the router is the linear on the hidden channels before it. `spans` are the expert
    neurons' rows along dim 1 of the gate|up weight (the same layout in every expert);
    `down` [experts, hidden, size] reads them through its last dim. `shared` is an expert every
    token runs (a dense MLP beside the routed ones), `shared_gate` its [1, hidden] gate."""

    router: str  # [experts, hidden]
    router_bias: Optional[str]
    top_k: int
    experts: int
    spans: list[Span]
    down: str
    size: int  # neurons per expert
    down_input: str  # node [tokens * top_k, size]: every (token, slot)'s expert neurons
    expert_ids: str  # node [tokens * top_k]: the expert of each (token, slot)
    weights: str  # node [tokens * top_k]: the routing weight of each (token, slot)
    weighted_output: str  # node [tokens * top_k, hidden]: routing weight x expert output
    shared: Optional["MlpGroup"] = None
    shared_gate: Optional[str] = None

    @property
    def rows(self) -> list[str]:
        return list(dict.fromkeys(s.param for s in self.spans))

    def params(self) -> list[str]:
        names = [self.router, self.router_bias, *self.rows, self.down, self.shared_gate]
        names += self.shared.params() if self.shared else []
        return list(dict.fromkeys(n for n in names if n))


@dataclass
class LayerBlock:
    """One decoder layer. Dropping it = redirect the users of `output` to `input`. A layer has a
    dense MLP (`mlp`) or a mixture of experts (`moe`), never both."""

    index: int
    prefix: str  # common HF-name prefix of its parameters, e.g. "model.layers.3."
    input: str  # residual-stream node entering the layer
    output: str  # residual-stream node leaving it (the last residual add of the layer)
    attn: AttentionGroup
    mlp: Optional[MlpGroup]
    norms: list[str]  # norm weights/biases on the hidden channels (pre-, post- or parallel)
    params: list[str]
    parallel: bool = False  # attention and MLP read the same stream and add in one update
    moe: Optional[MoeGroup] = None

    def mlps(self) -> list[MlpGroup]:
        """The dense MLPs of the layer: its MLP, or its mixture's shared expert."""
        return [m for m in (self.mlp, self.moe.shared if self.moe else None) if m is not None]


@dataclass
class HiddenGroup:
    size: int
    members: list[tuple[str, int]]  # (hf_name, dim) sliced together
    norm_outputs: list[str]  # nodes: output of each norm on the hidden channels
    embedding: str
    head: str  # output projection weight (may equal `embedding` when tied)
    final_norms: list[str] = field(default_factory=list)
    size_args: list[str] = field(default_factory=list)  # layer_norm nodes whose normalized_shape is [size]
    view_args: list[str] = field(default_factory=list)  # view/reshape nodes whose last size is the hidden size


@dataclass
class Structure:
    hidden: HiddenGroup
    layers: list[LayerBlock]

    def spans(self):
        """The spans of 2-D projection weights (rows along dim 0)."""
        for layer in self.layers:
            yield from (layer.attn.q, layer.attn.k, layer.attn.v)
            for m in layer.mlps():
                yield from m.spans

    def projections(self) -> list[str]:
        """Every linear-layer weight of the decoder layers (q/k/v or fused qkv, o, gate/up or
        fused, down; a mixture's shared expert and its gate), in layer order: the modules LoRA
        adapts."""
        out = []
        for layer in self.layers:
            out += layer.attn.projections()
            if layer.moe and layer.moe.shared_gate:
                out.append(layer.moe.shared_gate)
            for m in layer.mlps():
                out += m.rows + [m.down]
        return list(dict.fromkeys(out))

    def expert_parameters(self) -> list[str]:
        """The mixtures' routers and stacked expert weights ([experts, out, in]): parameters of
        modules that are not linear layers, which LoRA adapts as parameters (per expert)."""
        return [n for layer in self.moe_layers() for n in [layer.moe.router, *layer.moe.rows, layer.moe.down]]

    def moe_layers(self) -> list[LayerBlock]:
        return [layer for layer in self.layers if layer.moe is not None]

    def norms(self) -> list[str]:
        """Every norm weight and bias: on the hidden channels (in the layers and the final one)
        and inside attention (q/k norms): what norm-only correction trains."""
        out = []
        for layer in self.layers:
            out += layer.norms + list(layer.attn.row_norms) + layer.attn.head_norms
        out += self.hidden.final_norms
        return list(dict.fromkeys(out))

    def resize(self, program: Program) -> None:
        """Re-read every size from the current parameter shapes and re-find every span's rows
        from the graph (after a pass that sliced parameters and edited constants but kept nodes
        and names: `keeps_topology`). Roles of shape constants do not depend on sizes, so the
        result equals rediscovery on the sliced graph."""
        self.hidden.size = int(program.param(self.hidden.embedding).shape[1])
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for layer in self.layers:
            a = layer.attn
            for m in layer.mlps():
                m.size = int(program.param(m.down).shape[1])
            for span in (a.q, a.k, a.v, *(s for m in layer.mlps() for s in m.spans)):
                retrace(program, nodes, span)
            a.heads, a.kv_heads = a.q.units, a.k.units
            if layer.moe:
                e = layer.moe
                e.experts, e.size = int(program.param(e.router).shape[0]), int(program.param(e.down).shape[2])
                for span in e.spans:
                    retrace(program, nodes, span)

    def check_shapes(self, program: Program) -> Optional[str]:
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

        for name, dim in self.hidden.members:
            if size(name, dim) != self.hidden.size:
                return f"{name} has {size(name, dim)} hidden channels along dim {dim}, not {self.hidden.size}"
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for name in self.hidden.size_args:
            if list(nodes[name].args[1]) != [self.hidden.size]:
                return f"{name} normalizes over {list(nodes[name].args[1])}, not [{self.hidden.size}]"
        for name in self.hidden.view_args:
            if nodes[name].args[1][-1] != self.hidden.size:
                return f"{name} views its input as {list(nodes[name].args[1])}, not [..., {self.hidden.size}]"
        covered: dict[str, list] = {}
        for span in self.spans():
            covered.setdefault(span.param, []).append(span)
        for name, spans in covered.items():
            rows = torch.cat([s.rows() for s in spans]).sort().values
            if not torch.equal(rows, torch.arange(size(name, 0))):
                return f"{name}: its {size(name, 0)} rows are not covered exactly once by {', '.join(s.describe() for s in spans)}"
            for bias in {s.bias for s in spans if s.bias}:
                if size(bias, 0) != size(name, 0):
                    return f"{bias} has {size(bias, 0)} rows, its weight {name} {size(name, 0)}"
        nodes = {n.name: n for n in program.gm.graph.nodes}
        for layer in self.layers:
            a = layer.attn
            for m in layer.mlps():
                for name, units in [(s.param, s.units) for s in m.spans] + [(m.down, size(m.down, 1))]:
                    if units != m.size:
                        return f"layer {layer.index}: {name} has {units} MLP neurons, not {m.size}"
            if layer.moe:
                problem = _check_moe(program, layer.moe)
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
            lines.append(f"layer {layer.index} prefix={layer.prefix}{' parallel' if layer.parallel else ''}")
            lines.append(f"  norms {', '.join(layer.norms)}")
            lines.append(
                f"  attn heads={a.heads} kv_heads={a.kv_heads} head_dim={a.head_dim} "
                f"q={a.q.describe()} k={a.k.describe()} v={a.v.describe()} o={a.o} "
                f"biases={[b for b in (a.q.bias, a.k.bias, a.v.bias, a.o_bias) if b]}"
            )
            if a.row_norms or a.head_norms:
                lines.append(f"  attn norms rows={sorted(a.row_norms)} per-head={a.head_norms}")
            for c in a.shape_consts:
                lines.append(f"    shape const arg{c.index} roles={'*'.join(c.roles)}")
            if m is not None:
                lines.append(f"  mlp size={m.size} rows={[s.describe() for s in m.spans]} down={m.down} "
                             f"biases={m.row_biases + ([m.down_bias] if m.down_bias else [])}")
            if layer.moe:
                e = layer.moe
                lines.append(f"  moe experts={e.experts} top_k={e.top_k} size={e.size} router={e.router} "
                             f"rows={[s.describe() for s in e.spans]} down={e.down}")
                if e.shared:
                    lines.append(f"  shared expert size={e.shared.size} rows={[s.describe() for s in e.shared.spans]} "
                                 f"down={e.shared.down} gate={e.shared_gate}")
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


def _same_shape(a, b) -> bool:
    """Equal shapes, symbolic sizes compared by name (no symbolic guard is evaluated)."""
    sa, sb = _shape(a), _shape(b)
    return sa is not None and sb is not None and tuple(map(str, sa)) == tuple(map(str, sb))


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


def module_path(node: torch.fx.Node) -> str:
    """The Hugging Face module a node was traced from (`model.layers.3.self_attn.q_norm`), from
    export's `nn_module_stack`; '' when unknown."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    path = path[2:] if path.startswith("m.") else path
    return "" if path == "m" else path


def _fail(node: torch.fx.Node, why: str) -> PdcError:
    where = module_path(node)
    return PdcError(f"cannot classify node {_describe_node(node)}{f' from {where}' if where else ''}: {why}", STAGE)


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

    experts = _expert_linears(gm, prefix)  # squeeze node -> (weight, input node, ids node, inner nodes)
    inner = {n for e in experts.values() for n in e[3]}
    carried: set = set()  # nodes that keep their input's channels in the last dim (read as known)

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
        if node in experts:  # a per-expert projection: couples like a linear with weight [E, out, in]
            wname, x, _, _ = experts[node]
            uf.union(label[x], (wname, 2))
            label[node] = (wname, 1)
            continue
        if node in inner:
            label[node] = new_label(node)
            continue
        if tensor_args and node.args[0] in label and node.args[0] not in param_of and _keeps_last_dim(node):
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
                raise _fail(node, "linear weight is not a parameter")
            wname = param_of[w]
            uf.union(label[x], (wname, 1))
            label[node] = (wname, 0)
            bname = None
            if isinstance(b, torch.fx.Node):
                bname = param_of.get(b)
                if bname is None:
                    raise _fail(node, "bias is not a parameter")
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
    hidden_size = int(program.param(embed_name).shape[1])

    def in_hidden(node) -> bool:
        return node in label and uf.find(label[node]) == hidden_root

    # Every op that reads the hidden channels must be one whose coupling we understand.
    for node in gm.graph.nodes:
        if node.op != "call_function" or node.target in IGNORED or node in carried or node in inner or node in experts:
            continue
        known = node.target in PASSTHROUGH or node.target in ELEMENTWISE or node.target in (
            aten.linear.default, aten.embedding.default, LAYER_NORM)
        if known:
            continue
        for a in node.args:
            if isinstance(a, torch.fx.Node) and in_hidden(a):
                if node.target in REDUCTIONS and _last(node) == 1:
                    continue
                raise _fail(node, "it reads the hidden channels through an op pdc does not know how to slice")

    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = {n.name: n for n in gm.graph.nodes}
    readers = {n: (w, b) for n, w, b in linears if uf.find((w, 1)) == hidden_root}
    writers = {n: (w, b) for n, w, b in linears if uf.find((w, 0)) == hidden_root}
    readers.update({n: (e[0], None) for n, e in experts.items() if uf.find((e[0], 2)) == hidden_root})
    writers.update({n: (e[0], None) for n, e in experts.items() if uf.find((e[0], 1)) == hidden_root})
    output_node = next(n for n in gm.graph.nodes if n.op == "output")
    head_linear = None
    for n in readers:
        if _feeds_output_only(n, output_node):
            head_linear = n
    if head_linear is None:
        raise PdcError("cannot find the output head: no linear on the hidden channels reaches the graph output", STAGE)
    head_name = readers[head_linear][0]

    # The residual stream: from the embedding, each step is the one full-width add that merges
    # a branch (attention, MLP, or both in parallel) into the stream.
    updates = _residual_updates(embed_node, in_hidden, hidden_size, order)
    stream_nodes = {u[0] for u in updates} | {u[1] for u in updates}
    layers: list[LayerBlock] = []
    used: set[str] = {embed_name, head_name} | ({readers[head_linear][1]} if readers[head_linear][1] else set())
    pending_attn, layer_in = None, None
    for stream_in, merge, branch in updates:
        found = sorted(_linear_ancestors_stop(branch, set(writers), stream_nodes), key=lambda n: order[n])
        if not found:
            raise _fail(merge, "a residual add whose branch has no projection onto the hidden channels")
        expert_nodes = [n for n in found if n in experts]
        attn_nodes = [n for n in found if n not in experts and _has_attention_core(n.args[0], set(readers))]
        mlp_nodes = [n for n in found if n not in attn_nodes and n not in experts]
        if len(expert_nodes) > 1:
            raise _fail(merge, f"{len(expert_nodes)} routed expert outputs merge in one residual add")
        if len(attn_nodes) > 1 or len(mlp_nodes) > 1:
            raise _fail(merge, f"{len(attn_nodes)} attention and {len(mlp_nodes)} MLP outputs merge in one residual add")
        if attn_nodes:
            if pending_attn is not None:
                raise _fail(attn_nodes[0], "attention block without an MLP before the next attention")
            pending_attn, layer_in = _attention(program, attn_nodes[0], writers[attn_nodes[0]], readers, order,
                                                param_of, uf, nodes), stream_in
        if mlp_nodes or expert_nodes:
            if pending_attn is None:
                raise _fail((expert_nodes or mlp_nodes)[0], "MLP without a preceding attention block")
            moe, mlp = None, None
            if expert_nodes:
                moe = _moe(program, expert_nodes[0], experts, mlp_nodes, readers, writers, nodes)
            else:
                mlp = _mlp(program, mlp_nodes[0], writers[mlp_nodes[0]], readers, nodes)
            attn, pending_attn = pending_attn, None
            params = attn.params() + (moe.params() if moe else mlp.params())
            norms = [n for n in _norms_between(gm, order, layer_in, merge, param_of, uf, hidden_root, program)
                     if n not in params]
            params += norms
            used.update(params)
            layers.append(LayerBlock(
                index=len(layers), prefix=_common_prefix(params), input=layer_in.name, output=merge.name,
                attn=attn, mlp=mlp, norms=norms, params=params, parallel=bool(attn_nodes), moe=moe,
            ))
    if pending_attn is not None:
        raise PdcError(f"cannot classify the attention at {pending_attn.o}: attention block without an MLP", STAGE)
    if not layers:
        raise PdcError("cannot find any decoder layer (attention + MLP merged into the residual stream)", STAGE)

    members = sorted({e for e in uf.parent if isinstance(e, tuple) and len(e) == 2
                      and isinstance(e[0], str) and uf.find(e) == hidden_root and e[0] in set(param_of.values())})
    norm_outputs, size_args, view_args = [], [], []
    for node in gm.graph.nodes:
        if node.op != "call_function" or not in_hidden(node):
            continue
        if node.target in RESHAPES and node.args[1][-1] == hidden_size:
            view_args.append(node.name)  # [..., hidden]: flattening tokens in front of a mixture of experts
        if node.target is LAYER_NORM:
            if list(node.args[1]) != [hidden_size]:
                raise _fail(node, f"a layer norm over {list(node.args[1])} on the hidden channels")
            size_args.append(node.name)
            if any(isinstance(a, torch.fx.Node) and a in param_of for a in node.args[2:4]):
                norm_outputs.append(node.name)
        elif node.target in (aten.mul.Tensor, operator.mul) and _last(node) == hidden_size and any(
                isinstance(a, torch.fx.Node) and len(_shape(a) or ()) == 1 and _last(a) == hidden_size and in_hidden(a) and _from_param(a, param_of)
                for a in node.args):
            norm_outputs.append(node.name)
    final_norms = [param_of[a] for a in param_of if a.users and program.param(param_of[a]).dim() == 1
                   and in_hidden(a) and param_of[a] not in used]
    used.update(final_norms)
    for node, name in param_of.items():
        if not node.users or name in used or not isinstance(program.param(name), torch.nn.Parameter):
            continue
        user = next(iter(node.users))
        raise _fail(user, f"parameter {name} is in no prunable group (not a projection, a norm on the hidden "
                          "channels or a norm inside attention that pdc can slice)")
    hidden = HiddenGroup(size=hidden_size, members=members, norm_outputs=norm_outputs,
                         embedding=embed_name, head=head_name, final_norms=final_norms, size_args=size_args,
                         view_args=view_args)
    return Structure(hidden=hidden, layers=layers)


def _from_param(node: torch.fx.Node, param_of: dict) -> bool:
    """`node` is a parameter, or computed from one parameter by casts and scalar arithmetic
    (Gemma's `1 + weight`)."""
    while node not in param_of:
        inputs = node.all_input_nodes
        if node.op != "call_function" or len(inputs) != 1:
            return False
        node = inputs[0]
    return True


def _is_scalar_like(node) -> bool:
    shape = _shape(node)
    return shape is not None and all(isinstance(d, int) and d == 1 for d in shape)


def _stream_aliases(node: torch.fx.Node) -> list:
    """`node` and the nodes computing the same stream value up to casts, dropout and scaling by
    scalars (Granite's multipliers, Gemma's embedding scale)."""
    out, stack = [node], [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u.op != "call_function" or u in out or not _same_shape(u, n):
                continue
            if all(a is n or _is_scalar_like(a) for a in u.all_input_nodes) and u.target not in REDUCTIONS:
                out.append(u)
                stack.append(u)
    return out


def _residual_updates(embed_node, in_hidden, hidden_size: int, order: dict) -> list:
    """[(stream before, merging add, branch operand)] along the residual stream, in order. The
    stream before an add is the alias the add reads: after Gemma's embedding scale, not before,
    so a layer skipped by reading its input still sees the scaled embedding."""
    updates, current = [], embed_node
    while True:
        adds = []
        for alias in _stream_aliases(current):
            for u in alias.users:
                if u.target not in (aten.add.Tensor, operator.add) or not in_hidden(u) or _last(u) != hidden_size:
                    continue
                others = [a for a in u.args if isinstance(a, torch.fx.Node) and a is not alias]
                if len(others) == 1 and _same_shape(others[0], u):
                    adds.append((u, others[0], alias))
        adds = list(dict.fromkeys(adds))
        if not adds:
            return updates
        if len(adds) > 1:
            raise _fail(adds[0][0], f"the residual stream {current.name} feeds {len(adds)} residual adds")
        merge, branch, stream = adds[0]
        updates.append((stream, merge, branch))
        current = merge


def _linear_ancestors_stop(start, linear_nodes: set, stop: set) -> set:
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


def _has_attention_core(start, readers: set) -> bool:
    region = _ancestors(start, stop=readers)
    return any(n.target is SDPA or n.target in MATMULS for n in region)


def _feeds_output_only(node, output_node) -> bool:
    """`node` reaches the graph output through ops with no other tensor input (casts, logit
    scaling and soft-capping by constants)."""
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        for u in n.users:
            if u is output_node:
                return True
            if u.op == "call_function" and u not in seen and all(
                    a is n or _is_scalar_like(a) for a in u.all_input_nodes) and _same_shape(u, n):
                seen.add(u)
                stack.append(u)
    return False


def _norms_between(gm, order, start, end, param_of, uf, root, program) -> list[str]:
    lo, hi = order[start], order[end]
    out = []
    for node in gm.graph.nodes:
        if lo <= order[node] <= hi and node.op == "call_function":
            for a in node.all_input_nodes:
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


def _path_back(target: torch.fx.Node, sources: set) -> list:
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


# ---- rows of a projection, by running its path on row numbers ---------------------------
# Ops run on the row-number tensor as they are (batch and sequence are 1 there).
FOLLOW = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.transpose.int,
          aten.permute.default, aten.unsqueeze.default, aten.squeeze.dim, aten.slice.Tensor, aten.split.Tensor,
          aten.split_with_sizes.default, aten.chunk.default, aten.expand.default, aten.select.int}


def _concrete(value, prev, x):
    if value is prev:
        return x
    if isinstance(value, torch.fx.Node):
        if value.target is aten.sym_size.int or isinstance(value.meta.get("val"), torch.SymInt):
            return 1  # batch and sequence
        raise ValueError(f"it depends on {value.name}")
    if isinstance(value, (list, tuple)):
        return type(value)(_concrete(v, prev, x) for v in value)
    return value


def _run_path(program: Program, nodes: dict, path: list[str], rows: int):
    """Run the path's ops on row numbers: [(node, input, output)] per step after the linear."""
    first = nodes[path[0]]
    shape = [d if isinstance(d, int) else 1 for d in (_shape(first) or (1, 1, rows))]
    shape[-1] = rows
    x = torch.arange(rows).reshape(shape)
    steps, prev = [], first
    for name in path[1:]:
        node = nodes[name]
        if node.target is operator.getitem:
            y = x[node.args[1]]
        elif node.target in FOLLOW:
            try:
                y = node.target(*_concrete(node.args, prev, x), **_concrete(node.kwargs, prev, x))
            except Exception as exc:
                raise _fail(node, f"cannot follow the rows of {path[0]} through it: {one_line(exc)}") from None
        elif isinstance(x, torch.Tensor) and _same_shape(node, prev):
            y = x  # elementwise, casts, norms: rows stay where they are
        else:
            raise _fail(node, f"cannot follow the rows of {path[0]} through it (it changes the shape)")
        steps.append((node, x, y))
        x, prev = y, node
    return steps, x


def _span_of(program, nodes, path, axis, param, bias, block, what) -> Span:
    """The span of `param` read along `path`, whose end holds units along `axis` and `block`
    contiguous elements in its last dim (block 1: one element per unit)."""
    rows = int(program.param(param).shape[-2])  # output rows: dim 0 of a linear, dim 1 of an expert weight
    _, x = _run_path(program, nodes, path, rows)
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
        raise _fail(end, f"the {what} rows of {param} are not laid out as evenly strided blocks")
    return Span(param=param, bias=bias, offset=offset, stride=stride, block=block, units=units, path=list(path),
                axis=axis)


def retrace(program: Program, nodes: dict, span: Span) -> None:
    """Re-find `span`'s rows after its weight and the constants on its path were sliced."""
    fresh = _span_of(program, nodes, span.path, span.axis, span.param, span.bias, span.block, "")
    span.offset, span.stride, span.units = fresh.offset, fresh.stride, fresh.units


def row_constants(program: Program, span: Span, kept: torch.Tensor) -> dict:
    """New size arguments for the nodes on `span`'s path once its weight keeps rows `kept`
    (a bool mask over the current rows): {node name: new args}. Slices and splits count the
    kept rows before each bound; view/reshape/expand sizes count the kept positions per dim."""
    nodes = {n.name: n for n in program.gm.graph.nodes}
    steps, _ = _run_path(program, nodes, span.path, int(kept.numel()))
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
                    raise _fail(node, f"a split into equal chunks would keep {counts} rows per chunk")
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


def _attention(program, o_node, o_wb, readers, order, param_of, uf, nodes) -> AttentionGroup:
    o_w, o_b = o_wb
    o_in = o_node.args[0]
    reader_set = set(readers)
    projections = _linear_ancestors_stop(o_in, reader_set, set())
    if not 1 <= len(projections) <= 3:
        raise _fail(o_node, f"expected the q/k/v projections before it, found {len(projections)} linears")
    operands = _attention_operands(o_node, o_in, projections, order)
    head_dim = _last(operands[0])
    if head_dim is None:
        raise _fail(operands[0], "the query's head size is not a constant")
    spans, splits = [], []
    for what, operand in zip(("query", "key", "value"), operands):
        path = _path_back(operand, projections)
        if not path:
            raise _fail(operand, f"the attention {what} is not computed from a projection")
        split, axis = _head_split(path, head_dim)
        path = path[:path.index(split) + 1]
        w, b = readers[path[0]]
        spans.append(_span_of(program, nodes, [n.name for n in path], axis, w, b, head_dim, what))
        splits.append((split, axis))
    q, k, v = spans
    attn = AttentionGroup(q=q, k=k, v=v, o=o_w, o_bias=o_b, heads=q.units, kv_heads=k.units, head_dim=head_dim,
                          o_input=o_in.name)
    if v.units != k.units or (k.units and q.units % k.units):
        raise _fail(o_node, f"{q.units} query heads over {k.units} key and {v.units} value heads")
    attn.shape_consts = _shape_consts(splits, o_in, q.units, k.units, head_dim)
    # Norms inside the attention: over a projection's rows (sliced with them) or over head_dim.
    region = _ancestors(o_in, stop=projections)
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
            raise _fail(user, f"parameter {name} inside the attention is neither a norm over a q/k/v "
                              f"projection's rows nor one over head_dim ({head_dim})")
    return attn


def _head_split(path: list, head_dim: int) -> tuple:
    """The first node on `path` (after a view/reshape) whose last dim is head_dim, and its head
    axis: the one other dim of constant size."""
    viewed = False
    for node in path[1:]:
        viewed = viewed or node.target in (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
        shape = _shape(node)
        if viewed and shape and shape[-1] == head_dim:
            axes = [i for i, d in enumerate(shape[:-1]) if isinstance(d, int)]
            if len(axes) != 1:
                raise _fail(node, f"cannot tell the head axis of shape {tuple(shape)}")
            return node, axes[0]
    raise _fail(path[0], "its output is never split into heads")


def _mlp(program, down_node, down_wb, readers, nodes) -> MlpGroup:
    down_w, down_b = down_wb
    x = down_node.args[0]
    sources = _linear_ancestors_stop(x, set(readers), set())
    if not sources:
        raise _fail(down_node, "MLP output projection without an input projection on the hidden channels")
    spans = []
    for src in sorted(sources, key=lambda n: n.name):
        # every way the rows of this projection reach the neurons (gate and up of one fused weight)
        for path in _paths_from(x, src, set(readers)):
            w, b = readers[src]
            spans.append(_span_of(program, nodes, [n.name for n in path], -1, w, b, 1, "MLP"))
    spans.sort(key=lambda s: (s.param, s.offset))
    size = int(program.param(down_w).shape[1])
    bad = [s for s in spans if s.units != size]
    if bad:
        raise _fail(down_node, f"{bad[0].describe()} does not have one row per MLP neuron ({size})")
    return MlpGroup(spans=spans, down=down_w, down_bias=down_b, size=size, down_input=x.name)


def _paths_from(target, source, linears: set) -> list:
    """One path from `source` to `target` per distinct output of a splitting node (getitem index)
    that leads there: a fused gate|up weight reaches the neurons twice."""
    region = set(_ancestors(target, stop=linears)) | {source}
    paths = []
    for branch in _getitem_branches(source, region):
        if branch is None:
            paths.append(_path_back(target, {source}))
        else:
            paths.append(_path_back(branch, {source})[:-1] + _path_back(target, {branch}))
    return paths


def _getitem_branches(source, region) -> list:
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


def _attention_operands(o_node, o_in, qkv: set, order: dict) -> tuple:
    """The nodes that enter the attention core as query, key and value."""
    region = _ancestors(o_in, stop=set(qkv))
    cores = sorted((n for n in region if n.target is SDPA), key=lambda n: order[n])
    if len(cores) == 1:
        return tuple(cores[0].args[:3])
    if cores:
        raise _fail(o_node, f"{len(cores)} attention cores feed it")
    # Explicit matmuls: the last one before o is probs @ V, the one before the softmax Q @ K^T.
    matmuls = sorted((n for n in region if n.target in MATMULS), key=lambda n: order[n])
    if len(matmuls) < 2:
        raise _fail(o_node, "attention without scaled_dot_product_attention or two matmuls")
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


def _shape_consts(splits, o_in, heads, kv_heads, head_dim) -> list[ShapeConst]:
    """Propagate per-dimension roles from the head splits of q, k and v (`splits`: [(node, head
    axis)]) to the output projection's input and collect the explicit head-related integers in
    size lists along the way."""
    sizes = {"head": heads, "kv": kv_heads, "rep": heads // max(1, kv_heads), "hd": head_dim}
    starts = [n for n, _ in splits]
    region = set(_ancestors(o_in, stop=set(starts)))
    roles: dict = {}
    for (node, axis), role in zip(splits, ("head", "kv", "kv")):
        shape = _shape(node)
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
                raise _fail(node, "it splits the attention heads apart (a computation per head, e.g. one "
                                  "norm module per head): pdc cannot slice per-head modules")
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
                raise _fail(node, "cannot follow the head layout from the q/v projections to its operands")
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


# ---- mixtures of experts -------------------------------------------------------------------
def _keeps_last_dim(node: torch.fx.Node) -> bool:
    """Ops that move whole rows and keep each row's channels in place: a view/reshape that
    keeps the last size (tokens flattened), `repeat_interleave` and a reduction over other dims,
    and indexing rows by a tensor of row numbers."""
    t, shape, src = node.target, _shape(node), _shape(node.args[0]) if isinstance(node.args[0], torch.fx.Node) else None
    if not shape or not src or _last(node) is None or _last(node) != _last(node.args[0]):
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


def _expert_linears(gm: torch.fx.GraphModule, prefix: str) -> dict:
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
        if w.op != "get_attr" or not str(w.target).startswith(prefix) or len(index) != 1 or len(_shape(w) or ()) != 3:
            continue
        out[node] = (w.target[len(prefix):], col.args[0], index[0], {sel, col, bmm})
    return out


def _skip_reshapes(node: torch.fx.Node) -> torch.fx.Node:
    while node.target in RESHAPES or node.target in (aten.to.dtype, aten._to_copy.default):
        node = node.args[0]
    return node


def _moe(program, down_node, experts: dict, shared_nodes: list, readers: dict, writers: dict, nodes: dict) -> MoeGroup:
    """The mixture of experts whose down projection is the expert projection `down_node`."""
    down_w, x, ids, _ = experts[down_node]
    sources = _linear_ancestors_stop(x, set(readers), set())
    if not sources or any(src not in experts for src in sources):
        raise _fail(down_node, "the experts' down projection is not fed by per-expert input projections")
    spans = []
    for src in sorted(sources, key=lambda n: n.name):
        if experts[src][2] is not ids:
            raise _fail(src, "its experts are chosen by other expert ids than the down projection's")
        for path in _paths_from(x, src, set(readers)):
            spans.append(_span_of(program, nodes, [n.name for n in path], -1, experts[src][0], None, 1, "expert MLP"))
    spans.sort(key=lambda s: (s.param, s.offset))
    size = int(program.param(down_w).shape[2])
    if any(s.units != size for s in spans):
        raise _fail(down_node, f"{spans[0].describe()} does not have one row per expert neuron ({size})")
    pick = _skip_reshapes(ids)
    topk = pick.args[0] if pick.target is operator.getitem and pick.args[1] == 1 else None
    if topk is None or topk.target is not aten.topk.default:
        raise _fail(down_node, "its expert ids do not come from a top-k over router scores")
    routers = [n for n in _linear_ancestors_stop(topk.args[0], set(readers), set()) if n not in experts]
    n_experts = int(program.param(down_w).shape[0])
    if len(routers) != 1 or int(program.param(readers[routers[0]][0]).shape[0]) != n_experts:
        raise _fail(topk, f"expected one router (a linear with {n_experts} outputs) before the top-k, found {len(routers)}")
    router_w, router_b = readers[routers[0]]
    scaled = [u for u in down_node.users if u.target in (aten.mul.Tensor, operator.mul)]
    if len(scaled) != 1:
        raise _fail(down_node, "the experts' outputs are not scaled by routing weights")
    other = next(a for a in scaled[0].args if isinstance(a, torch.fx.Node) and a is not down_node)
    weights = other.args[0] if other.target is aten.unsqueeze.default else other
    moe = MoeGroup(router=router_w, router_bias=router_b, top_k=int(topk.args[1]), experts=n_experts, spans=spans,
                   down=down_w, size=size, down_input=x.name, expert_ids=ids.name, weights=weights.name,
                   weighted_output=scaled[0].name)
    if len(shared_nodes) == 1:
        shared = shared_nodes[0]
        moe.shared = _mlp(program, shared, writers[shared], readers, nodes)
        for user in shared.users:
            if user.target in (aten.mul.Tensor, operator.mul):
                gate_in = next(a for a in user.args if isinstance(a, torch.fx.Node) and a is not shared)
                gates = [n for n in _linear_ancestors_stop(gate_in, set(readers), set())
                         if int(program.param(readers[n][0]).shape[0]) == 1]
                if len(gates) == 1:
                    moe.shared_gate = readers[gates[0]][0]
    return moe


def _check_moe(program: Program, e: MoeGroup) -> Optional[str]:
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
