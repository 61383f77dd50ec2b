"""The dry run's memory plan: published sizes, the ZeRO partitioning algebra, the activation
estimate against the tensors a real Llama saves, the fewest GPUs, and the recipes."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
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
from pdc.plan.memory import (GB, LOSS_BYTES, activations, largest_layer_params, memory_plan, parse_size,
                              train_memory)
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
    # bf16 gradients and the fp32 ones the optimizer steps on; fp32 steps on its own
    assert bf16["parts"]["gradients"] == 6 * 8_030_261_248 and fp32["parts"]["gradients"] == 4 * 8_030_261_248


def deepspeed_model_states(psi: int, largest: int, zero: int, n: int) -> int:
    """What DeepSpeed's own estimators (no offload) give per GPU for a bf16 model of `psi`
    parameters on `n` GPUs: ZeRO-2 and 3 as they are; ZeRO-1 is ZeRO-2 with the 16-bit gradients
    whole; ZeRO-0 is ZeRO-1 on one GPU (nothing partitioned)."""
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    if zero == 3:
        return estimate_zero3_model_states_mem_needs(psi, largest, num_gpus_per_node=n, cpu_offload=False)[1]
    if zero == 0:
        return deepspeed_model_states(psi, largest, 1, 1)
    z2 = estimate_zero2_model_states_mem_needs(psi, num_gpus_per_node=n, cpu_offload=False)[1]
    return z2 + (int(2 * psi - 2 * psi / n) if zero == 1 else 0)


STATES = ("weights", "gradients", "optimizer", "gathered")


@pytest.mark.parametrize("zero", [0, 1, 2, 3])
@pytest.mark.parametrize("n", [1, 8, 64])
def test_model_states_are_deepspeeds_estimate(zero, n):
    """Llama-3.1-8B in bf16: weights + gradients + optimizer (+ the gathered layer under ZeRO-3,
    the 525M-parameter embedding) are what DeepSpeed's estimators give, to the byte's rounding;
    under ZeRO-3 2 bytes a parameter / N more: the plan keeps the fp32 gradient partition its
    ZeRO-2 estimate counts and its ZeRO-3 estimate leaves out."""
    cfg = TrainConfig(precision="bf16", zero=zero, seq_len=8)
    parts = train_memory(LLAMA_8B, cfg, "correct", n, None, None, params_of)["parts"]
    assert largest_layer_params(LLAMA_8B) == 128_256 * 4096
    expected = deepspeed_model_states(params_of(LLAMA_8B), largest_layer_params(LLAMA_8B), zero, n)
    extra = 2 * params_of(LLAMA_8B) / n if zero == 3 else 0
    assert sum(parts[k] for k in STATES) == pytest.approx(expected + extra, abs=8)


def test_no_recipe_stage_plans_less_than_deepspeed_estimates():
    """Every training stage of the three recipes, at the GPUs the plan gives it and at those of
    every alternative ZeRO stage: the planned model states (and the whole plan) are at least
    DeepSpeed's estimate for the model it trains."""
    checked = 0
    for path in sorted(SPECS.glob("*.pds")):
        spec = load_spec(path)
        for st in build_plan(spec, parse_size("80G"))["memory"]:
            if st["kind"] not in ("correct", "distill"):
                continue
            stage = spec.stage(st["name"])
            model = spec.source_arch if st["kind"] == "correct" else spec.final_arch
            for zero in range(4):
                cfg = dataclasses.replace(stage.train, zero=zero)
                for n in {1, 8, st["gpus"], *(v for v in st["alternatives"].values() if v)}:
                    plan = train_memory(model, cfg, st["kind"], n, None, None, params_of)
                    estimate = deepspeed_model_states(params_of(model), largest_layer_params(model), zero, n)
                    assert sum(plan["parts"][k] for k in STATES) >= estimate - 8, (path.name, st["name"], zero, n)
                    assert plan["total"] > estimate
                    checked += 1
    assert checked > 6 * 4


