"""The real model (slow): SmolLM2-135M pruned by `prune_width` (the quickstart's target) gets a
checkpoint, a `program.pt2` and an ONNX file that each reproduce the rewritten program, and a
fingerprint that comes out the same when the stage runs again."""

from __future__ import annotations

import pytest
import torch

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def test_smollm2_prune_outputs_and_fingerprint(tmp_path, real_assets):
    from pdc.emit.lock import build_lock, compare_locks
    from pdc.lang.settings import ImportanceConfig, WidthTarget
    from pdc.stages.prune_width import prune_width

    torch.set_num_threads(2)
    calib = torch.randint(0, 49152, (4, 64), generator=torch.Generator().manual_seed(0))
    target = WidthTarget(hidden=432, mlp=1024)
    first = prune_width(real_assets["smollm2"], calib, target, ImportanceConfig(), tmp_path / "a", progress=False)
    assert set(first.artifacts) == {"model", "program.pt2", "model.onnx"}
    assert all(a.max_abs_diff <= a.tolerance for a in first.artifacts.values())
    assert (first.arch_after["hidden"], first.arch_after["mlp"], first.arch_after["layers"]) == (432, 1024, 30)
    ids = torch.randint(0, 49152, (3, 19), generator=torch.Generator().manual_seed(1))
    pt2 = torch.export.load(str(tmp_path / "a" / "program.pt2")).module()
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "a" / "model", dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids=ids).logits, pt2(ids), rtol=0, atol=1e-4)
    again = prune_width(real_assets["smollm2"], calib, target, ImportanceConfig(), tmp_path / "b", progress=False,
                        deploy=False)
    assert compare_locks(build_lock(first, "spec"), build_lock(again, "spec"), rtol=0, atol=0) == []
