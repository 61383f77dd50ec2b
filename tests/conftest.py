"""Shared fixtures: tiny random models of each supported family, built from configs in seconds."""

from __future__ import annotations

import os

import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

FAMILY_CONFIGS = {
    "llama": dict(
        model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
    "mistral": dict(
        model_type="mistral", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, tie_word_embeddings=False, sliding_window=None,
    ),
    "qwen2": dict(
        model_type="qwen2", vocab_size=128, hidden_size=64, intermediate_size=96,
        num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=256, tie_word_embeddings=True,
    ),
}


def make_tiny_model(family: str = "llama", seed: int = 0, **overrides):
    """A randomly initialised tiny causal LM of `family` (eval mode, fp32)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(FAMILY_CONFIGS[family])
    cfg.update(overrides)
    model_type = cfg.pop("model_type")
    config = AutoConfig.for_model(model_type, **cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init leaves norms at 1; perturb them so channel coupling through norms is tested.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(params=sorted(FAMILY_CONFIGS))
def family(request):
    return request.param


@pytest.fixture
def tiny_model(family):
    return make_tiny_model(family)
