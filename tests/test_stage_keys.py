"""Stage keys and lock identities: what a stage computes, and nothing else. A new setting added
with a default must not rebuild (or fail the `pdc check` of) the specs that do not use it, and a
changed default must: every default is pinned here, against tests/golden/settings_defaults.json."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pdc.lang import checked, load_spec, settings
from pdc.plan import stage_graph
from pdc.runner.build import Build
from pdc.runner.stage_keys import SETTINGS_EPOCH, settings_identity
from tiny_builds import WIDTH_SPEC, make_project

GOLDEN = Path(__file__).parent / "golden" / "settings_defaults.json"
MODULES = (settings, checked, stage_graph)


def _defaults() -> dict[str, dict[str, str]]:
    """Every setting dataclass's defaults, by class and field, as repr."""
    out: dict[str, dict[str, str]] = {}
    for module in MODULES:
        for name, cls in sorted(vars(module).items()):
            if isinstance(cls, type) and dataclasses.is_dataclass(cls) and cls.__module__ == module.__name__:
                fields = {}
                for f in dataclasses.fields(cls):
                    if f.default is not dataclasses.MISSING:
                        fields[f.name] = repr(f.default)
                    elif f.default_factory is not dataclasses.MISSING:
                        fields[f.name] = repr(f.default_factory())
                out[f"{module.__name__}.{name}"] = fields
    return out


def test_every_default_is_pinned():
    """A changed default changes what the stages of specs that rely on it compute, but not their
    keys: it must come with a new SETTINGS_EPOCH. A new defaulted setting is recorded here."""
    pinned = json.loads(GOLDEN.read_text())
    now = _defaults()
    assert pinned["epoch"] == SETTINGS_EPOCH, f"SETTINGS_EPOCH changed: `python {Path(__file__).name}` records it"
    for cls, fields in now.items():
        for name, value in fields.items():
            was = pinned["defaults"].get(cls, {}).get(name)
            assert was is not None, f"new setting {cls}.{name} = {value}: `python {Path(__file__).name}` records it"
            assert was == value, (
                f"{cls}.{name} default {was} -> {value}: bump SETTINGS_EPOCH in pdc/runner/stage_keys.py (stages "
                f"computed with the old default must not be reused), then `python {Path(__file__).name}`")


def _keys(build: Build) -> dict[str, str]:
    build._keys.clear()
    return {name: build.stage_key(name) for name in build.graph.nodes}


def _with_new_setting(obj, value=None):
    """`obj` as an instance of its own class grown by one setting `new_setting` (default None)."""
    grown = dataclasses.make_dataclass(type(obj).__name__, [("new_setting", object, dataclasses.field(default=None))],
                                       bases=(type(obj),), frozen=True)
    return grown(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}, new_setting=value)


def test_a_new_defaulted_setting_keeps_every_key_and_lock(tmp_path):
    """The distillation's TrainConfig and the prune stage grow a setting: at its default no stage
    key and no lock identity moves; set, it moves the keys from that stage downstream only."""
    spec = load_spec(make_project(tmp_path, WIDTH_SPEC))
    build = Build(spec, out_dir=tmp_path / "build", progress=False)
    before = _keys(build)
    lock_identity = settings_identity(build.graph.node("prune").decl)  # what the lock hashes

    nodes = build.graph.nodes
    distill, prune = nodes["distill"], nodes["prune"]
    nodes["distill"] = dataclasses.replace(distill, decl=dataclasses.replace(distill.decl, train=_with_new_setting(distill.decl.train)))
    nodes["prune"] = dataclasses.replace(prune, decl=_with_new_setting(prune.decl))
    assert _keys(build) == before
    assert settings_identity(nodes["prune"].decl) == lock_identity

    nodes["distill"] = dataclasses.replace(distill, decl=dataclasses.replace(distill.decl, train=_with_new_setting(distill.decl.train, 3)))
    nodes["prune"] = prune
    after = _keys(build)
    assert [n for n in before if after[n] != before[n]] == ["distill", "evaluate"]


if __name__ == "__main__":  # record the current defaults (after a new setting, or with a new epoch)
    GOLDEN.write_text(json.dumps({"epoch": SETTINGS_EPOCH, "defaults": _defaults()}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {GOLDEN}")
