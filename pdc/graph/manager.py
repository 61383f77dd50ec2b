"""The pass protocol and the pass manager.

Contract for passes (`passes/`, one pass per file):

- A pass is any object with a `name: str` and `__call__(program) -> PassResult`.
- Before: `program.gm` is a lint-clean graph whose forward on `program.probe` works;
  `structure_of(program)` describes it. After: the same holds for the rewritten graph, the
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
- The per-pass check of a pass that keeps the topology is the resized structure's shape
  consistency (`Structure.check_shapes`: every coupled dimension and recorded shape constant
  agrees, from parameter shapes alone, no forward); the module is recompiled once, after the
  last of them. After any other pass: recompile, lint and one forward. The forward (also after
  the last pass) is a real one of the probe cut to `CHECK_TOKENS` tokens per row, which checks
  shapes and finite values and costs about one read of the weights, with real weights up to
  `REAL_CHECK_MAX_PARAMS`; above that, or with meta weights, a forward on fake tensors (shapes
  only; its cost grows with the node count), and with real weights one real forward after the
  last pass. `PassManager(check="full")` also recompiles, re-propagates symbolic shapes and
  rediscovers the structure after every pass (slow; for debugging a new pass).
- Parameters may live on the meta device (large sources export without weights); the probe
  forward then checks shapes only. `program.weights` (if set) loads real tensors by name.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Protocol

import torch

from pdc.errors import PdcError, one_line
from pdc.graph.program import STAGE, Program
from pdc.graph.structure import discover_fresh

REAL_CHECK_MAX_PARAMS = 2_000_000_000  # per-pass check: real short forward up to this size, fake tensors above
CHECK_TOKENS = 4  # probe tokens per row in the real per-pass check


@dataclass
class PassResult:
    """What one pass changed. `changed` is small and JSON-able, e.g.
    {"hidden": [64, 48]} or {"layers": {"0": {"mlp": [96, 64]}}} (before, after)."""

    name: str
    changed: dict = field(default_factory=dict)
    seconds: float = 0.0


class GraphPass(Protocol):
    name: str

    def __call__(self, program: Program) -> PassResult: ...


class PassManager:
    """Runs passes in order, checking after each (see the module docstring: shape consistency
    for passes that keep the topology, a probe forward for the others, and a real probe forward
    after the last pass). A failure is a `PdcError` naming the pass. `results` collects every
    `PassResult`.

    `check`: "probe" (default; also `True`) as above; "full" additionally re-propagates
    symbolic shapes and rediscovers the structure after every pass, and for passes that keep
    the topology checks that the resized structure agrees with the rediscovered one
    (`Structure.mismatch`); "none" (also `False`) only recompiles."""

    def __init__(self, passes: Iterable[GraphPass], check: "bool | str" = True, progress: bool = False):
        self.passes = list(passes)
        self.check = {True: "probe", False: "none"}.get(check, check)
        if self.check not in ("none", "probe", "full"):
            raise PdcError(f"PassManager check must be none, probe or full, not {check!r}", STAGE)
        self.progress = progress
        self.results: list[PassResult] = []
        self._unchecked: Optional[str] = None  # last pass whose graph has not run since (recompile + forward owed)
        self._values_checked = False  # the last forward check ran real arithmetic

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
                raise PdcError(f"pass {p.name} failed: {one_line(exc)}", STAGE) from exc
            result.seconds = time.perf_counter() - start
            self.results.append(result)
        if self._unchecked is not None:  # topology-keeping passes: recompile and run once
            _recompile_keeping_structure(program)
            if self.check != "none":
                self._forward_check(program, self._unchecked)
        if self.passes and self.check != "none" and not program.on_meta() and not self._values_checked:
            # Values once, after the last pass: the checks before ran on fake tensors.
            verify(program, self.passes[-1].name, values=True, tokens=CHECK_TOKENS)
        return self.results

    def _after(self, p: GraphPass, program: Program) -> None:
        keeps = getattr(p, "keeps_topology", False)
        if keeps and self.check != "full":
            kept = program._structure
            kept.resize(program)
            problem = kept.check_shapes(program) if self.check == "probe" else None
            if problem:
                raise PdcError(f"after pass {p.name}: {problem}", STAGE)
            self._unchecked = p.name
            return
        kept = program._structure if keeps else None
        program.invalidate()
        self._unchecked = None
        if kept is not None:
            kept.resize(program)
            program._structure = kept
        if self.check == "none":
            return
        self._forward_check(program, p.name)
        if self.check == "full":
            fresh = discover_fresh(program)
            problem = kept.mismatch(fresh, program) if kept is not None else None
            if problem:
                raise PdcError(f"after pass {p.name}: the resized structure differs from rediscovery: {problem}", STAGE)
            if kept is not None:
                program._structure = kept  # it also tracks constants rediscovery cannot see

    def _forward_check(self, program: Program, name: str) -> None:
        self._values_checked = not program.on_meta() and program.num_params() <= REAL_CHECK_MAX_PARAMS
        verify(program, name, values=self._values_checked, tokens=CHECK_TOKENS if self._values_checked else None)


def _recompile_keeping_structure(program: Program) -> None:
    """Recompile after passes that kept the topology: the structure they resized stays valid."""
    kept = program._structure
    program.invalidate()
    program._structure = kept


def verify(program: Program, after: str = "export", values: Optional[bool] = None,
           tokens: Optional[int] = None) -> None:
    """Lint the graph and run the probe (its first `tokens` tokens per row when given); raise
    `PdcError` naming `after` on any fault. `values` (default: whenever the weights are real)
    runs the real forward and requires finite logits; otherwise the probe runs on fake tensors
    and checks shapes only."""
    try:
        program.gm.graph.lint()
    except Exception as exc:
        raise PdcError(f"graph invalid after pass {after}: {one_line(exc)}", STAGE) from exc
    values = not program.on_meta() if values is None else values and not program.on_meta()
    probe = program.probe if tokens is None else program.probe[:, :max(2, tokens)]
    try:
        logits = program.forward(probe) if values else program.forward_shapes(probe)
    except Exception as exc:
        raise PdcError(f"forward on the probe fails after pass {after}: {one_line(exc)}", STAGE) from exc
    want = (*probe.shape, program.arch.vocab)
    if tuple(logits.shape) != want:
        raise PdcError(f"after pass {after}: logits shape {tuple(logits.shape)} != {want}", STAGE)
    if values and not torch.isfinite(logits).all():
        raise PdcError(f"after pass {after}: non-finite logits on the probe", STAGE)
