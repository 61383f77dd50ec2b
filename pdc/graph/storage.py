"""How a program's weights are held: stored in the source's precision, computed in fp32.

A student cut from a large bf16 source keeps its weights in bf16 (half the memory of fp32),
and the graph gains one `aten._to_copy(weight, float32)` right before each op that reads such a
weight: each weight is widened only while that op runs (fx's generated code drops it after). The logits are therefore exactly
those of an fp32 student holding the same (bf16-rounded) values -- what the fp32 path computes
from a bf16 source -- at half its resident size.

`release_weights` swaps every parameter for a meta tensor of its shape and dtype: after the
files are written, each is loaded and checked alone, against logits computed beforehand.
"""

from __future__ import annotations

import torch

from pdc.graph.program import Program

UPCAST = torch.ops.aten._to_copy.default
EMBEDDING = torch.ops.aten.embedding.default


def stored_below_fp32(program: Program) -> bool:
    """Whether any floating parameter is stored in a precision narrower than fp32."""
    return any(p.is_floating_point() and p.dtype != torch.float32 and p.element_size() < 4
               for p in program.gm.parameters())


def compute_in_fp32(program: Program) -> int:
    """Insert an upcast after every get_attr of a floating parameter narrower than fp32; an
    embedding table is gathered first and its rows widened (the same values, without an fp32
    copy of the table). Once per program. Returns the number of upcasts inserted."""
    if program.meta.get("computes_in_fp32"):
        return 0
    graph = program.gm.graph
    params = {n for n, _ in program.gm.named_parameters(remove_duplicate=False)}
    inserted = 0
    for node in list(graph.nodes):
        if node.op != "get_attr" or node.target not in params:
            continue
        tensor = program.param(node.target[len(program.prefix):])
        if not tensor.is_floating_point() or tensor.element_size() >= 4:
            continue
        for user in list(node.users):
            if user.target is EMBEDDING and user.args[0] is node:
                with graph.inserting_after(user):
                    cast = graph.call_function(UPCAST, (user,), {"dtype": torch.float32})
                user.replace_all_uses_with(cast, delete_user_cb=lambda u, c=cast: u is not c)
                inserted += 1
        for user in [u for u in node.users if not (u.target is EMBEDDING and u.args[0] is node)]:
            # right before its user: export puts every get_attr at the top of the graph, and a
            # cast there would widen the whole model before the first layer runs
            with graph.inserting_before(user):
                cast = graph.call_function(UPCAST, (node,), {"dtype": torch.float32})
            user.replace_input_with(node, cast)
            inserted += 1
    program.meta["computes_in_fp32"] = True
    if inserted:
        program.invalidate()
    return inserted


def release_weights(program: Program) -> None:
    """Replace every parameter by a meta tensor of its shape and dtype (frees its memory once
    nothing else holds it). The program still describes the model; it can no longer run."""
    for name, tensor in list(program.state_dict().items()):
        if not tensor.is_meta:
            program.set_param(name, torch.empty(tensor.shape, dtype=tensor.dtype, device="meta"))


def return_freed_memory(threshold: int = 1 << 20) -> None:
    """Have glibc serve every allocation of `threshold` bytes or more by its own mmap, returned
    to the system when freed. By default glibc raises that threshold up to 32 MiB after large
    frees, and then keeps the weights read one at a time (tens of MiB each) in its heap, where
    they add up to a multiple of the student. Process-wide; a no-op off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(-3, int(threshold))  # M_MMAP_THRESHOLD (fixes it: no dynamic raise)
    except (OSError, AttributeError):
        pass
