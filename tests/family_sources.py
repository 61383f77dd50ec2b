"""The tiny dense-family checkpoints shared by test_families.py and test_reconstruct.py, and the
one pair of fixtures every family test file builds its sources with (not a test module).

`checkpoint_fixtures(families, sizes, folder)` returns module-scoped fixtures `source_dirs`
(`family -> checkpoint dir`, each saved once) and `programs` (`family -> Program`: each family
exported once, the slow step, every call its own clone); a test module assigns them to those names.
"""

from __future__ import annotations

import functools

import pytest

from conftest import save_tiny_checkpoint
from pdc.graph.export import export_dir, materialize
from pdc.graph.program import Program
from pdc.lang.settings import WidthTarget

SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
GQA = dict(num_key_value_heads=2, head_dim=16)
# family -> (config overrides, width target): targets the family's config can represent.
FAMILIES = {
    "llama": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2)),
    "mistral": (dict(GQA, sliding_window=None), WidthTarget(hidden=40, heads=2, kv_heads=1)),
    "qwen2": (dict(GQA, tie_word_embeddings=True), WidthTarget(hidden=48, mlp=64, heads=2)),
    "qwen3": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2, kv_heads=1)),
    "gemma2": (dict(GQA, query_pre_attn_scalar=16, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                    sliding_window=4, tie_word_embeddings=True), WidthTarget(hidden=48, mlp=64, heads=2)),
    "phi3": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2, kv_heads=1)),
    "gpt_neox": (dict(use_parallel_residual=True, rotary_pct=0.5), WidthTarget(hidden=48, mlp=64, heads=3, kv_heads=3)),
    "olmo2": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2, kv_heads=1)),
    "granite": (dict(GQA, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                     logits_scaling=4.0), WidthTarget(hidden=48, mlp=64, heads=2)),
    # More of the same patterns (slow: run with -m slow): Gemma 3 (q/k norms + post norms),
    # Cohere (parallel residual, LayerNorm without bias), StableLM (parallel residual with
    # LayerNorm bias; head_dim derived from hidden / heads), Phi-2 (parallel, biases everywhere,
    # a biased output head).
    "gemma3_text": (dict(GQA, query_pre_attn_scalar=16, sliding_window=4, tie_word_embeddings=True),
                    WidthTarget(hidden=48, mlp=64, heads=2)),
    "cohere": (dict(GQA, use_qk_norm=False), WidthTarget(hidden=48, mlp=64, heads=2)),
    "stablelm": (dict(num_key_value_heads=2, use_parallel_residual=True), WidthTarget(hidden=32, mlp=64, heads=2)),
    "phi": (dict(), WidthTarget(hidden=48, mlp=64, heads=3, kv_heads=3)),
}
SLOW = {"gemma3_text", "cohere", "stablelm", "phi"}
PARAMS = [pytest.param(f, marks=pytest.mark.slow) if f in SLOW else f for f in FAMILIES]


def checkpoint_fixtures(families: dict, sizes: dict, folder: str):
    """(source_dirs, programs) fixtures for `families` (name -> (config overrides, ...)), each a
    tiny `sizes` checkpoint saved under a module's temporary `folder`."""

    @pytest.fixture(scope="module")
    def source_dirs(tmp_path_factory):
        root = tmp_path_factory.mktemp(folder)

        @functools.lru_cache(maxsize=None)
        def get(family: str):
            return save_tiny_checkpoint(root / family, "custom", model_type=family, **sizes, **families[family][0])

        return get

    @pytest.fixture(scope="module")
    def programs(source_dirs):
        @functools.lru_cache(maxsize=None)
        def get(family: str) -> Program:
            program = export_dir(source_dirs(family))
            materialize(program)
            return program

        return lambda family: get(family).clone()

    return source_dirs, programs
