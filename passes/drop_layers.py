"""Drop decoder layers from the exported graph and renumber the layers that follow.

Before: `structure_of(program).layers` lists the current decoder layers 0..n-1, each a `LayerBlock`
whose `output` node (its last residual add) is the residual stream leaving it and whose `input`
node is the residual stream entering it; parameters are named `<base><i>.*` (current index; the
base, e.g. `model.layers.` or `gpt_neox.layers.`, is the layers' common prefix)
and hold real values (weights shared with the model saliency was measured on) or, for a source
exported without weights, meta tensors that keep their source names (`Program.source_name`).
`program.kept["layers"]` is keyed by *source* layer index (one key per current layer).

After (for `drop` = a set of current indices, not all of them):
- every user of a dropped layer's `output` reads that layer's `input` instead, so the graph computes
  exactly the source model with those layers' residual updates skipped (what a checkpoint without
  them computes); the dropped layers' nodes and parameters are gone;
- the remaining layers are renamed `<base>0..n-len(drop)-1` in order (parameters and their
  `get_attr` targets), so `program.state_dict()` is a valid HF state dict of the shorter model;
- `program.arch.layers`, `program.hf_config` (`num_hidden_layers`, per-layer lists such as
  `layer_types`), `program.kept["layers"]` (dropped source keys removed) and
  `program.kept["dropped_layers"]` (source indices, ascending, accumulated; [] when nothing is
  dropped) follow.

Run it through `PassManager`, which re-derives shapes and the structure afterwards; called directly, the graph is recompiled and runnable but node shape
metadata of the graph is left as it was (still correct: no surviving node changes shape).

Returns `PassResult("drop_layers", {"layers": [n_before, n_after], "dropped_layers": [source idx]})`.
"""

from __future__ import annotations

from typing import Iterable

import torch

from pdc.arch import per_layer_lists
from pdc.errors import PdcError
from pdc.graph.manager import PassResult
from pdc.graph.program import STAGE, Program
from pdc.graph.structure import structure_of


class DropLayers:
    """Graph pass: remove decoder layers `drop` (current indices) and renumber the rest."""

    name = "drop_layers"

    def __init__(self, drop: Iterable[int]):
        self.drop = sorted(set(int(i) for i in drop))

    def __call__(self, program: Program) -> PassResult:
        layers = structure_of(program).layers
        n = len(layers)
        bad = [i for i in self.drop if not 0 <= i < n]
        if bad:
            raise PdcError(f"drop_layers: layers {bad} do not exist (the graph has {n} decoder layers)", STAGE)
        if len(self.drop) >= n:
            raise PdcError(f"drop_layers: cannot drop all {n} decoder layers", STAGE)
        if not self.drop:
            program.kept.setdefault("dropped_layers", [])
            return PassResult(self.name, {"layers": [n, n], "dropped_layers": []})
        source_keys = sorted(program.kept.get("layers", {str(i): None for i in range(n)}), key=int)
        if len(source_keys) != n:
            raise PdcError(f"drop_layers: kept_indices lists {len(source_keys)} layers, the graph has {n}", STAGE)
        base = layer_base(layers)
        nodes = {node.name: node for node in program.gm.graph.nodes}

        # 1. Skip each dropped layer. Last first: when consecutive layers go, the later one's
        #    input is the earlier one's output, which is rewired next.
        for i in reversed(self.drop):
            out_node, in_node = nodes[layers[i].output], nodes[layers[i].input]
            out_node.replace_all_uses_with(in_node)
        _eliminate_dead(program)

        # 2. Delete the parameters that nothing reads any more.
        read = {node.target for node in program.gm.graph.nodes if node.op == "get_attr"}
        for i in self.drop:
            for name in _layer_param_names(program, i, base):
                if program.prefix + name in read:
                    raise PdcError(f"drop_layers: {name} is still read after skipping layer {i}", STAGE)
                program.del_param(name)

        # 3. Renumber the survivors, ascending, so each target name is already free.
        keep = [i for i in range(n) if i not in set(self.drop)]
        for new, old in enumerate(keep):
            if new == old:
                continue
            for name in _layer_param_names(program, old, base):
                program.rename_param(name, f"{base}{new}." + name[len(f"{base}{old}."):])
        # Runnable when called directly; the PassManager then refreshes shapes and structure.
        program.gm.recompile()
        program._structure = None

        # 4. Bookkeeping: arch, config, kept indices.
        dropped_src = [int(source_keys[i]) for i in self.drop]
        for key in (source_keys[i] for i in self.drop):
            program.kept.get("layers", {}).pop(key, None)
        program.kept["dropped_layers"] = sorted(set(program.kept.get("dropped_layers", [])) | set(dropped_src))
        program.arch = program.arch.with_sizes(layers=len(keep))
        cfg = dict(program.hf_config)
        cfg["num_hidden_layers"] = len(keep)
        cfg.update(per_layer_lists(cfg, keep, n))
        program.hf_config = cfg
        numbers = {int(name[len(base):].split(".")[0]) for name in program.param_nodes()
                   if name.startswith(base)}
        if numbers != set(range(len(keep))):
            raise PdcError(f"drop_layers: the graph reads layers {sorted(numbers)}, expected 0..{len(keep) - 1}", STAGE)
        return PassResult(self.name, {"layers": [n, len(keep)], "dropped_layers": dropped_src})


