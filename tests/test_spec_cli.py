"""The `pdc` console script: exit codes and output for the commands this module implements
(compile --dry-run, fmt) and for bad input (always a report, never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pdc.cli import main

REPO = Path(__file__).resolve().parents[1]
WIDTH = REPO / "specs" / "llama-3.1-8b-to-4b-width.pds"


def test_dry_run_table(capsys):
    assert main(["compile", str(WIDTH), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "correct -> prune -> distill -> evaluate" in out
    assert "4.5B total (4,512,746,496)" in out and "3.7B non-embedding" in out
    assert "9,961 steps" in out  # ceil(94e9 / (1152 * 8192))


def test_dry_run_json_and_out(tmp_path, capsys):
    assert main(["compile", str(WIDTH), "--dry-run", "--json", "--out", str(tmp_path / "b")]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["final"]["params_total"] == 4_512_746_496
    assert json.loads((tmp_path / "b" / "plan.json").read_text()) == plan
    assert not [p for p in (tmp_path / "b").iterdir() if p.name != "plan.json"]  # no temp leftovers


@pytest.mark.parametrize("setup", ["missing", "directory", "binary"])
def test_unreadable_spec_is_one_line_exit_2(tmp_path, capsys, setup):
    path = tmp_path / "s.pds"
    if setup == "directory":
        path.mkdir()
    elif setup == "binary":
        path.write_bytes(b'model m = hf("\xff\xfe")\n')
    assert main(["compile", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err
    if setup != "binary":
        assert len(err.strip().splitlines()) == 1


def test_spec_error_exit_2_with_report(capsys):
    bad = REPO / "tests" / "diagnostics" / "hidden_too_large.pds"
    assert main(["compile", str(bad), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:5:3: error: hidden=8192 is larger than the source (4096)" in err
    assert "note: model 'teacher' declared here" in err
    assert "^" in err


def test_fmt_print_write_check(tmp_path, capsys):
    path = tmp_path / "s.pds"
    path.write_text('model   m=builtin("smollm2-135m")\nprune width {mlp=768   importance=magnitude}\n')
    assert main(["fmt", str(path), "--check"]) == 1
    capsys.readouterr()
    assert main(["fmt", str(path)]) == 0
    printed = capsys.readouterr().out
    assert printed == 'model m = builtin("smollm2-135m")\nprune width { mlp=768 importance=magnitude }\n'
    assert main(["fmt", str(path), "--write"]) == 0
    assert path.read_text() == printed
    assert main(["fmt", str(path), "--check"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.pds"]


def test_fmt_syntax_error_exit_2(tmp_path, capsys):
    path = tmp_path / "s.pds"
    path.write_text("prune width { hidden 3 }\n")
    assert main(["fmt", str(path), "--write"]) == 2
    assert "1:22: error: unexpected '3'" in capsys.readouterr().err
    assert path.read_text() == "prune width { hidden 3 }\n"  # untouched on failure


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    with pytest.raises(SystemExit) as info:
        main(["compile"])
    assert info.value.code == 2


def test_runtime_error_from_runner_exit_1(monkeypatch, capsys):
    """Commands delegated to the runner: a PdcError prints `pdc: error: ...` and exits 1; the
    exit code of `pdc check` is passed through."""
    from pdc.errors import PdcError
    from pdc.runner import build, check

    def fail(spec, out_dir, stage=None, **options):
        raise PdcError("no GPU here", "distill")

    monkeypatch.setattr(build, "run_spec", fail)
    monkeypatch.setattr(check, "check_spec", lambda spec, lock, **options: 3)
    assert main(["run", str(WIDTH), "--stage", "distill"]) == 1
    assert capsys.readouterr().err.strip() == "pdc: error: distill: no GPU here"
    assert main(["check", str(WIDTH)]) == 3

def test_console_script_version_and_help():
    """The installed entry point works as a subprocess (exit codes included)."""
    exe = [sys.executable, "-m", "pdc.cli"]
    out = subprocess.run(exe + ["--version"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.startswith("pdc ")
    for cmd in ("compile", "fmt", "run", "check", "bench", "setup"):
        h = subprocess.run(exe + [cmd, "--help"], capture_output=True, text=True, timeout=60)
        assert h.returncode == 0 and "usage: pdc" in h.stdout
    missing = subprocess.run(exe + ["compile", "/no/such.pds", "--dry-run"], capture_output=True, text=True,
                             timeout=60)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "pdc: error: cannot read spec '/no/such.pds': no such file"
