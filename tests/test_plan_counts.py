"""Parameter counts of the dry run: from the emitted config instantiated on the meta device,
for dense models and mixtures of experts (total and active per token)."""

from __future__ import annotations

import json

import pytest
from transformers import AutoConfig, AutoModelForCausalLM

from pdc.arch import Arch
from pdc.lang import check_text
from pdc.plan.counts import count, count_arch
from pdc.plan.dry_run import build_plan

BASE = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2)
MOE = {
    "mixtral": dict(num_local_experts=8, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16),
    "olmoe": dict(num_experts=8, num_experts_per_tok=2),
    "qwen2_moe": dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
                      shared_expert_intermediate_size=48),
}
EXPERT_KEY = {"mixtral": "num_local_experts", "qwen3_moe": "num_experts", "olmoe": "num_experts",
              "qwen2_moe": "num_experts"}


def _built(cfg: dict) -> int:
    """Parameters of the model transformers builds from `cfg` with real (random) weights."""
    cfg = dict(cfg)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(cfg.pop("model_type"), **cfg))
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("model_type", ["llama", "qwen2", *MOE])
def test_counts_equal_the_built_model(model_type):
    cfg = dict(model_type=model_type, **BASE, **MOE.get(model_type, {}))
    c = count(cfg)
    assert c.total == _built(cfg)
    assert c.total == c.non_embedding + c.embedding
    assert (c.active == c.total) == (model_type not in MOE)


@pytest.mark.parametrize("model_type", list(MOE))
def test_active_parameters_are_those_of_the_top_k_experts(model_type):
    """With 8 experts and top-2 routing a token uses what a 2-expert model holds, except the
    router's rows for the other 6 experts (the router scores every expert)."""
    cfg = dict(model_type=model_type, **BASE, **MOE[model_type])
    eight = count(cfg)
    two = count(dict(cfg, **{EXPERT_KEY[model_type]: 2}))
    router_rows = (8 - 2) * BASE["hidden_size"] * BASE["num_hidden_layers"]
    assert eight.active == two.total + router_rows
    assert eight.linear == two.linear  # FLOPs: a token multiplies two experts either way
    assert eight.total > eight.active


def test_moe_width_targets_count_total_and_active(tmp_path):
    """`experts=` and `expert_mlp=` shrink total and active parameters as the emitted config
    built on the meta device says, and the plan reports both."""
    (tmp_path / "m").mkdir()
    cfg = dict(model_type="qwen2_moe", **BASE, **MOE["qwen2_moe"])
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    spec = check_text('model m = dir("m")\nprune width { experts=4 expert_mlp=16 shared_mlp=24 importance=magnitude }\n',
                      tmp_path / "s.pds")
    plan = build_plan(spec)
    target = Arch.from_hf_config(cfg).with_sizes(experts=4, expert_mlp=16, shared_mlp=24)
    want = count_arch(cfg, target)
    emitted = target.to_hf_config(cfg)
    assert (emitted["num_experts"], emitted["moe_intermediate_size"], emitted["shared_expert_intermediate_size"]) == (4, 16, 24)
    assert plan["final"]["params_total"] == want.total == _built(emitted)
    assert plan["final"]["params_active"] == want.active < plan["source"]["params_active"]
    assert plan["stages"][0]["axes"]["experts"] == [8, 4]


def test_counts_of_a_paper_size_config():
    """Llama-3.1-8B's bundled config gives the published 8.03B parameters (on the meta device:
    nothing is allocated)."""
    from importlib.resources import files

    cfg = json.loads(files("pdc").joinpath("configs", "llama-3.1-8b.json").read_text())
    assert count(cfg).total == 8_030_261_248
