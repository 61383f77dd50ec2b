"""Real-model depth pruning (slow): SmolLM2-135M-Instruct, 30 -> 27 layers by block influence."""

from __future__ import annotations

import json
import os

import pytest
import torch

from pdc.plan.counts import count

pytestmark = pytest.mark.slow


def test_smollm2_depth_prune_loads_and_generates(tmp_path, real_assets):
    """The emitted 27-layer checkpoint loads, has the arch's parameter count, and greedy decoding
    with the KV cache equals decoding without it."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdc.stages.prune_depth import prune_depth
    from pdc.stages.evaluate import builtin_heldout_blocks
    from pdc.lang.settings import DepthTarget, Saliency

    src = real_assets["smollm2"]
    tok = AutoTokenizer.from_pretrained(src)
    blocks = builtin_heldout_blocks(tok, 128, n_blocks=2)
    summary = prune_depth(src, DepthTarget(27, Saliency("cosine")), blocks, tmp_path / "prune", progress=False,
                          deploy=False)
    assert summary.arch_after["layers"] == 27 and len(list(summary.saliency.dropped_layers)) == 3
    table = json.loads((tmp_path / "prune" / "saliency.json").read_text())
    assert len(table["candidates"]) == 28
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "prune" / "model", dtype=torch.float32).eval()
    assert sum(p.numel() for p in model.parameters()) == count(json.loads((tmp_path / "prune" / "model" / "config.json").read_text())).total
    prompt = AutoTokenizer.from_pretrained(tmp_path / "prune" / "model")("The capital of France is", return_tensors="pt")
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=tok.eos_token_id)
    with torch.no_grad():
        assert torch.equal(model.generate(**prompt, use_cache=True, **kwargs), model.generate(**prompt, use_cache=False, **kwargs))
