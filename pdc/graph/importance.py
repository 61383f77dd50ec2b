"""Importance of hidden channels, MLP neurons, attention heads and kv groups (forward only).

`activation` (Minitron): one pass over the calibration blocks through the exported graph,
recording at the nodes the structure names:
- MLP neuron i of layer l: the input of the down projection, channel i;
- attention head h: the input of the output projection, the L2 norm of head h's head_dim block;
  a kv group scores the sum of its query heads;
- hidden channel c: the output of every norm (all layers and the final one), channel c, summed;
- mixture of experts (per layer): expert e scores by `expert_score`: "mass" (default), the
  routing weight the router gave e summed over the (token, slot) pairs routed to it, or
  "output", the L2 norm of e's weighted output (routing weight x expert output) summed over
  those pairs; both are reported. Neuron i of expert e: the input of e's down projection, channel i, L2 over the
  tokens routed to e (each expert ranks its own neurons). A shared expert's neurons: as a dense
  MLP's.
Per block the values are aggregated over the sequence (`seq_agg`: "mean" of |x|, or "l2" norm),
then over blocks (`batch_agg`: "l2" norm, or "mean"). The output head is never evaluated: the
recorded nodes all come before it, so the pass stops there.

`magnitude`: L2 norm of every weight slice that moves with the unit (no data; a tied
embedding/head matrix counts once).
`random`: uniform scores from `seed` (ablation baseline).

Weights: if the program's parameters are on the meta device, each one is read from
`program.weights` right before the node that uses it and dropped after (peak memory: activations
plus one weight), otherwise the in-memory parameters are used.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pdc.errors import PdcError
from pdc.graph.program import STAGE, Program
from pdc.graph.stream import TapProgram, read_weight
from pdc.graph.structure import structure_of
from pdc.lang.settings import ImportanceConfig


@dataclass
class Importance:
    """Scores per unit; higher = more important. Layer keys are current layer indices."""

    method: str
    hidden: torch.Tensor
    mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    heads: dict[int, torch.Tensor] = field(default_factory=dict)
    kv_heads: dict[int, torch.Tensor] = field(default_factory=dict)
    # mixtures of experts, per layer: the experts' scores by the method's `expert_score`, both
    # activation measures, each expert's neuron scores [experts, neurons], the shared expert's
    experts: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_mass: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_output: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    shared_mlp: dict[int, torch.Tensor] = field(default_factory=dict)
    expert_score: str = ""
    seconds: float = 0.0
    tokens: int = 0
    # with `grams`: second moments sum_t x_t x_t^T (float64) of the inputs of the projections that
    # read pruned units, by ("mlp" | "heads" | "shared_mlp", layer); what reconstruction solves with
    grams: dict = field(default_factory=dict)
    gram_seconds: float = 0.0

    FIELDS = ("mlp", "heads", "kv_heads", "experts", "expert_mass", "expert_output", "expert_mlp", "shared_mlp")

    def to_json(self) -> dict:
        out = {"method": self.method, "hidden": self.hidden.tolist(), "layers": {}}
        if self.experts:
            out["expert_score"] = self.expert_score
        for i in sorted(self.heads):
            out["layers"][str(i)] = {k: getattr(self, k)[i].tolist() for k in self.FIELDS if i in getattr(self, k)}
        return out

    @classmethod
    def from_json(cls, data: dict, tokens: int = 0) -> "Importance":
        """The scores `to_json` wrote (float32 values survive the JSON round trip exactly)."""
        def t(values):
            return torch.tensor(values, dtype=torch.float32)

        layers = {int(i): v for i, v in data["layers"].items()}
        fields = {k: {i: t(v[k]) for i, v in layers.items() if k in v} for k in cls.FIELDS}
        return cls(method=data["method"], hidden=t(data["hidden"]), expert_score=data.get("expert_score", ""),
                   tokens=tokens, **fields)


def compute(program: Program, calib: torch.Tensor, config: ImportanceConfig, batch_size: int = 8,
            progress: bool = False, ranks: tuple[int, int] = (0, 1), grams: bool = False) -> Importance:
    """Scores of every unit. `ranks` = (rank, world): with world > 1 (torch.distributed
    initialized), this rank runs batches rank, rank + world, ... and the sums are all-reduced, so
    every rank returns the scores of the whole calibration set. `grams` (activation only) also
    sums the second moments reconstruction needs, in the same pass (`Importance.grams`)."""
    start = time.perf_counter()
    if grams and config.method != "activation":
        raise PdcError("reconstruction needs activation importance: its statistics come from the calibration pass",
                       STAGE)
    if config.method == "activation":
        imp = _activation(program, calib, config, batch_size, progress, ranks, grams)
        imp.tokens = int(calib.numel())
    elif config.method == "magnitude":
        imp = _magnitude(program)
    elif config.method == "random":
        imp = _random(program, config.seed)
    else:
        raise PdcError(f"unknown importance method {config.method!r}", STAGE)
    imp.seconds = time.perf_counter() - start
    return imp


# ---- activation -------------------------------------------------------------------------
class _Accumulator:
    """Per-unit sums over blocks of the per-block sequence aggregate (or of its square), in
    float64: the sum then hardly depends on its order, so 1 and N ranks rank units alike."""

    def __init__(self, seq_agg: str, batch_agg: str):
        self.seq_agg, self.batch_agg = seq_agg, batch_agg
        self.total = None
        self.count = 0

    def add(self, per_token: torch.Tensor) -> None:
        """per_token: [B, L, U] unit values of any sign; their magnitudes are aggregated.
        (An elementwise op then a plain sum over the sequence: on CPU, 2-4x faster than
        `vector_norm` over that non-innermost dimension, and this runs for every tap.)"""
        per_token = per_token.float()
        if self.seq_agg == "mean":  # mean over the sequence of |x|
            per_block = per_token.abs().sum(1) / per_token.shape[1]
        else:  # l2 norm over the sequence
            per_block = per_token.square().sum(1).sqrt()
        per_block = per_block.double()
        part = per_block.pow(2).sum(0) if self.batch_agg == "l2" else per_block.sum(0)
        self.total = part if self.total is None else self.total + part
        self.count += per_token.shape[0]

    def all_reduce(self, template: torch.Tensor) -> None:
        """Sum this rank's totals with the other ranks' (a rank without blocks adds zeros)."""
        total = self.total if self.total is not None else torch.zeros_like(template)
        both = torch.cat([total, torch.tensor([float(self.count)], dtype=torch.float64)])
        dist.all_reduce(both)
        self.total, self.count = both[:-1], int(both[-1])

    def result(self) -> torch.Tensor:
        total = self.total.sqrt() if self.batch_agg == "l2" else self.total / max(1, self.count)
        return total.float()


def _taps(structure) -> dict[str, tuple]:
    """The nodes activation importance reads: node name -> (kind, layer, head_dim). Each MLP's
    (and shared expert's) down-projection input, each attention's o-projection input, each norm
    output on the hidden channels, and a mixture's expert ids, routing weights, expert MLP inputs
    and weighted outputs."""
    taps: dict[str, tuple] = {}
    for layer in structure.layers:
        if layer.mlp is not None:
            taps[layer.mlp.down_input] = ("mlp", layer.index, 0)
        taps[layer.attn.o_input] = ("heads", layer.index, layer.attn.head_dim)
        if layer.moe is not None:
            e = layer.moe
            for node, kind in ((e.expert_ids, "ids"), (e.weights, "routing"), (e.down_input, "expert_mlp"),
                               (e.weighted_output, "expert_output")):
                taps[node] = (kind, layer.index, 0)
            if e.shared is not None:
                taps[e.shared.down_input] = ("shared_mlp", layer.index, 0)
    for name in structure.hidden.norm_outputs:
        taps[name] = ("hidden", -1, 0)
    return taps


@torch.no_grad()
def _activation(program: Program, calib: torch.Tensor, config: ImportanceConfig, batch_size: int, progress: bool,
                ranks: tuple[int, int], grams: bool = False) -> Importance:
    from tqdm import tqdm

    if calib.dim() != 2 or calib.dtype != torch.long:
        raise PdcError(f"calibration blocks must be a LongTensor [N, L], got {calib.dtype} {tuple(calib.shape)}", STAGE)
    structure = structure_of(program)
    taps = _taps(structure)
    routed = {layer.index: _ExpertAccumulator(layer.moe.experts, layer.moe.size)
              for layer in structure.layers if layer.moe is not None}
    accs = {key: _Accumulator(config.seq_agg, config.batch_agg) for key, (kind, _, _) in taps.items()
            if kind in ("mlp", "heads", "hidden", "shared_mlp")}
    batch_shape: list = [None]
    moments: dict[str, torch.Tensor] = {}  # tap -> float64 sum of x x^T (with `grams`)
    gram_time = [0.0]

    def record(name: str, value: torch.Tensor) -> None:
        kind, index, head_dim = taps[name]
        if grams and kind in ("mlp", "heads", "shared_mlp"):
            t0 = time.perf_counter()
            flat = value.reshape(-1, value.shape[-1]).float()
            part = (flat.T @ flat).double()  # one float32 product per batch, summed in float64
            moments[name] = part if name not in moments else moments[name] + part
            gram_time[0] += time.perf_counter() - t0
        if kind == "heads":
            b, l, width = value.shape
            value = torch.linalg.vector_norm(value.reshape(b, l, width // head_dim, head_dim), dim=-1)
        elif kind in ("ids", "routing", "expert_mlp", "expert_output"):
            routed[index].add(kind, value)
            return
        elif kind == "shared_mlp":  # tokens flattened in front of the mixture: [B * L, neurons]
            value = value.reshape(*batch_shape[0], -1)
        accs[name].add(value)

    tapped = TapProgram(program, set(taps), record)
    rank, world = ranks
    starts = list(range(0, calib.shape[0], batch_size))[rank::world]  # whole batches: as one process runs them
    for start in tqdm(starts, desc="calibration", unit="batch", disable=not progress or rank != 0):
        batch = calib[start:start + batch_size]
        batch_shape[0] = tuple(batch.shape)
        tapped.run(batch)
    if world > 1:
        for name, (kind, index, head_dim) in taps.items():
            if name in accs:
                accs[name].all_reduce(torch.zeros(_tap_width(structure, kind, index, head_dim), dtype=torch.float64))
        for index in sorted(routed):
            routed[index].all_reduce()
        for name, (kind, index, head_dim) in sorted(taps.items()):
            if grams and kind in ("mlp", "heads", "shared_mlp"):  # a rank without batches adds zeros
                width = _tap_width(structure, kind, index, head_dim) * (head_dim if kind == "heads" else 1)
                moments[name] = moments.get(name, torch.zeros(width, width, dtype=torch.float64))
                dist.all_reduce(moments[name])
    hidden = None
    imp = Importance(method="activation", hidden=torch.zeros(0), expert_score=config.expert_score if routed else "")
    for name, (kind, index, _) in taps.items():
        if name not in accs:
            continue
        score = accs[name].result()
        if kind == "hidden":
            hidden = score if hidden is None else hidden + score
        elif kind in ("mlp", "shared_mlp"):
            getattr(imp, kind)[index] = score
        else:
            imp.heads[index] = score
    imp.hidden = hidden
    imp.grams = {(taps[name][0], taps[name][1]): gram for name, gram in moments.items()}
    imp.gram_seconds = gram_time[0]
    for layer in structure.layers:
        imp.kv_heads[layer.index] = _group_sum(imp.heads[layer.index], layer.attn.kv_heads)
    for index, acc in routed.items():
        imp.expert_mass[index], imp.expert_output[index], imp.expert_mlp[index] = acc.result()
        imp.experts[index] = (imp.expert_mass if config.expert_score == "mass" else imp.expert_output)[index]
    return imp


class _ExpertAccumulator:
    """Per-expert float64 sums over the (token, slot) pairs routed to each expert: routing
    weight, norm of the weighted output, squared neuron inputs. The ids and routing weights of a
    batch are recorded before the expert values that use them (graph order)."""

    def __init__(self, experts: int, neurons: int):
        self.mass = torch.zeros(experts, dtype=torch.float64)
        self.output = torch.zeros(experts, dtype=torch.float64)
        self.neurons = torch.zeros(experts, neurons, dtype=torch.float64)
        self.ids = self.routing = None

    def add(self, kind: str, value: torch.Tensor) -> None:
        if kind == "ids":
            self.ids = value.reshape(-1).long()
        elif kind == "routing":
            self.routing = value.reshape(-1).double()
        elif kind == "expert_mlp":
            self.neurons.index_add_(0, self.ids, value.double().square())
        else:
            self.mass.index_add_(0, self.ids, self.routing)
            self.output.index_add_(0, self.ids, torch.linalg.vector_norm(value.double(), dim=-1))

    def all_reduce(self) -> None:
        both = torch.cat([self.mass, self.output, self.neurons.reshape(-1)])
        dist.all_reduce(both)
        n = self.mass.numel()
        self.mass, self.output, self.neurons = both[:n], both[n:2 * n], both[2 * n:].reshape(self.neurons.shape)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.mass.float(), self.output.float(), self.neurons.sqrt().float()


def _tap_width(structure, kind: str, index: int, head_dim: int) -> int:
    """Units a tap scores: hidden channels, the layer's MLP (or shared expert's) neurons or its
    query heads."""
    if kind == "hidden":
        return structure.hidden.size
    layer = next(l for l in structure.layers if l.index == index)
    if kind == "shared_mlp":
        return layer.moe.shared.size
    return layer.mlp.size if kind == "mlp" else layer.attn.heads


def _group_sum(head_scores: torch.Tensor, kv_heads: int) -> torch.Tensor:
    return head_scores.reshape(kv_heads, -1).sum(dim=1)


# ---- magnitude / random ------------------------------------------------------------------
def _weight(program: Program, name: str) -> torch.Tensor:
    tensor = program.param(name)
    return read_weight(program, name) if tensor.is_meta else tensor.float()


def _slice_norms(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """Squared L2 norm of every slice along `dim`."""
    other = [d for d in range(tensor.dim()) if d != dim]
    return tensor.pow(2).sum(dim=other) if other else tensor.pow(2)


@torch.no_grad()
def _magnitude(program: Program) -> Importance:
    structure = structure_of(program)
    hidden = torch.zeros(structure.hidden.size)
    members = list(structure.hidden.members)
    h = structure.hidden
    if program.arch.tied and h.head != h.embedding and (h.embedding, 1) in members:
        # A meta export reads the tied matrix under both names: count it once, as in memory.
        members.remove((h.head, 1))
    for name, dim in members:
        if program.param(name).dim() > 1:  # norm weights are scales, not connections
            hidden += _slice_norms(_weight(program, name), dim)
    imp = Importance(method="magnitude", hidden=hidden.sqrt())
    for layer in structure.layers:
        a = layer.attn
        for m, scores in ((layer.mlp, imp.mlp), (layer.moe.shared if layer.moe else None, imp.shared_mlp)):
            if m is not None:
                mlp = sum(_slice_norms(_weight(program, s.param), 0)[s.rows()] for s in m.spans)
                scores[layer.index] = (mlp + _slice_norms(_weight(program, m.down), 1)).sqrt()
        if layer.moe is not None:
            e = layer.moe
            rows = sum(_weight(program, s.param)[:, s.rows()].pow(2).sum(-1) for s in e.spans)  # [experts, neurons]
            neurons = rows + _weight(program, e.down).pow(2).sum(1)
            imp.expert_mlp[layer.index] = neurons.sqrt()
            imp.experts[layer.index] = neurons.sum(1).sqrt()
        q = _slice_norms(_weight(program, a.q.param), 0)[a.q.rows()].reshape(a.heads, a.head_dim).sum(1)
        o = _slice_norms(_weight(program, a.o), 1).reshape(a.heads, a.head_dim).sum(1)
        imp.heads[layer.index] = (q + o).sqrt()
        kv = sum(_slice_norms(_weight(program, s.param), 0)[s.rows()].reshape(a.kv_heads, a.head_dim).sum(1)
                 for s in (a.k, a.v))
        imp.kv_heads[layer.index] = kv.sqrt() + _group_sum(imp.heads[layer.index], a.kv_heads)
    return imp


def _random(program: Program, seed: int) -> Importance:
    structure = structure_of(program)
    g = torch.Generator().manual_seed(seed)
    imp = Importance(method="random", hidden=torch.rand(structure.hidden.size, generator=g))
    for layer in structure.layers:
        if layer.mlp is not None:
            imp.mlp[layer.index] = torch.rand(layer.mlp.size, generator=g)
        imp.heads[layer.index] = torch.rand(layer.attn.heads, generator=g)
        imp.kv_heads[layer.index] = torch.rand(layer.attn.kv_heads, generator=g)
        if layer.moe is not None:
            e = layer.moe
            imp.experts[layer.index] = torch.rand(e.experts, generator=g)
            imp.expert_mlp[layer.index] = torch.rand(e.experts, e.size, generator=g)
            if e.shared is not None:
                imp.shared_mlp[layer.index] = torch.rand(e.shared.size, generator=g)
    return imp


# ---- selection ---------------------------------------------------------------------------
def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, ascending (ties broken by lower index)."""
    if k > scores.numel() or k < 1:
        raise PdcError(f"cannot keep {k} of {scores.numel()} units", STAGE)
    order = torch.argsort(-scores, stable=True)
    return order[:k].sort().values


def select_heads(head_scores: torch.Tensor, kv_scores: torch.Tensor, heads: int, kv_heads: int,
                 new_heads: int, new_kv: int) -> tuple[torch.Tensor, torch.Tensor]:
    """GQA-aware: keep the `new_kv` best kv groups, then the same number of best query heads
    (new_heads // new_kv) inside each kept group. Returns (query head ids, kv group ids)."""
    if new_heads % new_kv:
        raise PdcError(f"heads {new_heads} must be a multiple of kv_heads {new_kv}", STAGE)
    rep, new_rep = heads // kv_heads, new_heads // new_kv
    if new_rep > rep:
        raise PdcError(f"cannot keep {new_rep} query heads per kv group: the source has {rep}", STAGE)
    groups = top_k(kv_scores, new_kv)
    kept = [g * rep + top_k(head_scores[g * rep:(g + 1) * rep], new_rep) for g in groups.tolist()]
    return torch.cat(kept).sort().values, groups
