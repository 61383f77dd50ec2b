"""Run a program whose weights are still in the source files: each read when first needed.

`streamed(program)` is the program's graph compiled to Python by fx with every meta parameter's
`get_attr` replaced by a read from `program.weights` (its source name, sliced by any recorded
source index, widened to fp32 as the graph was traced) placed right before its first use; fx's
generated code drops every value after its last use, so a forward holds one weight (plus the
program's own real tensors) and the activations, whatever the model's size. Each forward reads
the weights again: the cost is disk and page-cache bandwidth, not memory. `TapProgram` runs the
graph the same way up to the nodes it hands to a callback.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.fx

from pdc.graph.program import Program
from pdc.graph.rewrite import take


def read_weight(program: Program, name: str) -> torch.Tensor:
    """Parameter `name` from the source files as the program holds it (sliced, fp32)."""
    tensor = program.weights.load(program.source_name(name), torch.float32)
    for dim, idx in enumerate(program.meta.get("source_index", {}).get(name) or []):
        if idx is not None:
            tensor = take(tensor, dim, idx)
    return tensor


def copy_reading_weights(program: Program, nodes, after=None) -> torch.fx.Graph:
    """A new graph of `nodes` (the program's, in order) in which every meta parameter is read by
    `read_weight` right before its first use; `after(graph, node, copy)` may add nodes after each copy.
    The one copy rule of a streamed forward and of importance's tapped forward."""
    graph = torch.fx.Graph()
    copies: dict[torch.fx.Node, torch.fx.Node] = {}
    unread: dict[torch.fx.Node, str] = {}  # meta parameter nodes not read yet -> program name

    def load(name: str) -> torch.Tensor:
        return read_weight(program, name)

    for node in nodes:
        if node.op == "call_module" and node.target == "_guards_fn":
            continue  # export's input guard: computes nothing
        if node.op == "get_attr" and node.target.startswith(program.prefix):
            name = node.target[len(program.prefix):]
            if program.param(name).is_meta:
                unread[node] = name
                continue
        for source in node.all_input_nodes:
            if source in unread:
                copies[source] = graph.call_function(load, (unread.pop(source),))
        copies[node] = graph.node_copy(node, lambda n: copies[n])
        if after is not None:
            after(graph, node, copies[node])
    return graph


def streamed(program: Program) -> torch.nn.Module:
    """A module computing `program.forward` (logits) that reads meta weights per use."""
    graph = copy_reading_weights(program, program.gm.graph.nodes)
    return _Logits(torch.fx.GraphModule(program.gm, graph))


class _Logits(torch.nn.Module):
    """The copied graph returns export's flat output tuple; the program returns the logits."""

    def __init__(self, gm: torch.fx.GraphModule):
        super().__init__()
        self.gm = gm

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.gm(ids)
        return out[0] if isinstance(out, (tuple, list)) else out


class TapProgram:
    """The program's graph up to its last tapped node (nodes named in `taps`), compiled to Python
    by fx: each tapped value is handed to `on_tap(name, value)` as soon as it is computed (the
    activation importance's taps, depth saliency's block influence), and fx's generated code drops
    every value after its last use (a batch holds no more activations than the forward itself).
    Generated code rather than a node-by-node interpreter, whose per-node Python cost was about a
    seventh of SmolLM2's forward on CPU. A parameter still on the meta device is read from
    `program.weights` by a node placed right before its first use (one weight in memory at a
    time); the others are the program's own tensors, shared, not copied."""

    def __init__(self, program: Program, taps: set[str], on_tap: Callable[[str, torch.Tensor], None]):
        nodes = list(program.gm.graph.nodes)
        last_tap = max(i for i, n in enumerate(nodes) if n.name in taps)

        def tap(graph: torch.fx.Graph, node: torch.fx.Node, copy: torch.fx.Node) -> None:
            if node.name in taps:
                graph.call_function(on_tap, (node.name, copy))

        graph = copy_reading_weights(program, nodes[: last_tap + 1], tap)
        graph.output(None)
        self.module = torch.fx.GraphModule(program.gm, graph)

    def run(self, ids: torch.Tensor) -> None:
        self.module(ids)
