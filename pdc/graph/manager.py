"""The program object that graph passes rewrite, the pass protocol, and the pass manager.

Why an unlifted `torch.fx.GraphModule` (`ExportedProgram.module()`) rather than the
`ExportedProgram` itself: in the unlifted form every parameter is a plain attribute of the module,
reached by one `get_attr` node whose `target` is its dotted name. A pass can therefore replace a
parameter by a sliced copy (or a meta tensor of the new shape) and edit the graph's shape
constants in place, without re-deriving the export signature after every step. The final program
is re-exported once (`Program.export()`), which re-checks everything torch.export checks.

Contract for passes (the depth engineer's `passes/drop_layers.py` uses the same one):

- A pass is any object with a `name: str` and `__call__(program) -> PassResult`.
- Before: `program.gm` is a lint-clean graph whose forward on `program.probe` works;
  `program.structure()` describes it. After: the same holds for the rewritten graph, the
  parameters in `program.gm` have the new shapes, `program.arch` states the new sizes, and
  `program.kept` records which *source* indices survive (kept_indices.json form).
- A pass must not keep `Structure` objects across its own edits: node names can change.
  The manager drops the cached structure after each pass, unless the pass declares
  `keeps_topology = True` (it only changes parameter sizes and the integer constants the
  structure records, never nodes or names: the slicing passes). Then the manager keeps the
  structure and re-reads its sizes from the parameters (`Structure.resize`), which is what
  rediscovery would find (tests check this) at a fraction of the cost. It is also more
  informative: once a count drops to 1 (one query head per kv group), rediscovery can no longer
  tell which size-1 constants mean "heads per group"; the kept structure still knows.
- Node shape metadata (`node.meta["val"]`) is re-derived lazily: `invalidate()` only marks it
  stale, and `structure()` refreshes it before rediscovering. The per-pass check is a lint and
  one probe forward on fake tensors (cheap; one real forward after the last pass); `PassManager(check="full")` also re-propagates symbolic shapes and
  rediscovers the structure after every pass (slow; for debugging a new pass).
- Parameters may live on the meta device (large sources export without weights); the probe
  forward then checks shapes only. `program.weights` (if set) loads real tensors by name.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Protocol

import torch
import torch.fx

from pdc.arch import Arch
from pdc.errors import PdcError

STAGE = "prune"
REAL_PROBE_MAX_PARAMS = 20_000_000  # per-pass probe: real forward below, fake tensors above


@dataclass
class PassResult:
    """What one pass changed. `changed` is small and JSON-able, e.g.
    {"hidden": [64, 48]} or {"layers": {"0": {"mlp": [96, 64]}}} (before, after)."""

    name: str
    changed: dict = field(default_factory=dict)
    seconds: float = 0.0


class GraphPass(Protocol):
    name: str

    def __call__(self, program: "Program") -> PassResult: ...


@dataclass
class Program:
    """An exported causal LM being rewritten.

    Invariants (checked by `PassManager` after every pass):
    - `gm.graph` lints; every `get_attr` target names an existing attribute of `gm`;
    - `gm(probe)` returns logits of shape [*probe.shape, arch.vocab];
    - get_attr target == `prefix + hf_name` for every parameter, where `hf_name` is the key the
      parameter has in the Hugging Face state dict (so `emit` can write a checkpoint directly);
    - `sum(numel)` over the parameters equals `arch.total_params()` once passes have run.
    """

    gm: torch.fx.GraphModule
    arch: Arch
    hf_config: dict  # the source config (config.to_dict()), sizes are overwritten on emit
    probe: torch.Tensor  # LongTensor [2, L] of token ids used for forward checks
    prefix: str = "m."
    kept: dict = field(default_factory=dict)  # {"hidden": [...], "layers": {"0": {...}}, ...}
    weights: Any = None  # pdc.graph.export.WeightStore or None (weights already in gm)
    meta: dict = field(default_factory=dict)  # free-form: importance, timings, notes
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

    def rename_param(self, old: str, new: str) -> None:
        """Move a parameter to a new HF name and retarget its get_attr node(s)."""
        value = self.param(old)
        self.del_param(old)
        self.set_param(new, value)
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and node.target == self.prefix + old:
                node.target = self.prefix + new

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
        if self.arch.tied and "model.embed_tokens.weight" in params:
            params.pop("lm_head.weight", None)
        for tensor in params.values():
            if id(tensor) not in seen:
                seen.add(id(tensor))
                total += tensor.numel()
        return total

    # ---- structure / running -----------------------------------------------------------
    def structure(self):
        """The discovered `pdc.graph.structure.Structure` of the current graph (cached).
        Stale shape metadata is refreshed first (discovery reads node shapes)."""
        if self._structure is None:
            from pdc.graph.structure import discover

            if self._shapes_stale:
                refresh_shapes(self)
            self._structure = discover(self)
        return self._structure

    def invalidate(self, refresh: bool = False) -> None:
        """Call after editing the graph: drops dead nodes, recompiles and drops the cached
        structure. Every node's `meta["val"]` (symbolic batch/sequence) is re-derived on the
        next `structure()` call, or now with `refresh=True` (which also checks the shapes)."""
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

    def export(self, dynamic: bool = True) -> "torch.export.ExportedProgram":
        """Re-export the rewritten graph as an `ExportedProgram` (for `torch.export.save`,
        ONNX). Batch and sequence stay dynamic unless `dynamic=False`."""
        from pdc.graph.export import reexport

        return reexport(self, dynamic=dynamic)

    def clone(self) -> "Program":
        """A deep copy (graph, parameters, cached structure: it names nodes, which the copy keeps)
        for before/after comparisons and for tests that share one export."""
        return Program(
            gm=copy.deepcopy(self.gm), arch=self.arch, hf_config=dict(self.hf_config),
            probe=self.probe, prefix=self.prefix, kept=copy.deepcopy(self.kept),
            weights=self.weights, meta=copy.deepcopy(self.meta), _shapes_stale=self._shapes_stale,
            _structure=copy.deepcopy(self._structure),
        )


class PassManager:
    """Runs passes in order. After each: recompile, `graph.lint()` and a forward of the probe on
    fake tensors (shapes: cheap even for large models; small models run it for real, which is
    cheaper still). After the last pass, with real weights, one real forward of the probe whose
    logits must be finite. A failure is a `PdcError` naming
    the pass. `results` collects every `PassResult`.

    `check`: "probe" (default; also `True`) as above; "full" additionally re-propagates
    symbolic shapes and rediscovers the structure after every pass, and for passes that keep
    the topology checks that the resized structure agrees with the rediscovered one
    (`Structure.mismatch`); "none" (also
    `False`) only recompiles."""

    def __init__(self, passes: Iterable[GraphPass], check: "bool | str" = True, progress: bool = False):
        self.passes = list(passes)
        self.check = {True: "probe", False: "none"}.get(check, check)
        if self.check not in ("none", "probe", "full"):
            raise PdcError(f"PassManager check must be none, probe or full, not {check!r}", STAGE)
        self.progress = progress
        self.results: list[PassResult] = []

    def run(self, program: Program) -> list[PassResult]:
        iterator: Iterable = self.passes
        if self.progress:
            from tqdm import tqdm

            iterator = tqdm(self.passes, desc="slicing", unit="pass")
        for p in iterator:
            start = time.perf_counter()
            try:
                result = p(program)
                self._after(p, program)
            except PdcError:
                raise
            except Exception as exc:
                raise PdcError(f"pass {p.name} failed: {_one_line(exc)}", STAGE) from exc
            result.seconds = time.perf_counter() - start
            self.results.append(result)
        if self.passes and self.check != "none" and not program.on_meta():
            # Values once, after the last pass (a real forward of a large model costs seconds;
            # the per-pass checks above ran on fake tensors and already named any shape fault).
            verify(program, self.passes[-1].name, values=True)
        return self.results

    def _after(self, p: GraphPass, program: Program) -> None:
        kept = program._structure if getattr(p, "keeps_topology", False) else None
        program.invalidate()
        if kept is not None:
            kept.resize(program)
            program._structure = kept
        if self.check == "none":
            return
        # Fake-tensor dispatch costs about as much per node as a tiny model's real op: below
        # REAL_PROBE_MAX_PARAMS the real forward is the cheaper check (and also checks values).
        verify(program, p.name, values=program.num_params() <= REAL_PROBE_MAX_PARAMS)
        if self.check == "full":
            refresh_shapes(program)
            program._structure = None
            fresh = program.structure()
            problem = kept.mismatch(fresh, program) if kept is not None else None
            if problem:
                raise PdcError(f"after pass {p.name}: the resized structure differs from rediscovery: {problem}", STAGE)
            if kept is not None:
                program._structure = kept  # it also tracks constants rediscovery cannot see


def verify(program: Program, after: str = "export", values: Optional[bool] = None) -> None:
    """Lint the graph and run the probe; raise `PdcError` naming `after` on any fault.
    `values` (default: whenever the weights are real) runs the real forward and requires finite
    logits; otherwise the probe runs on fake tensors and checks shapes only (cheap)."""
    try:
        program.gm.graph.lint()
    except Exception as exc:
        raise PdcError(f"graph invalid after pass {after}: {_one_line(exc)}", STAGE) from exc
    values = not program.on_meta() if values is None else values and not program.on_meta()
    try:
        logits = program.forward(program.probe) if values else program.forward_shapes(program.probe)
    except Exception as exc:
        raise PdcError(f"forward on the probe fails after pass {after}: {_one_line(exc)}", STAGE) from exc
    want = (*program.probe.shape, program.arch.vocab)
    if tuple(logits.shape) != want:
        raise PdcError(f"after pass {after}: logits shape {tuple(logits.shape)} != {want}", STAGE)
    if values and not torch.isfinite(logits).all():
        raise PdcError(f"after pass {after}: non-finite logits on the probe", STAGE)


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
        raise PdcError(f"shape propagation failed: {_one_line(exc)}", STAGE) from exc
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"
