"""Training on several nodes, simulated on localhost: two torchrun "nodes" of two processes each
meet at a c10d rendezvous and reach the losses of one process with the same global batch; a node
killed mid-run is resumed from the last checkpoint; the DeepSpeed launcher (hostfile) and the
Slurm script start the same worker; ZeRO-3 partitions student and teacher without changing the
numbers."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import socket
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from pdc.errors import PdcError
from pdc.lang.settings import TrainConfig
from pdc.plan.training import Launch
from pdc.stages.distill import run_distill
from train_support import learnable_blocks, save_tiny, train_val, weights

CFG = TrainConfig(steps=6, lr=5e-3, min_lr=5e-4, warmup=1, global_batch=4, micro_batch=1, seq_len=16,
                  checkpoint_every=2, seed=3)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode_models")
    return save_tiny(root / "teacher", seed=0), save_tiny(root / "student", seed=1, num_hidden_layers=2)


@pytest.fixture(scope="module")
def blocks(tmp_path_factory):
    return train_val(learnable_blocks(36, seed=4), 32, tmp_path_factory.mktemp("shards") / "blocks")


@pytest.fixture(scope="module")
def one_process(models, blocks, tmp_path_factory):
    """The reference: the same global batch on one process (micro 1 x 4 accumulation steps)."""
    root = tmp_path_factory.mktemp("one")
    result = run_distill(*models, *blocks, CFG, root / "w", root / "o", progress=False)
    return result, _losses(root / "o"), weights(root / "o" / "model")


def _losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "log.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SecondNode:
    """Another node: waits until the first node has prepared the stage, then runs the stage's
    launch.sh, as an operator (or a scheduler) does on every other node."""

    def __init__(self, work: Path):
        self.work = work
        self.proc: subprocess.Popen | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        deadline = time.time() + 120
        while time.time() < deadline and not (self.work / "stage.json").exists():
            time.sleep(0.05)
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self.proc = subprocess.Popen(["sh", str(self.work / "launch.sh")], env=env, start_new_session=True,
                                     stdout=open(self.work.parent / f"{self.work.name}-node2.log", "w"),
                                     stderr=subprocess.STDOUT)

    def wait(self) -> int:
        self.thread.join()
        return self.proc.wait(timeout=300)

    def kill(self) -> None:
        """The node dies: its torchrun agent and every worker (torchrun starts each worker in a
        session of its own, so the process group alone would leave them running)."""
        self.thread.join()
        for pid in _process_tree(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()


def _process_tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        pid = stack.pop()
        out.append(pid)
        stack.extend(children.get(pid, []))
    return out


def _two_nodes(endpoint: str) -> Launch:
    return Launch(nnodes=2, nproc_per_node=2, rdzv_endpoint=endpoint)


def test_two_nodes_of_two_processes_reach_the_losses_of_one(models, blocks, one_process, tmp_path):
    """torchrun --nnodes 2 --nproc-per-node 2, c10d rendezvous on localhost: 4 ranks x micro 1
    = the global batch of 4, so every step sees the same samples as the 1-process run."""
    _, ref_losses, ref_weights = one_process
    work = tmp_path / "w"
    node2 = SecondNode(work)
    result = run_distill(*models, *blocks, CFG, work, tmp_path / "o", progress=False,
                         launch=_two_nodes(f"127.0.0.1:{_free_port()}"))
    assert node2.wait() == 0
    assert (result.world_size, result.grad_accumulation, result.micro_batch) == (4, 1, 1)
    assert _losses(tmp_path / "o") == pytest.approx(ref_losses, rel=1e-4)
    w = weights(tmp_path / "o" / "model")
    assert all(torch.allclose(w[k], ref_weights[k], atol=1e-5) for k in w)


@pytest.mark.slow
def test_a_killed_node_is_resumed_from_the_last_checkpoint(models, blocks, one_process, tmp_path):
    """Kill -9 the second node after a checkpoint: the first node's run fails with one line; both
    nodes started again resume from the checkpoint (its data position included) and end with the
    1-process losses."""
    _, ref_losses, ref_weights = one_process
    work = tmp_path / "w"
    cfg = dataclasses.replace(CFG, steps=10)
    ref = run_distill(*models, *blocks, cfg, tmp_path / "w1", tmp_path / "o1", progress=False)
    endpoint = f"127.0.0.1:{_free_port()}"
    failure: list[BaseException] = []

    def first_node():
        try:
            run_distill(*models, *blocks, cfg, work, tmp_path / "o", progress=False, launch=_two_nodes(endpoint))
        except BaseException as exc:  # noqa: BLE001 - the test inspects it
            failure.append(exc)

    node1 = threading.Thread(target=first_node)
    node1.start()
    node2 = SecondNode(work)
    pointer = work / "checkpoints" / "resume.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 4):
        time.sleep(0.05)
    assert pointer.exists(), "no checkpoint before the deadline"
    killed_after = json.loads(pointer.read_text())["step"]
    node2.kill()
    node1.join(timeout=300)
    assert failure and isinstance(failure[0], PdcError) and "\n" not in failure[0].message
    assert not (tmp_path / "o").exists()
    tag = json.loads(pointer.read_text())["tag"]
    client = torch.load(work / "checkpoints" / tag / "mp_rank_00_model_states.pt", weights_only=False)
    assert client["data"]["position"] == json.loads(pointer.read_text())["step"] * cfg.global_batch

    node2 = SecondNode(work)
    resumed = run_distill(*models, *blocks, cfg, work, tmp_path / "o", progress=False, launch=_two_nodes(endpoint))
    assert node2.wait() == 0
    assert resumed.resumed_from_step >= killed_after
    assert [json.loads(l)["step"] for l in (tmp_path / "o" / "log.jsonl").read_text().splitlines()] == list(range(1, 11))
    assert _losses(tmp_path / "o") == pytest.approx(_losses(tmp_path / "o1"), rel=1e-4)
    w, w_ref = weights(tmp_path / "o" / "model"), weights(tmp_path / "o1" / "model")
    assert all(torch.allclose(w[k], w_ref[k], atol=1e-5) for k in w)
    assert ref.resumed_from_step == 0


@pytest.mark.slow
def test_deepspeeds_launcher_with_a_hostfile_runs_the_same_stage(models, blocks, one_process, tmp_path):
    _, ref_losses, _ = one_process
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    result = run_distill(*models, *blocks, CFG, tmp_path / "w", tmp_path / "o", progress=False,
                         launch=Launch.from_hostfile(tmp_path / "hosts"))
    assert result.world_size == 2 and result.grad_accumulation == 2
    assert _losses(tmp_path / "o") == pytest.approx(ref_losses, rel=1e-4)
    assert "deepspeed.launcher.runner --hostfile" in (tmp_path / "w" / "deepspeed.sh").read_text()


FAKE_SRUN = """#!/bin/sh
# srun for tests: one task per node of the fake allocation, all on this machine
while [ "${1#--}" != "$1" ]; do shift; done
pids=""
i=0
while [ "$i" -lt "$SLURM_NNODES" ]; do
  SLURM_NODEID=$i SLURM_PROCID=$i "$@" &
  pids="$pids $!"
  i=$((i + 1))
