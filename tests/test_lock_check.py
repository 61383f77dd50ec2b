"""The prune lock and its comparison: locks made by `pdc run` (the session's `width_build`), built
from the stage's typed record alone, deterministic, pinning the numbers the checkpoint computes;
exact structure comparison, numbers within tolerance, readable diffs, one-line errors for bad
lock files. (`pdc check` end to end: tests/test_ci_recipe.py and tests/test_runner_e2e.py.)"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pdc.emit import lock as lockmod
from pdc.emit.fingerprint import model_identity
from pdc.errors import PdcError
from pdc.graph.probe import default_probe
from pdc.lang import load_spec
from pdc.runner.build import Build
from pdc.runner.build_locks import lock_path_of

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def built(width_build):
    """(build dir, committed lock path, lock dict) of the tiny width build."""
    spec = load_spec(width_build.parent.parent / "tiny.pds")
    path = lock_path_of(spec, "prune")
    return width_build, path, lockmod.read_lock(path)


def test_lock_is_built_from_the_record_alone_and_deterministic(built, tmp_path):
    """The committed lock is `build_lock` of the prune stage's record: rebuilding it from the
    record gives byte-identical text (no checkpoint is read, nothing is traced)."""
    build, path, _ = built
    spec = load_spec(build.parent.parent / "tiny.pds")
    again = lockmod.write_lock(Build(spec, build, progress=False).lock("prune"), tmp_path / "again.json")
    assert again.read_bytes() == path.read_bytes()
    assert path.parent == build.parent.parent  # next to the spec, outside the ignored build/


def test_lock_pins_what_the_build_produced(built):
    """Inputs by hash (the corrected teacher the stage pruned), kept indices as written, counts
    and shapes of the emitted checkpoint, and the checkpoint's own numbers on the probe."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    build, _, lock = built
    assert lock["lock_version"] == lockmod.LOCK_VERSION
    identity = model_identity(build / "correct" / "model")
    assert lock["inputs"]["model"]["sha256"] == identity.sha256
    assert lock["inputs"]["model"]["weights_sha256"] == identity.weights_sha256
    assert lock["inputs"]["calibration"]["shape"] == [8, 32]
    assert lock["kept_indices"] == json.loads((build / "prune" / "kept_indices.json").read_text())
    plan = json.loads((build / "plan.json").read_text())
    assert lock["params"]["after"] == plan["final"]["params_total"]
    stored = load_file(build / "prune" / "model" / "model.safetensors")
    assert lock["graph"]["param_shapes"] == {k: list(v.shape) for k, v in sorted(stored.items())}
    model = AutoModelForCausalLM.from_pretrained(build / "prune" / "model", dtype=torch.float32).eval()
    probe = default_probe(model.config.vocab_size, build / "prune" / "model")
    with torch.no_grad():
        logits = model(input_ids=probe).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), probe[:, 1:].reshape(-1))
    assert lock["numeric"]["probe_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert lock["numeric"]["logits"]["abs_max"] == pytest.approx(float(logits.abs().max()), rel=1e-4)


def test_altered_kept_index_names_axis_and_layer(built):
    """Before/after: one kept MLP index of layer 1 replaced -> the comparison fails, and the
    report names the layer, the axis and the indices that moved."""
    _, _, lock = built
    edited = copy.deepcopy(lock)
    mlp = edited["kept_indices"]["layers"]["1"]["mlp"]
    dropped = next(i for i in range(96) if i not in mlp)
    removed = mlp[5]
    mlp[5] = dropped
    report = lockmod.render_mismatches(lockmod.compare_locks(edited, lock))
    line = next(l for l in report.splitlines() if "layer 1 mlp" in l)
    assert f"1 removed [{dropped}]" in line and f"1 added [{removed}]" in line
    assert "heads" not in report and "layer 0" not in report
    assert lockmod.compare_locks(lock, copy.deepcopy(lock)) == []


def test_changed_prune_input_is_named_by_hash(built):
    _, _, lock = built
    edited = copy.deepcopy(lock)
    edited["inputs"]["model"]["weights_sha256"]["model.safetensors"] = "0" * 64
    edited["inputs"]["model"]["sha256"] = "1" * 64
    report = lockmod.render_mismatches(lockmod.compare_locks(edited, lock))
    assert "prune input (sha256): 111111111111 -> " + lock["inputs"]["model"]["sha256"][:12] in report
    assert "prune input weight file model.safetensors (sha256): 000000000000" in report


def test_structural_change_is_reported_per_parameter(built):
    _, _, lock = built
    edited = copy.deepcopy(lock)
    edited["graph"]["param_shapes"]["model.layers.0.mlp.up_proj.weight"] = [80, 48]
    edited["graph"]["hash"] = "0" * 64
    edited["arch"]["mlp"] = 80
    report = lockmod.render_mismatches(lockmod.compare_locks(edited, lock))
    assert "parameter model.layers.0.mlp.up_proj.weight shape: [80, 48] -> [64, 48]" in report
    assert "graph structure" in report and "mlp: 80 -> 64" in report


def test_numeric_drift_is_a_number_mismatch_within_tolerance_rules(built):
    _, _, lock = built
    edited = copy.deepcopy(lock)
    edited["numeric"]["probe_loss"] *= 1.01
    (m,) = lockmod.compare_locks(edited, lock)
    assert m.kind == "number" and "probe_loss" in m.message and "> tol" in m.message
    assert lockmod.compare_locks(edited, lock, rtol=0.1) == []


@pytest.mark.parametrize(
    "content, cause",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"lock_version": 99}', "lock_version 99"),
        ('{"lock_version": 2, "spec": {}}', "lacks inputs"),
    ],
)
def test_bad_lock_file_is_a_one_line_error(tmp_path, content, cause):
    path = tmp_path / "prune.lock.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PdcError, match=cause) as info:
        lockmod.read_lock(path)
    assert "\n" not in str(info.value) and info.value.stage == "check"


