"""Interrupted work, soaked: `pdc run` is SIGKILLed at random moments of distillation and rerun
each time; the weights it ends with are bit-identical to an uninterrupted run's, every rerun
leaves no temporary directory, and no final directory is ever half-written.

The kill moments are drawn with a fixed seed, uniformly over the remaining lifetime of the
process after it starts the distill stage (measured on an uninterrupted run first): they fall
into model loading, DeepSpeed start-up, resuming, training steps, checkpoint writes, the final
export, publishing into `distill.tmp/`, the rename and the report. A chain of kills that lets
the run finish before the count is reached starts again from a fresh copy of the compiled
build (`--out`: the stage keys do not depend on the build directory). Slow: a few minutes on
two cores.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pdc.cli import main as pdc_main
from pdc.inputs.verify import verify_checkpoint
from pdc.plan.results import read_record
from tiny_builds import WIDTH_SPEC, make_project

pytestmark = pytest.mark.slow

STEPS = 96
KILLS = 20
SEED = 20261129
SPEC = f"""\
model teacher = dir("tiny")
data corpus = jsonl("corpus.jsonl")
prune width {{ hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }}
distill from teacher on corpus {{ steps={STEPS} lr=1e-3 min_lr=1e-4 warmup=2 global_batch=4 micro_batch=2
  seq_len=32 checkpoint_every=1 seed=3 }}
"""


def private_extensions(root: Path) -> Path:
    """A torch JIT extension folder for these runs only (seeded once with the machine's builds,
    so nothing is compiled again): a kill in DeepSpeed's op load leaves its lock file here,
    never where other processes on the machine would wait for it."""
    from pdc.stages.train.jit_locks import extensions_root

    if not root.exists():
        if extensions_root().is_dir():
            shutil.copytree(extensions_root(), root, ignore=shutil.ignore_patterns("lock"))
        root.mkdir(parents=True, exist_ok=True)
    return root


class Run:
    """`pdc ...` in its own process group, its output lines time-stamped as they arrive."""

    def __init__(self, args: list[str], cwd: Path, cache: Path):
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", PDC_CACHE=str(cache),
                   TORCH_EXTENSIONS_DIR=str(private_extensions(cache / "torch_extensions")))
        self.t0 = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, "-m", "pdc.cli", *args], cwd=cwd, env=env, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def wait_for(self, text: str, timeout: float = 300) -> float | None:
        """Time `text` was printed, or None if the process ended first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for t, line in list(self.lines):
                if text in line:
                    return t
            if self.proc.poll() is not None:
                self.reader.join(5)
                return next((t for t, line in self.lines if text in line), None)
            time.sleep(0.01)
        self.kill()
        raise AssertionError(f"no {text!r} within {timeout}s (hung?): {self.output()[-2000:]}")

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join(5)

    def finish(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"pdc did not finish within {timeout}s (hung?): {self.output()[-2000:]}") from None
        self.reader.join(5)
        return rc

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def _weights(build: Path) -> dict[str, torch.Tensor]:
    return load_file(str(build / "distill" / "model" / "model.safetensors"))


def _losses(build: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (build / "distill" / "log.jsonl").read_text().splitlines()]


def _temp_dirs(build: Path) -> list[Path]:
    return [p for p in build.rglob("*") if p.is_dir() and (p.name.endswith(".tmp") or ".tmp." in p.name)]


def _log_steps(build: Path) -> int:
    log = build / "distill.work" / "log.jsonl"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _checkpoint_step(build: Path) -> int:
    pointer = build / "distill.work" / "checkpoints" / "resume.json"
    return json.loads(pointer.read_text())["step"] if pointer.exists() else 0


def _phase(build: Path, before: tuple[int, int]) -> str:
    """Where a kill landed, from what the run left behind compared with before it started."""
    work = build / "distill.work"
    if (build / "distill" / "stage.json").exists():
        return "after the rename (stages.json, report)"
    if (build / "distill.tmp" / "model").exists():
        return "publishing into distill.tmp/"
    if (work / "final").exists():
        return "final model written, not yet published"
    if (work / "final.tmp").exists():
        return "final export"
    if (_checkpoint_step(build), _log_steps(build)) > before:
        return "training steps and checkpoints"
    return "start-up (models, DeepSpeed, resuming)"


def _check_no_half_written_final(build: Path) -> None:
    """`distill/` is absent or complete: a valid record, a model that verifies."""
    final = build / "distill"
    if final.exists():
        record = read_record(final)
        assert record is not None and record.result.steps == STEPS
        verify_checkpoint(final / "model", "distill", scan=True)