def _eliminate_dead(program: Program) -> int:
    """Erase every node the output no longer depends on. fx's own dead-code elimination keeps
    the skipped layers alive: export leaves side-effecting `_assert_tensor_metadata` checks on
    their tensors, and ops that fx calls impure only because they may draw random numbers
    (eval-mode dropout, scaled_dot_product_attention with its dropout_p), and in-place ops (a
    router's `div_` renormalising its top-k weights). Here a check lives only as long as the
    tensor it checks, a random op only if something reads it, an in-place op as long as
    something reads it or the tensor it writes into."""
    assert_op = torch.ops.aten._assert_tensor_metadata.default
    random_ops = {torch.ops.aten.dropout.default, torch.ops.aten.native_dropout.default,
                  torch.ops.aten.scaled_dot_product_attention.default}
    nodes = list(program.gm.graph.nodes)
    live: set = set()
    while True:  # to a fixed point: an in-place op lives while the tensor it writes into does
        before = len(live)
        for node in reversed(nodes):
            if node in live:
                continue
            if node.op in ("output", "placeholder"):
                live.add(node)
            elif node.target is assert_op:
                continue  # decided below, from the tensor it checks
            elif any(user in live for user in node.users):
                live.add(node)
            elif _in_place(node):
                if node.args and node.args[0] in live:
                    live.add(node)
            elif node.is_impure() and node.target not in random_ops:
                live.add(node)
        if len(live) == before:
            break
    for node in nodes:
        if node.target is assert_op and node.args and node.args[0] in live:
            live.add(node)
    erased = 0
    for node in reversed(nodes):
        if node not in live:
            program.gm.graph.erase_node(node)
            erased += 1
    return erased


def _in_place(node: torch.fx.Node) -> bool:
    schema = getattr(node.target, "_schema", None)
    return node.op == "call_function" and schema is not None and schema.is_mutable


def layer_base(layers) -> str:
    """The HF-name prefix every layer's parameters share before its index (`model.layers.`)."""
    base = layers[0].prefix[: -len(f"{layers[0].index}.")] if layers[0].prefix.endswith(f"{layers[0].index}.") else None
    for layer in layers:
        if base is None or layer.prefix != f"{base}{layer.index}.":
            raise PdcError(f"drop_layers: layer {layer.index} has parameter prefix {layer.prefix!r}, not "
                           f"'<base>{layer.index}.' like the other layers", STAGE)
    return base


def _layer_param_names(program: Program, index: int, base: str) -> list[str]:
    """HF names of every parameter/buffer attribute of current layer `index` (whether or not the
    graph still reads it), found on the module tree itself."""
    root = program.gm
    for part in (program.prefix + base).strip(".").split("."):
        root = getattr(root, part, None)
        if root is None:
            return []
    layer = getattr(root, str(index), None)
    if layer is None:
        return []
    names = [f"{base}{index}.{n}" for n, _ in layer.named_parameters(remove_duplicate=False)]
    names += [f"{base}{index}.{n}" for n, _ in layer.named_buffers(remove_duplicate=False)]
    return names
