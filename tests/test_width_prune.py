"""Width pruning invariants on tiny random llama / mistral / qwen2 models."""

from __future__ import annotations

import json
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import make_tiny_model
from graph_exports import exported
from pdc.arch import Arch
from pdc.emit.checkpoint import emit_checkpoint
from pdc.emit.fingerprint import model_identity, tokens_identity
from pdc.errors import PdcError
from pdc.graph.export import seal
from pdc.graph.importance import select_heads
from pdc.plan.counts import count_arch
from pdc.stages.prune_width import prune_program, prune_width
from pdc.lang.settings import ImportanceConfig, WidthTarget

os.environ.setdefault("HF_HUB_OFFLINE", "1")
IDS = torch.randint(0, 128, (3, 11), generator=torch.Generator().manual_seed(1))
CALIB = torch.randint(0, 128, (8, 16), generator=torch.Generator().manual_seed(2))


@pytest.mark.parametrize("target", [WidthTarget(hidden=48, mlp=64, heads=2), WidthTarget(hidden=40, kv_heads=1)],
                         ids=["hidden-mlp-heads", "hidden-kv"])
def test_rewritten_graph_matches_emitted_checkpoint(family, target, tmp_path):
    """The rewritten graph and the emitted HF checkpoint give the same logits (fp32, 1e-5), and
    both have exactly the parameter count of the emitted config (`pdc.plan.counts`)."""
    from transformers import AutoModelForCausalLM

    program = exported(family)
    source_arch = program.arch
    prune_program(program, CALIB, target, ImportanceConfig(), progress=False)
    want = source_arch.with_sizes(hidden=target.hidden, mlp=target.mlp, heads=target.heads,
                                  kv_heads=target.kv_heads)
    if target.kv_heads is not None and target.heads is None:
        want = want.with_sizes(heads=target.kv_heads * source_arch.heads // source_arch.kv_heads)
    assert program.arch == want
    assert program.num_params() == count_arch(program.hf_config, want).total
    emit_checkpoint(program, tmp_path / "model")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "model", dtype=torch.float32).eval()
    assert sum(p.numel() for p in hf.parameters()) == count_arch(program.hf_config, want).total
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, program.forward(IDS), atol=1e-5, rtol=0)


def test_pruned_graph_reexports(family):
    """The rewritten GraphModule re-exports (torch.export) with dynamic batch/sequence and the
    exported program computes the same logits."""
    program = exported(family)
    prune_program(program, None, WidthTarget(hidden=32, mlp=48), ImportanceConfig(method="magnitude"), progress=False)
    ep = seal(program)
    torch.testing.assert_close(ep.module()(IDS), program.forward(IDS), atol=1e-6, rtol=0)


def test_meta_export_with_streamed_weights_matches_in_memory(tmp_path):
    """Pruning a checkpoint exported on the meta device (weights read from safetensors only when
    sliced) gives the same kept indices and the same logits as pruning the in-memory model
    (tied qwen2: the head is served from the embedding's tensor)."""
    from pdc.graph.export import export_dir

    src = tmp_path / "src"
    make_tiny_model("qwen2").save_pretrained(src)
    target, config = WidthTarget(hidden=40, mlp=64, heads=2), ImportanceConfig(method="magnitude")
    streamed = export_dir(src)
    assert streamed.on_meta()
    prune_program(streamed, None, target, config, progress=False)
    assert not streamed.on_meta()
    in_memory = exported("qwen2")
    prune_program(in_memory, None, target, config, progress=False)
    assert streamed.kept == in_memory.kept
    assert streamed.num_params() == in_memory.num_params() == count_arch(in_memory.hf_config, in_memory.arch).total
    torch.testing.assert_close(streamed.forward(IDS), in_memory.forward(IDS), atol=1e-6, rtol=0)


def test_activation_importance_streams_meta_weights(tmp_path):
    """Activation importance on a program exported without weights (each weight read from the
    safetensors right before its first use) equals importance on the in-memory program."""
    from pdc.graph.export import export_dir
    from pdc.graph.importance import compute

    make_tiny_model("qwen2").save_pretrained(tmp_path / "src")
    streamed = export_dir(tmp_path / "src")
    assert streamed.on_meta()
    got = compute(streamed, CALIB, ImportanceConfig())
    assert streamed.on_meta()  # nothing was kept in the program
    want = compute(exported("qwen2"), CALIB, ImportanceConfig())
    torch.testing.assert_close(got.hidden, want.hidden, rtol=1e-5, atol=0)
    for i in want.mlp:
        torch.testing.assert_close(got.mlp[i], want.mlp[i], rtol=1e-5, atol=0)
        torch.testing.assert_close(got.heads[i], want.heads[i], rtol=1e-5, atol=0)


