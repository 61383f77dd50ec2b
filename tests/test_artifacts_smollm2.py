"""The real model (slow): SmolLM2-135M as `prune/model` gets a verified `program.pt2`, a verified
ONNX file and a deterministic lock that checks clean against itself."""

from __future__ import annotations

import os

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_smollm2_artifacts_and_lock(tmp_path, real_assets):
    from pdc.emit import artifacts, lock

    source = real_assets["smollm2"]
    torch.set_num_threads(2)
    build = tmp_path / "build"
    (build / "prune").mkdir(parents=True)
    os.symlink(source, build / "prune" / "model")
    record = artifacts.emit_all(build / "prune")
    assert record["program.pt2"].max_abs_diff <= 1e-5
    assert record["model.onnx"].max_abs_diff <= record["model.onnx"].tolerance
    first = lock.write_lock(lock.build_lock(build, source, "spec"), build / lock.LOCK_NAME)
    again = lock.write_lock(lock.build_lock(build, source, "spec"), tmp_path / "again.json")
    assert first.read_bytes() == again.read_bytes()
    ok, report = lock.check_build(build, tmp_path / "again.json")
    assert ok, report
    arch = lock.read_lock(first)["arch"]
    assert (arch["layers"], arch["hidden"], arch["heads"], arch["kv_heads"]) == (30, 576, 9, 3)
