"""`prune.lock.json` and `pdc check`: deterministic locks, exact structure comparison, numbers
within tolerance, readable diffs, one-line errors for bad lock files."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from pdc.emit import lock as lockmod
from pdc.errors import PdcError
from pdc.lang.settings import ImportanceConfig, WidthTarget

pytestmark = pytest.mark.filterwarnings("ignore")

SPEC_TEXT = 'model src = dir("src")\n'
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(0))
TARGET = WidthTarget(hidden=48, mlp=64)


def _prune(source, build_dir):
    """A real width-pruned build directory (the width engineer's stage) under `build_dir`."""
    from pdc.stages.prune_width import prune_width

    prune_width(source, CALIB, TARGET, ImportanceConfig(), build_dir / "prune", progress=False)
    return build_dir


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(root, build dir, lock dict, lock bytes): a tiny Llama pruned to hidden 48, mlp 64."""
    root = tmp_path_factory.mktemp("lock")
    make_tiny_model("llama", num_hidden_layers=2).save_pretrained(root / "src")
    build = _prune(root / "src", root / "build")
    lock = lockmod.build_lock(build, root / "src", SPEC_TEXT, calib_blocks=CALIB)
    path = lockmod.write_lock(lock, build / lockmod.LOCK_NAME)
    return root, build, lock, path.read_bytes()


def test_lock_records_the_build(built):
    """The lock states what was built: versions, kept indices as written, the pruned sizes,
    parameter counts consistent with the architecture, finite numeric fingerprints."""
    root, build, lock, _ = built
    assert lock["lock_version"] == lockmod.LOCK_VERSION
    kept = json.loads((build / "prune" / "kept_indices.json").read_text())
    assert lock["kept_indices"] == kept
    assert (lock["arch"]["hidden"], lock["arch"]["mlp"]) == (48, 64)
    after = lock["params"]["after"]
    assert after["counted"] == after["total"] < lock["params"]["before"]["total"]
    assert set(lock["source"]["weights_sha256"]) == {"model.safetensors"}
    assert lock["inputs"]["calibration"]["shape"] == list(CALIB.shape)
    numeric = lock["numeric"]
    assert 0 < numeric["calibration_loss"] < 20 and 0 < numeric["probe_loss"] < 20
    assert len(numeric["logits"]["last_slice"]) == lock["inputs"]["probe"]["shape"][0]


def test_lock_is_deterministic_for_the_same_build(built, tmp_path):
    """Invariant: locking the same build directory again gives byte-identical text."""
    root, build, _, first_bytes = built
    lock = lockmod.build_lock(build, root / "src", SPEC_TEXT, calib_blocks=CALIB)
    assert lockmod.write_lock(lock, tmp_path / "again.json").read_bytes() == first_bytes


@pytest.mark.slow
def test_lock_is_deterministic_across_prunes(built, tmp_path):
    """Invariant: pruning the same source twice and locking each build gives byte-identical
    locks (no paths, timestamps or float noise in the file)."""
    root, _, _, first_bytes = built
    again = _prune(root / "src", tmp_path / "build")
    lock = lockmod.build_lock(again, root / "src", SPEC_TEXT, calib_blocks=CALIB)
    assert lockmod.write_lock(lock, tmp_path / "again.json").read_bytes() == first_bytes
    assert lockmod.read_lock(tmp_path / "again.json") == json.loads(first_bytes)


def test_check_passes_on_its_own_build(built):
    root, build, _, _ = built
    ok, report = lockmod.check_build(build, build / lockmod.LOCK_NAME)
    assert ok and "matches" in report
    assert lockmod.compare_locks(built[2], copy.deepcopy(built[2])) == []


def test_altered_kept_index_names_axis_and_layer(built, tmp_path):
    """Before/after: one kept MLP index of layer 1 replaced -> check fails, and the report names
    the layer, the axis and the indices that moved."""
    root, build, lock, _ = built
    edited = copy.deepcopy(lock)
    mlp = edited["kept_indices"]["layers"]["1"]["mlp"]
    dropped = next(i for i in range(96) if i not in mlp)
    removed = mlp[5]
    mlp[5] = dropped
    lockmod.write_lock(edited, tmp_path / "edited.json")
    ok, report = lockmod.check_build(build, tmp_path / "edited.json")
    assert not ok
    line = next(l for l in report.splitlines() if "layer 1 mlp" in l)
    assert f"1 removed [{dropped}]" in line and f"1 added [{removed}]" in line
    assert "heads" not in report and "layer 0" not in report


def test_changed_weights_are_caught_numerically(built, tmp_path):
    """Before/after: same structure, one pruned weight nudged -> the graph fingerprint still
    matches but the numeric fingerprint does not (and the report says by how much)."""
    from safetensors.torch import load_file, save_file

    root, build, lock, _ = built
    copy_dir = tmp_path / "build"
    shutil.copytree(build / "prune", copy_dir / "prune")
    weights = copy_dir / "prune" / "model" / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.down_proj.weight"] += 0.05
    save_file(tensors, weights, metadata={"format": "pt"})
    changed = lockmod.build_lock(copy_dir, root / "src", SPEC_TEXT, calib_blocks=CALIB)
    assert changed["graph"] == lock["graph"]
    mismatches = lockmod.compare_locks(lock, changed)
    assert mismatches and all(m.kind == "number" for m in mismatches)
    report = lockmod.render_mismatches(mismatches)
    assert "logits probe" in report and "> tol" in report
    # A tolerance wider than the change accepts it.
    assert lockmod.compare_locks(lock, changed, rtol=0, atol=1e3) == []


def test_structural_change_is_reported_per_parameter(built):
    root, build, lock, _ = built
    edited = copy.deepcopy(lock)
    edited["graph"]["param_shapes"]["model.layers.0.mlp.up_proj.weight"] = [80, 48]
    edited["graph"]["hash"] = "0" * 64
    edited["arch"]["mlp"] = 80
    report = lockmod.render_mismatches(lockmod.compare_locks(edited, lock))
    assert "parameter model.layers.0.mlp.up_proj.weight shape: [80, 48] -> [64, 48]" in report
    assert "graph structure" in report and "mlp: 80 -> 64" in report


@pytest.mark.parametrize(
    "content, cause",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ('{"lock_version": 99}', "lock_version 99"),
        ('{"lock_version": 1, "spec": {}}', "lacks source"),
    ],
)
def test_bad_lock_file_is_a_one_line_error(built, tmp_path, content, cause):
    root, build, _, _ = built
    path = tmp_path / "prune.lock.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(PdcError, match=cause) as info:
        lockmod.check_build(build, path)
    assert "\n" not in str(info.value) and info.value.stage == "check"


def test_missing_pruned_checkpoint_is_a_one_line_error(tmp_path):
    with pytest.raises(PdcError, match="no Hugging Face checkpoint in .*prune/model"):
        lockmod.build_lock(tmp_path, None, SPEC_TEXT)


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
