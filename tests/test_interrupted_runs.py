"""Interrupted and failed runs leave nothing half-made, and the next run redoes exactly the
stage that stopped. (SIGKILL at random moments is soaked in tests/test_kill_soak.py.)"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from pdc.cli import main as pdc_main
from pdc.plan.results import read_record
from pdc.stages.train.jit_locks import remove_stale_jit_locks
from tiny_builds import WIDTH_SPEC


def test_a_failed_stage_leaves_no_staging_dir_and_only_it_runs_again(width_build, capsys):
    """evaluate fails inside lm-eval (its task's data file is damaged): one line naming the
    stage, the task folder and the cause; no evaluate.tmp/; stages.json and the report say it
    failed and why. With the file repaired, the next run runs evaluate alone."""
    project = width_build.parent.parent
    out = project / "build" / "failing-evaluate"
    shutil.copytree(width_build, out)
    tasks = project / "tasks-damaged"
    shutil.copytree(project / "tasks", tasks)
    spec = project / "failing_evaluate.pds"
    spec.write_text(WIDTH_SPEC.replace('tasks_dir="tasks"', 'tasks_dir="tasks-damaged"'))
    data = tasks / "tiny_mc.jsonl"
    good = data.read_text()
    data.write_text(good + '{"question": "cut off by a full disk", "choi\n')

    capsys.readouterr()
    assert pdc_main(["run", str(spec), "--out", str(out)]) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("pdc: error:")]
    assert len(err) == 1
    assert err[0].startswith(f"pdc: error: evaluate: lm-eval failed on tiny_mc (tasks from {tasks}): ")
    assert not err[0].endswith(": ")
    assert not list(out.glob("*.tmp"))
    status = json.loads((out / "stages.json").read_text())
    assert status["evaluate"]["status"] == "failed" and "lm-eval failed" in status["evaluate"]["message"]
    assert "failed: lm-eval failed on tiny_mc" in (out / "report.md").read_text()

    data.write_text(good)
    assert pdc_main(["run", str(spec), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("up to date, skipped") == 3 and "[pdc] evaluate: running" in printed
    assert read_record(out / "evaluate").result.models
    assert json.loads((out / "stages.json").read_text())["evaluate"]["status"] == "done"


def test_a_second_run_on_the_same_build_is_refused(width_build, tmp_path, capsys):
    """Two writers on one build directory would delete each other's staging: the second is
    refused in one line while the first holds the build's lock."""
    from pdc.runner.build_status import BUILD_LOCK

    project = width_build.parent.parent
    out = project / "build" / "busy"
    shutil.copytree(width_build, out)
    spec = project / "busy.pds"
    spec.write_text(WIDTH_SPEC.replace("steps=3", "steps=4"))
    assert (out / BUILD_LOCK).exists()  # left by the run that made the build; held by nobody
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); fcntl.flock(fd, fcntl.LOCK_EX); "
        "os.pwrite(fd, b'4242\\n', 0); print('locked', flush=True); time.sleep(60)"), str(out / BUILD_LOCK)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        capsys.readouterr()
        assert pdc_main(["run", str(spec), "--out", str(out)]) == 1
        err = capsys.readouterr().err
        assert f"pdc: error: another pdc run is writing into {out} (pid 4242)" in err
    finally:
        holder.kill()
        holder.wait()


def test_stale_jit_build_lock_is_removed_and_a_held_one_kept(tmp_path):
    """torch's JIT extension lock (which DeepSpeed takes at every start) left by a killed
    process is removed; one a live process holds open is kept."""
    lock = tmp_path / "py311_cpu" / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True)
    holder = subprocess.Popen([sys.executable, "-c", (
        "import os, sys, time; os.open(sys.argv[1], os.O_CREAT | os.O_EXCL); print('held', flush=True); "
        "time.sleep(60)"), str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert remove_stale_jit_locks(tmp_path) == [] and lock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert lock.exists()  # the killed holder left it behind
    assert remove_stale_jit_locks(tmp_path) == [lock] and not lock.exists()