MEASURE = """
import resource, sys, torch
from pdc.lang.settings import TrainConfig
from pdc.stages.train import losses
from pdc.stages.train.stage import Cached
torch.set_num_threads(1)
kind, B, L, V, K = sys.argv[1], 1, 512, 32000, 64
torch.manual_seed(0)
s = torch.randn(B, L, V, dtype=torch.bfloat16, requires_grad=True)
t = torch.randn(B, L, V, dtype=torch.bfloat16)
ids = torch.randint(0, V, (B, L))
cached = Cached(torch.log_softmax(torch.randn(B, L, K), -1) - 0.1, torch.randint(0, V, (B, L, K)),
                torch.full((B, L), -2.3), torch.zeros(B))
# The peak is reset here (Linux's clear_refs 5 sets VmHWM to the current RSS), so what imports or
# earlier work once held never counts; VmHWM after the backward is the loss's own peak.
open("/proc/self/clear_refs", "w").write("5")
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
if kind == "ce":
    loss = losses.lm_loss(s, ids)
elif kind == "kl":
    loss = losses.distill_loss(s, t, ids, TrainConfig())[0]
else:
    loss = losses.cached_distill_loss(s, cached, ids, TrainConfig(cache_k=K))[0]
loss.backward()
hwm = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print((hwm - before) / (B * L * V))
"""


@pytest.mark.parametrize("kind", sorted(LOSS_BYTES))
def test_the_loss_temporaries_are_what_the_loss_allocates(kind):
    """The production losses on bf16 logits of 512 tokens x 32,000 ids, forward and backward, in
    a fresh process: its peak memory above what it held before, per logit entry, is within 20 %
    below the plan's figure (never above it)."""
    out = subprocess.run([sys.executable, "-c", MEASURE, kind], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured = float(out.stdout.split()[-1])
    assert 0.8 * LOSS_BYTES[kind] < measured <= LOSS_BYTES[kind], (kind, measured)


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
    assert out.count("fits on") == 4 and "    teacher" in out and "(zero3)" in out and "    gathered" in out
    assert "weights           24.5 GB" in out  # Mistral-NeMo-12B: 12.25B parameters in bf16


STEP = """
import json, resource, torch
from transformers import LlamaConfig, LlamaForCausalLM
from pdc.stages.train import losses
torch.set_num_threads(1)
cfg = LlamaConfig(**json.loads(__import__("sys").argv[1]))
ids = torch.randint(0, cfg.vocab_size, (2, 256))
# The peak is reset here (Linux's clear_refs 5 sets VmHWM to the current RSS), so what imports or
# earlier work once held never counts; VmHWM after the backward is the loss's own peak.
open("/proc/self/clear_refs", "w").write("5")
before = int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
torch.manual_seed(0)
model = LlamaForCausalLM(cfg).train()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), eps=1e-8)  # ds_config's torch AdamW
for _ in range(2):
    losses.lm_loss(model(input_ids=ids).logits, ids).backward()
    opt.step()
    opt.zero_grad(set_to_none=False)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before)
"""


@pytest.mark.slow  # 11 s: a fresh process builds and trains the model
def test_a_tiny_training_step_peaks_below_the_plan():
    """Two fp32 correction steps (forward, the production loss, backward, AdamW) of a 19M-parameter
    Llama with a 32,000-token vocabulary, 2 x 256 tokens, in a fresh process: the peak memory it
    adds is at most the plan's total less its reserve, and more than 75 % of it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=2,
                 num_hidden_layers=4, vocab_size=32000, attn_implementation="sdpa")
    with torch.device("meta"):
        psi = sum(p.numel() for p in LlamaForCausalLM(LlamaConfig(**sizes)).parameters())
    plan = train_memory(Arch.from_hf_config(LlamaConfig(**sizes).to_dict()),
                        TrainConfig(precision="fp32", micro_batch=2, seq_len=256), "correct", 1, None, None,
                        lambda arch: psi)
    out = subprocess.run([sys.executable, "-c", STEP, json.dumps(sizes)], capture_output=True, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    measured, budget = int(out.stdout.split()[-1]), plan["total"] - plan["parts"]["reserve"]
    assert 0.75 * budget < measured <= budget, (measured, budget)
