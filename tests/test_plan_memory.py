"""The dry run's memory plan: published sizes, the ZeRO partitioning algebra, the activation
estimate against the tensors a real Llama saves, the fewest GPUs, and the recipes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pdc.arch import Arch
from pdc.cli import main as pdc_main
from pdc.errors import PdcError
from pdc.lang import load_spec
from pdc.lang.settings import TrainConfig
from pdc.plan.counts import count_arch
from pdc.plan.dry_run import build_plan
from pdc.plan.memory import GB, activations, memory_plan, parse_size, train_memory
from pdc.plan.training import divisors

SPECS = Path(__file__).resolve().parents[1] / "specs"
LLAMA_8B_CONFIG = json.loads((Path(__file__).resolve().parents[1] / "pdc/configs/llama-3.1-8b.json").read_text())
LLAMA_8B = Arch.from_hf_config(LLAMA_8B_CONFIG)


def params_of(arch: Arch) -> int:
    """What the plan passes: the exact count of the config pdc would emit for `arch`."""
    return count_arch(LLAMA_8B_CONFIG, arch).total


def test_published_sizes():
    """Llama-3.1-8B has 8,030,261,248 parameters: 16.06 GB of bf16 weights, 32.1 GB in fp32."""
    assert params_of(LLAMA_8B) == 8_030_261_248
    bf16 = train_memory(LLAMA_8B, TrainConfig(precision="bf16", seq_len=8), "correct", 1, None, None, params_of)
    fp32 = train_memory(LLAMA_8B, TrainConfig(precision="fp32", seq_len=8), "correct", 1, None, None, params_of)
    assert bf16["parts"]["weights"] == 2 * 8_030_261_248 and round(bf16["parts"]["weights"] / GB, 2) == 16.06
    assert fp32["parts"]["weights"] == 4 * 8_030_261_248
    # Adam in mixed precision: 12 bytes a parameter (fp32 master + two moments), 8 in fp32
    assert bf16["parts"]["optimizer"] == 12 * 8_030_261_248 and fp32["parts"]["optimizer"] == 8 * 8_030_261_248


@pytest.mark.parametrize("zero, divided", [(0, set()), (1, {"optimizer"}), (2, {"optimizer", "gradients"}),
                                            (3, {"optimizer", "gradients", "weights"})])
def test_zero_stages_partition_what_the_zero_paper_says(zero, divided):
    cfg = TrainConfig(precision="bf16", zero=zero, seq_len=1024)
    one = train_memory(LLAMA_8B, cfg, "correct", 1, None, None, params_of)["parts"]
    eight = train_memory(LLAMA_8B, cfg, "correct", 8, None, None, params_of)["parts"]
    for part in one:
        assert eight[part] == (one[part] / 8 if part in divided else one[part]), part


def test_lora_and_norm_correction_train_few_parameters():
    full = train_memory(LLAMA_8B, TrainConfig(precision="bf16"), "correct", 1, None, None, params_of)["parts"]
    lora = train_memory(LLAMA_8B, TrainConfig(precision="bf16", method="lora", lora_rank=16), "correct", 1, None,
                        None, params_of)["parts"]
    assert lora["weights"] == full["weights"] and lora["optimizer"] < full["optimizer"] / 100
    # rank 16 on the 7 projections of 32 layers: 16 x (in + out) each
    assert lora["optimizer"] == 12 * 32 * 16 * ((4096 + 4096) + 2 * (4096 + 1024) + (4096 + 4096)
                                                 + 2 * (4096 + 14336) + (14336 + 4096))


@pytest.mark.parametrize("hidden, mlp, heads, kv", [(256, 688, 8, 2), (384, 1024, 6, 6)])
def test_the_activation_estimate_matches_what_a_llama_saves(hidden, mlp, heads, kv):
    """Sum the tensors (weights aside) a transformers Llama (SDPA attention, fp32) keeps for its
    backward pass: the estimate is within 15 %; with checkpointing the forward keeps a small
    fraction of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_attention_heads=heads, num_key_value_heads=kv,
                      num_hidden_layers=3, vocab_size=300, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).train()
    arch = Arch.from_hf_config(cfg.to_dict())
    ids = torch.randint(0, 300, (2, 256))

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def saved_bytes() -> int:
        seen: dict = {}

        def pack(t):
            if t.untyped_storage().data_ptr() not in weights:  # a linear keeps its weight too: not an activation
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            model(input_ids=ids)
        return sum(seen.values())

    full = saved_bytes()
    assert 0.85 < full / activations(arch, ids.numel(), 4, False) < 1.15
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    kept = saved_bytes()  # layer inputs; one layer is recomputed at a time in the backward pass
    assert kept < 0.25 * full
    assert kept < activations(arch, ids.numel(), 4, True)


