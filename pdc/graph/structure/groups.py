"""The prunable groups discovery finds: spans of projection rows (`Span`), attention with its
heads and shape constants, dense MLPs, mixtures of experts, decoder layers and the hidden
channels. Plain data; `decoder.Structure` holds them for one program."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch


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
