"""The real model (slow): SmolLM2-135M as `prune/model` gets a verified `program.pt2`, a verified
ONNX file and a deterministic lock that checks clean against itself."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_smollm2_artifacts_and_lock(tmp_path):
    from pdc import artifacts, lock
    from pdc.assets import smollm2_dir

    try:
        source = smollm2_dir()
    except Exception as exc:  # the asset is built by `pdc setup`
        pytest.skip(f"SmolLM2 asset unavailable: {exc}")
    torch.set_num_threads(2)
    build = tmp_path / "build"
    (build / "prune").mkdir(parents=True)
    os.symlink(source, build / "prune" / "model")
    record = artifacts.emit_all(build / "prune")
    assert record["program.pt2"]["dynamic"]
    assert record["model.onnx"]["max_abs_diff"] <= 1e-4 and not record["model.onnx"]["external_data"]
    first = lock.write_lock(lock.build_lock(build, source, "spec"), build / lock.LOCK_NAME)
    again = lock.write_lock(lock.build_lock(build, source, "spec"), tmp_path / "again.json")
    assert first.read_bytes() == again.read_bytes()
    ok, report = lock.check_build(build, tmp_path / "again.json")
    assert ok, report
    arch = lock.read_lock(first)["arch"]
    assert (arch["layers"], arch["hidden"], arch["heads"], arch["kv_heads"]) == (30, 576, 9, 3)