def test_the_fewest_gpus_fit_and_one_valid_size_fewer_does_not():
    spec = load_spec(SPECS / "llama-3.1-8b-to-4b-width.pds")
    gpu = parse_size("80G")
    for st in memory_plan(spec, gpu, params_of):
        if st["kind"] not in ("correct", "distill") or st["gpus"] is None:
            continue
        stage = spec.stage(st["name"])
        model = spec.source_arch if st["kind"] == "correct" else spec.final_arch
        teacher = spec.source_arch if st["kind"] == "distill" else None
        at = lambda n: train_memory(model, stage.train, st["kind"], n, teacher, gpu, params_of)["total"]  # noqa: E731
        assert at(st["gpus"]) <= gpu
        smaller = [n for n in divisors(stage.train.global_batch) if n < st["gpus"]]
        assert all(at(n) > gpu for n in smaller)
        assert st["gpus"] in divisors(stage.train.global_batch)


def test_the_recipes_fit_80gb_gpus_with_the_settings_they_carry():
    """Each recipe's stages fit 80 GB GPUs, the training stages on at most one 8-GPU node; they
    carry activation checkpointing because without it their ZeRO stage needs more GPUs or none
    fits at micro_batch 1 x seq_len 8192."""
    for path in sorted(SPECS.glob("*.pds")):
        spec = load_spec(path)
        plan = build_plan(spec, parse_size("80G"))
        for st in plan["memory"]:
            assert st["gpus"] is not None, (path.name, st["name"])
            if st["kind"] in ("correct", "distill"):
                assert st["activation_checkpointing"] and st["gpus"] <= 8, (path.name, st["name"])
                without = st["alternatives"][f"zero={st['zero']}"]
                assert without is None or without > st["gpus"], (path.name, st["name"])


def test_sizes_parse_and_bad_ones_are_refused(capsys):
    assert parse_size("80G") == parse_size("80GB") == 80 * 10**9
    assert parse_size("80GiB") == 80 * 2**30 and parse_size("141") == 141 * 10**9
    with pytest.raises(PdcError, match="cannot read the memory size '80 gigs'"):
        parse_size("80 gigs")
    spec = str(SPECS / "llama-3.1-8b-to-4b-width.pds")
    assert pdc_main(["compile", spec, "--dry-run", "--gpu-mem", "lots"]) == 2
    assert "cannot read the memory size 'lots'" in capsys.readouterr().err
    assert pdc_main(["compile", spec, "--gpu-mem", "80G"]) == 2
    assert "--gpu-mem needs --dry-run" in capsys.readouterr().err


def test_the_dry_run_prints_the_plan_per_stage(capsys):
    assert pdc_main(["compile", str(SPECS / "mistral-nemo-12b-to-8b.pds"), "--dry-run", "--gpu-mem", "80G"]) == 0
    out = capsys.readouterr().out
    assert "memory per GPU of 80.0 GB" in out
    assert out.count("fits on") == 4 and "    teacher" in out and "(replicated)" in out
    assert "weights           24.5 GB" in out  # Mistral-NeMo-12B: 12.25B parameters in bf16
