"""Stage keys: a stage's content key covers its settings (`settings_identity`, defaults left
out, `SETTINGS_EPOCH`), the identities of the models and data it reads and the keys of the
stages upstream of it; a stage whose record holds its current key is done. Mixed into
`pdc.runner.build.Build`."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

from pdc import __version__
from pdc.errors import PdcError
from pdc.files import sha256_json
from pdc.inputs.models import data_identity, source_identity
from pdc.inputs.teacher_cache import TeacherLogits
from pdc.plan.results import StageRecord, TeacherLogitsResult, read_record
from pdc.plan.search_plan import short_distill_stage
from pdc.plan.stage_graph import ModelRef, SourceRef



# Part of every stage key. A setting at its default is left out of the keys (below), so a
# changed default would reuse stages computed with the old one: bump this with it
# (tests/test_stage_keys.py pins every default).
SETTINGS_EPOCH = 1


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def settings_identity(x):
    """JSON-able form of stage settings. Source spans and check tolerances are left out (moving a
    line or loosening `pdc check` changes nothing that a stage computes), and so is every setting
    at its default: a new setting with a default leaves the keys and locks of the specs that do
    not use it unchanged."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        fields = {f.name: settings_identity(getattr(x, f.name)) for f in dataclasses.fields(x)
                  if f.name not in ("span", "check_tolerance", "setting_spans")
                  and getattr(x, f.name) != _field_default(f)}
        return {"__type__": type(x).__name__, **fields}
    if isinstance(x, (list, tuple)):
        return [settings_identity(v) for v in x]
    if isinstance(x, dict):
        return {str(k): settings_identity(v) for k, v in x.items()}
    if isinstance(x, Path):
        return str(x)
    return x


def cache_holds(result: TeacherLogitsResult) -> bool:
    """Whether the teacher logits cache a pass filled still holds as many blocks as it recorded."""
    try:
        return len(TeacherLogits(Path(result.cache_dir))) >= result.blocks
    except PdcError:
        return False


class StageKeys:
    """A build's stage keys and records (part of `Build`)."""

    def _ref_key(self, ref: ModelRef):
        if isinstance(ref, SourceRef):
            return source_identity(self.spec.models[ref.model], self.base)
        return self.stage_key(ref.stage)

    def stage_key(self, name: str) -> str:
        if name not in self._keys:
            node = self.graph.node(name)
            parts = [__version__, SETTINGS_EPOCH, node.kind, settings_identity(node.decl),
                     {role: self._ref_key(ref) for role, ref in node.inputs.items()},
                     [data_identity(self.spec.data[d], self.base) for d in node.data]]
            if node.kind == "evaluate":
                parts.append(str(self.tasks_dir()) if self.tasks_dir() else None)
            if node.kind == "prune" and node.decl.kind == "search":  # it distills as the distill stage does
                # (a search of steps=0 distills nothing: the distillation's data and settings are not its input)
                d = short_distill_stage(self.spec, node.decl) if node.decl.search.steps > 0 else None
                parts.append(d and [settings_identity(d.train), data_identity(self.spec.data[d.data], self.base)])
            if node.needs:
                parts.append({up: self.stage_key(up) for up in node.needs})
            self._keys[name] = sha256_json(parts)[:16]
        return self._keys[name]

    def record(self, name: str) -> Optional[StageRecord]:
        return read_record(self.out / name)

    def done(self, name: str) -> bool:
        try:
            rec = self.record(name)
        except PdcError:
            return False  # a record of another pdc version: the stage runs again
        if rec is not None and isinstance(rec.result, TeacherLogitsResult) and not cache_holds(rec.result):
            return False  # its cache (or some of its parts) was deleted since: the pass runs again
        return rec is not None and rec.key == self.stage_key(name)

    def require(self, name: str) -> None:
        if not self.done(name):
            raise PdcError(f"stage {name!r} has not run (or its inputs changed): run it first", name)