def test_gqa_heads_even_per_group_and_kv_drops_whole_groups():
    """Reducing heads keeps the same number of query heads in every kv group; reducing kv_heads
    removes whole groups (every kept query head reads a kept group)."""
    program = exported("llama")  # 4 heads over 2 kv groups
    prune_program(program, CALIB, WidthTarget(heads=2), ImportanceConfig(), progress=False)
    for entry in program.kept["layers"].values():
        groups = [h // 2 for h in entry["heads"]]
        assert sorted(groups) == [0, 1] and entry["kv_heads"] == [0, 1]
    program = exported("llama")
    prune_program(program, CALIB, WidthTarget(kv_heads=1), ImportanceConfig(), progress=False)
    for entry in program.kept["layers"].values():
        assert len(entry["kv_heads"]) == 1
        assert [h // 2 for h in entry["heads"]] == entry["kv_heads"] * 2


@settings(max_examples=40, deadline=None)
@given(kv=st.sampled_from([1, 2, 3, 4]), rep=st.sampled_from([1, 2, 3, 4]), data=st.data())
def test_select_heads_property(kv, rep, data):
    """For any scores and any valid target, selected heads sit in selected groups, evenly."""
    new_kv = data.draw(st.integers(1, kv))
    new_rep = data.draw(st.integers(1, rep))
    scores = torch.tensor(data.draw(st.lists(st.floats(0, 1), min_size=kv * rep, max_size=kv * rep)))
    heads, groups = select_heads(scores, scores.reshape(kv, rep).sum(1), kv * rep, kv, new_kv * new_rep, new_kv)
    assert len(groups) == new_kv and len(heads) == new_kv * new_rep
    assert torch.equal(torch.bincount(heads // rep, minlength=kv)[groups], torch.full((new_kv,), new_rep))
    assert set((heads // rep).tolist()) == set(groups.tolist())


def _hooked_importance(model, calib, seq_agg, batch_agg):
    """The paper's activation importance measured with forward hooks on the Hugging Face model:
    MLP neurons at the down projection's input, heads as the L2 norm of their head_dim block at
    the output projection's input (kv groups: the sum of their heads), hidden channels at every
    norm's output, summed; aggregated over the sequence, then over the blocks."""
    taps = {}

    def keep(key, pre):
        def hook(module, args, output=None):
            taps[key] = (args[0] if pre else output).detach()
        return hook

    handles = []
    cfg = model.config
    for i, layer in enumerate(model.model.layers):
        handles.append(layer.mlp.down_proj.register_forward_pre_hook(keep(("mlp", i), True)))
        handles.append(layer.self_attn.o_proj.register_forward_pre_hook(keep(("heads", i), True)))
        handles.append(layer.input_layernorm.register_forward_hook(keep(("hidden", f"in{i}"), False)))
        handles.append(layer.post_attention_layernorm.register_forward_hook(keep(("hidden", f"post{i}"), False)))
    handles.append(model.model.norm.register_forward_hook(keep(("hidden", "final"), False)))
    with torch.no_grad():
        model(input_ids=calib)
    for h in handles:
        h.remove()

    def aggregate(x):
        per_block = x.abs().mean(1) if seq_agg == "mean" else x.pow(2).sum(1).sqrt()
        return per_block.pow(2).sum(0).sqrt() if batch_agg == "l2" else per_block.mean(0)

    head_dim = cfg.hidden_size // cfg.num_attention_heads if getattr(cfg, "head_dim", None) is None else cfg.head_dim
    out = {"hidden": sum(aggregate(v) for (kind, _), v in taps.items() if kind == "hidden"), "mlp": {}, "heads": {}}
    for (kind, i), v in taps.items():
        if kind == "mlp":
            out["mlp"][i] = aggregate(v)
        elif kind == "heads":
            b, l, _ = v.shape
            out["heads"][i] = aggregate(v.reshape(b, l, -1, head_dim).pow(2).sum(-1).sqrt())
    return out


@pytest.mark.parametrize("seq_agg, batch_agg", [("mean", "l2"), ("l2", "mean")])
def test_activation_importance_equals_the_hooked_model(family, seq_agg, batch_agg):
    """Importance computed on the exported graph equals the definition measured with hooks on
    the Hugging Face model the graph was exported from (an independent route to the same
    activations)."""
    from pdc.graph.importance import compute

    model = make_tiny_model(family)
    program = exported(family)
    imp = compute(program, CALIB, ImportanceConfig(seq_agg=seq_agg, batch_agg=batch_agg))
    ref = _hooked_importance(model, CALIB, seq_agg, batch_agg)
    close = dict(rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(imp.hidden, ref["hidden"], **close)
    rep = program.arch.heads // program.arch.kv_heads
    for i in range(program.arch.layers):
        torch.testing.assert_close(imp.mlp[i], ref["mlp"][i], **close)
        torch.testing.assert_close(imp.heads[i], ref["heads"][i], **close)
        torch.testing.assert_close(imp.kv_heads[i], ref["heads"][i].reshape(-1, rep).sum(1), **close)


def test_prune_width_writes_its_outputs(tmp_path):
    """prune_width writes model/, kept_indices.json, importance.json/png and returns a typed
    result whose counts match the architecture and whose inputs name the source and the
    calibration tokens by hash; a bad target fails before any work with a one-line PdcError.
    (Atomicity is the runner's: tests/test_runner_e2e.py; the deployed files: test_artifacts_export.)"""
    src = tmp_path / "src"
    make_tiny_model("qwen2").save_pretrained(src)
    out = tmp_path / "prune"
    result = prune_width(src, CALIB, WidthTarget(hidden=48, mlp=64), ImportanceConfig(), out, progress=False,
                         deploy=False)
    assert {p.name for p in out.iterdir()} >= {"model", "kept_indices.json", "importance.json", "importance.png"}
    kept = json.loads((out / "kept_indices.json").read_text())
    assert kept == result.kept
    assert len(kept["hidden"]) == 48 and all(len(v["mlp"]) == 64 for v in kept["layers"].values())
    source_cfg = json.loads((src / "config.json").read_text())
    want = count_arch(source_cfg, Arch.from_hf_config(source_cfg).with_sizes(hidden=48, mlp=64)).total
    assert result.params_after == want and result.arch_after["hidden"] == 48
    assert json.loads((out / "model" / "config.json").read_text())["head_dim"] == 16
    assert result.inputs.model == model_identity(src) and result.inputs.calibration == tokens_identity(CALIB)
    bad = tmp_path / "bad"
    with pytest.raises(PdcError, match="cannot keep 999 hidden channels: the source has 64"):
        prune_width(src, CALIB, WidthTarget(hidden=999), ImportanceConfig(), bad, progress=False, deploy=False)
    assert not bad.exists()
