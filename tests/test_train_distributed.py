"""Multi-process (torchrun + gloo) equivalence, and kill -9 + resume == uninterrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig
from pdc.plan.training import Launch
from pdc.stages.distill import run_distill
from pdc.stages.teacher_logits import compute_teacher_logits
from train_support import learnable_blocks, save_tiny, train_val, weights


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist_models")
    return save_tiny(root / "teacher", seed=0), save_tiny(root / "student", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    return train_val(learnable_blocks(36, seed=2), 32, tmp_path_factory.mktemp("shards") / "blocks")


CACHE_K = 8


def _teacher_cache(models, blocks, cfg: TrainConfig, tmp_path: Path) -> Path:
    """The teacher logits cache a cached distillation with `cfg` reads, filled by its producer."""
    return Path(compute_teacher_logits(models[0], *blocks, cfg, tmp_path / "teacher_logits",
                                       progress=False).cache_dir)


def _losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("teacher", ["online", "cached"])
def test_two_processes_match_one_with_the_same_global_batch(models, blocks, tmp_path, teacher):
    """Global batch 4 = 2 micro x 2 accumulation x 1 rank = 2 micro x 1 accumulation x 2 ranks:
    the same samples per step, so the loss trajectories and final weights agree to float error.
    Cached: each rank reads its own rows of the teacher cache as it reads its token rows."""
    cfg = TrainConfig(steps=6, lr=5e-3, min_lr=5e-4, warmup=1, global_batch=4, micro_batch=2, seq_len=16,
                      checkpoint_every=100, cache_k=CACHE_K if teacher == "cached" else None)
    cache = _teacher_cache(models, blocks, cfg, tmp_path) if teacher == "cached" else None
    one = run_distill(*models, *blocks, cfg, tmp_path / "w1", tmp_path / "o1", progress=False, teacher_cache=cache)
    two = run_distill(*models, *blocks, cfg, tmp_path / "w2", tmp_path / "o2", progress=False,
                      launch=Launch(nproc_per_node=2), teacher_cache=cache)
    assert one.grad_accumulation == 2 and two.grad_accumulation == 1 and two.world_size == 2
    assert one.teacher_placement == two.teacher_placement == ("cached" if cache else "replicated")
    assert _losses(tmp_path / "o2") == pytest.approx(_losses(tmp_path / "o1"), rel=1e-4, abs=1e-6)
    assert len(set(_losses(tmp_path / "o1"))) > 1  # the trajectory actually moves
    w1, w2 = weights(tmp_path / "o1" / "model"), weights(tmp_path / "o2" / "model")
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)
    assert "--nproc-per-node 2" in (tmp_path / "w2" / "launch.sh").read_text()


@pytest.mark.slow
def test_worker_failure_is_one_line(models, blocks, tmp_path):
    """A fault inside the spawned ranks (here: the teacher vanished after the launch checks)
    reaches the caller as a one-line PdcError naming the stage."""
    import shutil

    teacher = tmp_path / "teacher"
    shutil.copytree(models[0], teacher)
    (teacher / "model.safetensors").write_bytes(b"not a safetensors file")
    cfg = TrainConfig(steps=2, global_batch=2, micro_batch=1, seq_len=16)
    with pytest.raises(PdcError) as info:
        run_distill(teacher, models[1], *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False,
                    launch=Launch(nproc_per_node=2))
    assert info.value.stage == "distill" and "\n" not in info.value.message
    assert "cannot load the checkpoint" in info.value.message


def test_launch_failure_without_a_worker_message_is_one_line(models, blocks, tmp_path, monkeypatch):
    """Workers that die without writing error.json: exit status and log path in one line."""
    from pdc.stages.train import execute as launch

    def failing(work_dir, launch_):
        return [sys.executable, "-c", "import sys; print('boom'); sys.exit(3)"]

    monkeypatch.setattr(launch, "launch_argv", failing)
    cfg = TrainConfig(steps=2, global_batch=2, micro_batch=1, seq_len=16)
    with pytest.raises(PdcError, match=r"training workers failed \(exit 3\); see .*launch.log: boom"):
        run_distill(*models, *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False,
                    launch=Launch(nproc_per_node=2))


def test_worker_writes_its_fault_for_the_launcher(models, blocks, tmp_path, monkeypatch):
    """A rank's PdcError becomes error.json (read by the launcher) and exit status 1."""
    from pdc.stages.train import execute as launch, worker

    monkeypatch.setattr(launch, "_finished", lambda *a: True)  # prepare the work dir only
    monkeypatch.setattr(launch, "_publish", lambda *a: {})
    cfg = TrainConfig(steps=2, global_batch=2, micro_batch=2, seq_len=16)
    broken = tmp_path / "teacher"
    broken.mkdir()
    (broken / "config.json").write_text("{}")
    run_distill(broken, models[1], *blocks, cfg, tmp_path / "w", tmp_path / "o", progress=False)
    for key, val in dict(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(launch._free_port()), RANK="0",
                         WORLD_SIZE="1", LOCAL_RANK="0").items():
        monkeypatch.setenv(key, val)
    assert worker.main(["--stage-dir", str(tmp_path / "w")]) == 1
    err = json.loads((tmp_path / "w" / "error.json").read_text())
    assert "cannot load the checkpoint" in err["message"] and err["rank"] == 0


