"""Teacher correction: LoRA merges into a plain checkpoint, norm-only touches only norms, loss falls."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdc.lang.settings import TrainConfig
from pdc.stages.correct import run_correct
from train_support import learnable_blocks, save_tiny, train_val, weights


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return save_tiny(tmp_path_factory.mktemp("correct") / "model", family="qwen2", seed=3)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    return train_val(learnable_blocks(36, seed=1), 32, tmp_path_factory.mktemp("shards") / "blocks")


def _cfg(method: str, **kw) -> TrainConfig:
    return TrainConfig(steps=10, lr=kw.pop("lr", 1e-2), min_lr=1e-3, warmup=0, global_batch=4, micro_batch=4,
                       seq_len=16, method=method, lora_rank=4, checkpoint_every=100, **kw)


def test_lora_merges_into_a_plain_checkpoint_with_the_same_parameter_count(source, blocks, tmp_path):
    """Output: no adapter tensors, same names/shapes/count as the source; weights changed; val loss falls."""
    m = run_correct(source, *blocks, _cfg("lora"), tmp_path / "w", tmp_path / "o", progress=False)
    before, after = weights(source), weights(tmp_path / "o" / "model")
    assert after.keys() == before.keys()
    assert all(after[k].shape == before[k].shape for k in before)
    assert not any("lora" in k for k in after)
    assert not (tmp_path / "o" / "model" / "adapter_config.json").exists()
    src = AutoModelForCausalLM.from_pretrained(source)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "o" / "model")
    assert sum(p.numel() for p in out.parameters()) == sum(p.numel() for p in src.parameters())
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all(k.endswith("proj.weight") for k in changed)  # only adapted matrices move
    assert m.val_loss_end < m.val_loss_start
    assert m.method == "lora" and m.trainable_params < sum(p.numel() for p in src.parameters()) / 5


def test_norm_only_changes_only_norm_weights(source, blocks, tmp_path):
    m = run_correct(source, *blocks, _cfg("norm", lr=5e-2), tmp_path / "w", tmp_path / "o", progress=False)
    before, after = weights(source), weights(tmp_path / "o" / "model")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    norms = {k for k in before if "norm" in k}
    assert changed and changed <= norms
    assert m.trainable_params == sum(before[k].numel() for k in norms)
    assert m.val_loss_end < m.val_loss_start


def test_full_correction_lowers_validation_loss(source, blocks, tmp_path):
    m = run_correct(source, *blocks, _cfg("full", lr=3e-3), tmp_path / "w", tmp_path / "o", progress=False)
    assert m.val_loss_end < m.val_loss_start
    assert (tmp_path / "o" / "loss.png").stat().st_size > 0




def test_a_bf16_stage_written_and_run_on_a_cpu(source, blocks, tmp_path):
    """ds_config.json says bf16 whatever machine writes it (a GPU node reads it); this CPU rank
    runs fp32 weights (with bf16 autocast where the CPU has bf16 units) and records so."""
    import json

    from pdc.stages.train.precision import cpu_has_bf16

    m = run_correct(source, *blocks, dataclasses.replace(_cfg("norm", lr=5e-2, precision="bf16"), steps=2), tmp_path / "w",
                    tmp_path / "o", progress=False)
    assert json.loads((tmp_path / "w" / "ds_config.json").read_text())["bf16"] == {"enabled": True}
    assert m.precision == ("bf16 autocast" if cpu_has_bf16() else "fp32")
    assert all(t.dtype == torch.float32 for t in weights(tmp_path / "o" / "model").values())


@pytest.mark.slow  # three runs (~50 s on this shared CPU)
def test_another_world_size_is_refused_and_the_checkpoint_kept(source, blocks, tmp_path):
    """A run stopped after its step-2 checkpoint (its final model removed), restarted on 2
    processes: refused in one line, nothing deleted; on 1 process it resumes from step 2."""
    import shutil

    from pdc.errors import PdcError
    from pdc.plan.training import Launch

    cfg = dataclasses.replace(_cfg("norm", lr=5e-2), steps=4, checkpoint_every=2)
    run_correct(source, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    shutil.rmtree(tmp_path / "w" / "final")
    ckpt = sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir())
    assert "step00000002" in ckpt
    with pytest.raises(PdcError, match=r"written by 1 process\(es\) and this run has 2: rerun with 1") as info:
        run_correct(source, *blocks, cfg, tmp_path / "w", tmp_path / "o2", progress=False,
                    launch=Launch(nproc_per_node=2))
    assert "\n" not in info.value.message
    assert sorted(p.name for p in (tmp_path / "w" / "checkpoints").iterdir()) == ckpt
    assert run_correct(source, *blocks, cfg, tmp_path / "w", tmp_path / "o3", progress=False).resumed_from_step == 2
