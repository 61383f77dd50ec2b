"""Distillation on DeepSpeed, in-process, tiny models: loss falls, outputs are complete, faults are one line."""

from __future__ import annotations

import errno
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig
from pdc.plan.training import Launch
from pdc.stages.distill import run_distill
from train_support import learnable_blocks, lr_schedule, save_tiny, train_val, weights

CFG = TrainConfig(steps=12, lr=5e-3, min_lr=5e-4, warmup=2, global_batch=4, micro_batch=2, seq_len=16,
                  checkpoint_every=5)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_models")
    teacher = save_tiny(root / "teacher", seed=0)
    student = save_tiny(root / "student", seed=1, num_hidden_layers=2)
    return teacher, student


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    return train_val(learnable_blocks(40), 32, tmp_path_factory.mktemp("shards") / "blocks")


@pytest.fixture(scope="module")
def distilled(models, blocks, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill_run")
    teacher, student = models
    teacher_before = weights(teacher)
    metrics = run_distill(teacher, student, *blocks, CFG, root / "work", root / "out", progress=False)
    return metrics, root, teacher_before


def test_distillation_lowers_the_kl_and_publishes_a_complete_output(distilled, models):
    """Validation KL to the teacher falls; out_dir has model/ (loadable), metrics, log, plot; no .tmp left."""
    metrics, root, _ = distilled
    out = root / "out"
    assert metrics.val_kl_end < metrics.val_kl_start
    assert metrics.train_loss_last < metrics.train_loss_first
    assert {p.name for p in out.iterdir()} >= {"model", "log.jsonl", "loss.png"}
    assert metrics.steps == CFG.steps
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    assert model.config.num_hidden_layers == 2
    assert weights(out / "model").keys() == weights(models[1]).keys()
    for name in ("ds_config.json", "launch.sh", "stage.json"):
        assert (root / "work" / name).exists()
    assert "pdc.stages.train.worker" in (root / "work" / "launch.sh").read_text()


def test_log_has_one_record_per_step_with_the_schedules_lr(distilled):
    """log.jsonl: steps 1..N, LR equal to DeepSpeed's schedule, KL logged, positive throughput."""
    _, root, _ = distilled
    records = [json.loads(l) for l in (root / "out" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, CFG.steps + 1))
    assert [r["lr"] for r in records] == pytest.approx(lr_schedule(CFG, CFG.steps))
    assert all(r["tokens_per_s"] > 0 and r["kl"] >= 0 for r in records)


def test_teacher_is_not_modified(distilled, models):
    _, _, before = distilled
    after = weights(models[0])
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_rerun_of_a_finished_run_only_republishes(distilled, models, blocks):
    """Same arguments again: no training (weights identical), out_dir rewritten whole."""
    _, root, _ = distilled
    w0 = weights(root / "out" / "model")
    run_distill(*models, *blocks, CFG, root / "work", root / "out", progress=False)
    w1 = weights(root / "out" / "model")
    assert all(torch.equal(w0[k], w1[k]) for k in w0)


def test_kl_is_zero_when_student_is_the_teacher(models, blocks, tmp_path):
    """Student == teacher: the KL at the first step and on validation is 0 (up to float error)."""
    teacher, _ = models
    cfg = TrainConfig(steps=1, lr=1e-3, global_batch=2, micro_batch=2, seq_len=16)
    m = run_distill(teacher, teacher, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    assert abs(m.train_loss_first) < 1e-5
    assert abs(m.val_kl_start) < 1e-5


def test_nan_loss_stops_with_the_step_number(models, blocks, tmp_path):
    teacher, student = models
    bad = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        bad.lm_head.weight.fill_(float("nan"))
    bad.save_pretrained(tmp_path / "nan_teacher")
    cfg = TrainConfig(steps=3, global_batch=2, micro_batch=2, seq_len=16)
    with pytest.raises(PdcError, match=r"loss is nan at step 1") as info:
        run_distill(tmp_path / "nan_teacher", student, blocks[0], blocks[1][:0], cfg, tmp_path / "w",
                    tmp_path / "o", progress=False)
    assert info.value.stage == "distill"
    assert not (tmp_path / "o").exists()


def test_missing_model_dir_is_one_line(models, blocks, tmp_path):
    with pytest.raises(PdcError, match="teacher model directory not found") as info:
        run_distill(tmp_path / "nope", models[1], *blocks, CFG, tmp_path / "w", tmp_path / "o", progress=False)
    assert info.value.stage == "distill"


def test_missing_checkpoint_dir_is_one_line(distilled, models, blocks, tmp_path):
    """A resume pointer naming a deleted checkpoint: a clear error, not a traceback."""
    import shutil

    _, root, _ = distilled
    work = tmp_path / "w"
    shutil.copytree(root / "work", work)
    # Pretend the run died after its last checkpoint, then lost the checkpoint's directory.
    shutil.rmtree(work / "final")
    pointer = json.loads((work / "checkpoints" / "resume.json").read_text())
    assert pointer["step"] == 10  # checkpoint_every=5 over 12 steps: the step-10 one is kept
    shutil.rmtree(work / "checkpoints" / pointer["tag"])
    with pytest.raises(PdcError, match="checkpoint directory .* is missing"):
        run_distill(*models, *blocks, CFG, work, tmp_path / "o", progress=False)


def test_full_disk_while_checkpointing_is_one_line(models, blocks, tmp_path, monkeypatch):
    from deepspeed.runtime.engine import DeepSpeedEngine

    def full_disk(self, *a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DeepSpeedEngine, "save_checkpoint", full_disk)
    cfg = TrainConfig(steps=3, global_batch=2, micro_batch=2, seq_len=16, checkpoint_every=1)
    with pytest.raises(PdcError, match="disk full while saving the checkpoint of step 1"):
        run_distill(*models, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()


def test_a_world_size_that_does_not_divide_the_global_batch_lists_the_valid_ones(models, blocks, tmp_path):
    """Refused before any process starts, with every world size that would work."""
    cfg = TrainConfig(steps=3, global_batch=12, micro_batch=2, seq_len=16)
    with pytest.raises(PdcError, match=r"global_batch 12 cannot be split evenly over 5 processes; "
                                       r"valid world sizes: 1, 2, 3, 4, 6, 12$"):
        run_distill(*models, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False,
                    launch=Launch(nproc_per_node=5))
    assert not (tmp_path / "w" / "stage.json").exists()


@pytest.mark.slow
def test_zero_stage_2_follows_the_same_trajectory_as_stage_0(distilled, models, blocks, tmp_path):
    """ZeRO partitions optimizer state/gradients; on one rank it must not change the numbers."""
    import dataclasses

    _, root, _ = distilled
    cfg = dataclasses.replace(CFG, zero=2)
    run_distill(*models, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    z0 = [json.loads(l)["loss"] for l in (root / "out" / "log.jsonl").read_text().splitlines()]
    z2 = [json.loads(l)["loss"] for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert z2 == pytest.approx(z0, rel=1e-5)
    assert json.loads((tmp_path / "w" / "ds_config.json").read_text())["zero_optimization"]["stage"] == 2


def test_activation_checkpointing_changes_memory_not_numbers(distilled, models, blocks, tmp_path, monkeypatch):
    """The student recomputes its layers in the backward pass: same losses and weights as the
    run without it (the fixture's), and the model really was put in checkpointing mode."""
    import dataclasses

    from transformers import PreTrainedModel

    calls = []
    real = PreTrainedModel.gradient_checkpointing_enable
    monkeypatch.setattr(PreTrainedModel, "gradient_checkpointing_enable",
                        lambda self, **kw: calls.append(kw) or real(self, **kw))
    _, root, _ = distilled
    cfg = dataclasses.replace(CFG, activation_checkpointing=True)
    result = run_distill(*models, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    assert calls and result.activation_checkpointing
    plain = [json.loads(l)["loss"] for l in (root / "out" / "log.jsonl").read_text().splitlines()]
    ckpt = [json.loads(l)["loss"] for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert ckpt == pytest.approx(plain, rel=1e-5)
    a, b = weights(root / "out" / "model"), weights(tmp_path / "o" / "model")
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


@pytest.mark.skipif(not torch.ops.mkldnn._is_mkldnn_bf16_supported(), reason="this CPU has no bf16 matrix units")
def test_bf16_on_a_cpu_runs_the_forward_passes_in_bf16_and_keeps_fp32_weights(distilled, models, blocks, tmp_path,
                                                                                monkeypatch):
    """precision=bf16 on a CPU with bf16 units: the student's and the teacher's training forward
    passes run under bf16 autocast, the trained weights stay fp32, the metrics say so, and the
    losses track the fp32 run's to bf16's precision."""
    import dataclasses

    seen = []
    real = torch.nn.functional.linear
    monkeypatch.setattr(torch.nn.functional, "linear",
                        lambda x, w, b=None: seen.append(real(x, w, b).dtype) or real(x, w, b))
    _, root, _ = distilled
    cfg = dataclasses.replace(CFG, precision="bf16")
    result = run_distill(*models, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    assert result.precision == "bf16 autocast"
    # every training step: two micro-batches, each a student and a teacher forward in bf16
    # (validation stays fp32, so its losses are comparable across precisions)
    micro_passes = CFG.steps * (CFG.global_batch // CFG.micro_batch) * 2
    assert seen.count(torch.bfloat16) >= micro_passes and torch.float32 in seen
    assert {t.dtype for t in weights(tmp_path / "o" / "model").values()} == {torch.float32}
    fp32 = [json.loads(l)["loss"] for l in (root / "out" / "log.jsonl").read_text().splitlines()]
    bf16 = [json.loads(l)["loss"] for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05, abs=0.02)
    assert result.val_kl_end < result.val_kl_start