RUNNER = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from pdc.inputs.shards import Blocks
    from pdc.lang.settings import TrainConfig
    from pdc.stages.distill import run_distill
    teacher, student, work, out = sys.argv[1:5]
    data = json.loads(sys.argv[5])
    cfg = TrainConfig(**eval(sys.argv[6]))
    cache = sys.argv[7] or None
    run_distill(teacher, student, Blocks.from_json(data["train"]), Blocks.from_json(data["val"]), cfg, work, out,
                progress=False, teacher_cache=cache)
""")


@pytest.mark.parametrize("teacher", ["online", "cached"])
def test_kill_9_and_resume_equals_uninterrupted(models, blocks, tmp_path, teacher):
    """SIGKILL a run after >= 2 checkpoints, rerun it: it resumes from the last checkpoint and the
    final weights equal those of an uninterrupted run with the same seed and data order (cached:
    the resumed run reads the cache rows of the batches the data cursor in the checkpoint names)."""
    cfg_kw = dict(steps=16, lr=5e-3, min_lr=5e-4, warmup=3, global_batch=4, micro_batch=2, seq_len=16,
                  checkpoint_every=2, seed=7, cache_k=CACHE_K if teacher == "cached" else None)
    cfg = TrainConfig(**cfg_kw)
    cache = _teacher_cache(models, blocks, cfg, tmp_path) if teacher == "cached" else None
    data = json.dumps({"train": blocks[0].to_json(), "val": blocks[1].to_json()})
    work, out = tmp_path / "work", tmp_path / "out"
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-c", RUNNER, str(models[0]), str(models[1]), str(work), str(out),
                             data, repr(cfg_kw), str(cache or "")], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    pointer = work / "checkpoints" / "resume.json"
    deadline = time.time() + 120
    killed_after = None
    while time.time() < deadline and proc.poll() is None:
        if pointer.exists():
            step = json.loads(pointer.read_text())["step"]
            if step >= 4:
                os.kill(proc.pid, signal.SIGKILL)
                killed_after = step
                break
        time.sleep(0.01)
    proc.wait()
    assert killed_after is not None, f"run ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
    assert proc.returncode == -signal.SIGKILL and not out.exists()

    resumed = run_distill(*models, *blocks, cfg, work, out, progress=False, teacher_cache=cache)
    assert resumed.resumed_from_step >= killed_after
    steps = [json.loads(l)["step"] for l in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 17))  # killed-run steps after the checkpoint were re-logged, not duplicated

    clean = run_distill(*models, *blocks, cfg, tmp_path / "work2", tmp_path / "out2", progress=False,
                        teacher_cache=cache)
    assert clean.resumed_from_step == 0
    a, b = weights(out / "model"), weights(tmp_path / "out2" / "model")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ from the uninterrupted run"
