"""Dense decoder families pruned from their graph alone: one tiny random model per family, built
from a config and saved as a Hugging Face checkpoint, through the functions `pdc run` calls.

For every family: keeping everything reproduces the source logits; width pruning (hidden, MLP,
heads / kv groups) and depth pruning emit a checkpoint that `AutoModelForCausalLM` loads and that
computes the rewritten program's logits (fp32, 1e-5 relative); the loaded model has exactly the
parameter count the dry run predicts from the emitted config (`pdc.plan.counts`).

The families stand for graph patterns, not for a table in pdc: fused q|k|v and gate|up weights
(phi3), heads interleaved in a fused weight with a parallel residual and LayerNorm with bias
(gpt_neox), per-head q/k norms (qwen3), full-width q/k norms and post-norm layers (olmo2),
post-sublayer norms, an embedding scale from sqrt(hidden), soft-capping and alternating sliding
and global layers (gemma2), config multipliers (granite).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch

from conftest import save_tiny_checkpoint
from pdc.emit.pruned import emit_pruned
from pdc.graph.export import export_dir, materialize
from pdc.graph.manager import PassManager
from pdc.lang.settings import ImportanceConfig, WidthTarget
from pdc.passes.drop_layers import DropLayers
from pdc.passes.slice_heads import SliceHeads
from pdc.passes.slice_hidden import SliceHidden
from pdc.passes.slice_mlp import SliceMlp
from pdc.plan.counts import count_arch
from pdc.stages.prune_width import prune_program

IDS = torch.randint(0, 128, (2, 13), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (4, 16), generator=torch.Generator().manual_seed(2))
SIZES = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=3)
GQA = dict(num_key_value_heads=2, head_dim=16)
# family -> (config overrides, width target): targets the family's config can represent.
FAMILIES = {
    "llama": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2)),
    "mistral": (dict(GQA, sliding_window=None), WidthTarget(hidden=40, kv_heads=1)),
    "qwen2": (dict(GQA, tie_word_embeddings=True), WidthTarget(hidden=48, mlp=64, heads=2)),
    "qwen3": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2, kv_heads=1)),
    "gemma2": (dict(GQA, query_pre_attn_scalar=16, attn_logit_softcapping=20.0, final_logit_softcapping=10.0,
                    sliding_window=4, tie_word_embeddings=True), WidthTarget(hidden=48, mlp=64, heads=2)),
    "phi3": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2, kv_heads=1)),
    "gpt_neox": (dict(use_parallel_residual=True, rotary_pct=0.5), WidthTarget(hidden=48, mlp=64, heads=3, kv_heads=3)),
    "olmo2": (dict(GQA), WidthTarget(hidden=48, mlp=64, heads=2, kv_heads=1)),
    "granite": (dict(GQA, embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                     logits_scaling=4.0), WidthTarget(hidden=48, mlp=64, heads=2)),
}
DROP = [1, 2]


@pytest.fixture(scope="module")
def source_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")

    @functools.lru_cache(maxsize=None)
    def get(family: str):
        overrides, _ = FAMILIES[family]
        return save_tiny_checkpoint(root / family, "custom", model_type=family, **SIZES, **overrides)

    return get


@pytest.fixture(scope="module")
def programs(source_dirs):
    """One export per family (the slow step); each test gets a clone."""
    @functools.lru_cache(maxsize=None)
    def get(family: str):
        program = export_dir(source_dirs(family))
        materialize(program)
        return program

    return lambda family: get(family).clone()


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _assert_same_logits(model, program):
    with torch.no_grad():
        got, want = model(input_ids=IDS).logits, program.forward(IDS)
    scale = want.abs().max().item()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale)


def _assert_counts(model, program, source_cfg):
    built = sum(p.numel() for p in model.parameters())
    assert built == program.num_params() == count_arch(source_cfg, program.arch).total


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_reproduces_source_logits(family, source_dirs, programs):
    """The exported program computes the source checkpoint's logits, and passes that keep every
    unit leave them bit-identical."""
    program = programs(family)
    _assert_same_logits(_hf(source_dirs(family)), program)
    before = program.forward(IDS)
    a = program.arch
    layers = range(a.layers)
    PassManager([
        SliceHidden(torch.arange(a.hidden)),
        SliceMlp({i: torch.arange(a.mlp) for i in layers}),
        SliceHeads({i: torch.arange(a.heads) for i in layers}, {i: torch.arange(a.kv_heads) for i in layers}),
    ]).run(program)
    assert torch.equal(program.forward(IDS), before)


@pytest.mark.parametrize("family", FAMILIES)
def test_width_prune_checkpoint_equals_program(family, source_dirs, programs, tmp_path):
    """Activation importance, slicing and emission as the width stage runs them: the emitted
    checkpoint loads, computes the rewritten program's logits and has the dry run's count."""
    program = programs(family)
    source_cfg = dict(program.hf_config)
    target = FAMILIES[family][1]
    prune_program(program, CALIB, target, ImportanceConfig(), progress=False)
    for axis in ("hidden", "mlp", "heads", "kv_heads"):
        if getattr(target, axis) is not None:
            assert getattr(program.arch, axis) == getattr(target, axis)
    emit_pruned(program, tmp_path, source_dirs(family), None, deploy=False)
    model = _hf(tmp_path / "model")
    _assert_same_logits(model, program)
    _assert_counts(model, program, source_cfg)


@pytest.mark.parametrize("family", FAMILIES)
def test_depth_prune_checkpoint_equals_program(family, source_dirs, programs, tmp_path):
    """Dropping layers 1 and 2: the emitted checkpoint (per-layer config lists cut with the
    layers) computes the rewritten program's logits and has the dry run's count."""
    program = programs(family)
    source_cfg = dict(program.hf_config)
    PassManager([DropLayers(DROP)]).run(program)
    emit_pruned(program, tmp_path, source_dirs(family), None, deploy=False)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["num_hidden_layers"] == SIZES["num_hidden_layers"] - len(DROP)
    if isinstance(source_cfg.get("layer_types"), list):
        keep = [i for i in range(SIZES["num_hidden_layers"]) if i not in DROP]
        assert config["layer_types"] == [source_cfg["layer_types"][i] for i in keep]
    model = _hf(tmp_path / "model")
    _assert_same_logits(model, program)
    _assert_counts(model, program, source_cfg)
