"""The program that graph passes rewrite: pdc's one intermediate representation.

A `Program` is the unlifted `torch.fx.GraphModule` of `torch.export` (`ExportedProgram.module()`)
of a Hugging Face causal LM seen as `input_ids -> logits`, plus what the graph alone cannot say:
the architecture sizes (`arch`), the source config (`hf_config`), which source indices survive
(`kept`) and, for sources exported without weights, the store that reads them (`weights`).

Why the unlifted form rather than the `ExportedProgram` itself: every parameter is a plain
attribute of the module, reached by one `get_attr` node whose target is its dotted name. A pass
can therefore replace a parameter by a sliced copy (or a meta tensor of the new shape) and edit
the graph's shape constants in place, without re-deriving the export signature after every step.
`pdc.graph.export.seal` turns the final program back into an `ExportedProgram` (for `.pt2`, ONNX
and the lock's fingerprint); the HF checkpoint is written from the same parameters.

Node shape metadata (`node.meta["val"]`) is re-derived lazily: `invalidate()` only marks it
stale and `refresh_shapes` re-propagates it. Parameters may live on the meta device (large
sources export without weights); a forward then checks shapes only.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx

from pdc.arch import Arch
from pdc.errors import PdcError, one_line

STAGE = "prune"


@dataclass
class Program:
    """An exported causal LM being rewritten.

    Invariants (checked by `PassManager` after every pass):
    - `gm.graph` lints; every `get_attr` target names an existing attribute of `gm`;
    - `gm(probe)` returns logits of shape [*probe.shape, arch.vocab];
    - get_attr target == `prefix + hf_name` for every parameter, where `hf_name` is the key the
      parameter has in the Hugging Face state dict (so `emit` can write a checkpoint directly);
    - `num_params()` equals the count of `arch.to_hf_config(hf_config)` built by transformers
      (`pdc.plan.counts`) once passes have run (the stages check it).
    """

    gm: torch.fx.GraphModule
    arch: Arch
    hf_config: dict  # the source config (config.to_dict()), sizes are overwritten on emit
    probe: torch.Tensor  # LongTensor [2, L] of token ids used for forward checks
    prefix: str = "m."
    kept: dict = field(default_factory=dict)  # {"hidden": [...], "layers": {"0": {...}}, ...}
    weights: Any = None  # pdc.graph.export.WeightStore or None (weights already in gm)
    meta: dict = field(default_factory=dict)  # free-form: importance, timings, notes
    embedding: str = "model.embed_tokens.weight"  # HF names of the input embedding and output head
    head: str = "lm_head.weight"  # (the same tensor under two names when tied)
    _structure: Any = None
    _shapes_stale: bool = False  # node.meta["val"] predates the last graph edit

    # ---- parameters --------------------------------------------------------------------
    def param_nodes(self) -> dict[str, torch.fx.Node]:
        """hf_name -> get_attr node, for every parameter/buffer the graph reads."""
        out = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and isinstance(node.target, str) and node.target.startswith(self.prefix):
                out[node.target[len(self.prefix):]] = node
        return out

    def param(self, hf_name: str) -> torch.Tensor:
        return _get_attr(self.gm, self.prefix + hf_name)

    def set_param(self, hf_name: str, value: torch.Tensor) -> None:
        """Replace a parameter (any shape). Buffers stay buffers, parameters stay parameters."""
        _set_attr(self.gm, self.prefix + hf_name, value)

    def del_param(self, hf_name: str) -> None:
        owner, leaf = _owner(self.gm, self.prefix + hf_name)
        delattr(owner, leaf)
        for key in ("source_name", "source_index"):
            self.meta.get(key, {}).pop(hf_name, None)

    def rename_param(self, old: str, new: str) -> None:
        """Move a parameter to a new HF name and retarget its get_attr node(s). A weight not
        read yet (meta) keeps the name it has in the source (`source_name`)."""
        value = self.param(old)
        moved = {key: self.meta.get(key, {}).get(old) for key in ("source_name", "source_index")}
        self.del_param(old)
        self.set_param(new, value)
        if value.is_meta:
            self.meta.setdefault("source_name", {})[new] = moved["source_name"] or old
            if moved["source_index"] is not None:
                self.meta.setdefault("source_index", {})[new] = moved["source_index"]
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and node.target == self.prefix + old:
                node.target = self.prefix + new

    def source_name(self, hf_name: str) -> str:
        """The name parameter `hf_name` has in the source checkpoint (layers renumbered by a
        depth pass keep theirs until their weights are read)."""
        return self.meta.get("source_name", {}).get(hf_name, hf_name)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """HF-named parameters (buffers excluded) that the graph reads, in graph order."""
        params = {n for n, _ in self.gm.named_parameters(remove_duplicate=False)}
        return {
            name: self.param(name)
            for name in self.param_nodes()
            if self.prefix + name in params
        }

    def num_params(self) -> int:
        """Parameter count as HF counts it (a tied tensor once). A source exported on meta may
        read the tied embedding and head as two attributes; with `arch.tied` the head is then
        the same tensor in the emitted checkpoint and is counted once."""
        seen, total = set(), 0
        params = self.state_dict()
        if self.arch.tied and self.embedding in params:
            params.pop(self.head, None)
        for tensor in params.values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
        return total

    # ---- structure / running -----------------------------------------------------------
    def invalidate(self, refresh: bool = False) -> None:
        """Call after editing the graph: drops dead nodes, recompiles and drops the cached
        structure. Every node's `meta["val"]` (symbolic batch/sequence) is re-derived on the
        next structure discovery, or now with `refresh=True` (which also checks the shapes)."""
        self.gm.graph.eliminate_dead_code()
        self.gm.recompile()
        self._structure = None
        self._shapes_stale = True
        if refresh:
            refresh_shapes(self)

    def on_meta(self) -> bool:
        return any(p.is_meta for p in self.gm.parameters())

    @torch.no_grad()
    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, L, vocab]; with meta weights, a fake tensor of the right shape (no values)."""
        if self.on_meta():
            from torch._subclasses.fake_tensor import FakeTensorMode

            mode = FakeTensorMode(allow_non_fake_inputs=True)
            with _fake_cpu_params(self, mode), mode:
                return self.gm(mode.from_tensor(ids))
        return self.gm(ids)

    @torch.no_grad()
    def forward_shapes(self, ids: torch.Tensor) -> torch.Tensor:
        """Run the graph on fake tensors only (shapes, no arithmetic) whatever the weights:
        the cheap structural check. Returns a fake tensor of the logits' shape."""
        from torch._subclasses.fake_tensor import FakeTensorMode

        mode = FakeTensorMode(allow_non_fake_inputs=True)
        with _fake_cpu_params(self, mode), mode:
            return self.gm(mode.from_tensor(ids))

    def clone(self, share_weights: bool = False) -> "Program":
        """A deep copy (graph, parameters, cached structure: it names nodes, which the copy keeps)
        for before/after comparisons and for tests that share one export. With `share_weights`
        the copy reads the same tensors (a candidate graph to edit, not weights to change)."""
        memo = {id(t): t for t in list(self.gm.parameters()) + list(self.gm.buffers())} if share_weights else {}
        return Program(
            gm=copy.deepcopy(self.gm, memo), arch=self.arch, hf_config=dict(self.hf_config),
            probe=self.probe, prefix=self.prefix, kept=copy.deepcopy(self.kept),
            weights=self.weights, meta=copy.deepcopy(self.meta), _shapes_stale=self._shapes_stale,
            embedding=self.embedding, head=self.head,
            _structure=copy.deepcopy(self._structure),
        )


