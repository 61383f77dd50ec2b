"""The teacher's logits computed once: `pdc run` on tiny specs whose distillation reads a top-k
teacher cache (`teacher_logits=cached`), and `loss=ce` (no teacher at all)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pdc.cli import main as pdc_main
from pdc.errors import PdcError
from pdc.inputs import teacher_cache
from pdc.inputs.models import load_causal_lm
from pdc.inputs.shards import Blocks
from pdc.lang.settings import TrainConfig
from pdc.plan.results import read_record
from pdc.stages.distill import run_distill
from pdc.stages.teacher_logits import compute_teacher_logits
from train_support import learnable_blocks, save_tiny, train_val
from tiny_builds import make_project

K = 8
CACHED_SPEC = f"""\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")

prune width {{ hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }}
distill from teacher on corpus {{ steps=3 lr=1e-3 min_lr=1e-4 warmup=1 global_batch=4 micro_batch=2 seq_len=32 teacher_logits=cached(k={K}) val_every=2 }}
"""
# Another student of the same teacher on the same blocks: it must reuse the cache.
NARROWER_SPEC = CACHED_SPEC.replace("hidden=48 mlp=64", "hidden=32 mlp=48")


@pytest.fixture(scope="module")
def cached_build(tmp_path_factory):
    """(project dir, build dir) of `pdc run` on the cached spec, with a private pdc cache."""
    root = tmp_path_factory.mktemp("cached")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDC_CACHE", str(root / "pdc-cache"))
        spec = make_project(root, CACHED_SPEC)
        assert pdc_main(["run", str(spec)]) == 0
    return root, root / "build" / "tiny"


def _log(build: Path, stage: str) -> list[dict]:
    return [json.loads(line) for line in (build / stage / "log.jsonl").read_text().splitlines()]


def test_teacher_pass_runs_before_distillation_and_fills_a_cache_beside_the_token_shards(cached_build):
    root, build = cached_build
    rec = read_record(build / "teacher_logits")
    result = rec.result
    cache = Path(result.cache_dir)
    assert cache.parent.name == "teacher_logits" and (cache.parent.parent / "tokens.json").exists()
    assert cache.is_relative_to(root / "pdc-cache" / "tokens")
    assert result.k == K and result.blocks == result.blocks_computed > 0
    assert result.bytes_per_token == pytest.approx(4 * K + 2 + 12 / 32)  # uint16 ids: a 128-token vocabulary
    assert result.cache_bytes == sum(f.stat().st_size for f in cache.glob("part-*/*"))
    assert sum(f.stat().st_size for f in cache.glob("part-*/*.bin")) == pytest.approx(result.blocks * 32 * result.bytes_per_token)
    assert 0 < result.topk_mass < 1
    # the mass is streamed from the tail column; read in one go it is the same
    opened = teacher_cache.TeacherLogits(cache)
    rows = opened._rows
    whole = float(np.mean(-np.expm1(opened.take(rows).tail.astype(np.float64))))
    assert result.topk_mass == pytest.approx(whole, rel=1e-9)
    assert opened.topk_mass(rows, tokens_per_read=32 * 3) == pytest.approx(whole, rel=1e-9)  # 3 blocks a read
    statuses = json.loads((build / "stages.json").read_text())
    assert list(statuses) == ["prune", "teacher_logits", "distill"]
    assert all(s["status"] == "done" for s in statuses.values())


def test_cached_values_are_the_teachers_top_k_log_probabilities(cached_build):
    """Invariant: every stored row equals the teacher's own log-softmax top k (float16), and the
    tail is the log of the rest of the mass."""
    root, build = cached_build
    cache = teacher_cache.TeacherLogits(Path(read_record(build / "teacher_logits").result.cache_dir))
    tokens = Blocks.open(Path(read_record(build / "teacher_logits").result.cache_dir).parent.parent)
    rows = np.sort(np.concatenate([p[teacher_cache.ROWS].take(np.arange(len(p[teacher_cache.ROWS]))).ravel()
                                   for p in cache.parts]))[:6]
    got = cache.take(rows)
    teacher = load_causal_lm(root / "tiny", "test")
    with torch.no_grad():
        ids = torch.from_numpy(tokens.array.take(rows).astype(np.int64))
        log_p = F.log_softmax(teacher(input_ids=ids).logits.float(), dim=-1)
    top = log_p.topk(K, dim=-1)
    assert torch.allclose(torch.from_numpy(got.logprobs.astype(np.float32)), top.values, atol=1e-2)
    assert torch.equal(torch.from_numpy(got.indices.astype(np.int64)), top.indices)
    tail = torch.log1p(-top.values.exp().sum(-1).clamp(max=1 - 1e-6))
    assert torch.allclose(torch.from_numpy(got.tail.astype(np.float32)), tail, atol=2e-2)


def test_distillation_reads_the_cache_and_never_the_teacher(cached_build):
    _, build = cached_build
    result = read_record(build / "distill").result
    assert result.teacher_placement == "cached" and result.cache_k == K and result.loss == "kl_forward"
    stage = json.loads((build / "distill.work" / "stage.json").read_text())
    assert "teacher_dir" not in stage and "student_dir" in stage
    assert stage["teacher_cache"]["dir"] == read_record(build / "teacher_logits").result.cache_dir
    log = _log(build, "distill")
    assert [r["step"] for r in log if "val_loss" in r] == [2, 3]  # val_every=2, and the last step
    assert all(r["kl"] >= 0 for r in log)
    report = (build / "report.md").read_text()
    assert f"| loss | forward KL, logits only, from the teacher's cached top {K} + tail |" in report
    assert "| validation every | 2 steps |" in report and "| computed by this run | " in report
    card = (build / "distill" / "model" / "README.md").read_text()
    assert "source -> prune -> teacher_logits -> distill" in card
    assert f"(kl_forward, from the teacher's cached top {K} logits + tail)" in card


def test_rerun_skips_the_pass_and_another_student_reuses_the_cache(cached_build, capsys):
    """`pdc run` again: up to date. A second spec (a narrower student of the same teacher on the
    same blocks) computes no teacher logits at all."""
    root, build = cached_build
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDC_CACHE", str(root / "pdc-cache"))
        capsys.readouterr()
        assert pdc_main(["run", str(root / "tiny.pds")]) == 0
        assert "[pdc] teacher_logits: up to date, skipped" in capsys.readouterr().out
        (root / "narrow.pds").write_text(NARROWER_SPEC)
        assert pdc_main(["run", str(root / "narrow.pds")]) == 0
    first = read_record(build / "teacher_logits").result
    second = read_record(root / "build" / "narrow" / "teacher_logits").result
    assert second.cache_dir == first.cache_dir and second.blocks == first.blocks and second.blocks_computed == 0
    assert read_record(root / "build" / "narrow" / "distill").result.teacher_placement == "cached"


def test_a_cache_that_lost_parts_is_refilled_by_the_next_run(cached_build, capsys):
    root, build = cached_build
    cache = Path(read_record(build / "teacher_logits").result.cache_dir)
    for part in teacher_cache.part_dirs(cache):
        shutil.rmtree(part)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PDC_CACHE", str(root / "pdc-cache"))
        capsys.readouterr()
        assert pdc_main(["run", str(root / "tiny.pds")]) == 0
        out = capsys.readouterr().out
    assert "[pdc] teacher_logits: running" in out and "[pdc] distill: up to date, skipped" in out
    result = read_record(build / "teacher_logits").result
    assert result.blocks_computed == result.blocks == len(teacher_cache.TeacherLogits(cache))


# ---- the stages directly ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cache_models")
    teacher = save_tiny(root / "teacher", seed=0)
    student = save_tiny(root / "student", seed=1, num_hidden_layers=2)
    return teacher, student, train_val(learnable_blocks(40), 32, root / "blocks")


CFG = TrainConfig(steps=4, lr=5e-3, min_lr=5e-4, warmup=1, global_batch=4, micro_batch=2, seq_len=16, cache_k=K)


def test_a_killed_pass_keeps_its_whole_parts_and_the_next_one_adds_only_what_is_missing(tiny, tmp_path):
    """Parts close every batch here (part_seconds=0): a pass stopped after two parts leaves them
    whole; the rerun computes only the remaining blocks, and the result is the same bits as one
    uninterrupted pass into another cache."""
    teacher, _, (train, val) = tiny
    import pdc.stages.teacher_logits as stage

    calls = {"n": 0}
    real = teacher_cache.PartWriter.append

    def dying(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # what a Ctrl-C or kill mid-part looks like from the inside
        return real(self, *a, **kw)

    cfg = CFG
    directory, _ = stage.cache_for(teacher, train, cfg)
    shutil.rmtree(directory, ignore_errors=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(teacher_cache.PartWriter, "append", dying)
        with pytest.raises(KeyboardInterrupt):
            compute_teacher_logits(teacher, train, val, cfg, tmp_path / "o1", progress=False, part_seconds=0)
    assert len(teacher_cache.part_dirs(directory)) == 2 and not list(directory.glob("*.tmp"))
    resumed = compute_teacher_logits(teacher, train, val, cfg, tmp_path / "o2", progress=False, part_seconds=0)
    assert resumed.blocks_computed == resumed.blocks - 4  # two parts of micro_batch=2 blocks were kept
    a = teacher_cache.TeacherLogits(directory)
    rows = stage.blocks_read(train, val, cfg)
    got = a.take(rows)
    shutil.rmtree(directory)
    clean = compute_teacher_logits(teacher, train, val, cfg, tmp_path / "o3", progress=False)
    assert clean.blocks_computed == clean.blocks == resumed.blocks
    want = teacher_cache.TeacherLogits(directory).take(rows)
    for field in ("logprobs", "indices", "tail", "nll"):
        assert np.array_equal(getattr(got, field), getattr(want, field)), field


def test_a_gpu_bf16_pass_and_a_cpu_fp32_pass_fill_different_caches(tiny, monkeypatch):
    """The teacher's dtype is part of the cache key: targets computed in bf16 on a GPU never
    stand in for a CPU's fp32 ones (or the reverse), on the same teacher and tokens."""
    teacher, _, (train, _) = tiny
    import pdc.stages.teacher_logits as stage

    bf16_cfg = TrainConfig(**{**CFG.__dict__, "precision": "bf16"})
    cpu_dir, cpu_meta = stage.cache_for(teacher, train, bf16_cfg)  # no GPU here: fp32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(stage, "gpu_bf16", lambda cfg: cfg.precision == "bf16")
    gpu_dir, gpu_meta = stage.cache_for(teacher, train, bf16_cfg)
    assert (cpu_meta["teacher_dtype"], gpu_meta["teacher_dtype"]) == ("float32", "bfloat16")
    assert cpu_dir != gpu_dir and cpu_dir.parent == gpu_dir.parent
    assert stage.cache_for(teacher, train, CFG)[0] != gpu_dir  # fp32 asked for: fp32 on a GPU too


