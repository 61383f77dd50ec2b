"""Every bad input, through the commands a user runs: `pdc compile` and `pdc run` on tiny
projects, each input damaged after its producer wrote it (tests/bad_inputs.py). Each must end
with exit code 1 and exactly one `pdc: error: <stage>: ...` line naming the file, no traceback,
and the build directory as it was: nothing created on a fresh project, a byte-identical tree
when a previous build exists. Slow (a few minutes): the default run keeps one checkpoint fault
and one corpus fault (tests/test_inputs_verify.py)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from bad_inputs import (
    CHECKPOINT_FAULTS,
    DATA_FAULTS,
    FEW_CALIBRATION_SAMPLES,
    SHORTER_THAN_A_SEQUENCE,
    WEIGHTS,
    Fault,
    swap_tokenizer,
    tree_digest,
)
from pdc.cli import main as pdc_main
from tiny_builds import PRUNE_SPEC, WIDTH_SPEC, make_project

pytestmark = pytest.mark.slow

COMMANDS = ("compile", "run")
FIRST_STAGE = "correct"  # the first stage of WIDTH_SPEC reads both the source and the corpus


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PDC_CACHE", str(tmp_path / "cache"))


def _target(root: Path, fault: Fault) -> Path:
    return root / ("tiny" if fault.target == "model" else "corpus.jsonl")


def _assert_error_line(err: str, stage: str, expect: str) -> str:
    errors = [line for line in err.splitlines() if line.startswith("pdc: error:")]
    assert len(errors) == 1, err
    assert errors[0].startswith(f"pdc: error: {stage}: "), errors[0]
    assert re.search(expect, errors[0]), errors[0]
    return errors[0]


def _fails_with_one_line(capsys, argv: list[str], stage: str, expect: str) -> str:
    capsys.readouterr()
    rc = pdc_main(argv)
    captured = capsys.readouterr()
    assert rc == 1, captured.out[-2000:] + captured.err[-2000:]
    assert "Traceback" not in captured.err + captured.out
    return _assert_error_line(captured.err, stage, expect)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS + DATA_FAULTS, ids=lambda f: f"{f.target}: {f.name}")
def test_bad_input_on_a_fresh_project_creates_nothing(fault, command, tmp_path, capsys):
    spec = make_project(tmp_path, WIDTH_SPEC)
    fault.damage(_target(tmp_path, fault))
    line = _fails_with_one_line(capsys, [command, str(spec)], FIRST_STAGE, fault.expect)
    assert str(_target(tmp_path, fault)) in line
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("fault", CHECKPOINT_FAULTS + DATA_FAULTS, ids=lambda f: f"{f.target}: {f.name}")
def test_bad_input_leaves_a_previous_build_untouched(fault, command, width_build, tmp_path, capsys):
    root = tmp_path / "project"
    shutil.copytree(width_build.parent.parent, root)
    before = tree_digest(root / "build")
    fault.damage(_target(root, fault))
    _fails_with_one_line(capsys, [command, str(root / "tiny.pds")], FIRST_STAGE, fault.expect)
    assert tree_digest(root / "build") == before


def _truncate(model_dir: Path) -> None:
    f = model_dir / WEIGHTS
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _nan(model_dir: Path) -> None:
    next(f for f in CHECKPOINT_FAULTS if f.name == "NaN in a weight").damage(model_dir)


# A stage output damaged after its stage finished; the next stage that reads it must stop.
STAGE_OUTPUT_FAULTS = [
    ("pruned student truncated", "prune", _truncate,
     r"prune/model/model\.safetensors: truncated.*\[written by stage prune: delete .*/prune and run again\]"),
    ("pruned student with NaN", "prune", _nan, r"prune/model/model\.safetensors: tensor .* holds 1 NaN"),
    ("corrected teacher truncated", "correct", _truncate,
     r"correct/model/model\.safetensors: truncated.*\[written by stage correct"),
    ("student tokenizer from another model", "prune", swap_tokenizer,
     r"the student's tokenizer \(.*/prune/model, [\d,]+ tokens\) differs from the teacher's"),
]


@pytest.mark.parametrize("case", STAGE_OUTPUT_FAULTS, ids=lambda c: c[0])
def test_bad_stage_output_stops_the_stage_that_reads_it(case, width_build, capsys):
    """Distillation reads the pruned student and the corrected teacher of an earlier build
    (the spec's distill settings changed, so distill runs again and prune does not)."""
    name, stage, damage, expect = case
    project = width_build.parent.parent
    slug = re.sub(r"\W+", "-", name)
    out = project / "build" / slug
    shutil.copytree(width_build, out)
    spec = project / f"{slug}.pds"
    spec.write_text(WIDTH_SPEC.replace("on corpus { steps=3", "on corpus { steps=4"))  # distill runs again
    damage(out / stage / "model")
    before = tree_digest(out)
    _fails_with_one_line(capsys, ["run", str(spec), "--out", str(out)], "distill", expect)
    assert tree_digest(out) == before


@pytest.mark.parametrize("command", COMMANDS)
def test_text_shorter_than_one_sequence_is_refused(command, tmp_path, capsys):
    """Not one sequence of seq_len tokens: refused with how many tokens were found and how many
    a sequence needs, before anything is written."""
    spec = make_project(tmp_path, PRUNE_SPEC)
    SHORTER_THAN_A_SEQUENCE.damage(tmp_path / "corpus.jsonl")
    _fails_with_one_line(capsys, [command, str(spec)], "prune", SHORTER_THAN_A_SEQUENCE.expect)
    assert not (tmp_path / "build").exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_fewer_calibration_samples_than_asked_is_refused_or_repeated_in_the_report(command, tmp_path, capsys):
    """8 calibration samples asked, about 2 available: either refused in one line saying how
    many were found and asked (nothing written), or done with a warning saying so that the
    report repeats; never silently with fewer."""
    spec = make_project(tmp_path, PRUNE_SPEC)
    FEW_CALIBRATION_SAMPLES.damage(tmp_path / "corpus.jsonl")
    capsys.readouterr()
    rc = pdc_main([command, str(spec)])
    captured = capsys.readouterr()
    printed = captured.out + captured.err
    assert "Traceback" not in printed
    if rc == 1:
        _assert_error_line(captured.err, "prune", FEW_CALIBRATION_SAMPLES.expect)
        assert not (tmp_path / "build").exists()
        return
    assert rc == 0
    warnings = [line for line in printed.splitlines() if "warning" in line.lower()]
    assert any(re.search(FEW_CALIBRATION_SAMPLES.expect, w) for w in warnings), warnings
    report = (tmp_path / "build" / "tiny" / "report.md").read_text()
    assert re.search(FEW_CALIBRATION_SAMPLES.expect, report)