def test_distillation_killed_20_times_ends_bit_identical(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("PDC_CACHE", str(cache))
    base = tmp_path / "base"
    spec = make_project(base, SPEC, "k")
    assert pdc_main(["compile", str(spec)]) == 0  # prune once; every copy below starts here

    compiled = base / "build" / "k"

    def fresh_build(name: str) -> Path:
        shutil.copytree(compiled, base / "build" / name)
        return base / "build" / name

    def distill(build: Path) -> Run:
        return Run(["run", "k.pds", "--stage", "distill", "--out", str(build)], base, cache)

    # A first run fills the caches (tokens, scan records, the JIT op); the second, timed, is
    # the uninterrupted reference: start-up, training, and what follows the last step.
    warm = distill(fresh_build("warm-up"))
    assert warm.wait_for("[pdc] distill: running") is not None and warm.finish() == 0, warm.output()
    ref = fresh_build("reference")
    run = distill(ref)
    started = run.wait_for("[pdc] distill: running")
    first = last = None
    while run.proc.poll() is None:
        steps = _log_steps(ref)
        first = first or (time.monotonic() if steps >= 1 else None)
        last = last or (time.monotonic() if steps >= STEPS else None)
        time.sleep(0.01)
    assert run.finish() == 0, run.output()
    ended = time.monotonic()
    start_up, training, tail = first - started, last - first, ended - last
    reference, ref_losses = _weights(ref), _losses(ref)
    warm_weights = _weights(base / "build" / "warm-up")  # two uninterrupted runs agree bit for bit
    assert warm_weights.keys() == reference.keys() and all(torch.equal(warm_weights[k], reference[k]) for k in reference)
    print(f"\nuninterrupted distill: start-up {start_up:.1f}s, {STEPS} steps {training:.1f}s, then {tail:.1f}s",
          flush=True)

    rng = random.Random(SEED)
    kills, chains, phases, cleanups, resumed, jit_locks = 0, 0, Counter(), 0, 0, 0
    build = None
    while True:
        if build is None:
            chains += 1
            assert chains <= KILLS, f"{chains} chains for {kills} kills: the runs finish before the kill moments"
            build = fresh_build(f"chain{chains}")
        before = (_checkpoint_step(build), _log_steps(build))
        remaining = start_up + training * (STEPS - before[0]) / STEPS + tail
        delay = rng.uniform(0, remaining)  # a moment of this run's expected remaining lifetime
        run = distill(build)
        started = run.wait_for("[pdc] distill: running")
        if started is not None and kills < KILLS:
            while run.proc.poll() is None and time.monotonic() < started + delay:
                time.sleep(0.005)
        cleanups += "[pdc] the last run was interrupted during distill" in run.output()
        jit_locks += "a lock of DeepSpeed's op build" in run.output()
        if run.proc.poll() is None and kills < KILLS:
            run.kill()
            kills += 1
            phases[_phase(build, before)] += 1
            assert "Traceback" not in run.output()
            _check_no_half_written_final(build)
            continue
        rc = run.finish()
        out = run.output()
        assert rc == 0, out
        resumed += read_record(build / "distill").result.resumed_from_step > 0
        assert not _temp_dirs(build), _temp_dirs(build)
        weights = _weights(build)
        assert weights.keys() == reference.keys()
        assert all(torch.equal(weights[k], reference[k]) for k in reference), \
            f"chain {chains}: resumed weights differ from the uninterrupted run"
        assert _losses(build) == ref_losses
        if kills >= KILLS:
            break
        build = None  # the run finished before the count: go on with a fresh copy

    print(f"\nkill soak: {kills} SIGKILLs over {chains} chain(s) (seed {SEED}); every chain ended "
          f"bit-identical to the uninterrupted run ({resumed} finished by resuming a checkpoint; {cleanups} "
          f"reruns cleaned up and named the interrupted stage, {jit_locks} removed a stale JIT build lock); kills by phase: {dict(sorted(phases.items()))}")
    assert kills == KILLS


def test_killed_during_prune_the_next_run_redoes_exactly_prune(tmp_path):
    """SIGKILL while the prune stage writes: no `prune/` appears half-written; the next run
    removes `prune.tmp/`, says so, skips the finished correction and redoes prune."""
    spec = make_project(tmp_path, WIDTH_SPEC.split("distill")[0], "w")
    cache = tmp_path / "cache"
    build = tmp_path / "build" / "w"
    run = Run(["compile", spec.name], tmp_path, cache)
    assert run.wait_for("[pdc] prune: running") is not None, run.output()
    deadline = time.monotonic() + 300
    while not (build / "prune.tmp" / "model").exists() and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(random.Random(SEED).uniform(0, 2))
    run.kill()
    assert (build / "correct" / "stage.json").exists()
    assert not (build / "prune").exists() and (build / "prune.tmp").exists()

    rerun = Run(["compile", spec.name], tmp_path, cache)
    assert rerun.finish() == 0, rerun.output()
    out = rerun.output()
    assert "[pdc] the last run was interrupted during prune: removed prune.tmp" in out
    assert "prune runs again" in out
    assert "[pdc] correct: up to date, skipped" in out and "[pdc] prune: running" in out
    assert not _temp_dirs(build)
    assert read_record(build / "prune").result.params_after > 0