def test_a_cache_that_lacks_blocks_is_refused_before_training(tiny, tmp_path):
    """A longer distillation than the pass was run for: one line naming the stage to rerun."""
    teacher, student, (train, val) = tiny
    filled = compute_teacher_logits(teacher, train, val, CFG, tmp_path / "t", progress=False)
    longer = TrainConfig(**{**CFG.__dict__, "steps": 40})
    with pytest.raises(PdcError, match="lacks .* of the blocks this distillation reads") as info:
        run_distill(teacher, student, train, val, longer, tmp_path / "w", tmp_path / "o", progress=False,
                    teacher_cache=Path(filled.cache_dir))
    assert info.value.stage == "distill"


def test_cached_distillation_never_needs_the_teacher_weights(tiny, tmp_path):
    """The teacher directory may be gone once its logits are cached."""
    teacher, student, (train, val) = tiny
    filled = compute_teacher_logits(teacher, train, val, CFG, tmp_path / "t", progress=False)
    result = run_distill(tmp_path / "no-such-teacher", student, train, val, CFG, tmp_path / "w", tmp_path / "o",
                         progress=False, teacher_cache=Path(filled.cache_dir))
    assert result.teacher_placement == "cached" and result.val_kl_end < result.val_kl_start
    assert result.teacher_val_loss == pytest.approx(
        float(teacher_cache.TeacherLogits(Path(filled.cache_dir)).take(val.rows()).nll.mean()), rel=1e-5)


