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

Where each part lives: `ops` (op families, shapes, union-find, graph walks, the error), `groups`
(the group dataclasses), `coupling` (step 1), `residual` (layers from the residual stream),
`attention` (steps 2 and 3), `mlp`, `moe` (step 4), `spans` (rows found by running the path on
row numbers), `decoder` (`Structure`), `checks` (shape checks without a forward), `discovery`
(`discover`, `structure_of`).
"""

from pdc.graph.structure.decoder import Structure
from pdc.graph.structure.discovery import discover, discover_fresh, structure_of
from pdc.graph.structure.groups import AttentionGroup, HiddenGroup, LayerBlock, MlpGroup, MoeGroup, ShapeConst, Span
from pdc.graph.structure.ops import module_path
from pdc.graph.structure.spans import retrace, row_constants

__all__ = ["AttentionGroup", "HiddenGroup", "LayerBlock", "MlpGroup", "MoeGroup", "ShapeConst", "Span", "Structure",
           "discover", "discover_fresh", "module_path", "retrace", "row_constants", "structure_of"]
