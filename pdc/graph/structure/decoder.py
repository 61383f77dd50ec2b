"""`Structure`: the prunable groups of one decoder (the hidden channels and its layers), what the
passes and stages read from it (spans, LoRA targets, norms), re-reading sizes after a slicing
pass (`resize`), shape checks and the stable text form of golden snapshots."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from pdc.graph.program import Program
from pdc.graph.structure.checks import check_shapes, mismatch
from pdc.graph.structure.groups import HiddenGroup, LayerBlock
from pdc.graph.structure.spans import retrace


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
        """None when every coupled dimension agrees with the (resized) sizes, else one line naming
        the first parameter or constant that disagrees (`checks.check_shapes`)."""
        return check_shapes(self, program)

    def mismatch(self, fresh: "Structure", program: Program) -> Optional[str]:
        """None when this (resized) structure agrees with `fresh` rediscovery of the same graph
        (`checks.mismatch`)."""
        return mismatch(self, fresh, program)

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