def test_loss_ce_trains_on_the_text_without_a_teacher(tiny, tmp_path):
    teacher, student, (train, val) = tiny
    cfg = TrainConfig(steps=4, lr=5e-3, min_lr=5e-4, warmup=1, global_batch=4, micro_batch=2, seq_len=16, loss="ce")
    result = run_distill(tmp_path / "no-such-teacher", student, train, val, cfg, tmp_path / "w", tmp_path / "o",
                         progress=False)
    assert result.loss == "ce" and result.teacher_placement is None and result.teacher_val_loss is None
    assert result.val_loss_end < result.val_loss_start
    log = [json.loads(line) for line in (tmp_path / "o" / "log.jsonl").read_text().splitlines()]
    assert all("kl" not in r for r in log)


@pytest.mark.slow  # a torchrun launch of 2 ranks (~40 s on this CPU)
def test_two_ranks_fill_the_cache_one_rank_fills(tmp_path):
    """The teacher pass on 2 processes (each its contiguous share of whole batches, its own parts)
    leaves the cache one process leaves: the same rows, bit for bit."""
    teacher = save_tiny(tmp_path / "teacher", seed=0)
    data = learnable_blocks(24, seq=16, seed=4)
    cfg = TrainConfig(steps=3, global_batch=4, micro_batch=3, seq_len=16, cache_k=K)
    caches = []
    for n in (1, 2):
        train, val = train_val(data, 20, tmp_path / f"shards{n}" / "blocks")  # a cache of its own beside each
        result = compute_teacher_logits(teacher, train, val, cfg, tmp_path / f"out{n}", progress=False,
                                        nproc=n, work_dir=tmp_path / f"work{n}")
        caches.append((teacher_cache.TeacherLogits(Path(result.cache_dir)), result))
    (one, r1), (two, r2) = caches
    assert r1.blocks == r2.blocks == r2.blocks_computed and len(two.parts) >= 2
    assert np.array_equal(one._rows, two._rows)
    a, b = one.take(one._rows), two.take(one._rows)
    for column in ("logprobs", "indices", "tail", "nll"):
        assert np.array_equal(getattr(a, column), getattr(b, column)), column
    assert r2.topk_mass == r1.topk_mass