# ---- comparison properties (no model) ----------------------------------------------------
index_lists = st.lists(st.integers(0, 200), max_size=40, unique=True).map(sorted)


@settings(max_examples=60, deadline=None)
@given(index_lists, index_lists)
def test_index_diff_counts_removed_and_added(expected, actual):
    """Invariant: the kept-index comparison fails iff the lists differ, and its message counts
    exactly the indices removed and added."""
    exp = {"kept_indices": {"layers": {"3": {"mlp": expected}}}}
    act = {"kept_indices": {"layers": {"3": {"mlp": actual}}}}
    mismatches = lockmod.compare_locks(exp, act)
    assert bool(mismatches) == (expected != actual)
    if mismatches:
        (m,) = mismatches
        assert m.message.startswith("layer 3 mlp: kept indices differ")
        removed, added = set(expected) - set(actual), set(actual) - set(expected)
        assert (f"{len(removed)} removed" in m.message) == bool(removed)
        assert (f"{len(added)} added" in m.message) == bool(added)


finite = st.floats(-1e4, 1e4, allow_nan=False)


@settings(max_examples=100, deadline=None)
@given(finite, finite, st.sampled_from([0.0, 1e-4, 1e-2]), st.sampled_from([0.0, 1e-4, 1e-1]))
def test_number_comparison_uses_atol_plus_rtol(x, y, rtol, atol):
    """Invariant: a number mismatches iff |actual - expected| > atol + rtol * |expected|."""
    tol = atol + rtol * abs(x)
    diff = abs(y - x)
    if abs(diff - tol) <= 1e-9 * max(1.0, abs(x)):
        return  # too close to the boundary for float rounding to decide
    mismatches = lockmod.compare_locks({"numeric": {"loss": x}}, {"numeric": {"loss": y}}, rtol=rtol, atol=atol)
    assert bool(mismatches) == (diff > tol)


json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), finite, st.text(max_size=8))
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=20,
)


@settings(max_examples=80, deadline=None)
@given(st.dictionaries(st.text(max_size=6), json_values, max_size=5))
def test_lock_text_round_trips_and_is_canonical(data):
    """Invariants: the written text parses back to the (rounded) data; writing the parsed data
    again gives the same text; the text does not depend on key insertion order."""
    text = lockmod.dumps_lock(data)
    parsed = json.loads(text)
    assert lockmod.dumps_lock(parsed) == text
    assert lockmod.dumps_lock(dict(reversed(list(data.items())))) == text
    assert lockmod.compare_locks(parsed, json.loads(text)) == []
