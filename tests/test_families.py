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

import json

import pytest
import torch

from family_sources import FAMILIES, GQA, PARAMS, SIZES, checkpoint_fixtures
from graph_exports import assert_same_logits, load_hf
from pdc.emit.pruned import emit_pruned
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
DROP = [1, 2]


source_dirs, programs = checkpoint_fixtures(FAMILIES, SIZES, "families")


def _assert_counts(model, program, source_cfg):
    built = sum(p.numel() for p in model.parameters())
    assert built == program.num_params() == count_arch(source_cfg, program.arch).total


@pytest.mark.parametrize("family", PARAMS)
def test_keep_all_reproduces_source_logits(family, source_dirs, programs):
    """The exported program computes the source checkpoint's logits, and passes that keep every
    unit leave them bit-identical."""
    program = programs(family)
    assert_same_logits(load_hf(source_dirs(family)), program, IDS)
    before = program.forward(IDS)
    a = program.arch
    layers = range(a.layers)
    PassManager([
        SliceHidden(torch.arange(a.hidden)),
        SliceMlp({i: torch.arange(a.mlp) for i in layers}),
        SliceHeads({i: torch.arange(a.heads) for i in layers}, {i: torch.arange(a.kv_heads) for i in layers}),
    ]).run(program)
    assert torch.equal(program.forward(IDS), before)


def _dry_run_total(source_dir, target: WidthTarget, tmp_path, capsys) -> int:
    """`pdc compile --dry-run --json` of a width spec on a directory holding only config.json."""
    from pdc.cli import main

    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text((source_dir / "config.json").read_text())
    sizes = " ".join(f"{a}={getattr(target, a)}" for a in ("hidden", "mlp", "heads", "kv_heads")
                     if getattr(target, a) is not None)
    spec = tmp_path / "w.pds"
    spec.write_text(f'model m = dir("cfg")\nprune width {{ {sizes} importance=magnitude }}\n')
    capsys.readouterr()
    assert main(["compile", str(spec), "--dry-run", "--json"]) == 0
    return json.loads(capsys.readouterr().out)["final"]["params_total"]


@pytest.mark.parametrize("family", PARAMS)
def test_width_prune_checkpoint_equals_program(family, source_dirs, programs, tmp_path, capsys):
    """Activation importance, slicing and emission as the width stage runs them: the emitted
    checkpoint loads, computes the rewritten program's logits and has the count that
    `pdc compile --dry-run` predicts from the source's config.json alone."""
    predicted = _dry_run_total(source_dirs(family), FAMILIES[family][1], tmp_path, capsys)
    program = programs(family)
    source_cfg = dict(program.hf_config)
    target = FAMILIES[family][1]
    prune_program(program, CALIB, target, ImportanceConfig(), progress=False)
    for axis in ("hidden", "mlp", "heads", "kv_heads"):
        if getattr(target, axis) is not None:
            assert getattr(program.arch, axis) == getattr(target, axis)
    emit_pruned(program, tmp_path, source_dirs(family), None, deploy=False)
    model = load_hf(tmp_path / "model")
    assert_same_logits(model, program, IDS)
    _assert_counts(model, program, source_cfg)
    assert sum(p.numel() for p in model.parameters()) == predicted


@pytest.mark.parametrize("family", PARAMS)
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
    model = load_hf(tmp_path / "model")
    assert_same_logits(model, program, IDS)
    _assert_counts(model, program, source_cfg)


class _GatedConfig(__import__("transformers").LlamaConfig):
    model_type = "pdc_toy_gated_attention"


def _gated_model_class():
    """A Llama whose attention output is scaled per channel by a learned gate before o_proj:
    a parameter inside the attention that is neither a q/k/v norm nor one over head_dim."""
    import types

    from transformers import AutoConfig, AutoModelForCausalLM, LlamaForCausalLM

    class GatedForCausalLM(LlamaForCausalLM):
        config_class = _GatedConfig

        def __init__(self, config):
            super().__init__(config)
            for layer in self.model.layers:
                o = layer.self_attn.o_proj
                o.head_gate = torch.nn.Parameter(torch.ones(o.in_features))
                o.forward = types.MethodType(
                    lambda self, x: torch.nn.functional.linear(x * self.head_gate, self.weight, self.bias), o)

    try:
        AutoConfig.register(_GatedConfig.model_type, _GatedConfig)
        AutoModelForCausalLM.register(_GatedConfig, GatedForCausalLM)
    except ValueError:  # registered by an earlier test in this process
        pass
    return AutoModelForCausalLM