def refresh_shapes(program: Program) -> None:
    """Fake-tensor propagation of the probe with dynamic batch and sequence: rewrites
    `node.meta["val"]` for every node. Raises `PdcError` if shapes no longer line up."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    from torch.fx.passes.fake_tensor_prop import FakeTensorProp

    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fake_ids = mode.from_tensor(program.probe, static_shapes=False)
    try:
        with _fake_cpu_params(program, mode):
            FakeTensorProp(program.gm, mode).propagate(fake_ids)
    except Exception as exc:
        raise PdcError(f"shape propagation failed: {one_line(exc)}", STAGE) from exc
    program._shapes_stale = False


@contextlib.contextmanager
def _fake_cpu_params(program: Program, mode):
    """Meta parameters stand in as fake CPU tensors (the graph's ops expect CPU) for the
    duration; restored afterwards."""
    swapped = []
    for name, tensor in list(program.gm.named_parameters(remove_duplicate=False)):
        if tensor.is_meta:
            owner, leaf = _owner(program.gm, name)
            with mode:
                fake = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu")
            swapped.append((owner, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = fake
    try:
        yield
    finally:
        for owner, leaf, original in swapped:
            owner._parameters[leaf] = original


# ---- attribute helpers -----------------------------------------------------------------
def _owner(root: torch.nn.Module, target: str) -> tuple[torch.nn.Module, str]:
    *path, leaf = target.split(".")
    mod = root
    for part in path:
        mod = getattr(mod, part)
    return mod, leaf


def _get_attr(root: torch.nn.Module, target: str) -> torch.Tensor:
    owner, leaf = _owner(root, target)
    return getattr(owner, leaf)


def _set_attr(root: torch.nn.Module, target: str, value: torch.Tensor) -> None:
    *path, leaf = target.split(".")
    mod = root
    for part in path:  # create missing containers (a renamed layer may not exist yet)
        if not hasattr(mod, part):
            mod.add_module(part, torch.nn.Module())
        mod = getattr(mod, part)
    if leaf in mod._buffers:
        mod._buffers[leaf] = value.detach()
    else:
        if leaf in mod._parameters:
            del mod._parameters[leaf]
        mod.register_parameter(leaf, torch.nn.Parameter(value.detach(), requires_grad=False))
