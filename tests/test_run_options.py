"""`pdc run`'s options for where training runs: usage mistakes exit 2 with one line, before any
stage runs; a hostfile gives the nodes and processes."""

from __future__ import annotations

import pytest

from pdc.cli import main as pdc_main
from tiny_builds import WIDTH_SPEC, make_project


@pytest.fixture(scope="module")
def spec(tmp_path_factory):
    return str(make_project(tmp_path_factory.mktemp("opts"), WIDTH_SPEC))


@pytest.mark.parametrize("args, message", [
    (["--nnodes", "2"], "--nnodes 2 needs --rdzv-endpoint HOST:PORT"),
    (["--nnodes", "2", "--rdzv-endpoint", "node0"], "--rdzv-endpoint 'node0': expected HOST:PORT"),
    (["--nproc-per-node", "0"], "--nnodes and --nproc-per-node must be at least 1"),
    (["--launcher", "slurm"], "--launcher slurm runs inside a Slurm allocation"),
    (["--launcher", "deepspeed"], "--launcher deepspeed needs --hostfile FILE"),
])
def test_usage_mistakes_exit_2_before_any_stage_runs(spec, args, message, capsys, monkeypatch):
    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    assert pdc_main(["run", spec, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pdc: error: {message}") and len(err.strip().splitlines()) == 1


def test_hostfile_options_must_agree(spec, tmp_path, capsys):
    (tmp_path / "hosts").write_text("localhost slots=2\n")
    assert pdc_main(["run", spec, "--hostfile", str(tmp_path / "hosts"), "--nnodes", "2"]) == 2
    assert "--hostfile gives the nodes and processes itself" in capsys.readouterr().err
    assert pdc_main(["run", spec, "--hostfile", str(tmp_path / "hosts"), "--nproc-per-node", "4"]) == 2
    assert "disagrees with the hostfile's slots=2" in capsys.readouterr().err
    (tmp_path / "bad").write_text("localhost gpus=2\n")
    assert pdc_main(["run", spec, "--hostfile", str(tmp_path / "bad")]) == 1
    assert "bad:1: expected `HOST slots=N`" in capsys.readouterr().err