def test_unsupported_pattern_is_one_error_naming_node_and_module(tmp_path, monkeypatch):
    """A pattern pdc cannot classify stops the width stage right after the export, before any
    weight is read or importance computed, with one error naming the node, its module and why."""
    from pdc.errors import PdcError
    from pdc.stages import prune_width as stage

    auto = _gated_model_class()
    config = _GatedConfig(**SIZES, **GQA)
    auto.from_config(config).save_pretrained(tmp_path / "gated")
    monkeypatch.setattr(stage, "materialize", lambda *a, **k: pytest.fail("weights were read"))
    monkeypatch.setattr(stage.imp_mod, "compute", lambda *a, **k: pytest.fail("importance ran"))
    with pytest.raises(PdcError) as err:
        stage.prune_width(tmp_path / "gated", CALIB, WidthTarget(hidden=48), ImportanceConfig(), tmp_path / "out",
                          progress=False)
    message = err.value.message
    assert message.startswith("cannot classify node mul")
    assert "from model.layers.0.self_attn.o_proj" in message
    assert "parameter model.layers.0.self_attn.o_proj.head_gate inside the attention" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "olmo2"])
def test_correction_targets_come_from_the_structure(family, source_dirs):
    """LoRA adapts every linear of the decoder layers and norm-only correction trains every
    norm, whatever the family calls them (fused qkv_proj, query_key_value, dense_h_to_4h, q/k
    norms, LayerNorm biases); peft accepts the module names as they are."""
    from peft import LoraConfig, get_peft_model

    from pdc.stages.correct import correction_targets

    model = load_hf(source_dirs(family))
    head = model.get_output_embeddings()
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and m is not head}
    norms = {f"{n}.{p}" for n, m in model.named_modules() if "Norm" in type(m).__name__
             for p, _ in m.named_parameters(recurse=False)}
    lora = correction_targets(source_dirs(family), "lora")["lora_modules"]
    assert set(lora) == linears and len(lora) == len(linears)
    assert set(correction_targets(source_dirs(family), "norm")["norm_params"]) == norms
    adapted = get_peft_model(model, LoraConfig(r=2, target_modules=lora))
    assert sum(1 for _, m in adapted.named_modules() if hasattr(m, "lora_A")) == len(linears)


def test_per_head_modules_are_refused_naming_the_split():
    """StableLM's qk_layernorm runs one LayerNorm module per head (the heads split apart, each
    normalised by its own weights): not a pattern pdc slices, so discovery names the split."""
    from conftest import make_tiny_model
    from pdc.errors import PdcError
    from pdc.graph.export import export_model
    from pdc.graph.structure import structure_of

    model = make_tiny_model("custom", model_type="stablelm", **dict(SIZES, num_hidden_layers=2),
                            num_key_value_heads=2, qk_layernorm=True)
    with pytest.raises(PdcError, match=r"cannot classify node split \(call_function split.Tensor\) from "
                                       r"model.layers.0.self_attn.q_layernorm: it splits the attention heads apart"):
        structure_of(export_model(model))


@pytest.mark.parametrize("family", ["phi3", "gpt_neox", "olmo2"])
def test_sliced_spans_equal_rediscovery(family, programs):
    """After slicing fused and interleaved projections (and q/k norms), the structure the passes
    kept up to date (spans re-traced through the recounted slice/split/view constants) equals a
    rediscovery of the rewritten graph: the manager's check="full" compares them after every pass."""
    program = programs(family)
    a = program.arch
    layers = range(a.layers)
    rep = a.heads // a.kv_heads
    keep_kv = torch.tensor([0, a.kv_heads - 1]) if a.kv_heads > 2 else torch.tensor([a.kv_heads - 1])
    keep_heads = torch.cat([g * rep + torch.arange(rep)[-1:] for g in keep_kv.tolist()])
    PassManager([
        SliceHidden(torch.arange(0, a.hidden, 2)),
        SliceMlp({i: torch.arange(5, 5 + a.mlp // 2) for i in layers}),
        SliceHeads({i: keep_heads for i in layers}, {i: keep_kv for i in layers}),
    ], check="full").run(program)
    assert program.arch.heads == len(keep_heads) and program.arch.kv_heads == len(keep_kv)


@pytest.mark.parametrize("family, kind", [("gemma2", "loss"), ("gpt_neox", "cosine")])
def test_depth_stage_on_any_family(family, kind, source_dirs, tmp_path):
    """The depth stage end to end (saliency with layers temporarily removed from the Hugging Face
    model, whatever holds its layer list; the drop applied to the program; emission): the
    emitted config keeps per-layer lists in step with the kept layers (Gemma 2 alternates
    sliding and global attention), and the checkpoint has the count the stage recorded."""
    from pdc.lang.settings import DepthTarget, Saliency
    from pdc.stages.prune_depth import prune_depth

    src = source_dirs(family)
    result = prune_depth(src, DepthTarget(2, Saliency(kind), contiguous=kind == "loss"), CALIB, tmp_path / "out",
                         progress=False, deploy=False)
    dropped = list(result.saliency.dropped_layers)
    assert len(dropped) == 2 and result.arch_after["layers"] == 2
    source_cfg = json.loads((src / "config.json").read_text())
    config = json.loads((tmp_path / "out" / "model" / "config.json").read_text())
    if isinstance(source_cfg.get("layer_types"), list):
        kept = [i for i in range(SIZES["num_hidden_layers"]) if i not in dropped]
        assert config["layer_types"] == [source_cfg["layer_types"][i] for i in kept]
    model = load_hf(tmp_path / "out" / "model")
    assert sum(p.numel() for p in model.parameters()) == result.params_after
