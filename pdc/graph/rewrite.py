"""Rewrite rules as data, and the one action they share: keep some indices along one dimension.

A `Rule` names a pattern (a function from a discovered group to the parameter names it matches),
the dimension to slice, and the unit of the kept indices ("channel": one row/column each;
"head"/"kv_head": blocks of head_dim rows/columns). Passes declare lists of rules and apply them
with `apply_rules`; composing passes is running them one after another.

Parameters on the meta device (a source that was exported without weights) are sliced in shape
only; the composed source index per dimension is recorded in `program.meta["source_index"]`, and
`materialize_sliced` later reads each source tensor once and slices it to its final shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch

from pdc.graph.program import Program
from pdc.graph.structure import Span, row_constants


@dataclass(frozen=True)
class Rule:
    what: str  # one-line description (why this parameter moves with the group)
    match: Callable[[Any], Iterable[Optional[str]]]  # group -> parameter names (None skipped)
    dim: int
    unit: str = "channel"  # "channel" | "head" (blocks of head_dim)


def expand_blocks(keep: torch.Tensor, block: int) -> torch.Tensor:
    """Block ids -> element ids: [1, 3] with block 2 -> [2, 3, 6, 7]."""
    return (keep[:, None] * block + torch.arange(block)[None, :]).reshape(-1)


def slice_param(program: Program, name: str, dim: int, keep: torch.Tensor) -> tuple[int, int]:
    """Keep indices `keep` (ascending LongTensor) of parameter `name` along `dim`.
    Returns (size before, size after)."""
    tensor = program.param(name)
    before = tensor.shape[dim]
    if tensor.is_meta:
        index = program.meta.setdefault("source_index", {}).setdefault(name, [None] * tensor.dim())
        if index[dim] is None:
            index[dim] = keep.clone()
        else:
            index[dim] = index[dim][:, keep] if index[dim].dim() == 2 else index[dim][keep]
        if dim == 0:  # per-expert indices of the other dims (one row per expert) follow the kept experts
            index[1:] = [idx[keep] if idx is not None and idx.dim() == 2 else idx for idx in index[1:]]
        shape = list(tensor.shape)
        shape[dim] = len(keep)
        new = torch.empty(shape, dtype=tensor.dtype, device="meta")
    else:
        new = tensor.index_select(dim, keep).contiguous()
    program.set_param(name, new)
    return before, len(keep)


def take(tensor: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """`tensor` keeping `index` along `dim`: a 1-D index is the same for every slice; a 2-D
    index [experts, n] keeps its own row of indices in each slice along dim 0 (each expert its
    own neurons)."""
    if index.dim() == 1:
        return tensor.index_select(dim, index)
    shape = [1] * tensor.dim()
    shape[0], shape[dim] = index.shape
    expand = list(tensor.shape)
    expand[dim] = index.shape[1]
    return tensor.gather(dim, index.reshape(shape).expand(expand))


def slice_param_per_expert(program: Program, name: str, dim: int, keep: torch.Tensor) -> tuple[int, int]:
    """Keep, in each slice e along dim 0 of parameter `name`, the indices `keep[e]` (ascending)
    along `dim`. Returns (size before, size after) along `dim`."""
    tensor = program.param(name)
    before = tensor.shape[dim]
    if tensor.is_meta:
        index = program.meta.setdefault("source_index", {}).setdefault(name, [None] * tensor.dim())
        old = index[dim]
        if old is None:
            index[dim] = keep.clone()
        else:
            index[dim] = old.gather(1, keep) if old.dim() == 2 else old[keep]
        shape = list(tensor.shape)
        shape[dim] = keep.shape[1]
        new = torch.empty(shape, dtype=tensor.dtype, device="meta")
    else:
        new = take(tensor, dim, keep).contiguous()
    program.set_param(name, new)
    return before, int(keep.shape[1])


def apply_rules(program: Program, rules: list[Rule], group: Any, keep: torch.Tensor, head_dim: int = 1) -> dict:
    """Apply every rule to `group`; returns {param: [before, after]}."""
    changed = {}
    for rule in rules:
        index = expand_blocks(keep, head_dim) if rule.unit == "head" else keep
        for name in rule.match(group):
            if name is not None and name not in changed:
                changed[name] = list(slice_param(program, name, rule.dim, index))
    return changed


def slice_spans(program: Program, spans_keep: list[tuple[Span, torch.Tensor]],
                coupled: Optional[dict[str, str]] = None) -> dict:
    """Keep units `keep` of each span (ascending ids into its current units). A weight read by
    several spans (fused q|k|v, gate|up) keeps the union of their kept rows in ascending order,
    so its layout stays the one the graph reads; its bias and every parameter `coupled` to its
    rows (norm -> weight: a norm over the projection's output) keep the same rows. Size constants
    on the spans' paths (slice bounds, split sizes, view sizes) are recomputed first, while the
    graph still runs on the current rows. Returns {param: [before, after]}."""
    kept: dict[str, list[torch.Tensor]] = {}
    for span, keep in spans_keep:
        kept.setdefault(span.param, []).append(span.rows(keep))
    rows = {name: torch.cat(parts).sort().values for name, parts in kept.items()}
    new_args: dict = {}
    for span, _ in spans_keep:
        mask = torch.zeros(int(program.param(span.param).shape[0]), dtype=torch.bool)
        mask[rows[span.param]] = True
        new_args.update(row_constants(program, span, mask))
    nodes = {n.name: n for n in program.gm.graph.nodes}
    for name, args in new_args.items():
        nodes[name].args = args
    changed = {}
    biases = {span.bias: span.param for span, _ in spans_keep if span.bias}
    for name, weight in [(w, w) for w in rows] + list(biases.items()) + list((coupled or {}).items()):
        if weight in rows and name not in changed:
            changed[name] = list(slice_param(program, name, 0, rows[weight]))
    return changed


def materialize_sliced(program: Program, dtype: torch.dtype = torch.float32, progress: bool = False) -> None:
    """Replace every meta parameter by its source tensor from `program.weights`, sliced by the
    recorded source indices. Peak memory: the result so far plus one source tensor."""
    from tqdm import tqdm

    indices = program.meta.get("source_index", {})
    names = [n for n in program.param_nodes() if program.param(n).is_meta]
    for name in tqdm(names, desc="read+slice weights", disable=not progress):
        tensor = program.weights.load(program.source_name(name))
        for dim, idx in enumerate(indices.get(name, [])):
            if idx is not None:
                tensor = take(tensor, dim, idx)
        program.set_param(name, tensor.to(dtype).contiguous())
        del tensor


def source_layer(program: Program, layer_index: int) -> str:
    """The kept_indices key (source layer number) of the current layer `layer_index`: layers
    dropped by a depth pass are absent from `program.kept["layers"]`."""
    keys = sorted(program.kept["layers"], key=int)
    return keys[layer_index]
