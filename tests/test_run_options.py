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


def _launch_of(argv, monkeypatch, env):
    from pdc.cli import _launch, build_parser

    for key in ("SLURM_JOB_ID", "SLURM_NNODES", "SLURM_JOB_NUM_NODES", "SLURM_GPUS_ON_NODE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["run", "x.pds", *argv])
    args.nproc_per_node_given, args.nnodes_given = args.nproc_per_node is not None, args.nnodes is not None
    args.nproc_per_node, args.nnodes = args.nproc_per_node or 1, args.nnodes or 1
    return _launch(args)


def test_the_slurm_launcher_reads_the_allocation(monkeypatch):
    """Nodes from SLURM_NNODES, processes per node from SLURM_GPUS_ON_NODE; options that repeat
    them are fine, options that contradict them are refused in one line."""
    alloc = {"SLURM_JOB_ID": "7", "SLURM_NNODES": "4", "SLURM_GPUS_ON_NODE": "8"}
    launch = _launch_of(["--launcher", "slurm"], monkeypatch, alloc)
    assert (launch.nnodes, launch.nproc_per_node, launch.world_size, launch.launcher) == (4, 8, 32, "slurm")
    assert _launch_of(["--launcher", "slurm", "--nnodes", "4", "--nproc-per-node", "8"], monkeypatch, alloc) == launch
    assert _launch_of(["--launcher", "slurm", "--nnodes", "2"], monkeypatch, alloc) == \
        "--nnodes 2 disagrees with the Slurm allocation's 4 node(s) (SLURM_NNODES)"
    assert _launch_of(["--launcher", "slurm", "--nproc-per-node", "2"], monkeypatch, alloc).startswith(
        "--nproc-per-node 2 disagrees with the allocation's 8 GPU(s)")
    # a CPU allocation has no GPUs to count: --nproc-per-node (default 1) gives the processes
    cpu = _launch_of(["--launcher", "slurm", "--nproc-per-node", "2"], monkeypatch,
                     {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3"})
    assert (cpu.nnodes, cpu.nproc_per_node) == (3, 2)
    assert _launch_of(["--launcher", "slurm"], monkeypatch, {"SLURM_JOB_ID": "7", "SLURM_NNODES": "two"}).startswith(
        "cannot read the Slurm allocation")
