"""Prune locks: where a prune stage's lock lives beside the spec, and the lock built from its
record. Mixed into `pdc.runner.build.Build`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from pdc.emit.lock import LOCK_SUFFIX, build_lock, write_lock
from pdc.errors import PdcError
from pdc.lang.checked import CheckedSpec
from pdc.runner.stage_keys import settings_identity



def lock_path_of(spec: CheckedSpec, prune_name: str, variant: Optional[str] = None) -> Path:
    """Where a prune stage's lock lives: next to the spec, `<spec stem>.<stage>.lock.json` (a file
    to commit with the spec, outside the ignored build directory); a comparison variant's is
    `<spec stem>.<variant>.<stage>.lock.json`."""
    spec_path = Path(spec.path)
    parts = [spec_path.stem] + ([variant] if variant else []) + [prune_name]
    return spec_path.with_name(".".join(parts) + LOCK_SUFFIX)


class BuildLocks:
    """The locks of a build's prune stages (part of `Build`)."""

    def lock(self, name: str) -> dict:
        """The lock of prune stage `name`, from its record. It pins what decides the pruned
        graph (the stage's settings), not the spec's text: editing a comment or another stage
        must not fail `pdc check`."""
        record = self.record(name)
        if record is None:
            raise PdcError(f"stage {name!r} has not run: no lock to write", name)
        decl = self.graph.node(name).decl
        settings = json.dumps(settings_identity(decl), sort_keys=True, default=repr)
        return build_lock(record.result, settings, not_emitted=decl.not_emitted)

    def write_lock(self, name: str) -> Path:
        return write_lock(self.lock(name), lock_path_of(self.spec, name, self.variant))
