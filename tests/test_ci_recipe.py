"""The CI recipe of docs/ci.md, run as written on a tiny model: a fresh git repository (with pdc's
own .gitignore) compiles a spec with teacher correction, commits the lock where the docs say and
publishes the corrected teacher under the lock's hash; a fresh clone (no build directory) checks
it. Then a tampered lock fails naming the axis and layer, and a changed prune input fails naming
the input hash.

`pdc` lines run in this process (`pdc.cli.main`, what the console script calls); every other line
runs in bash. `NAME=$(pdc ...)` and `export NAME=value` set variables for the lines after them.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import save_tiny_checkpoint
from pdc.cli import main as pdc_main
from tiny_builds import write_corpus

ROOT = Path(__file__).resolve().parents[1]
SPEC = """\
model teacher = dir("../models/tiny")
data corpus = jsonl("../data/corpus.jsonl")

correct teacher on corpus { steps=2 lr=1e-4 warmup=1 global_batch=4 micro_batch=2 seq_len=32 }
prune width { hidden=48 mlp=64 importance=activation(samples=8, seq_len=32) }
"""


def recipe_blocks() -> list[str]:
    """The ```sh blocks of docs/ci.md's "Recipe" section: (workstation, CI)."""
    text = (ROOT / "docs" / "ci.md").read_text()
    section = text.split("### Recipe", 1)[1].split("\n### ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 2, "docs/ci.md's recipe must have a workstation block and a CI block"
    return blocks


def run_block(block: str, cwd: Path, env: dict) -> tuple[int, str]:
    """Run `block` line by line like `bash -e`; returns (exit status, everything printed)."""
    out = io.StringIO()
    for line in block.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        assign = re.fullmatch(r"(?:export\s+)?([A-Z_]+)=\$\((pdc .*)\)", line)
        if assign or line.startswith("pdc "):
            command = assign.group(2) if assign else line
            printed = io.StringIO()
            with contextlib.chdir(cwd), contextlib.redirect_stdout(printed):
                status = pdc_main(shlex.split(_expand(command, env))[1:])
            out.write(printed.getvalue())
            if assign:
                env[assign.group(1)] = printed.getvalue().strip()
        elif m := re.fullmatch(r"export\s+([A-Z_]+)=(\S+)", line):
            env[m.group(1)] = _expand(m.group(2), env)
            status = 0
        else:
            done = subprocess.run(["bash", "-c", line], cwd=cwd, env=env, capture_output=True, text=True)
            out.write(done.stdout + done.stderr)
            status = done.returncode
        if status:
            return status, out.getvalue()
    return 0, out.getvalue()


def _expand(text: str, env: dict) -> str:
    return re.sub(r"\$([A-Z_]+)", lambda m: env[m.group(1)], text)


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, text=True).stdout


def test_documented_ci_recipe_end_to_end(tmp_path, capsys):
    import os

    if shutil.which("git") is None:
        pytest.fail("this test needs git on PATH", pytrace=False)
    work, store = tmp_path / "work", tmp_path / "store"
    save_tiny_checkpoint(work / "models" / "tiny", "llama")
    (work / "data").mkdir()
    write_corpus(work / "data" / "corpus.jsonl")
    (work / "specs").mkdir()
    (work / "specs" / "my_model.pds").write_text(SPEC)
    shutil.copy(ROOT / ".gitignore", work / ".gitignore")
    _git(work, "init", "-q")
    _git(work, "config", "user.email", "ci@example.invalid")
    _git(work, "config", "user.name", "ci")
    _git(work, "add", ".gitignore", "models", "data")
    _git(work, "commit", "-q", "-m", "sources")
    env = {**os.environ, "PDC_ARTIFACTS": str(store), "GIT_TERMINAL_PROMPT": "0"}
    workstation, ci = recipe_blocks()

    status, out = run_block(workstation, work, env)
    assert status == 0, out
    assert "specs/my_model.prune.lock.json" in _git(work, "ls-files").split()
    assert (work / "specs" / "build").is_dir() and not _git(work, "status", "--porcelain")
    key = env["KEY"]
    assert (store / key / "config.json").exists()

    clone = tmp_path / "ci"
    _git(tmp_path, "clone", "-q", str(work), str(clone))
    assert not (clone / "specs" / "build").exists()
    status, out = run_block(ci, clone, dict(env))
    assert status == 0 and "lock matches" in out, out
    with contextlib.chdir(clone):  # without the artifact: one line naming what is missing and its hash
        assert pdc_main(["check", "specs/my_model.pds"]) == 1
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("pdc: error: check: prune stage 'prune' reads the model of stage 'correct'")
    assert f"sha256 {env['KEY']}" in error and "--prune-input DIR" in error

    lock_path = clone / "specs" / "my_model.prune.lock.json"
    original = lock_path.read_text()
    mlp = re.search(r'"2": \{\n\s+"heads": \[.*?\],\n\s+"kv_heads": \[.*?\],\n\s+"mlp": \[(\d+)', original)
    kept = {int(x) for x in re.search(r'"2": \{.*?"mlp": \[([\d, ]+)\]', original, flags=re.S).group(1).split(", ")}
    replacement = next(i for i in range(96) if i not in kept)
    lock_path.write_text(original[:mlp.start(1)] + str(replacement) + original[mlp.end(1):])
    status, out = run_block(ci, clone, dict(env))
    assert status == 1 and "layer 2 mlp: kept indices differ" in out, out

    lock_path.write_text(original)
    from safetensors.torch import load_file, save_file

    weights = store / key / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.0.mlp.down_proj.weight"] += 0.01
    save_file(tensors, weights, metadata={"format": "pt"})
    status, out = run_block(ci, clone, dict(env))
    assert status == 1 and f"prune input (sha256): {key[:12]} -> " in out, out
