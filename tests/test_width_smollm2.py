"""Slow: SmolLM2-135M pruned to hidden=432, mlp=1024 (heads and 30 layers kept).

Invariant checked: activation importance leaves a far better model (held-out perplexity) than
weight magnitude or random ranking, and the pruned size is exactly the count of its emitted config.
Run: HF_HUB_OFFLINE=1 pytest -m slow -s tests/test_width_smollm2.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from pdc.plan.counts import count_arch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.slow
def test_activation_importance_beats_magnitude_and_random(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pdc.arch import Arch
    from pdc.inputs.assets import smollm2_dir
    from pdc.inputs.data import take, token_blocks
    from pdc.stages.evaluate import builtin_heldout_blocks, perplexity
    from pdc.stages.prune_width import prune_width
    from pdc.lang.settings import DataSource, ImportanceConfig, WidthTarget

    src = smollm2_dir()
    tok = AutoTokenizer.from_pretrained(src)
    calib = take(token_blocks(DataSource("builtin", "wiki"), tok, 256), 64, seed=0).read()
    heldout = builtin_heldout_blocks(tok, 256, n_blocks=32)
    target = WidthTarget(hidden=432, mlp=1024)
    base_arch = Arch.from_hf_config(json.loads((src / "config.json").read_text()))
    want = count_arch(json.loads((src / "config.json").read_text()), base_arch.with_sizes(hidden=432, mlp=1024)).total
    assert want == 80_979_696
    ppl = {}
    base = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    ppl["base"] = perplexity(base, heldout, batch_size=8)
    del base
    for method in ("activation", "magnitude", "random"):
        out = tmp_path / method
        summary = prune_width(src, calib, target, ImportanceConfig(method=method), out, progress=False,
                              deploy=False)
        assert summary.params_after == want
        model = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32)
        assert sum(p.numel() for p in model.parameters()) == want
        ppl[method] = perplexity(model, heldout, batch_size=8)
        print(f"{method}: ppl {ppl[method]:.1f}  seconds {summary.seconds}")
        del model
    print("held-out perplexity:", {k: round(v, 1) for k, v in ppl.items()})
    assert ppl["activation"] * 10 < ppl["magnitude"]
    assert ppl["activation"] * 10 < ppl["random"]