done
status=0
for p in $pids; do wait "$p" || status=1; done
exit $status
"""


@pytest.mark.slow
def test_the_slurm_script_runs_one_torchrun_per_node(models, blocks, one_process, tmp_path, monkeypatch):
    """`--launcher slurm` inside an allocation runs slurm.sbatch: srun starts one torchrun per node
    (here a stand-in srun on localhost), which meet at the c10d rendezvous on the first node."""
    _, ref_losses, _ = one_process
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", FAKE_SRUN), ("scontrol", "#!/bin/sh\necho 127.0.0.1\n")):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", str(_free_port()))
    monkeypatch.setenv("SLURM_NNODES", "2")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "localhost")
    result = run_distill(*models, *blocks, CFG, tmp_path / "w", tmp_path / "o", progress=False,
                         launch=Launch(nnodes=2, nproc_per_node=1, launcher="slurm"))
    assert result.world_size == 2
    assert _losses(tmp_path / "o") == pytest.approx(ref_losses, rel=1e-4)


def test_zero_3_partitions_student_and_teacher_without_changing_the_numbers(blocks, tmp_path):
    """Under ZeRO-3 on two processes the student's and the teacher's large weights are built
    partitioned (`deepspeed.zero.Init`) and trained so
    (a 2048-token vocabulary makes the embeddings exceed DeepSpeed's persistence threshold); the
    losses and the exported (gathered) weights equal the ZeRO-0 single-process run's."""
    teacher = save_tiny(tmp_path / "teacher", seed=0, vocab_size=2048)
    student = save_tiny(tmp_path / "student", seed=1, num_hidden_layers=2, vocab_size=2048)
    z0 = run_distill(teacher, student, *blocks, CFG, tmp_path / "w0", tmp_path / "o0", progress=False)
    z3 = run_distill(teacher, student, *blocks, dataclasses.replace(CFG, zero=3), tmp_path / "w3", tmp_path / "o3",
                     progress=False, launch=Launch(nproc_per_node=2))
    assert (z0.teacher_placement, z3.teacher_placement, z3.zero) == ("replicated", "zero3", 3)
    # built partitioned (zero.Init: no rank ever held the whole student), not partitioned after loading
    loaded = {w: json.loads((tmp_path / w / "final" / "metrics.json").read_text())["loaded_partitioned"]
              for w in ("w0", "w3")}
    assert loaded == {"w0": False, "w3": True}
    assert _losses(tmp_path / "o3") == pytest.approx(_losses(tmp_path / "o0"), rel=1e-4)
    a, b = weights(tmp_path / "o0" / "model"), weights(tmp_path / "o3" / "model")
    assert a.keys() == b.keys() and all(a[k].shape == b[k].shape for k in a)
    assert all(torch.allclose(a[k], b[k], atol=1e-5) for k in a)
